from collections.abc import Callable
from typing import Any

from .credit import SendFlow

class ReceiptCore:
    _channel: Any
    _flow: SendFlow
    number: int
    def __init__(self, channel: Any, flow: SendFlow, number: int) -> None: ...

class ReceiptWriter:
    def __init__(
        self,
        fd: int,
        core: object,
        lock: object,
        make_flow: Callable[[], object],
        channel: object,
        receipt_type: type[ReceiptCore],
        on_part: Callable[[int, bytes, int], int],
        reap: Callable[[], object],
        fallback: Callable[..., Any],
        finish: Callable[[int, int], Any],
        sock: bool = False,
    ) -> None: ...
    def __call__(self, data: object, timeout: float | None = None, *, priority: int = 0) -> Any: ...
    def counts(self) -> tuple[int, int, int]: ...
