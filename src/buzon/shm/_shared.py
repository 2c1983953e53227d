"""Shared arrays and values with a process-shared lock that survives its holder dying.

Theory of operation
-------------------
Each object is a :class:`buzon._core.Block`: the data first (so
``multiprocessing.shared_memory.SharedMemory(segment_name).buf[:nbytes]`` is exactly
the array's bytes), then a header page with the participant slots, the lock word and up
to 1 KiB of metadata (JSON: kind, dtype or format, shape). The lock is a futex word
holding its owner's token; a waiter that finds the owner dead (its slot's OFD lock is
gone: the kernel released it) takes the lock over, and ``acquire`` then returns True so
the new holder knows the data may be half-updated.

Names work as for :class:`~buzon.BoundedBuffer`: ``NAME.array`` / ``NAME.value`` in the
private runtime dir hold the unguessable segment name. The metadata is untrusted on
attach: only plain dtypes (no Python objects), at most 32 dimensions, and a byte size
that matches the segment. Both pass to child processes through ``multiprocessing``
by their segment's name (:mod:`buzon._reduction`); using one after ``close`` raises
:class:`~buzon.errors.ChannelClosed`.
"""

from __future__ import annotations

import abc
import json
import math
import struct
from types import TracebackType
from typing import Any, Self

from .. import _core, _reduction
from ..errors import ChannelClosed, NoSuchEndpoint, ProtocolError, from_oserror
from ._names import lookup, name_path, publish, unpublish
from ._segment import new_segment_name, remove_segment

__all__ = ["SharedArray", "SharedLock", "SharedValue", "shared_array", "shared_value"]

_MAX_DIMS = 32
_VALUE_TYPES = {int: "q", float: "d", bool: "?"}


class SharedLock:
    """A process-shared lock; ``acquire`` returns True if the last holder died holding it.

    It excludes every holder from every other: other processes, other handles on the
    same object in this process, and the threads of this process that share this
    handle (a thread waits for another exactly as for another process). Like
    :class:`threading.Lock` it is not reentrant (``acquire`` by the thread that holds
    it raises :class:`RuntimeError` instead of waiting forever) and any thread of the
    holding process may ``release`` it. It is taken over only when the holding
    *process* dies: a thread that exits holding it keeps it held, as with
    :class:`threading.Lock`. ``acquire(timeout)`` raises :class:`buzon.Timeout`.
    """

    def __init__(self, block: _core.Block) -> None:
        self._block = block
        self.recovered = False

    def acquire(self, timeout: float | None = None) -> bool:
        self.recovered = self._block.lock(timeout)
        return self.recovered

    def release(self) -> None:
        self._block.unlock()

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _open_block(
    name: str, suffix: str, size: int | None, meta: dict[str, Any] | None
) -> tuple[_core.Block, dict[str, Any], bool]:
    """Attach the block ``name`` names, or create it (when ``size`` is given)."""
    path = name_path(name, suffix)
    for _ in range(8):
        segment = lookup(path)
        if segment is not None:
            try:
                block = _core.Block.attach("/" + segment)
            except FileNotFoundError:
                unpublish(path, segment)  # its segment is gone: a stale name
                continue
            except OSError as exc:
                raise from_oserror(exc, f"attaching {name}") from exc
            try:
                got = _parse_meta(block.meta())
            except BaseException:
                block.close()
                raise
            return block, got, False
        if size is None or meta is None:
            raise NoSuchEndpoint(f"no shared object named {name!r}")
        segment = new_segment_name()
        try:
            block = _core.Block.create("/" + segment, size, json.dumps(meta).encode())
        except OSError as exc:
            raise from_oserror(exc, f"creating {name}") from exc
        if publish(path, segment):
            return block, meta, True
        block.close()
        remove_segment(segment)
    raise NoSuchEndpoint(f"shared object {name!r} keeps changing; try again")


def _attach_block(name: str, segment: str) -> tuple[_core.Block, dict[str, Any]]:
    """Attach ``segment`` directly (a child process given the object by its parent)."""
    try:
        block = _core.Block.attach("/" + segment)
    except FileNotFoundError:
        raise NoSuchEndpoint(f"shared object {name!r} was removed (segment {segment})") from None
    except OSError as exc:
        raise from_oserror(exc, f"attaching {name}") from exc
    try:
        return block, _parse_meta(block.meta())
    except BaseException:
        block.close()
        raise


def _parse_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw.rstrip(b"\0").decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("the shared object's metadata is not valid") from None
    if not isinstance(meta, dict):
        raise ProtocolError("the shared object's metadata is not valid")
    return meta


class _Shared(abc.ABC):
    _block: _core.Block
    name: str
    path: str
    created: bool

    @classmethod
    def _attach_segment(cls, name: str, path: str, segment: str) -> Self:
        """The object ``name`` (name file ``path``) by its segment (a child's copy)."""
        self = cls.__new__(cls)
        self.name = name
        self.path = path
        self._block, meta = _attach_block(name, segment)
        self.created = False
        self._setup(meta)
        return self

    @abc.abstractmethod
    def _setup(self, meta: dict[str, Any]) -> None:
        """Check the segment's metadata and build the view of it (each kind its own)."""

    @property
    def segment_name(self) -> str:
        """The segment's name for ``multiprocessing.shared_memory.SharedMemory(name)``."""
        return self._block.name.lstrip("/")

    def remove(self) -> None:
        """Delete the name and the segment; attached processes keep their mapping."""
        unpublish(self.path, self.segment_name)
        remove_segment(self.segment_name)


class SharedArray(_Shared):
    """A numpy array in shared memory: ``.array``, ``.lock``, ``.segment_name``."""

    def __init__(self, name: str, shape: tuple[int, ...] | int | None, dtype: Any) -> None:
        _reduction.register()  # it may be handed to a child process
        import numpy as np

        meta = None
        size = None
        if shape is not None:
            shp = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
            dt = np.dtype(dtype if dtype is not None else "f8")
            if dt.hasobject:
                raise ValueError("a shared array cannot hold Python objects")
            size = math.prod(shp) * dt.itemsize
            meta = {"kind": "array", "dtype": dt.str, "shape": list(shp)}
        self.name = name
        self.path = name_path(name, ".array")
        self._block, meta, self.created = _open_block(name, ".array", size, meta)
        self._setup(meta)

    def _setup(self, meta: dict[str, Any]) -> None:
        import numpy as np

        try:
            dt, shp = _check_array_meta(meta, self._block.size)
            self._array: Any = np.ndarray(shp, dt, buffer=memoryview(self._block))
        except BaseException:
            self._block.close()
            raise
        self.lock = SharedLock(self._block)

    @property
    def array(self) -> Any:
        """The numpy array over the segment; :class:`~buzon.errors.ChannelClosed` after
        close."""
        arr = self._array
        if arr is None:
            raise ChannelClosed(f"shared array {self.name!r} is closed")
        return arr

    def close(self) -> None:
        """Unmap (drop every other reference to ``.array`` first)."""
        self._array = None
        self._block.close()

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        arr = self._array
        what = f"{arr.dtype} {arr.shape}" if arr is not None else "closed"
        return f"<SharedArray {self.name!r} {what}>"


def _check_array_meta(meta: dict[str, Any], size: int) -> tuple[Any, tuple[int, ...]]:
    import numpy as np

    dtype, shape = meta.get("dtype"), meta.get("shape")
    if meta.get("kind") != "array" or not isinstance(dtype, str) or len(dtype) > 32:
        raise ProtocolError("the shared object is not an array")
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise ProtocolError("the shared array's shape is not valid")
    if not all(isinstance(n, int) and 0 <= n < 1 << 40 for n in shape):
        raise ProtocolError("the shared array's shape is not valid")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ProtocolError("the shared array's dtype is not valid") from None
    if dt.hasobject or math.prod(shape) * dt.itemsize != size:
        raise ProtocolError("the shared array's dtype and shape do not match its segment")
    return dt, tuple(shape)


class SharedValue(_Shared):
    """One number in shared memory: ``.value`` (read and written whole), ``.lock``."""

    def __init__(self, name: str, type: Any = None) -> None:
        _reduction.register()  # it may be handed to a child process
        meta = None
        size = None
        if type is not None:
            fmt = _VALUE_TYPES.get(type, type)
            if not isinstance(fmt, str) or fmt not in "bBhHiIlLqQfd?":
                raise ValueError(f"type must be int, float, bool or a struct code, not {type!r}")
            size = struct.calcsize(fmt)
            meta = {"kind": "value", "format": fmt}
        self.name = name
        self.path = name_path(name, ".value")
        self._block, meta, self.created = _open_block(name, ".value", size, meta)
        self._setup(meta)

    def _setup(self, meta: dict[str, Any]) -> None:
        fmt = meta.get("format")
        if (
            meta.get("kind") != "value"
            or not isinstance(fmt, str)
            or len(fmt) != 1
            or fmt not in "bBhHiIlLqQfd?"
            or struct.calcsize(fmt) != self._block.size
        ):
            self._block.close()
            raise ProtocolError(f"{self.name!r} is not a valid shared value")
        self.format = fmt
        self._view: memoryview[Any] | None = memoryview(self._block).cast(fmt)  # type: ignore[call-overload]
        self.lock = SharedLock(self._block)

    @property
    def value(self) -> Any:
        """The number (read whole); :class:`~buzon.errors.ChannelClosed` after close."""
        view = self._view
        if view is None:
            raise ChannelClosed(f"shared value {self.name!r} is closed")
        return view[0]

    @value.setter
    def value(self, v: Any) -> None:
        view = self._view
        if view is None:
            raise ChannelClosed(f"shared value {self.name!r} is closed")
        view[0] = v

    def close(self) -> None:
        """Unmap (the value and its name stay; see :meth:`remove`)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        self._block.close()

    def __enter__(self) -> SharedValue:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def shared_array(
    name: str, shape: tuple[int, ...] | int | None = None, dtype: Any = None
) -> SharedArray:
    """The shared numpy array ``name``: created with ``shape``/``dtype`` (zeros) if absent."""
    return SharedArray(name, shape, dtype)


def shared_value(name: str, type: Any = None) -> SharedValue:
    """The shared number ``name``: created as ``type`` (int, float, bool, struct code) if absent."""
    return SharedValue(name, type)


# both pass to child processes by their segment's name (buzon/_reduction.py)
_reduction.passable(SharedArray)
_reduction.passable(SharedValue)
