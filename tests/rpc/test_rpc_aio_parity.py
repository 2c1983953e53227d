"""Every public name of buzon.rpc has an asyncio counterpart in buzon.aio.rpc (or is
listed as sync-only with its asyncio form), and every public aio name has a docstring."""

from __future__ import annotations

import inspect

from buzon import rpc
from buzon.aio import rpc as arpc


def test_every_public_name_of_buzon_rpc_has_an_aio_counterpart() -> None:
    missing = [
        name for name in rpc.__all__ if name not in arpc.__all__ and name not in arpc.SYNC_ONLY
    ]
    assert missing == [], f"buzon.rpc names without a buzon.aio.rpc counterpart: {missing}"
    assert set(arpc.SYNC_ONLY) <= set(rpc.__all__)  # no stale entries
    for name in arpc.__all__:
        assert hasattr(arpc, name), name


def test_the_verbs_are_coroutines_and_the_pure_pieces_are_the_same_objects() -> None:
    for verb in ("connect", "connect_process", "serve", "close"):
        assert inspect.iscoroutinefunction(getattr(arpc, verb)), verb
    for name in ("call", "notify"):
        for klass in (arpc.Client, arpc.MsgpackRpcClient, arpc.JsonRpcClient):
            assert inspect.iscoroutinefunction(getattr(klass, name)), (klass, name)
    assert inspect.iscoroutinefunction(arpc.JsonRpcClient.call_batch)
    assert inspect.iscoroutinefunction(arpc.Server.serve_forever)
    shared = (
        "CallContext",
        "DeadlineExceeded",
        "Method",
        "RemoteError",
        "RemoteObject",
        "ServerRestarted",
        "Service",
        "context",
        "deadline",
        "expose",
        "remote",
    )
    for name in shared:
        assert getattr(arpc, name) is getattr(rpc, name), name


def test_the_sync_servers_options_are_all_accepted_by_the_aio_server() -> None:
    sync = set(inspect.signature(rpc.Server).parameters) - {"mode"}  # mode: which server
    aio = set(inspect.signature(arpc.Server).parameters)
    assert sync <= aio, sync - aio
    sync_connect = set(inspect.signature(rpc.connect).parameters)
    aio_connect = set(inspect.signature(arpc.connect).parameters)
    assert sync_connect <= aio_connect, sync_connect - aio_connect
    sync_cp = set(inspect.signature(rpc.connect_process).parameters)
    assert sync_cp <= set(inspect.signature(arpc.connect_process).parameters)


def test_every_public_aio_name_and_method_has_a_docstring() -> None:
    undocumented = []
    for name in arpc.__all__:
        obj = getattr(arpc, name)
        if name == "SYNC_ONLY":
            continue
        if not inspect.getdoc(obj):
            undocumented.append(name)
        if not inspect.isclass(obj):
            continue
        for klass in obj.__mro__:
            if not klass.__module__.startswith("buzon.aio"):
                continue
            for attr, value in vars(klass).items():
                if attr.startswith("_") or not (callable(value) or isinstance(value, property)):
                    continue
                if not inspect.getdoc(value):
                    undocumented.append(f"{name}.{attr}")
    assert undocumented == []
