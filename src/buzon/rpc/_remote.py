"""Remote objects (RMI) on ``wire="buzon"``: references instead of copies.

An instance of a class marked :func:`remote` that goes over an RPC connection (a
result, an argument, or inside a list or dict of them) is not copied: the sending end
keeps the object in its table of *exports* and sends a reference, and the receiving
end gets a :class:`RemoteObject` proxy whose method calls run on the original object.
A proxy that goes back to the end that owns it arrives as the original object itself
(identity, not a copy). Both ends can export, so a client can hand the server a
callback object and the server calls it back over the same connection while the
client waits for its own reply.

Only methods marked ``@buzon.rpc.expose`` are callable: a call names a method by a
string looked up in the object's table of exposed methods (built once from its class),
never with ``getattr``, so ``__class__``, ``_private`` or dotted names are refused
before anything runs.

On the wire a reference is the msgpack extension type 3 with the body
``[owner, id]``: ``owner`` 1 ("mine": the sender exports it, the receiver makes a
proxy) or 0 ("yours": the receiver's own object, given back). A call on a remote
object is a request whose method is ``[id, name]``. References are counted: every time
an end sends a reference, the object's count goes up; a proxy remembers how many
references it stands for, and when it is garbage collected its count goes back in a
release message ``[4, [[id, count], ...]]``, batched. An object leaves the export table
when its count reaches 0, or when the connection ends.
"""

from __future__ import annotations

import abc
import itertools
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ..errors import EndOfChannel, RemoteError
from ._service import _REMOTE, Method, Service

__all__ = ["RELEASE", "Exports", "RefPeer", "RemoteObject", "is_remote", "remote"]

C = TypeVar("C", bound=type)

REF_EXT = 3  # the msgpack extension code of a reference (buzon.codec decodes it as an Ext)
YOURS, MINE = 0, 1  # a reference's owner, as the sender sees it
RELEASE = 4  # the message kind of a batch of released references
FLUSH_EVERY = 0.02  # how often a connection sends the releases of dropped proxies

_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_Ext = msgspec.msgpack.Ext
_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.decode


def remote(cls: C) -> C:
    """Mark a class whose instances go by reference (``@buzon.rpc.remote``)::

        @buzon.rpc.remote
        class Counter:
            @buzon.rpc.expose
            def incr(self) -> int: ...

    An instance returned by an RPC method (or passed as an argument) reaches the other
    end as a :class:`RemoteObject` proxy; only its ``@expose`` methods can be called.
    """
    if not isinstance(cls, type):
        raise TypeError("@buzon.rpc.remote decorates a class")
    setattr(cls, _REMOTE, True)
    return cls


def is_remote(obj: object) -> bool:
    """True if ``obj`` is an instance of a class marked :func:`remote`."""
    return getattr(type(obj), _REMOTE, False) is True


class _Export:
    __slots__ = ("count", "obj", "service")

    def __init__(self, obj: object) -> None:
        self.obj = obj
        self.count = 0
        try:
            self.service = Service.of(obj)
        except ValueError:  # a remote class without exposed methods: nothing callable
            self.service = Service(type(obj).__name__)


class Exports:
    """The objects one end of a connection has given the other end references to:
    reference id -> (object, its exposed methods, references held by the peer)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, _Export] = {}
        self._by_obj: dict[int, int] = {}  # id(obj) -> reference id (the entry keeps obj alive)
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_id)

    def export(self, obj: object) -> int:
        """The reference id of ``obj`` (the same while it is exported), counted once more."""
        with self._lock:
            rid = self._by_obj.get(id(obj))
            if rid is None:
                rid = next(self._ids)
                self._by_id[rid] = _Export(obj)
                self._by_obj[id(obj)] = rid
            self._by_id[rid].count += 1
            return rid

    def get(self, rid: object) -> _Export:
        """The export ``rid``; ``RemoteError`` INVALID_PARAMS if there is none."""
        entry = self._by_id.get(rid) if type(rid) is int else None
        if entry is None:
            raise RemoteError(
                f"no remote object {rid!r} on this connection (released, or never exported)",
                RemoteError.INVALID_PARAMS,
            )
        return entry

    def method(self, target: object) -> Method:
        """The exposed method a request's ``[id, name]`` names (nothing else is reachable)."""
        if type(target) is not list or len(target) != 2 or type(target[1]) is not str:
            raise RemoteError(
                f"malformed remote-object method {target!r}", RemoteError.INVALID_REQUEST
            )
        return self.get(target[0]).service.lookup(target[1])

    def release(self, pairs: object) -> None:
        """Apply a release message's ``[[id, count], ...]`` (junk is ignored)."""
        if type(pairs) is not list:
            return
        with self._lock:
            for pair in pairs:
                if type(pair) is not list or len(pair) != 2 or type(pair[1]) is not int:
                    continue
                entry = self._by_id.get(pair[0]) if type(pair[0]) is int else None
                if entry is None:
                    continue
                entry.count -= pair[1]
                if entry.count <= 0:
                    del self._by_id[pair[0]]
                    self._by_obj.pop(id(entry.obj), None)

    def clear(self) -> None:
        """Forget every export (the connection ended)."""
        with self._lock:
            self._by_id.clear()
            self._by_obj.clear()


class RemoteObject:
    """A proxy of an object at the other end of an RPC connection.

    ``proxy.incr(2)`` calls the original's exposed method ``incr`` and waits for the
    result (at most once, with the connection's deadline rules); attributes starting
    with ``_`` are refused here, and anything not exposed is refused by the owner.
    Thread-safe (calls share the connection). Dropping the last reference to the proxy
    releases the remote object; passing the proxy back to its owner gives it the
    original object.
    """

    __slots__ = ("__weakref__", "_cell", "_peer", "_rid")

    def __init__(self, peer: RefPeer, rid: int, cell: list[int]) -> None:
        self._peer = peer
        self._rid = rid
        self._cell = cell  # references this proxy stands for (released when it dies)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(f"{name!r}: only exposed methods of a remote object are reachable")
        peer, rid = self._peer, self._rid

        def stub(*args: Any, **kwargs: Any) -> Any:
            return peer._call_ref(rid, name, args, kwargs)

        stub.__name__ = name
        return stub

    def __repr__(self) -> str:
        return f"<buzon.rpc.RemoteObject #{self._rid}>"


def _dropped(releases: list[list[int]], rid: int, cell: list[int]) -> None:
    # a weakref finalizer: may run in any thread, inside any code (GC); so no locks,
    # no I/O: only an append (atomic), sent later by the connection's flusher
    releases.append([rid, cell[0]])


class RefPeer(abc.ABC):
    """One end of a connection that exports objects and holds proxies (mixed into the
    RPC client and the server's connection). Subclasses provide :meth:`_call_ref` and
    :meth:`_send_release`."""

    def _ref_init(self) -> None:
        self._exports = Exports()
        self._proxies: weakref.WeakValueDictionary[int, RemoteObject] = (
            weakref.WeakValueDictionary()
        )
        self._releases: list[list[int]] = []
        self._ref_lock = threading.Lock()
        self._ref_closed = False
        self._flusher: threading.Thread | None = None

    @abc.abstractmethod
    def _call_ref(
        self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any: ...

    @abc.abstractmethod
    def _send_release(self, pairs: list[list[int]]) -> None: ...

    # -- marshalling ---------------------------------------------------------------

    def _out(self, value: Any) -> Any:
        """``value`` with remote objects and proxies replaced by references."""
        t = type(value)
        if t in _PLAIN:
            return value
        if t is list or t is tuple:
            return [self._out(v) for v in value]
        if t is dict:
            return {k: self._out(v) for k, v in value.items()}
        if t is RemoteObject:
            if value._peer is not self:
                raise RemoteError(
                    "a proxy of another connection's object cannot be passed on",
                    RemoteError.INVALID_PARAMS,
                )
            return _Ext(REF_EXT, _encode([YOURS, value._rid]))
        if getattr(t, _REMOTE, False) is True:
            return _Ext(REF_EXT, _encode([MINE, self._exports.export(value)]))
        return value

    def _in(self, value: Any) -> Any:
        """``value`` with references replaced by proxies (or by this end's own objects)."""
        t = type(value)
        if t in _PLAIN:
            return value
        if t is list:
            return [self._in(v) for v in value]
        if t is dict:
            return {k: self._in(v) for k, v in value.items()}
        if t is _Ext and value.code == REF_EXT:
            try:
                owner, rid = _decode(value.data)
            except (msgspec.DecodeError, TypeError, ValueError):
                raise RemoteError(
                    "a malformed object reference", RemoteError.INVALID_PARAMS
                ) from None
            if owner == YOURS:
                return self._exports.get(rid).obj
            if owner == MINE and type(rid) is int:
                return self._proxy(rid)
            raise RemoteError("a malformed object reference", RemoteError.INVALID_PARAMS)
        return value

    def _proxy(self, rid: int) -> RemoteObject:
        with self._ref_lock:
            proxy = self._proxies.get(rid)
            if proxy is None:
                cell = [0]
                proxy = RemoteObject(self, rid, cell)
                self._proxies[rid] = proxy
                weakref.finalize(proxy, _dropped, self._releases, rid, cell)
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_loop, name="buzon-rpc-release", daemon=True
                    )
                    self._flusher.start()
            proxy._cell[0] += 1
            return proxy

    # -- releasing -----------------------------------------------------------------

    def _flush_loop(self) -> None:
        while not self._ref_closed:
            time.sleep(FLUSH_EVERY)
            self._flush_releases()

    def _flush_releases(self) -> None:
        """Send the references of dropped proxies back, as one message."""
        if not self._releases or self._ref_closed:
            return
        releases, pairs = self._releases, []
        while releases:  # pop() is atomic: an append by a finalizer meanwhile is kept
            pairs.append(releases.pop())
        try:
            self._send_release(pairs)
        except Exception:  # the connection is gone: the peer drops everything anyway
            pass

    def _ref_request(self, body: list[Any]) -> tuple[Any, list[Any], dict[str, Any] | None]:
        """(method, args, kwargs) of the other end's call ``body`` of one of this end's
        remote objects: the allowlist first (nothing runs before it), references in the
        arguments made proxies; a typed :class:`RemoteError` for a bad request."""
        if len(body) not in (3, 4) or type(body[2]) is not list:
            raise RemoteError("not an RPC request", RemoteError.INVALID_REQUEST)
        method = self._exports.method(body[1])
        kwargs = body[3] if len(body) == 4 else None
        if kwargs is not None and type(kwargs) is not dict:
            raise RemoteError("keywords are a map", RemoteError.INVALID_PARAMS)
        args = self._in(body[2])
        if kwargs:
            kwargs = self._in(kwargs)
        return method, args, kwargs

    def _forget_references(self, lost: RefPeer) -> None:
        """References belong to one connection: after a reconnect the old proxies
        point at ``lost`` (their calls fail, never reaching whatever object has their
        id on the new connection), the old exports are dropped and the old proxies'
        releases are not sent."""
        with self._ref_lock:
            for proxy in list(self._proxies.values()):
                proxy._peer = lost
            self._proxies = weakref.WeakValueDictionary()
            self._releases = []  # the old proxies' finalizers append to the old list
            self._exports.clear()

    def _ref_close(self) -> None:
        """The connection ended: forget exports and proxies."""
        self._ref_closed = True
        self._exports.clear()


class LostPeer(RefPeer):
    """Where a blocking client's proxies point once their connection was replaced by a
    reconnect: every call raises :class:`~buzon.errors.EndOfChannel`."""

    def _call_ref(self, rid: int, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        raise EndOfChannel(
            f"{name}: this remote object belonged to a connection that was lost "
            "(references do not survive a reconnect)"
        )

    def _send_release(self, pairs: list[list[int]]) -> None:
        pass
