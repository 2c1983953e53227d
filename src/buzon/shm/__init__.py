"""Shared memory: named segments and the rings in them (the C core is :mod:`buzon._core`).

See :mod:`buzon.shm._segment` for naming, ownership and cleaning, and docs/shm.md for
the byte layout and the crash-safety argument.
"""

from __future__ import annotations

from ._bounded import BoundedBuffer
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
