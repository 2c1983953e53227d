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

A :class:`SharedArray` behaves as the numpy array it holds (indexing, attributes,
``__array__``, ``__array_ufunc__``, ``__array_function__``, operators) and every result
is a plain ndarray; the array is ``np.frombuffer`` over a ``memoryview`` of the block, so
each view holds a buffer export and the block is never unmapped under one (``close``
with views alive defers the unmapping to the last of them).

Names work as for :class:`~buzon.BoundedBuffer`: ``NAME.array`` / ``NAME.value`` in the
private runtime dir hold the unguessable segment name. Attaching with a shape, dtype or
value type other than the existing one's raises :class:`~buzon.errors.EndpointInUse`.
The metadata is untrusted on attach: only plain dtypes (no Python objects), at most 32
dimensions, and a byte size that matches the segment. Both pass to child processes
through ``multiprocessing`` by their segment's name (:mod:`buzon._reduction`); using one
after ``close`` raises :class:`~buzon.errors.ChannelClosed`.
"""

from __future__ import annotations

import abc
import json
import math
import operator
import struct
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from .. import _core, _reduction
from ..errors import ChannelClosed, EndpointInUse, NoSuchEndpoint, ProtocolError, from_oserror
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
        self._block: _core.Block | None = block
        self.recovered = False

    def _held_block(self) -> _core.Block:
        block = self._block
        if block is None:
            raise ChannelClosed("the shared object of this lock is closed")
        return block

    def acquire(self, timeout: float | None = None) -> bool:
        self.recovered = self._held_block().lock(timeout)
        return self.recovered

    def release(self) -> None:
        self._held_block().unlock()

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
    _segment: str
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
        return self._segment

    @property
    @abc.abstractmethod
    def closed(self) -> bool:
        """True after :meth:`close`."""

    def remove(self) -> None:
        """Delete the name and the segment; attached processes keep their mapping."""
        unpublish(self.path, self.segment_name)
        remove_segment(self.segment_name)


def _plain(obj: Any) -> Any:
    """``obj`` with every :class:`SharedArray` in it (in lists, tuples and dicts too)
    replaced by its plain ndarray, so numpy computes on plain arrays."""
    if type(obj) is SharedArray:
        return obj.array
    if type(obj) is tuple or type(obj) is list:
        return type(obj)(_plain(o) for o in obj)
    if type(obj) is dict:
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _plain_key(key: Any) -> Any:
    """An index with a :class:`SharedArray` in it (a mask, an index array) replaced by
    its plain ndarray; the common keys (an int, a slice, a tuple of them) as they are."""
    if type(key) is tuple:
        for k in key:
            if type(k) is SharedArray:  # type(), not isinstance(): ABCMeta's is slow
                return tuple(_plain(k) for k in key)
        return key
    return key.array if type(key) is SharedArray else key


def _operators(cls: type) -> type:
    """Give ``cls`` the arithmetic and comparison operators of the ndarray it holds:
    each computes on the plain array (a plain ndarray result); the in-place ones write
    the shared memory and return the shared array itself."""
    binary = ["add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod"]
    binary += ["pow", "lshift", "rshift", "and", "xor", "or"]

    def make(op: Any, reflected: bool) -> Any:
        if reflected:
            return lambda self, other: op(_plain(other), self.array)
        return lambda self, other: op(self.array, _plain(other))

    def make_inplace(op: Any) -> Any:
        def inplace(self: SharedArray, other: Any) -> SharedArray:
            op(self.array, _plain(other))  # ndarray's in-place operators write in place
            return self

        return inplace

    for name in binary:
        fn = (
            getattr(operator, name + "_")
            if name in ("and", "or")
            else getattr(operator, name, None)
        )
        if fn is None:  # divmod is a builtin
            fn = divmod
        setattr(cls, f"__{name}__", make(fn, False))
        setattr(cls, f"__r{name}__", make(fn, True))
        if name != "divmod":
            setattr(cls, f"__i{name}__", make_inplace(getattr(operator, f"i{name}")))
    for name in ("lt", "le", "eq", "ne", "gt", "ge"):
        setattr(cls, f"__{name}__", make(getattr(operator, name), False))
    for name in ("neg", "pos", "abs", "invert"):
        setattr(
            cls, f"__{name}__", (lambda op: lambda self: op(self.array))(getattr(operator, name))
        )
    setattr(cls, "__hash__", None)  # noqa: B010 - as ndarray: mutable, unhashable
    return cls


@_operators
class SharedArray(_Shared):
    """A numpy array in shared memory that behaves as one, with ``.lock`` and ``.name``.

    Index, slice and assign it as an ndarray (``arr[1:3] = 5`` writes the shared
    memory); ``.shape``, ``.dtype``, ``.ndim``, ``.size``, ``.nbytes``, ``.T`` and every
    other ndarray attribute or method (``arr.sum()``, ``arr.reshape(...)``) are the
    array's. numpy functions and ufuncs take it (``np.sum(arr)`` is a number) and
    ``np.asarray(arr)`` (or ``arr.array``) is a plain ndarray over the same memory.
    Results (arithmetic, slices, method results) are plain ndarrays, which never own
    the segment: ``close``, ``remove``, ``lock`` and ``name`` are the handle's alone.
    The in-place operators (``arr += 1``, ``np.add(arr, 1, out=arr)``) write the shared
    memory and keep ``arr`` the shared array. It is not an ``ndarray`` subclass:
    ``isinstance(arr, np.ndarray)`` is False; pass ``arr.array`` where an ndarray is
    checked for.

    After :meth:`close` every use of the handle raises
    :class:`~buzon.errors.ChannelClosed`; plain arrays taken from it before stay
    valid, and the segment stays mapped until the last of them is gone.
    """

    if TYPE_CHECKING:  # the operators @_operators adds, for type checkers

        def __add__(self, other: Any) -> Any: ...
        def __radd__(self, other: Any) -> Any: ...
        def __iadd__(self, other: Any) -> Self: ...
        def __sub__(self, other: Any) -> Any: ...
        def __rsub__(self, other: Any) -> Any: ...
        def __isub__(self, other: Any) -> Self: ...
        def __mul__(self, other: Any) -> Any: ...
        def __rmul__(self, other: Any) -> Any: ...
        def __imul__(self, other: Any) -> Self: ...
        def __matmul__(self, other: Any) -> Any: ...
        def __rmatmul__(self, other: Any) -> Any: ...
        def __imatmul__(self, other: Any) -> Self: ...
        def __truediv__(self, other: Any) -> Any: ...
        def __rtruediv__(self, other: Any) -> Any: ...
        def __itruediv__(self, other: Any) -> Self: ...
        def __floordiv__(self, other: Any) -> Any: ...
        def __rfloordiv__(self, other: Any) -> Any: ...
        def __ifloordiv__(self, other: Any) -> Self: ...
        def __mod__(self, other: Any) -> Any: ...
        def __rmod__(self, other: Any) -> Any: ...
        def __imod__(self, other: Any) -> Self: ...
        def __divmod__(self, other: Any) -> Any: ...
        def __rdivmod__(self, other: Any) -> Any: ...
        def __pow__(self, other: Any) -> Any: ...
        def __rpow__(self, other: Any) -> Any: ...
        def __ipow__(self, other: Any) -> Self: ...
        def __lshift__(self, other: Any) -> Any: ...
        def __rlshift__(self, other: Any) -> Any: ...
        def __ilshift__(self, other: Any) -> Self: ...
        def __rshift__(self, other: Any) -> Any: ...
        def __rrshift__(self, other: Any) -> Any: ...
        def __irshift__(self, other: Any) -> Self: ...
        def __and__(self, other: Any) -> Any: ...
        def __rand__(self, other: Any) -> Any: ...
        def __iand__(self, other: Any) -> Self: ...
        def __xor__(self, other: Any) -> Any: ...
        def __rxor__(self, other: Any) -> Any: ...
        def __ixor__(self, other: Any) -> Self: ...
        def __or__(self, other: Any) -> Any: ...
        def __ror__(self, other: Any) -> Any: ...
        def __ior__(self, other: Any) -> Self: ...
        def __lt__(self, other: Any) -> Any: ...
        def __le__(self, other: Any) -> Any: ...
        def __gt__(self, other: Any) -> Any: ...
        def __ge__(self, other: Any) -> Any: ...
        def __eq__(self, other: object) -> Any: ...
        def __ne__(self, other: object) -> Any: ...
        def __neg__(self) -> Any: ...
        def __pos__(self) -> Any: ...
        def __abs__(self) -> Any: ...
        def __invert__(self) -> Any: ...

    def __init__(self, name: str, shape: tuple[int, ...] | int | None, dtype: Any) -> None:
        _reduction.register()  # it may be handed to a child process
        import numpy as np

        meta = None
        size = None
        want: tuple[tuple[int, ...] | None, Any] | None = None
        if shape is not None:
            shp = (shape,) if isinstance(shape, int) else tuple(int(n) for n in shape)
            dt = np.dtype(dtype if dtype is not None else "f8")
            if dt.hasobject:
                raise ValueError("a shared array cannot hold Python objects")
            size = math.prod(shp) * dt.itemsize
            meta = {"kind": "array", "dtype": dt.str, "shape": list(shp)}
            want = (shp, dt)
        elif dtype is not None:
            want = (None, np.dtype(dtype))  # attach only: the dtype must match
        self.name = name
        self.path = name_path(name, ".array")
        self._block, meta, self.created = _open_block(name, ".array", size, meta)
        self._setup(meta)
        if want is not None and not self.created:
            self._check_same(*want)

    def _check_same(self, shape: tuple[int, ...] | None, dtype: Any) -> None:
        """Raise :class:`~buzon.errors.EndpointInUse` (and close) if the array we
        attached is not the ``shape`` and ``dtype`` asked for."""
        arr = self.array
        if (shape is None or arr.shape == shape) and arr.dtype == dtype:
            return
        self.close()
        asked = f"dtype {dtype}" if shape is None else f"shape {shape}, dtype {dtype}"
        raise EndpointInUse(
            f"shared array {self.name!r} exists with shape {arr.shape}, dtype {arr.dtype}, "
            f"not {asked}: attach it without shape and dtype (or with those), or remove it "
            "first"
        )

    def _setup(self, meta: dict[str, Any]) -> None:
        import numpy as np

        self._segment = self._block.name.lstrip("/")

        try:
            dt, shp = _check_array_meta(meta, self._block.size)
            # frombuffer keeps a memoryview of the block as the array's base, so the block
            # counts every array over it as an export and cannot be unmapped under it
            # (np.ndarray(buffer=...) keeps only the block: closing it left them dangling)
            flat = np.frombuffer(memoryview(self._block), dt, count=math.prod(shp))
            self._array: Any = flat.reshape(shp)
        except BaseException:
            self._block.close()
            raise
        self.lock = SharedLock(self._block)

    @property
    def array(self) -> Any:
        """The plain numpy array over the segment (the same memory as the handle);
        :class:`~buzon.errors.ChannelClosed` after close."""
        arr = self._array
        if arr is None:
            raise ChannelClosed(f"shared array {self.name!r} is closed")
        return arr

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._array is None

    # --- the ndarray protocol -------------------------------------------------------

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> Any:
        """The array itself for ``np.asarray`` (no copy unless a copy or another dtype
        is asked for)."""
        import numpy as np

        arr = self.array
        if copy or (dtype is not None and np.dtype(dtype) != arr.dtype):
            if copy is False:
                raise ValueError("a copy is needed for that dtype (copy=False was asked)")
            return np.array(arr, dtype=dtype, copy=True)
        return arr

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is None or method == "at":
            return result
        # as numpy does: a result written into ``out`` is returned as ``out`` itself,
        # so ``arr += 1`` leaves ``arr`` the shared array
        return out[0] if len(out) == 1 else out

    def __array_function__(
        self, func: Any, types: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return func(*_plain(args), **_plain(kwargs))

    def __getitem__(self, key: Any) -> Any:
        return self.array[_plain_key(key)]

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(value) is SharedArray:
            value = value.array
        self.array[_plain_key(key)] = value

    def __len__(self) -> int:
        return len(self.array)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.array)

    def __contains__(self, value: Any) -> bool:
        return _plain(value) in self.array

    def __bool__(self) -> bool:
        return bool(self.array)

    def __int__(self) -> int:
        return int(self.array)

    def __float__(self) -> float:
        return float(self.array)

    def __index__(self) -> int:
        return operator.index(self.array)

    def __buffer__(self, flags: int, /) -> memoryview:
        return memoryview(self.array)

    @property
    def shape(self) -> tuple[int, ...]:
        """The array's shape."""
        return self.array.shape  # type: ignore[no-any-return]

    @property
    def dtype(self) -> Any:
        """The array's numpy dtype."""
        return self.array.dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return self.array.ndim  # type: ignore[no-any-return]

    @property
    def size(self) -> int:
        """The number of elements."""
        return self.array.size  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        """The array's bytes (the segment's data size)."""
        return self.array.nbytes  # type: ignore[no-any-return]

    @property
    def T(self) -> Any:
        """The transposed array (a plain ndarray view of the same memory)."""
        return self.array.T

    def __getattr__(self, attr: str) -> Any:
        # every other ndarray attribute and method: arr.sum(), arr.reshape(...), ...
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.array, attr)

    # --- the handle -------------------------------------------------------------------

    def close(self) -> None:
        """End this handle (every use then raises
        :class:`~buzon.errors.ChannelClosed`; a second close does nothing). The segment
        is unmapped now, or, while plain arrays taken from the handle still exist,
        when the last of them is gone. The array and its name stay (see :meth:`remove`)."""
        if self._array is None:
            return
        self._array = None
        try:
            self._block.close()
        except BufferError:
            # views of it remain: the mapping (and our lock slot) goes with the last
            # of them, which hold the block through their memoryview
            self.lock._block = None
            del self._block

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

    def __str__(self) -> str:
        arr = self._array
        return str(arr) if arr is not None else repr(self)


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
        self._block, got, self.created = _open_block(name, ".value", size, meta)
        self._setup(got)
        if meta is not None and not self.created and self.format != meta["format"]:
            self.close()
            raise EndpointInUse(
                f"shared value {name!r} exists with format {self.format!r}, not "
                f"{meta['format']!r}: attach it without a type (or with that one), or "
                "remove it first"
            )

    def _setup(self, meta: dict[str, Any]) -> None:
        self._segment = self._block.name.lstrip("/")
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

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._view is None

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
    """The shared numpy array ``name``: created with ``shape``/``dtype`` (zeros, dtype
    float64 by default) if absent. If it exists, a ``shape`` (with its dtype) or a
    ``dtype`` given must be the existing array's, or
    :class:`~buzon.errors.EndpointInUse` is raised; with neither it attaches whatever is
    there. :class:`~buzon.errors.NoSuchEndpoint` if it is absent and no shape was given. The result
    behaves as a numpy array (see :class:`SharedArray`)."""
    return SharedArray(name, shape, dtype)


def shared_value(name: str, type: Any = None) -> SharedValue:
    """The shared number ``name``: created as ``type`` (int, float, bool, struct code) if
    absent; if it exists with another type, :class:`~buzon.errors.EndpointInUse`."""
    return SharedValue(name, type)


# both pass to child processes by their segment's name (buzon/_reduction.py)
_reduction.passable(SharedArray)
_reduction.passable(SharedValue)
