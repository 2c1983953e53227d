from collections.abc import Callable
from typing import Any

class RvStream:
    number: int
    serial: int
    n: int
    err: int
    def __init__(
        self,
        rfd: int,
        wfd: int,
        core: object,
        lock: object,
        limit: int,
        on_part: Callable[[bytes | None, int, bytes, int], int],
        sock: bool = False,
    ) -> None: ...
    def send(
        self, data: bytes, whole: bool, deadline: float | None, spin: float, wake: int, /
    ) -> int: ...
    def take(self) -> tuple[int, bytes] | None: ...
    def recv(
        self, deadline: float | None, spin: float, wake: int, /
    ) -> tuple[int, bytes] | int: ...
    def confirm(self) -> bool: ...
    def counts(self) -> tuple[int, int, int, int, int, int, int]: ...

def at_exit() -> None: ...
def confirm_all() -> None: ...
def confirm_delay(seconds: float = ..., /) -> float: ...

class RvCall:
    def __init__(
        self,
        channel: object,
        rv: RvStream,
        fallback: Callable[..., object],
        tail: Callable[..., object],
        spin: float,
        recv: bool,
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
