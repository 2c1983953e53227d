from collections.abc import Sequence

_Buffer = bytes | bytearray | memoryview

def piece(
    flags: int, bufs: Sequence[_Buffer] | bytes, pid: int, nonce: int, seq: int, /
) -> bytes: ...
def pack(
    messages: Sequence[Sequence[_Buffer] | bytes],
    start: int,
    pid: int,
    nonce: int,
    seq: int,
    limit: int,
    /,
) -> tuple[bytes, int, int]: ...
def scan(
    buf: bytearray | memoryview,
    start: int,
    end: int,
    dst: memoryview,
    filled: int,
    max_frame: int,
    codecs: int,
    /,
) -> tuple[int, int]: ...
