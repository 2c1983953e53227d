"""What the blocking and the asyncio RPC clients share, written once.

The two clients (:class:`buzon.rpc.Client`, :class:`buzon.aio.rpc.Client`) differ in
how they wait: threads taking turns at reading the connection, or one reader task.
Everything else is here: the options and their checks, the state a client keeps (call
ids, the exactly-once client id and sequence numbers, the counters), the proxy's
attribute stubs, a call's deadline, and what a REPLY body means (a result, converted to
the method's declared return type, or the error it carries).
"""

from __future__ import annotations

import itertools
import os
import time
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec

from ..errors import BuzonError, RemoteError, ValidationError
from . import _wire as w
from ._context import _DEADLINE
from ._remote import _PLAIN, RefPeer
from ._retry import server_start
from ._service import _schema

__all__ = ["ClientCore", "return_types"]

ChannelT = TypeVar("ChannelT")

_monotonic = time.monotonic


def return_types(proto: Any) -> dict[str, Any]:
    """Return hints of a Protocol's (or class's) public methods: name -> type."""
    types: dict[str, Any] = {}
    for klass in reversed(getattr(proto, "__mro__", (proto,))):
        if klass is object or klass is typing.Protocol or klass.__module__ == "typing":
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or not callable(value):
                continue
            try:
                hint = typing.get_type_hints(value).get("return", Any)
            except Exception as exc:
                raise TypeError(f"{proto.__name__}.{name}: hints do not resolve: {exc}") from exc
            types[name] = None if hint is type(None) else _schema(hint)
    return types


class ClientCore(RefPeer, Generic[ChannelT]):
    """The state and the I/O-free steps of an RPC client (see the module docstring).

    A subclass calls :meth:`_setup` first in its ``__init__`` and provides ``call``
    (which the proxy's stubs call: a blocking one returns the result, an asyncio one
    a coroutine to await).
    """

    _NAME = "buzon.rpc.Client"  # for repr()
    _ch: ChannelT
    call: Callable[..., Any]  # each client's own: ``call(method, *args, **kwargs)``

    def _setup(
        self,
        ch: ChannelT,
        proto: Any,
        timeout: float | None,
        max_in_flight: int,
        semantics: str,
        reconnect: Callable[[float | None], Any] | None,
        instance: Callable[[], str | None] | None,
    ) -> None:
        if semantics != "at_most_once" and reconnect is None:
            raise ValueError(f"semantics={semantics!r} needs a way to reconnect")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._ch = ch
        self._proto = proto
        self._rtypes: dict[str, Any] = {} if proto is None else return_types(proto)
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, Any] = {}  # call id -> the subclass's record of the call
        self._broken: BuzonError | None = None
        self._stubs: dict[str, Callable[..., Any]] = {}
        self._semantics = semantics
        self._reconnect_fn = reconnect
        self._instance_of = instance  # the server start from the name's record, if any
        self._client_id = os.urandom(16)  # exactly_once: (client id, sequence number)
        self._next_seq = 1
        self._open_seqs: set[int] = set()
        self._restarts = 0  # reconnects that found another server start, table lost
        self.restarts_survived = 0  # ...whose table persisted: calls in flight go on
        self._closing = False
        self.retries = 0  # attempts made again after a lost connection
        self.late = 0  # replies that came after their call was given up

    # -- the proxy ----------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._proto is not None and name not in self._rtypes:
            raise AttributeError(f"{self._proto.__name__} has no method {name!r}")
        stub = self._stubs.get(name)
        if stub is None:

            def stub(*args: Any, **kwargs: Any) -> Any:
                return self.call(name, *args, **kwargs)

            stub.__name__ = name
            self._stubs[name] = stub
        return stub

    # -- a call ---------------------------------------------------------------------

    def _deadline(self) -> float | None:
        """When a call started now must end: the nearest of the ``deadline`` blocks
        in force and this client's ``timeout`` (None: never)."""
        at = _DEADLINE.get()
        if self._timeout is not None:
            mine = _monotonic() + self._timeout
            if at is None or mine < at:
                at = mine
        return at

    def _outcome(self, method: str, rtype: Any, body: Any) -> tuple[BaseException | None, Any]:
        """What a REPLY body for a call of ``method`` means: ``(None, result)`` (the
        result's references made proxies, converted to ``rtype`` unless it is Any)
        or ``(error, None)``."""
        if type(body) is not list or len(body) != 3 or body[0] != w.REPLY:
            return RemoteError("malformed reply", RemoteError.INTERNAL_ERROR), None
        if body[1] is not None:
            return w.error_from(body[1]), None
        try:
            result = body[2]
            if type(result) not in _PLAIN:
                result = self._in(result)  # references -> proxies (or our own objects)
        except RemoteError as err:
            return err, None
        return self._converted(method, rtype, result)

    @staticmethod
    def _converted(method: str, rtype: Any, result: Any) -> tuple[BaseException | None, Any]:
        """``result`` as the method's declared return type (``(error, None)`` if it
        does not match)."""
        if rtype is Any:
            return None, result
        try:
            return None, msgspec.convert(result, rtype)
        except msgspec.ValidationError as exc:
            return ValidationError(f"{method}: the result does not match {rtype!r}: {exc}"), None

    # -- what it is connected to ----------------------------------------------------

    @property
    def channel(self) -> ChannelT:
        """The underlying channel (replaced when a retrying client reconnects)."""
        return self._ch

    @property
    def in_flight(self) -> int:
        """Calls sent whose reply has not come yet."""
        return len(self._pending)

    @property
    def server_instance(self) -> str | None:
        """The instance id of the server start this client is connected to (a fresh
        one each time the server starts; None if the server does not say)."""
        return server_start(self._ch, self._instance_of)[0]

    def __repr__(self) -> str:
        proto = f" {self._proto.__name__}" if self._proto is not None else ""
        return f"<{self._NAME}{proto} {self._ch!r} in_flight={len(self._pending)}>"
