from collections.abc import Callable

SOCKET: int
MQ: int
FIFO: int
KICK: bytes

class Receiver:
    def __init__(
        self, fd: int, kind: int, size: int, connected: bool = True, counts_drops: bool = False
    ) -> None: ...
    def recv(self) -> bytes | None: ...
    def wait(
        self, deadline: float | None, spin: float, limit: int, wake: int = -1, /
    ) -> tuple[int, bytes] | bytes | None: ...
    def close(self) -> None: ...
    @property
    def sender(self) -> bytes | None: ...
    @property
    def priority(self) -> int: ...
    @property
    def overflows(self) -> int: ...
    @property
    def truncated(self) -> int: ...
    blocks: bool
    @property
    def in_block(self) -> bool: ...

class MessageSender:
    def __init__(
        self,
        fd: int,
        kind: int,
        core: object,
        lock: object,
        limit: int,
        receiver: Receiver | None = None,
        writer: object = None,
        piece: object = None,
    ) -> None: ...
    def __call__(self, data: object, /) -> bool: ...
    def counts(self) -> tuple[int, int, int]: ...

def wait_fifo(
    fd: int,
    buf: bytearray,
    deadline: float | None,
    spin: float,
    limit: int,
    wake: int,
    scan: Callable[..., tuple[int, int]],
    max_frame: int,
    codecs: int,
    bfd: int = -1,
    /,
) -> tuple[int, bytes] | tuple[int, int, int] | None: ...
