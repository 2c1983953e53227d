"""Codecs: how objects become frame bodies, and which buffers travel out of band.

========  ==========================================================================
raw       the body is the bytes; ``send_bytes``/``recv_bytes`` use it
msgpack   the default for objects (msgspec): dicts, lists, str, int, float, bytes,
          None, bool, ``msgspec.Struct``, dataclasses, datetimes, UUIDs, numpy arrays
json      msgspec JSON, for peers that want text
pickle    opt-in only (``pickle=True``), protocol 5, never from an unauthenticated or
          foreign-user peer; a pickle frame on any other channel is rejected from its
          codec id, *before* a byte of it is unpickled
========  ==========================================================================

Out-of-band buffers: a numpy array of at least :data:`OOB_THRESHOLD` bytes is not
copied into the msgpack body. The body holds a small extension record (dtype, shape,
buffer index) and the array's memory goes to the transport as its own buffer in a
vectored write. The receiver rebuilds the array on top of the frame's receive buffer:
one copy in all, kernel to final place. Top-level ``bytes``/``bytearray``/``memoryview``
objects of that size travel the same way. With pickle, ``PickleBuffer``s go out of band.

Limits: bodies are bounded by the frame cap; nesting deeper than the interpreter's
recursion limit raises :class:`CodecError` (msgspec checks it); container lengths are
checked against the bytes actually present before anything is allocated.
"""

from __future__ import annotations

import builtins
import importlib
import pickle
import sys
import types
from typing import TYPE_CHECKING, Any, Literal

from ._record import Record
from .errors import CodecError, PickleRejected, ValidationError
from .protocol.frames import CodecId

if TYPE_CHECKING:
    import msgspec
else:
    msgspec = None  # set by the first Codec: ``import buzon`` does not import msgspec


def _load_msgspec() -> None:
    """Import msgspec into this module's namespace (the first Codec does it once; the
    methods then find it as a plain global, as if it had been imported at the top)."""
    if msgspec is None:
        globals()["msgspec"] = importlib.import_module("msgspec")


__all__ = ["OOB_THRESHOLD", "Codec", "CodecName"]

CodecName = Literal["msgpack", "json", "pickle"]
OOB_THRESHOLD = 1024
_EXT_NDARRAY = 1  # body: msgpack [dtype.str, shape, buffer index]
_EXT_BUFFER = 2  # body: msgpack buffer index; decodes to bytes
_EXT_REF = 3  # body: msgpack [owner, id]; a buzon.rpc object reference, decoded as an Ext
_MAX_BUFS = 255


def _loaded_numpy() -> Any:
    """numpy if the program imported it (else no object can be an array): encoding
    never imports numpy, so ``import buzon`` stays fast."""
    return sys.modules.get("numpy")


def _import_numpy() -> Any:
    """numpy for decoding a received array; imported on first use."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


class Codec:
    """Encode objects to (codec id, body, buffers) and back.

    One instance per channel; not thread-safe on its own (the channel's send lock
    serialises encoding).
    """

    def __init__(self, name: CodecName = "msgpack", *, allow_pickle: bool = False) -> None:
        if name not in ("msgpack", "json", "pickle"):
            raise ValueError(f"unknown codec {name!r}; use 'msgpack', 'json' or 'pickle'")
        if name == "pickle" and not allow_pickle:
            raise ValueError("codec='pickle' needs pickle=True")
        self.name: CodecName = name
        self.allow_pickle = allow_pickle
        self._out: list[memoryview] = []
        _load_msgspec()
        self._mp_enc = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)
        self._json_enc = msgspec.json.Encoder(enc_hook=self._json_hook)
        self._mp_dec: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self._json_dec: dict[Any, msgspec.json.Decoder[Any]] = {}
        self._in: list[memoryview] = []
        self._id = {"msgpack": CodecId.MSGPACK, "json": CodecId.JSON, "pickle": CodecId.PICKLE}[
            name
        ]

    # -- encoding ---------------------------------------------------------------------

    def encode(self, obj: Any) -> tuple[int, bytes, list[memoryview]]:
        """Return ``(codec id, body, out-of-band buffers)``."""
        self._out = out = []
        try:
            if self._id == CodecId.MSGPACK:
                if (
                    isinstance(obj, bytes | bytearray | memoryview)
                    and _nbytes(obj) >= OOB_THRESHOLD
                ):
                    out.append(memoryview(obj).cast("B"))
                    ext = msgspec.msgpack.Ext(_EXT_BUFFER, self._mp_enc.encode(0))
                    return CodecId.MSGPACK, self._mp_enc.encode(ext), out
                return CodecId.MSGPACK, self._mp_enc.encode(obj), out
            if self._id == CodecId.JSON:
                return CodecId.JSON, self._json_enc.encode(obj), out
            body = pickle.dumps(obj, protocol=5, buffer_callback=self._pickle_buffer)
            return CodecId.PICKLE, body, out
        except CodecError:
            raise
        except (
            TypeError,
            ValueError,
            OverflowError,
            RecursionError,
            AttributeError,  # pickle: "Can't pickle local object" on 3.11
            msgspec.EncodeError,
            pickle.PicklingError,
        ) as exc:
            raise CodecError(f"cannot encode {type(obj).__name__} with {self.name}: {exc}") from exc
        finally:
            self._out = []

    def _enc_hook(self, obj: Any) -> Any:
        _np = _loaded_numpy()
        if _np is not None and isinstance(obj, _np.ndarray):
            if obj.dtype.hasobject:
                raise CodecError("numpy arrays of dtype=object cannot be sent without pickle")
            arr = _np.ascontiguousarray(obj)
            if arr.nbytes >= OOB_THRESHOLD and len(self._out) < _MAX_BUFS:
                index = len(self._out)
                # a uint8 view, not memoryview(arr): datetime64/timedelta64 export no buffer
                self._out.append(memoryview(arr.reshape(-1).view(_np.uint8)))
                meta = self._mp_enc.encode((arr.dtype.str, arr.shape, index))
            else:
                meta = self._mp_enc.encode((arr.dtype.str, arr.shape, -1, arr.tobytes()))
            return msgspec.msgpack.Ext(_EXT_NDARRAY, meta)
        if _np is not None and isinstance(obj, _np.generic):
            return obj.item()
        if isinstance(obj, Record):  # buzon's own values (PeerInfo...): a map, as a dataclass
            return {n: getattr(obj, n) for n in obj._fields}
        raise TypeError(f"objects of type {type(obj).__name__} are not supported{_hint(obj)}")

    def _json_hook(self, obj: Any) -> Any:
        _np = _loaded_numpy()
        if _np is not None and isinstance(obj, _np.generic):
            return obj.item()
        if isinstance(obj, Record):
            return {n: getattr(obj, n) for n in obj._fields}
        raise TypeError(
            f"objects of type {type(obj).__name__} are not supported by the json codec"
            + (
                " (use msgpack for numpy arrays)"
                if _np is not None and isinstance(obj, _np.ndarray)
                else _hint(obj)
            )
        )

    def _pickle_buffer(self, buf: pickle.PickleBuffer) -> bool:
        if len(self._out) >= _MAX_BUFS:
            return True  # serialise in band
        self._out.append(buf.raw())
        return False

    # -- decoding ---------------------------------------------------------------------

    def decode(
        self,
        codec: int,
        body: bytes | bytearray | memoryview,
        buffers: list[memoryview],
        type: Any = Any,
    ) -> Any:
        """Decode a frame body; validate against ``type`` when given."""
        if codec == CodecId.PICKLE:
            if not self.allow_pickle:
                raise PickleRejected(
                    "received a pickle frame but this channel did not enable pickle; "
                    "it was discarded without being unpickled"
                )
            return self._unpickle(body, buffers, type)
        self._in = buffers
        try:
            if codec == CodecId.MSGPACK:
                dec = self._mp_dec.get(type)
                if dec is None:
                    dec = self._mp_dec[type] = msgspec.msgpack.Decoder(
                        type, ext_hook=self._ext_hook
                    )
                return dec.decode(body)
            if codec == CodecId.JSON:
                jdec = self._json_dec.get(type)
                if jdec is None:
                    jdec = self._json_dec[type] = msgspec.json.Decoder(type)
                return jdec.decode(body)
            if codec == CodecId.RAW:
                # a big send_bytes payload travels as the frame's one out-of-band buffer
                data = b"".join([bytes(body), *map(bytes, buffers)]) if buffers else bytes(body)
                if type is not Any:
                    return msgspec.convert(data, type)
                return data
        except msgspec.ValidationError as exc:
            raise ValidationError(f"message does not match {_type_name(type)}: {exc}") from exc
        except (
            msgspec.DecodeError,
            RecursionError,
            ValueError,
            TypeError,
            LookupError,
            OverflowError,
        ) as exc:
            raise CodecError(f"cannot decode {CodecId(codec).name.lower()} body: {exc}") from exc
        finally:
            self._in = []
        raise CodecError(f"unknown codec id {codec}")

    def _ext_hook(self, code: int, data: memoryview) -> Any:
        if code == _EXT_REF:  # resolved by buzon.rpc (remote objects), not here
            return msgspec.msgpack.Ext(code, bytes(data))
        meta = msgspec.msgpack.decode(data)
        if code == _EXT_BUFFER:
            return bytes(self._buffer(meta))
        if code == _EXT_NDARRAY:
            _np = _import_numpy()
            if _np is None:
                raise ValueError("received a numpy array but numpy is not installed")
            if not isinstance(meta, list) or len(meta) not in (3, 4):
                raise ValueError("malformed ndarray record")
            dtype = _np.dtype(_checked_dtype(meta[0]))
            if dtype.fields is not None or dtype.subdtype is not None or dtype.hasobject:
                raise ValueError(f"dtype {meta[0]!r} is not allowed")
            shape = tuple(int(s) for s in meta[1])
            count = 1
            for s in shape:
                if s < 0:
                    raise ValueError("negative array dimension")
                count *= s
            raw = self._buffer(meta[2]) if meta[2] >= 0 else memoryview(meta[3])
            if raw.nbytes != count * dtype.itemsize:
                raise ValueError(
                    f"array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} "
                    f"bytes, got {raw.nbytes}"
                )
            return _np.frombuffer(raw, dtype=dtype).reshape(shape)
        raise ValueError(f"unknown msgpack extension type {code}")

    def _buffer(self, index: Any) -> memoryview:
        if not isinstance(index, int) or not 0 <= index < len(self._in):
            raise ValueError(f"reference to out-of-band buffer {index!r} that the frame lacks")
        return self._in[index]

    def _unpickle(
        self, body: bytes | bytearray | memoryview, buffers: list[memoryview], type: Any
    ) -> Any:
        try:
            obj = pickle.loads(body, buffers=buffers)
        except Exception as exc:
            raise CodecError(f"cannot unpickle: {exc}") from exc
        if type is not Any and isinstance(type, builtins.type) and not isinstance(obj, type):
            raise ValidationError(f"expected {_type_name(type)}, got {obj.__class__.__name__}")
        return obj


def _hint(obj: Any) -> str:
    """What would carry ``obj``, which msgpack/json cannot: the data types msgspec
    encodes, or the pickle codec (opt-in: it runs code on the receiving side)."""
    pickle_way = "codec='pickle' with pickle=True (on both ends; between trusting peers)"
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return (
            f". A function is code, not data: send its name or its arguments; {pickle_way} "
            "sends module-level functions by reference, but not a lambda or a nested function"
        )
    return (
        f". Send it as a dict, or make its class a msgspec.Struct or a dataclass "
        f"(msgspec encodes both), or use {pickle_way}"
    )


def _nbytes(obj: bytes | bytearray | memoryview) -> int:
    return obj.nbytes if isinstance(obj, memoryview) else len(obj)


_SAFE_DTYPE_KINDS = frozenset("biufcmMSUV?")


def _checked_dtype(spec: Any) -> str:
    """Only plain dtype strings ('<f8', '|u1', '<U10'...), never object or structured specs."""
    if not isinstance(spec, str) or len(spec) > 16:
        raise ValueError(f"bad dtype {spec!r}")
    kind = spec.lstrip("<>|=")[:1]
    if kind not in _SAFE_DTYPE_KINDS or "O" in spec:
        raise ValueError(f"dtype {spec!r} is not allowed")
    return spec


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)
