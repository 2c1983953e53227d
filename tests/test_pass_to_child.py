"""Contract 4g: buzon objects pass to child processes as ``multiprocessing.Pipe`` ends do.

Parent to child: as ``Process`` arguments (pickled by ``multiprocessing`` under spawn
and forkserver, inherited under fork). Child to parent: through a
``multiprocessing`` pipe, whose pickler fetches the fds from the child's resource
sharer. Each start method runs in one separate interpreter (so the forkserver and the
resource tracker end with it) that starts exactly one child and joins it with a
timeout; it checks that every object arrived working with its options and state, and
that the parent is left with the fds it started with and no segment or name file.

The refusals need no child: they are checked in this process with the pickler.
"""

from __future__ import annotations

import copy
import os
import pickle
import threading
from collections.abc import Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import pytest

import buzon
from _fork import run_script
from buzon.errors import ChannelClosed, UnsupportedOperation

SCRIPT = r"""
import atexit
import multiprocessing as mp
import os
import sys
import threading

import buzon


def fds():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def child(conn, rx, tx, simplex, unix_end, mq_end, fifo_end, dgram, lst, tcp, shm, auth, *shared):
    buf, grid, counter, *inherited = shared
    for end in inherited:  # fork only: an shm: end, inherited rather than pickled
        end.send(b"y" * 5_000_000, timeout=10)  # larger than the ring: out of line
        assert end.recv(timeout=10) == "got it"
        end.close()
    # a duplex pipe end with capacity=2 and max_frame: two messages were waiting for it
    assert rx.capacity == 2 and rx.properties.transport == "pipe", rx.properties
    assert [rx.recv(timeout=10), rx.recv(timeout=10)] == ["m1", "m2"]
    assert rx.recv(timeout=10) == "m3"  # sent once our takes gave credit back
    try:
        rx.send(b"x" * 70_000, timeout=10)
        raise AssertionError("max_frame was not carried over")
    except buzon.MessageTooLarge:
        pass
    # a sending end with capacity=1 whose one credit the parent's take gave back
    assert tx._core.sflow.sent == 1, "the credit state was not carried over"
    tx.send("two", timeout=10)
    # the sending end of a simplex pipe with capacity=1 (a token pool)
    simplex.send("s1", timeout=10)
    simplex.send("s2", timeout=10)  # waits for the token the parent's take puts back
    # a Unix socket end with codec="pickle"
    assert unix_end.recv(timeout=10) == {1, 2, 3}
    unix_end.send(("set", frozenset({4})), timeout=10)
    # the reading end of a POSIX queue made with capacity=2 (its maxmsg)
    assert mq_end.capacity == 2, mq_end.capacity
    assert mq_end.recv(timeout=10) == "queued"
    # the reading end of a FIFO with capacity=1: it owns the credit pool (one fd, two roles)
    assert [fifo_end.recv(timeout=10), fifo_end.recv(timeout=10)] == ["f1", "f2"]
    # a connected Unix datagram end
    dgram.send("ping", timeout=10)
    assert dgram.recv(timeout=10) == "pong"
    # listeners: accept the parent's connections; closing our copies removes nothing
    with lst.accept(timeout=10) as peer:
        peer.send(peer.recv(timeout=10) + "!", timeout=10)
    lst.close()
    with tcp.accept(timeout=10) as peer:
        peer.send(peer.recv(timeout=10) * 2, timeout=10)
    tcp.close()
    with shm.accept(timeout=10) as peer:  # the rings are made here, in the child
        peer.send(peer.recv(timeout=10).upper(), timeout=10)
    shm.close()
    with auth.accept(timeout=10) as peer:  # with the authkey it was made with
        peer.send(peer.recv(timeout=10)[::-1], timeout=10)
    auth.close()
    # shared objects, by name
    buf.put(b"from the child", timeout=10)
    with grid.lock:
        grid.array[1] = 42
    with counter.lock:
        counter.value += 1
    for obj in (rx, tx, simplex, unix_end, mq_end, fifo_end, dgram, buf, grid, counter):
        obj.close()
    # child to parent: a pipe end and a shared value, through a multiprocessing pipe
    here, there = buzon.pipe()
    made = buzon.shared_value("made", int)
    made.value = 7
    conn.send((there, made))
    there.close()
    made.close()
    here.send("hello from the child", timeout=10)
    assert here.recv(timeout=10) == "bye"  # the parent has it all: we may exit
    here.close()
    conn.close()


def scrub():
    # at exit, even after a failure: no segment or queue of this run is left behind
    from buzon.transport.mq import remove_queue

    named = (buzon.BoundedBuffer, "jobs"), (buzon.shared_array, "grid")
    for make, name in named + ((buzon.shared_value, "counter"), (buzon.shared_value, "made")):
        try:
            obj = make(name)
        except buzon.NoSuchEndpoint:
            continue
        obj.remove()
        obj.close()
    remove_queue("mq:jobs")


if __name__ == "__main__":
    atexit.register(scrub)
    method = sys.argv[1]
    ctx = mp.get_context(method)
    if method != "fork":  # their helper processes (and fds) live on: start them first
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        if method == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()
    before = fds()
    rx_parent, rx = buzon.pipe(capacity=2, max_frame=1 << 16)
    rx_parent.send("m1")
    rx_parent.send("m2")  # the window is full: m3 needs the child's takes
    tx, tx_parent = buzon.pipe(capacity=1)
    tx.send("one")
    simplex_rx, simplex = buzon.pipe(duplex=False, capacity=1)
    pair = buzon.listen("unix:pair", codec="pickle", pickle=True)
    accepted = []
    t = threading.Thread(target=lambda: accepted.append(pair.accept(timeout=10)))
    t.start()
    unix_mine = buzon.connect("unix:pair", timeout=10, codec="pickle", pickle=True)
    t.join(10)
    unix_end = accepted[0]
    pair.close()
    mq = buzon.listen("mq:jobs", capacity=2)
    mq_end = mq.accept(timeout=10)
    fifo = buzon.listen("fifo:ff", capacity=1)
    fifo_end = fifo.accept(timeout=10)
    fifo_w = buzon.connect("fifo:ff", timeout=10, capacity=1)
    dg = buzon.listen("unixgram:dg")
    dg_bound = dg.accept(timeout=10)
    dgram = buzon.connect("unixgram:dg", timeout=10)
    lst = buzon.listen("unix:svc")
    tcp_lst = buzon.listen("tcp://127.0.0.1:0")
    shm_lst = buzon.listen("shm:sh", ring_size=1 << 16)
    auth_lst = buzon.listen("unix:auth", authkey=b"secret")
    buf = buzon.BoundedBuffer("jobs", slots=2, item_size=32)
    grid = buzon.shared_array("grid", 3, "i8")
    counter = buzon.shared_value("counter", int)
    parent_conn, child_conn = ctx.Pipe()
    ends = (rx, tx, simplex, unix_end, mq_end, fifo_end, dgram)
    args = (child_conn, *ends, lst, tcp_lst, shm_lst, auth_lst, buf, grid, counter)
    if method == "fork":
        with buzon.listen("shm:inherit") as sl:
            t = threading.Thread(target=lambda: accepted.append(sl.accept(timeout=10)))
            t.start()
            shm_mine = buzon.connect("shm:inherit", timeout=10)
            t.join(10)
        args += (accepted[-1],)
    proc = ctx.Process(target=child, args=args, daemon=True)  # ended at exit if we fail
    proc.start()
    child_conn.close()
    for obj in (rx, tx, simplex, unix_end, mq_end, fifo_end):  # the child has them now
        obj.close()
    if method == "fork":
        accepted[-1].close()
        assert shm_mine.recv(timeout=60) == b"y" * 5_000_000
        shm_mine.send("got it")
        shm_mine.close()
    rx_parent.send("m3", timeout=60)  # the first wait for the child: it may start slowly
    assert tx_parent.recv(timeout=10) == "one"
    assert tx_parent.recv(timeout=10) == "two"
    assert simplex_rx.recv(timeout=10) == "s1"
    assert simplex_rx.recv(timeout=10) == "s2"
    unix_mine.send({1, 2, 3})
    assert unix_mine.recv(timeout=10) == ("set", frozenset({4}))
    with buzon.connect("mq:jobs", timeout=10, capacity=2) as w:
        w.send("queued")
    fifo_w.send("f1", timeout=10)
    fifo_w.send("f2", timeout=10)  # waits for the token the child's take puts back
    assert dg_bound.recv(timeout=10) == "ping"
    dg_bound.send("pong")
    with buzon.connect("unix:svc", timeout=10) as c:
        c.send("hi")
        assert c.recv(timeout=10) == "hi!"
    with buzon.connect(str(tcp_lst.address), timeout=10) as c:
        c.send("ab")
        assert c.recv(timeout=10) == "abab"
    with buzon.connect("shm:sh", timeout=10) as c:
        assert "rings of 65536 bytes" in c.properties.notes  # the listener's ring_size
        c.send("shm")
        assert c.recv(timeout=10) == "SHM"
    with buzon.connect("unix:auth", timeout=10, authkey=b"secret") as c:
        c.send("abc")
        assert c.recv(timeout=10) == "cba"
    assert parent_conn.poll(30), "the child sent nothing back"
    back, made = parent_conn.recv()
    assert back.recv(timeout=10) == "hello from the child"
    back.send("bye")
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
    exitcode = proc.exitcode
    proc.close()
    assert buf.get(timeout=10) == b"from the child"
    result = (exitcode, grid.array.tolist(), counter.value, made.value)
    for path in (lst._lt.path, shm_lst._lt.path):
        assert os.path.exists(path), "the child's listener removed the socket file"
    segments = [buf._ring.name.lstrip("/")] + [o.segment_name for o in (grid, counter, made)]
    for obj in (buf, grid, counter, made):
        obj.remove()
        obj.close()
    assert not any(os.path.exists("/dev/shm/" + seg) for seg in segments), "segments left"
    # the parent's copy of the datagram end owns its socket file: closed last
    for obj in (rx_parent, tx_parent, simplex_rx, unix_mine, mq, fifo_w, fifo, dg_bound, dg):
        obj.close()
    for obj in (dgram, lst, tcp_lst, shm_lst, auth_lst, back):
        obj.close()
    parent_conn.close()
    after = fds()
    leaked = {fd: t for fd, t in after.items() if before.get(fd) != t}
    print(result, "leaked:", leaked)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_objects_pass_both_ways(method: str, runtime_dir: str) -> None:
    out = run_script(runtime_dir, "pass_objects.py", SCRIPT, method)
    assert out == "(0, [0, 42, 0], 1, 7) leaked: {}\n"
    assert sorted(os.listdir(runtime_dir)) == []


SHM_SCRIPT = r"""
import multiprocessing as mp
import os
import sys
import threading

import buzon

BIG = 200_000  # more than the 64 KiB rings hold: out of line, in a block


def fds():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def pair(name):
    with buzon.listen(f"shm:{name}", ring_size=1 << 16, capacity=2) as lst:
        got = []
        t = threading.Thread(target=lambda: got.append(lst.accept(timeout=10)))
        t.start()
        mine = buzon.connect(f"shm:{name}", timeout=10, capacity=2)
        t.join(10)
    return mine, got[0]


def child(end, plain, conn):
    # the parent's mapped pooled block carries this one: mapped here through its fd
    assert end.recv(timeout=60) == b"q" * BIG
    assert end.capacity == 2 and end._core.sflow is not None, "the options were lost"
    assert [end.recv(timeout=10) for _ in range(3)] == ["s1", "s2", "s3"]  # credits flow
    end.send(b"Q" * BIG, timeout=10)
    end.send("done", timeout=10)
    end.close()
    assert plain.recv(timeout=10) == "read ahead in the ring"  # left unread by the parent
    plain.send(b"P" * BIG, timeout=10)
    plain.close()
    # child to parent, through a multiprocessing pipe: an end with a message waiting
    here, there = pair("back")
    here.send(b"z" * BIG, timeout=10)
    conn.send(there)
    there.close()
    assert here.recv(timeout=10) == b"Z" * BIG
    here.close()
    conn.close()


if __name__ == "__main__":
    method = sys.argv[1]
    ctx = mp.get_context(method)
    if method != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        if method == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()
    before = fds()
    mine, theirs = pair("pass")
    for _ in range(2):  # theirs maps mine's pooled block (its name is gone after that)
        mine.send(b"p" * BIG, timeout=10)
        assert theirs.recv(timeout=10) == b"p" * BIG
    theirs.send(b"t" * BIG, timeout=10)
    assert mine.recv(timeout=10) == b"t" * BIG
    plain_mine, plain = pair("plain")
    plain_mine.send("read ahead in the ring")
    parent_conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=child, args=(theirs, plain, child_conn), daemon=True)
    proc.start()
    child_conn.close()
    theirs.close()  # the child holds it now
    plain.close()
    mine.send(b"q" * BIG, timeout=10)
    for m in ("s1", "s2", "s3"):
        mine.send(m, timeout=60)
    assert mine.recv(timeout=60) == b"Q" * BIG
    assert mine.recv(timeout=10) == "done"
    assert plain_mine.recv(timeout=10) == b"P" * BIG
    assert parent_conn.poll(30), "the child sent nothing back"
    back = parent_conn.recv()
    assert back.recv(timeout=10) == b"z" * BIG
    back.send(b"Z" * BIG, timeout=10)
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join(10)
    exitcode = proc.exitcode
    proc.close()
    for obj in (mine, plain_mine, back, parent_conn):
        obj.close()
    left = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"buzon-{os.getuid()}-"))
    after = fds()
    leaked = {fd: t for fd, t in after.items() if before.get(fd) != t}
    print(exitcode, "segments:", left, "leaked:", leaked)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_shm_channel_ends_pass_both_ways(method: str, runtime_dir: str) -> None:
    """An shm: end passes as a Process argument (pickled under spawn and forkserver: its
    rings and the peer's blocks it maps go by fd) and back through a multiprocessing
    pipe, with its options, credit state and the messages waiting in its ring."""
    out = run_script(runtime_dir, "pass_shm.py", SHM_SCRIPT, method)
    assert out == "0 segments: [] leaked: {}\n"
    assert sorted(os.listdir(runtime_dir)) == []


# -- refusals: no child needed ------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return bytes(ForkingPickler.dumps(obj))


@pytest.fixture
def objects(runtime_dir: str) -> Iterator[dict[str, Any]]:
    a, b = buzon.pipe()
    lst = buzon.listen("unix:refuse")
    buf = buzon.BoundedBuffer("refuse", slots=1, item_size=8)
    arr = buzon.shared_array("refuse", 2, "i4")
    val = buzon.shared_value("refuse", float)
    try:
        yield {"channel": a, "listener": lst, "buffer": buf, "array": arr, "value": val}
    finally:
        for obj in (buf, arr, val):
            obj.remove()
            obj.close()
        for ch in (a, b, lst):
            ch.close()


@pytest.mark.fd_check
@pytest.mark.parametrize("kind", ["channel", "listener", "array", "value"])
def test_plain_pickle_says_multiprocessing(objects: dict[str, Any], kind: str) -> None:
    obj = objects[kind]
    with pytest.raises(TypeError, match=r"passes only to another process through multiprocess"):
        pickle.dumps(obj)
    with pytest.raises(TypeError, match=r"with plain pickle"):
        copy.copy(obj)


@pytest.mark.fd_check
def test_closed_objects_are_refused(objects: dict[str, Any]) -> None:
    for obj in objects.values():
        obj.close()
        with pytest.raises(ChannelClosed, match="closed"):
            _dumps(obj)


@pytest.mark.fd_check
def test_channel_with_unread_bytes_is_refused() -> None:
    a, b = buzon.pipe()
    try:
        a.send("first")
        a.send("second")
        assert b.recv(timeout=5) == "first"  # "second" was read with it: it is buffered here
        with pytest.raises(UnsupportedOperation, match="already read here"):
            _dumps(b)
        assert b.recv(timeout=5) == "second"  # the refusal lost nothing
    finally:
        a.close()
        b.close()


@pytest.mark.fd_check
def test_channel_with_a_partial_frame_is_refused() -> None:
    r, w = os.pipe()
    a, b = buzon.pipe()
    try:
        frame = bytes(b._core.encode("whole")[0])  # what a peer would write
        os.write(a._core.write_fileno(), frame[:5])  # a writer died mid-frame
        with pytest.raises(buzon.Empty):
            b.recv_nowait()
        with pytest.raises(UnsupportedOperation, match="partially read frame"):
            _dumps(b)
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.fd_check
def test_channel_with_unwritten_bytes_is_refused() -> None:
    a, b = buzon.pipe()
    try:
        big = b"x" * 1_000_000  # more than the pipe holds: the rest waits in user space
        a.send_bytes_nowait(big)
        assert a._core.pending
        with pytest.raises(UnsupportedOperation, match="flush"):
            _dumps(a)
    finally:
        b.close()
        a.close()


@pytest.mark.fd_check
def test_shm_channel_with_an_open_loan_or_view_is_refused(runtime_dir: str) -> None:
    with buzon.listen("shm:refuse") as lst:
        accepted: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: accepted.append(lst.accept(timeout=10)))
        t.start()
        with buzon.connect("shm:refuse", timeout=10) as c:
            t.join(10)
            with accepted[0] as s:
                for nbytes in (64, 8 << 20):  # in the ring, and in a block
                    with c.loan(nbytes) as buf:
                        buf[:2] = b"ok"
                        with pytest.raises(UnsupportedOperation, match="loan or a received"):
                            _dumps(c)
                    with s.recv_view(timeout=10) as view:
                        assert bytes(view[:2]) == b"ok"
                        if nbytes == 64:  # a view of a ring record (a block's is harmless)
                            with pytest.raises(UnsupportedOperation, match="loan or a rece"):
                                _dumps(s)
                c.send("still works")
                assert s.recv(timeout=10) == "still works"
                c.send("read ahead")
                assert buzon.wait([s], timeout=10) == [s]  # took it from the ring
                with pytest.raises(UnsupportedOperation, match="already read here"):
                    _dumps(s)
                assert s.recv(timeout=10) == "read ahead"  # the refusal lost nothing


@pytest.mark.fd_check
def test_single_channel_listener_is_refused(runtime_dir: str) -> None:
    with (
        buzon.listen("fifo:refuse") as lst,
        pytest.raises(UnsupportedOperation, match="accept it and pass the channel"),
    ):
        _dumps(lst)


def test_authkey_listener_only_as_a_process_argument(runtime_dir: str) -> None:
    with (
        buzon.listen("unix:refuse", authkey=b"secret") as lst,
        pytest.raises(UnsupportedOperation, match="authkey"),
    ):
        _dumps(lst)


@pytest.mark.fd_check
def test_asyncio_objects_are_refused(runtime_dir: str) -> None:
    import asyncio

    async def main() -> None:
        a, b = buzon.aio.pipe()
        lst = buzon.aio.listen("unix:refuse-aio")
        try:
            for obj in (a, lst):
                with pytest.raises(UnsupportedOperation, match="event loop"):
                    _dumps(obj)
                with pytest.raises(TypeError, match="multiprocessing"):
                    pickle.dumps(obj)
        finally:
            a.close()
            b.close()
            lst.close()

    asyncio.run(main())


@pytest.mark.fd_check
def test_tls_listener_is_refused(runtime_dir: str) -> None:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with (
        buzon.listen("tcp://127.0.0.1:0", tls=ctx) as lst,
        pytest.raises(UnsupportedOperation, match="SSLContext"),
    ):
        _dumps(lst)


@pytest.mark.fd_check
def test_reliable_datagram_ends_are_refused(runtime_dir: str) -> None:
    with buzon.listen("unixgram:rel", reliable=True) as lst:
        # the listener's refusal names why (it used to say "its endpoint is a single
        # channel; accept it and pass the channel", which is false here twice over)
        with pytest.raises(UnsupportedOperation, match="listen in the child") as info:
            _dumps(lst)
        assert "single channel" not in str(info.value)
        assert "pass the channel" not in str(info.value)
        accepted: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: accepted.append(lst.accept(timeout=10)))
        t.start()
        with buzon.connect("unixgram:rel", timeout=10, reliable=True) as c:
            t.join(10)
            with accepted[0] as s:
                for end in (c, s):
                    with pytest.raises(UnsupportedOperation, match="delivery protocol"):
                        _dumps(end)
                c.send("still works")
                assert s.recv(timeout=10) == "still works"
                c.send("read ahead")
                assert buzon.wait([s], timeout=10) == [s]  # took it from the ring
                with pytest.raises(UnsupportedOperation, match="already read here"):
                    _dumps(s)
                assert s.recv(timeout=10) == "read ahead"  # the refusal lost nothing
