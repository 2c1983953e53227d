"""The asyncio twin of :mod:`buzon.rpc` (``buzon.aio.rpc``): same services, same wires.

>>> calc = await buzon.aio.rpc.connect("unix:calc")
>>> await calc.add(1, 2)
3

Every public name of :mod:`buzon.rpc` has a counterpart here: the blocking API's
verbs as coroutines (:func:`connect`, :func:`connect_process`, :func:`serve`,
:func:`close`, :class:`Client`, :class:`Server`, :class:`MsgpackRpcClient`,
:class:`JsonRpcClient`), and the pieces that do no I/O are the very same objects
(``Service``, ``expose``, ``remote``, ``RemoteObject``, ``deadline``, ``context``,
``CallContext``, ``Method``, the errors). The only sync-only name is listed in
:data:`SYNC_ONLY` with its asyncio form.

A client has one reader task that hands each reply to the future of the call it
answers (replies come back in any order) and runs the server's calls to the client's
remote objects; ``call`` awaits its future by the call's deadline, and a call given up
(deadline, ``asyncio.CancelledError``, ``task.cancel()``) sends the server a cancel
message. The server runs each request in a task of its own, at most
``max_in_flight`` per connection; a coroutine handler cancelled by its caller gets
``CancelledError`` (and ``context().cancelled``). A plain function handler runs in
the event loop's thread: keep it short.

The messages, the reference tables, the completion table and the JSON-RPC and
msgpack-rpc rules are the blocking modules' own (sans-IO); only the I/O is here
(``_rpc_client.py``, ``_rpc_server.py``, ``_rpc_stream.py``).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..address import Address
from ..errors import DeadlineExceeded, RemoteError, UnsupportedOperation
from ..rpc._client import ServerRestarted
from ..rpc._completion import CompletionTable, MemoryTable, SqliteTable, transactional
from ..rpc._context import CallContext, context, deadline
from ..rpc._remote import RemoteObject, remote
from ..rpc._service import Method, Service, expose
from ._open import connect as _connect
from ._rpc_client import Client, name_reconnect
from ._rpc_server import Server, serve
from ._rpc_stream import JsonRpcClient, MsgpackRpcClient, _ChannelStream, open_stream_session
from ._rpc_stream import connect_process as _connect_process

__all__ = [
    "SYNC_ONLY",
    "CallContext",
    "Client",
    "CompletionTable",
    "DeadlineExceeded",
    "JsonRpcClient",
    "MemoryTable",
    "Method",
    "MsgpackRpcClient",
    "RemoteError",
    "RemoteObject",
    "Server",
    "ServerRestarted",
    "Service",
    "SqliteTable",
    "close",
    "connect",
    "connect_process",
    "context",
    "deadline",
    "expose",
    "remote",
    "serve",
    "transactional",
]

P = TypeVar("P")

SYNC_ONLY: dict[str, str] = {
    "Call": "the blocking client's call_async future; Client.call_async here returns an "
    "asyncio.Task (cancel() cancels the call on the server)",
}
"""Public names of :mod:`buzon.rpc` without a counterpart here, and what to use."""


@typing.overload
async def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: typing.Literal["msgpack-rpc"],
    handler: object = None,
    **options: Any,
) -> MsgpackRpcClient: ...
@typing.overload
async def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: typing.Literal["jsonrpc"],
    handler: object = None,
    **options: Any,
) -> JsonRpcClient: ...
@typing.overload
async def connect(
    url: str | Address,
    proto: None = None,
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    **options: Any,
) -> Client: ...
@typing.overload
async def connect(
    url: str | Address,
    proto: Callable[..., P],
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    **options: Any,
) -> P: ...


async def connect(
    url: str | Address,
    proto: Any = None,
    *,
    timeout: float | None = 60.0,
    wire: str = "buzon",
    semantics: str = "at_most_once",
    max_in_flight: int = 64,
    handler: object = None,
    **options: Any,
) -> Any:
    """Connect to an RPC server (``await buzon.aio.rpc.connect(url, Proto)``), as
    :func:`buzon.rpc.connect`.

    With a Protocol whose methods are ``async def``, mypy checks ``await
    calc.add(1, 2)`` and results are validated against its hints. ``timeout`` bounds
    the connection and is every call's default deadline. ``semantics``:
    ``"at_most_once"``, ``"at_least_once"`` or ``"exactly_once"`` (see
    :class:`Client`). ``url`` may be ``name:NAME`` (:mod:`buzon.names`), looked up
    again on every reconnect. ``wire="msgpack-rpc"`` / ``"jsonrpc"`` return a
    :class:`MsgpackRpcClient` / :class:`JsonRpcClient` session on a raw stream
    (``handler`` answers the peer's requests).
    """
    if wire in ("jsonrpc", "msgpack-rpc"):
        if proto is not None:
            raise TypeError(f"wire={wire!r} proxies are untyped: pass no Protocol")
        if semantics != "at_most_once":
            raise UnsupportedOperation(
                f"wire={wire!r} is at-most-once: its messages carry no retry ids"
            )
        ch = await _connect(url, timeout, raw=True, **options)
        return open_stream_session(wire, _ChannelStream(ch), handler, timeout, max_in_flight)
    if wire != "buzon":
        raise UnsupportedOperation(
            f"wire={wire!r}: buzon.aio.rpc speaks buzon, jsonrpc and msgpack-rpc"
        )
    if handler is not None:
        raise TypeError("handler= is for wire='msgpack-rpc' or 'jsonrpc' (the peer's own requests)")
    if semantics not in ("at_most_once", "at_least_once", "exactly_once"):
        raise UnsupportedOperation(
            f"semantics={semantics!r}: this version offers at_most_once, at_least_once,"
            " exactly_once"
        )
    reconnect, instance = name_reconnect(url, options, _connect)
    ch = await reconnect(timeout)
    return Client(
        ch,
        proto,
        timeout=timeout,
        max_in_flight=max_in_flight,
        semantics=semantics,
        reconnect=reconnect,
        instance=instance,
    )


async def connect_process(
    argv: Sequence[str],
    *,
    wire: str = "msgpack-rpc",
    handler: Service | object | None = None,
    timeout: float | None = 60.0,
) -> Any:
    """Start ``argv`` and talk RPC over its stdin/stdout, as
    :func:`buzon.rpc.connect_process`::

        nv = await buzon.aio.rpc.connect_process(
            ["nvim", "--headless", "--embed", "--clean", "-n"], handler=svc)
        await nv.nvim_eval("1+1")      # 2
        await nv.aclose()              # closes its stdin; the child is waited for

    ``wire``: ``"msgpack-rpc"`` (a :class:`MsgpackRpcClient`) or ``"jsonrpc"`` (a
    :class:`JsonRpcClient`); ``handler`` answers the child's own requests.
    """
    return await _connect_process(argv, wire=wire, handler=handler, timeout=timeout)


async def close(proxy: object) -> None:
    """Close a proxy or session made by :func:`connect` (a typed one included: its
    Protocol need not declare ``aclose``)."""
    if not isinstance(proxy, (Client, MsgpackRpcClient, JsonRpcClient)):
        raise TypeError(f"not a buzon.aio.rpc proxy: {proxy!r}")
    await proxy.aclose()
