from collections.abc import Callable

def write_frame(fd: int, flags: int, data: bytes, /) -> int: ...
def send_frame(fd: int, flags: int, data: bytes, /) -> int: ...
def plain_run(
    data: bytes | bytearray | memoryview,
    pos: int,
    stop: int,
    limit: int,
    append: Callable[[tuple[int, bytes]], object],
    /,
) -> int: ...
def wait_frame(
    fd: int,
    buf: bytearray,
    deadline: float | None,
    spin: float,
    limit: int,
    wake: int = -1,
    mode: int = 0,
    /,
) -> tuple[int, bytes] | int | None: ...

class SmallWriter:
    def __init__(
        self,
        fd: int,
        core: object,
        lock: object,
        limit: int,
        on_part: Callable[[int, bytes, int], int],
        sock: bool = False,
    ) -> None: ...
    def __call__(self, data: object, framed: bool = False, /) -> bool | int: ...
    def counts(self) -> tuple[int, int, int]: ...
