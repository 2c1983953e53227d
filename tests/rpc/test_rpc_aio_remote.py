"""buzon.aio.rpc remote objects: references, identity, release, callbacks, refusal,
between asyncio ends and mixed with the blocking ones."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest
from _rpc_aio_helpers import aio_serving, aio_serving_in_thread, until
from _rpc_helpers import serving

import buzon
from buzon import rpc
from buzon.aio import rpc as arpc
from buzon.errors import RemoteError

RAN: list[str] = []


@rpc.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    @rpc.expose
    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value

    @rpc.expose
    def child(self) -> Counter:
        return Counter(self.value * 10)

    def secret(self) -> str:  # not exposed
        RAN.append("secret")
        return "secret"

    def __getattr__(self, name: str) -> Any:  # any attribute walk would show here
        RAN.append(f"getattr {name}")
        raise AttributeError(name)


@rpc.remote
class Listener:
    """A client's object the server calls back."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @rpc.expose
    async def notice(self, value: int) -> int:
        self.seen.append(value)
        return value * 2


@rpc.remote
class BlockingListener:
    """A blocking client's object the asyncio server calls back."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @rpc.expose
    def notice(self, value: int) -> int:
        self.seen.append(value)
        return value * 2


def _service() -> tuple[rpc.Service, dict[str, Any]]:
    state: dict[str, Any] = {"counters": []}
    svc = rpc.Service("objects")

    @svc.method
    def make(start: int) -> Counter:
        c = Counter(start)
        state["counters"].append(c)
        return c

    @svc.method
    def same(a: Counter, b: Counter) -> bool:
        return a is b and a is state["counters"][0]

    @svc.method
    async def call_back(listener: Any, value: int) -> int:
        doubled: int = await listener.notice(value)  # the client's object, over this connection
        return doubled + 1

    @svc.method
    def call_back_blocking(listener: Any, value: int) -> int:
        doubled: int = listener.notice(value)  # the blocking server's proxy
        return doubled + 1

    return svc, state


async def test_async_remote_objects_identity_refusal_release_and_callbacks() -> None:
    RAN.clear()
    svc, state = _service()
    async with aio_serving("unix:aobj", svc) as srv:
        client = await arpc.connect(srv.address, timeout=10)
        async with client:
            counter = await client.make(5)
            assert isinstance(counter, rpc.RemoteObject)
            assert await counter.incr() == 6
            assert await counter.incr(by=4) == 10
            assert state["counters"][0].value == 10  # it ran on the original
            # given back, it arrives as the original object (identity, not a copy)
            assert await client.same(counter, counter) is True
            child = await counter.child()
            assert isinstance(child, rpc.RemoteObject) and await child.incr() == 101
            # only exposed methods: nothing else runs, nothing is walked
            for bad in ("secret", "__class__", "__init__", "value"):
                with pytest.raises(RemoteError) as info:
                    await client._call_ref(counter._rid, bad, (), {})
                assert info.value.code == RemoteError.METHOD_NOT_FOUND, bad
            with pytest.raises(AttributeError):
                counter._private  # noqa: B018
            with pytest.raises(RemoteError):
                await client._call_ref(999, "incr", (), {})  # forged reference
            assert RAN == []
            # a callback: the server awaits the client's object over this connection
            listener = Listener()
            assert await client.call_back(listener, 21) == 43
            assert listener.seen == [21]
            # references counted: dropped proxies are released
            assert srv.references == 2
            del counter, child
            gc.collect()
            assert await until(lambda: srv.references == 0)
            again = await client.make(1)
            assert srv.references == 1
            del again
        # a disconnect drops whatever the client still held
        assert await until(lambda: srv.references == 0)


async def test_async_client_passes_a_callback_to_the_blocking_server() -> None:
    svc, _ = _service()
    with serving("unix:bobj", svc) as srv:
        client = await arpc.connect(srv.address, timeout=10)
        async with client:
            listener = Listener()
            assert await client.call_back_blocking(listener, 4) == 9
            assert listener.seen == [4]
            counter = await client.make(2)
            assert await counter.incr() == 3


def test_the_blocking_client_holds_the_async_servers_objects() -> None:
    svc, _ = _service()
    with (
        aio_serving_in_thread("unix:cobj", svc) as srv,
        rpc.connect(srv.address, timeout=10) as client,
    ):
        counter = client.make(7)
        assert counter.incr(by=3) == 10
        assert client.same(counter, counter) is True
        listener = BlockingListener()
        assert client.call_back(listener, 1) == 3  # the async server calls the blocking client
        assert listener.seen == [1]
        assert threading.active_count() > 0
        del counter
        gc.collect()
        assert asyncio.run(until(lambda: srv.references == 0))


async def test_a_proxy_of_a_lost_connection_fails_instead_of_reaching_a_new_object() -> None:
    """After a reconnect, reference ids start again on the new connection: an old
    proxy must not reach the new connection's object that has its id."""
    svc, _ = _service()
    svc2, state2 = _service()
    async with aio_serving("unix:relost", svc, grace=0.1) as srv:
        c = await arpc.connect(srv.address, timeout=20, semantics="at_least_once")
        old = await c.make(1)
        assert await old.incr() == 2
    async with aio_serving("unix:relost", svc2):
        fresh = await c.make(100)  # reconnects: a new connection, reference ids from 1
        assert fresh._rid == old._rid
        with pytest.raises(buzon.EndOfChannel, match="lost"):
            await old.incr()
        with pytest.raises(RemoteError, match="another connection"):
            await c.same(old, fresh)
        assert await fresh.incr() == 101
        assert state2["counters"][0].value == 101  # untouched by the old proxy's call
        await c.aclose()
