"""Remote procedure calls over buzon channels (``buzon.rpc``).

The lecture's stubs, as objects: a :class:`Service` (the server stub's table of
procedures, type hints as the schema) served with :func:`serve` or :class:`Server`, and
a proxy from :func:`connect` (the client stub), typed by a ``typing.Protocol``::

    svc = buzon.rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    buzon.rpc.serve("unix:calc", svc)                 # blocks; or buzon.rpc.Server

    class Calc(typing.Protocol):
        def add(self, a: int, b: int) -> int: ...

    calc = buzon.rpc.connect("unix:calc", Calc)
    calc.add(1, 2)                                    # 3, checked by mypy

Remote objects: instances of a class marked ``@buzon.rpc.remote`` go by reference
(the other end gets a :class:`RemoteObject` proxy, and a proxy given back arrives as
the original object).

Marshalling is the channel's codec (msgpack); call ids, correlation and deadlines are
frame header fields. Two standard wires talk to programs that know nothing of buzon:
``wire="msgpack-rpc"`` (Neovim) and ``wire="jsonrpc"`` (JSON-RPC 2.0 with LSP's
``Content-Length`` framing: language servers), with :func:`connect_process` for a
child over its stdin/stdout. See ``docs/rpc.md``.
"""

from __future__ import annotations

from ..errors import DeadlineExceeded, RemoteError
from ._client import Call, Client, ServerRestarted, close, connect
from ._completion import CompletionTable, MemoryTable, SqliteTable, transactional
from ._context import CallContext, context, deadline
from ._jsonrpc import JsonRpcClient
from ._msgpack import MsgpackRpcClient, connect_process
from ._remote import RemoteObject, remote
from ._server import Server, serve
from ._service import Method, Service, expose

__all__ = [
    "Call",
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
