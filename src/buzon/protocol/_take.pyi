"""Type stubs of the C extension protocol/_take.c (recv_bytes and send_bytes in C)."""

from typing import Any

class Take:
    def __init__(
        self,
        channel: Any,
        core: Any,
        lock: Any,
        kind: int,
        wait: Any,
        fallback: Any,
        rest: Any,
        failed: Any,
        max_frame: int,
    ) -> None: ...
    def __call__(self, timeout: float | None = None) -> bytes: ...
    def counts(self) -> tuple[int, int]: ...

class Put:
    def __init__(self, channel: Any, core: Any, fallback: Any, partial: Any) -> None: ...
    def __call__(self, data: Any, timeout: float | None = None, *, priority: int = 0) -> None: ...

class RingTake:
    def __init__(self, channel: Any, core: Any, fallback: Any, rest: Any) -> None: ...
    def __call__(self, timeout: float | None = None) -> bytes: ...
