"""Shared memory: named segments and the rings in them (the C core is :mod:`buzon._core`).

See :mod:`buzon.shm._segment` for naming, ownership and cleaning, and docs/shm.md for
the byte layout and the crash-safety argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._segment import (
    SHM_DIR,
    SegmentInfo,
    attach_ring,
    clean_segments,
    create_ring,
    list_segments,
    list_unnamed,
    new_segment_name,
    remove_segment,
    segment_exists,
)
from ._shared import SharedArray, SharedLock, SharedValue, shared_array, shared_value

if TYPE_CHECKING:
    from ._bounded import BoundedBuffer

__all__ = [
    "SHM_DIR",
    "BoundedBuffer",
    "SegmentInfo",
    "attach_ring",
    "clean_segments",
    "create_ring",
    "list_segments",
    "list_unnamed",
    "new_segment_name",
    "remove_segment",
    "segment_exists",
    "SharedArray",
    "SharedLock",
    "SharedValue",
    "shared_array",
    "shared_value",
]


def __getattr__(name: str) -> Any:
    # BoundedBuffer is a mailbox (buzon._mailbox, which imports this package): loaded
    # on first use, so either may be imported first
    if name == "BoundedBuffer":
        from ._bounded import BoundedBuffer

        return BoundedBuffer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
