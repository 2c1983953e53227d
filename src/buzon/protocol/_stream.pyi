from collections.abc import Callable

def write_frame(fd: int, flags: int, data: bytes, /) -> int: ...
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
    /,
) -> tuple[int, bytes] | int | None: ...
