"""buzon.rpc remote objects (RMI): references, identity, release, callbacks, refusal."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from _rpc_helpers import serving

import buzon
from buzon import rpc
from buzon.errors import RemoteError
from buzon.rpc import _wire as w


def until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it is true or ``timeout`` passes (a generous bound)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


RAN: list[str] = []


@rpc.remote
class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.lock = threading.Lock()

    @rpc.expose
    def incr(self, by: int = 1) -> int:
        with self.lock:
            self.value += by
            return self.value

    @rpc.expose
    def child(self) -> Counter:
        """A remote object's method that returns another remote object."""
        return Counter(self.value * 10)

    def secret(self) -> str:  # not exposed
        RAN.append("secret")
        return "secret"

    def _private(self) -> str:
        RAN.append("_private")
        return "private"

    def __getattr__(self, name: str) -> Any:  # any attribute walk would show here
        RAN.append(f"getattr {name}")
        raise AttributeError(name)


@rpc.remote
class Listener:
    """A client's object the server calls back."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    @rpc.expose
    def notice(self, value: int) -> int:
        self.seen.append(value)
        return value * 2

    @rpc.expose
    def unencodable(self) -> Any:
        return object()

    @rpc.expose
    def fails(self) -> None:
        raise ValueError("listener broke")

    def secret(self) -> None:  # not exposed: the server must not reach it
        RAN.append("listener secret")


class Registry:
    def __init__(self) -> None:
        self.made: list[Counter] = []
        self.received: list[Any] = []

    @rpc.expose
    def make(self, start: int) -> Counter:
        c = Counter(start)
        self.made.append(c)
        return c

    @rpc.expose
    def make_two(self) -> list[Any]:
        c = Counter(1)
        self.made.append(c)
        return [c, {"again": c}]

    @rpc.expose
    def is_mine(self, c: Counter, index: int) -> bool:
        self.received.append(c)
        return c is self.made[index]

    @rpc.expose
    def bump(self, c: Counter) -> int:
        return c.incr(100)

    @rpc.expose
    def call_me(self, listener: Any, n: int) -> int:
        """Calls the client's object back ``n`` times while the client waits."""
        return sum(listener.notice(i) for i in range(n))

    @rpc.expose
    def call_me_nested(self, listener: Any) -> int:
        """A callback that calls the server again from inside the callback."""
        return int(listener.notice(5))

    @rpc.expose
    def probe(self, listener: Any, name: str) -> list[Any]:
        """Call ``name`` on the client's object; the error it gets, as [code, message]."""
        try:
            return ["ok", listener._peer._call_ref(listener._rid, name, (), {})]
        except RemoteError as err:
            return [err.code, err.message]

    @rpc.expose
    def keep(self, listener: Any) -> None:
        self.received.append(listener)

    @rpc.expose
    def plain(self, a: int) -> int:
        return a + 1


@pytest.fixture
def server() -> Any:
    reg = Registry()
    with serving("unix:rmi", reg) as srv:
        srv.registry = reg  # type: ignore[attr-defined]
        yield srv


def test_a_remote_result_is_a_proxy_whose_calls_run_on_the_server_object(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        counter = c.make(5)
        assert isinstance(counter, rpc.RemoteObject)
        assert counter.incr() == 6
        assert counter.incr(by=4) == 10
        assert server.registry.made[0].value == 10  # the server's object changed
        assert c.plain(1) == 2  # plain calls still work beside references


def test_identity_round_trip(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        a = c.make(1)
        b = c.make(2)
        assert c.is_mine(a, 0) is True
        assert c.is_mine(b, 1) is True
        assert c.is_mine(a, 1) is False
        assert server.registry.received[0] is server.registry.made[0]  # the very object
        assert c.bump(a) == 101  # the server calls its own original object
        # the same object twice in one result: one proxy
        first, inner = c.make_two()
        assert first is inner["again"]


def test_a_method_of_a_remote_object_returns_another_remote_object(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        parent = c.make(3)
        kid = parent.child()
        assert isinstance(kid, rpc.RemoteObject)
        assert kid is not parent
        assert kid.incr() == 31
        assert parent.incr() == 4
        assert server.references == 2


def test_only_exposed_methods_are_callable_and_nothing_runs_otherwise(server: Any) -> None:
    RAN.clear()
    with rpc.connect(server.address, timeout=10) as c:
        counter = c.make(0)
        rid = counter._rid
        # the proxy refuses private and dunder names locally (its own __class__ is the
        # proxy's class: nothing of the server's)
        for name in ("_private", "__globals__", "__dict__", "__func__"):
            with pytest.raises(AttributeError):
                getattr(counter, name)
        assert counter.__class__ is rpc.RemoteObject
        # and the server refuses them on the wire, whatever the client sends
        hostile = [
            "secret",
            "_private",
            "__class__",
            "__globals__",
            "__init__",
            "incr.__globals__",
            "incr.__func__.__globals__",
            "__getattribute__",
            "value",
            "lock",
            "",
        ]
        for name in hostile:
            with pytest.raises(RemoteError) as info:
                c._call_ref(rid, name, (), {})
            assert info.value.code == RemoteError.METHOD_NOT_FOUND, name
        for rid_ in (rid + 1000, -1):  # no such reference
            with pytest.raises(RemoteError) as info:
                c._call_ref(rid_, "incr", (), {})
            assert info.value.code == RemoteError.INVALID_PARAMS
        assert RAN == []  # nothing ran, no attribute was looked up
        assert counter.incr() == 1  # the connection still serves


def test_release_on_drop_returns_the_count_to_zero(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        kept = c.make(1)
        dropped = [c.make(i) for i in range(5)]
        again = c.make_two()  # one object, sent twice
        assert server.references == 7
        del dropped, again
        gc.collect()
        assert until(lambda: server.references == 1), server.references
        assert kept.incr() == 2  # the kept one is untouched
        del kept
        gc.collect()
        assert until(lambda: server.references == 0), server.references


def test_a_reference_sent_again_while_its_proxy_lives_is_counted(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        a = c.make(0)
        assert c.make_two() is not None
        # the server sends `a` inside other results: the same proxy, counted each time
        for _ in range(3):
            assert c.is_mine(a, 0)
        server.registry.made.clear()
        del a
        gc.collect()
        assert until(lambda: server.references == 0), server.references


def test_release_on_disconnect(server: Any) -> None:
    c = rpc.connect(server.address, timeout=10)
    held = [c.make(i) for i in range(3)]
    c.keep(Listener())  # the server holds a proxy of the client's object too
    assert server.references == 3
    alive = [weakref.ref(obj) for obj in server.registry.made]
    server.registry.made.clear()  # only the export table keeps them now
    c.close()
    assert until(lambda: server.references == 0), server.references
    gc.collect()
    assert until(lambda: all(r() is None for r in alive))  # the objects are freed
    # the connection's release thread ended with it
    assert until(lambda: not any(t.name == "buzon-rpc-release" for t in threading.enumerate()))
    assert len(held) == 3


def test_the_server_calls_the_clients_object_back_on_the_same_connection(server: Any) -> None:
    listener = Listener()
    with rpc.connect(server.address, timeout=10) as c:
        assert c.call_me(listener, 4) == 2 * (0 + 1 + 2 + 3)
        assert listener.seen == [0, 1, 2, 3]
        assert c.call_me_nested(listener) == 10
        # the server's proxy of the listener was released when its call ended (the
        # client reads the release while it waits for a reply: make calls meanwhile)
        assert until(lambda: c.plain(0) == 1 and len(c._exports) == 0), len(c._exports)


def test_a_callback_may_call_the_server_while_the_server_waits_for_it(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:

        @rpc.remote
        class Relay:
            @rpc.expose
            def notice(self, value: int) -> int:
                return int(c.plain(value))  # a call to the server from inside the callback

        assert c.call_me_nested(Relay()) == 6


def test_a_proxy_used_from_two_threads(server: Any) -> None:
    with rpc.connect(server.address, timeout=10) as c:
        counter = c.make(0)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(200):
                    counter.incr()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert counter.incr(0) == 400


def test_a_proxy_of_another_connection_cannot_be_passed(server: Any) -> None:
    with (
        rpc.connect(server.address, timeout=10) as c1,
        rpc.connect(server.address, timeout=10) as c2,
    ):
        a = c1.make(0)
        with pytest.raises(RemoteError):
            c2.is_mine(a, 0)
        assert c2.plain(1) == 2


def test_malformed_targets_and_references_on_the_wire_are_refused(server: Any) -> None:
    RAN.clear()
    ch = buzon.connect(server.address, timeout=10)
    ids = iter(range(1, 100))

    def ask(body: list[Any]) -> list[Any]:
        w.send(ch, body, w.MESSAGE_ID, next(ids), None, 10)
        reply, _ = ch._recv_fields(10)
        assert isinstance(reply, list)
        return reply

    try:
        made = ask([w.REQUEST, "make", [7]])
        ref = made[2]
        assert isinstance(ref, msgspec.msgpack.Ext) and ref.code == 3
        owner, rid = msgspec.msgpack.decode(ref.data)
        assert owner == 1  # "mine": the server exports it
        for target in (
            [rid],
            [rid, 1],
            [rid, "incr", "x"],
            ["1", "incr"],
            [None, "incr"],
            [rid, "__class__"],
            [rid, "incr.__globals__"],
            {"id": rid},
        ):
            reply = ask([w.REQUEST, target, []])
            assert reply[1] is not None, target  # an error reply
        # a forged reference: unknown ids, wrong owners, junk bodies
        for data in ([0, 999], [0, "x"], [7, rid], "junk", [0]):
            forged = msgspec.msgpack.Ext(3, msgspec.msgpack.encode(data))
            reply = ask([w.REQUEST, "is_mine", [forged, 0]])
            assert reply[1] is not None and reply[1][0] == RemoteError.INVALID_PARAMS, data
        reply = ask([w.REQUEST, [rid, "incr"], [1]])
        assert reply[1] is None and reply[2] == 8  # the connection still serves
        assert RAN == []
    finally:
        ch.close()
    assert until(lambda: server.references == 0)


def test_the_client_serves_only_its_objects_exposed_methods(server: Any) -> None:
    RAN.clear()
    listener = Listener()
    with rpc.connect(server.address, timeout=10) as c:
        for name in ("secret", "__class__", "__init__", "seen", "notice.__globals__", "_x"):
            code, _ = c.probe(listener, name)
            assert code == RemoteError.METHOD_NOT_FOUND, name
        code, message = c.probe(listener, "unencodable")
        assert code == RemoteError.INVALID_RESULT, message
        code, message = c.probe(listener, "fails")
        assert code == RemoteError.SERVER_ERROR and "listener broke" in message
        assert c.probe(listener, "notice")[0] == RemoteError.INVALID_PARAMS  # no argument
        assert RAN == []


@pytest.mark.parametrize(
    ("url", "mode"),
    [
        ("tcp://127.0.0.1:0", "thread"),
        ("seqpacket:rmi", "thread"),
        ("shm:rmi", "thread"),
        ("unix:rmiproc", "process"),
    ],
)
def test_references_and_callbacks_on_other_transports_and_modes(url: str, mode: str) -> None:
    with (
        serving(url, Registry(), mode=mode) as srv,
        rpc.connect(srv.address, timeout=10) as c,
    ):
        a = c.make(1)
        assert a.incr() == 2
        assert c.is_mine(a, 0) is True
        assert a.child().incr() == 21
        listener = Listener()
        assert c.call_me(listener, 3) == 6
        assert listener.seen == [0, 1, 2]


def test_a_proxy_of_a_lost_connection_fails_instead_of_reaching_a_new_object() -> None:
    """After a reconnect, reference ids start again on the new connection: an old proxy
    must fail, not reach the new connection's object that has its id (it did)."""
    first, second = Registry(), Registry()
    with serving("unix:rmi-lost", first, grace=0.1) as srv:
        c = rpc.connect(srv.address, timeout=20, semantics="at_least_once")
        old = c.make(1)
        assert old.incr() == 2
    try:
        with serving("unix:rmi-lost", second):
            fresh = c.make(100)  # reconnects: a new connection, reference ids from 1
            assert fresh._rid == old._rid
            with pytest.raises(buzon.EndOfChannel, match="lost"):
                old.incr()
            with pytest.raises(RemoteError, match="another connection"):
                c.is_mine(old, 0)
            assert fresh.incr() == 101
            assert second.made[0].value == 101  # untouched by the old proxy's call
            del fresh
    finally:
        c.close()
