"""Type stubs of the C extension protocol/_pop.c (ChannelCore._pop in C)."""

from collections import deque
from typing import Any

def pop(core: Any, frames: deque[Any]) -> Any: ...

class Head:
    def __init__(
        self, channel: Any, core: Any, lock: Any, fallback: Any, *, bound: bool = False
    ) -> None: ...
    def __call__(self, timeout: float | None = None) -> bytes: ...
