"""Channel features beyond the conformance contract (blocking driver)."""

from __future__ import annotations

import os
import socket
import threading
import time

import msgspec
import pytest

import buzon
from buzon._channel import ChannelOptions
from buzon.protocol.frames import HEADER


class Point(msgspec.Struct):
    x: int
    y: int


def test_typed_receive_validates() -> None:
    a, b = buzon.pipe()
    with a, b:
        a.send(Point(1, 2))
        assert b.recv(timeout=5, type=Point) == Point(1, 2)
        a.send({"x": "not an int"})
        with pytest.raises(buzon.ValidationError):
            b.recv(timeout=5, type=Point)
        a.send({"x": 3, "y": 4})  # the channel is still in sync after a bad message
        assert b.recv(timeout=5, type=Point) == Point(3, 4)


def test_pickle_is_opt_in_and_works_when_enabled() -> None:
    a, b = buzon.pipe(pickle=True, codec="pickle")
    with a, b:
        a.send({1, 2, 3})  # a set: msgpack cannot, pickle can
        assert b.recv(timeout=5) == {1, 2, 3}
    with pytest.raises(ValueError):
        buzon.pipe(codec="pickle")


def test_json_codec_interoperates_with_msgpack_receiver() -> None:
    a, b = buzon.pipe(codec="json")
    with a, b:
        a.send({"k": [1, 2.5, "x"]})
        assert b.recv(timeout=5) == {"k": [1, 2.5, "x"]}


def test_recv_bytes_into_and_too_small_buffer() -> None:
    a, b = buzon.pipe()
    with a, b:
        a.send_bytes(b"hello")
        buf = bytearray(16)
        assert b.recv_bytes_into(buf, timeout=5) == 5
        assert bytes(buf[:5]) == b"hello"
        a.send_bytes(b"x" * 100)
        with pytest.raises(buzon.MessageTooLarge):
            b.recv_bytes_into(bytearray(10), timeout=5)


def test_send_many_arrives_in_order_and_counts() -> None:
    a, b = buzon.pipe()
    with a, b:
        items = [{"i": i} for i in range(1000)]
        t = threading.Thread(target=a.send_many, args=(items, 10))
        t.start()
        got = [b.recv(timeout=5) for _ in range(1000)]
        t.join(10)
        assert got == items
        assert a.statistics().messages_sent == 1000
        assert a.send_bytes_many([b"a", b"bb", b"x" * 10000]) == 3
        assert [b.recv_bytes(timeout=5) for _ in range(3)] == [b"a", b"bb", b"x" * 10000]


def test_mq_priorities() -> None:
    with buzon.listen("mq:prio") as lst:
        rx = lst.accept(timeout=5)
        tx = buzon.connect("mq:prio", timeout=5)
        with rx, tx:
            tx.send("low", priority=1)
            tx.send("high", priority=9)
            assert rx.recv(timeout=5) == "high"
            assert rx.last_priority == 9
            assert rx.recv(timeout=5) == "low"
            assert rx.last_priority == 1
    a, b = buzon.pipe()
    with a, b, pytest.raises(buzon.UnsupportedOperation):
        a.send("x", priority=3)


def test_frame_progress_timeout() -> None:
    """A peer that sends half a frame and stalls is reported, not waited on forever."""
    with buzon.listen("unix:stall", frame_timeout=0.2) as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=5)))
        t.start()
        c = buzon.connect("unix:stall", timeout=5)
        t.join(5)
        server = box[0]
        with c, server:
            raw = c._core.transport.sock  # type: ignore[attr-defined]
            raw.send(HEADER.pack(1, 1, 0, 0, 100) + b"only part")
            with pytest.raises(buzon.Timeout, match="stalled"):
                server.recv(timeout=5)


def test_idle_timeout_bounds_recv_without_timeout() -> None:
    a, b = buzon.pipe()
    b2 = buzon.Channel(type(b._core)(b._core.transport, _with(b._core.options, 0.1)))
    with a, b2:
        start = time.monotonic()
        with pytest.raises(buzon.Timeout):
            b2.recv()
        assert time.monotonic() - start >= 0.09


def _with(opts: ChannelOptions, idle: float) -> ChannelOptions:
    from buzon._record import replace

    return replace(opts, idle_timeout=idle)


def test_partial_write_is_completed_by_close() -> None:
    """send_nowait accepts a message whose tail does not fit; close() delivers it."""
    a, b = buzon.pipe()
    payload = os.urandom(200_000)  # far more than a pipe holds
    a.send_bytes_nowait(payload)
    assert a._core.pending
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(b.recv_bytes(timeout=5)))
    t.start()
    a.close()
    t.join(10)
    b.close()
    assert got == [payload]


def test_peer_credentials_on_unix() -> None:
    with buzon.listen("unix:creds") as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=5)))
        t.start()
        c = buzon.connect("unix:creds", timeout=5)
        t.join(5)
        with c, box[0] as s:
            assert s.peer.pid == os.getpid() and s.peer.uid == os.getuid()
            assert c.peer.pid == os.getpid()


def test_raw_mode_moves_bytes_exactly() -> None:
    with buzon.listen("unix:raw", raw=True) as lst:
        path = lst.address.fs_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        ch = lst.accept(timeout=5)
        with ch:
            sock.sendall(b"no framing at all\n")
            sock.close()
            data = b"".join(ch)
            assert data == b"no framing at all\n"


def test_connect_errors_are_clear() -> None:
    with pytest.raises(buzon.NoSuchEndpoint):
        buzon.connect("unix:absent", timeout=1, retry=False)
    with pytest.raises(buzon.NoSuchEndpoint):
        buzon.connect("fifo:absent", timeout=1, retry=False)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(buzon.ConnectionRefused):
        buzon.connect(f"tcp://127.0.0.1:{port}", timeout=2, retry=False)
    with pytest.raises(buzon.AddressError):
        buzon.connect("carrier-pigeon:coop")


def test_listen_twice_on_the_same_name_is_refused() -> None:
    for url in ("unix:twice", "fifo:twice", "mq:twice", "unixgram:twice"):
        with buzon.listen(url) as first:
            ch = first.accept(timeout=5) if not url.startswith("unix:") else None
            with pytest.raises(buzon.EndpointInUse):
                buzon.listen(url)
            if ch is not None:
                ch.close()


def test_stale_socket_file_is_replaced() -> None:
    lst = buzon.listen("unix:stale")
    path = lst.address.fs_path()
    lst._lt.sock.close()  # type: ignore[attr-defined]  # simulate a crash: file left behind
    assert os.path.exists(path)
    with buzon.listen("unix:stale") as again:
        assert os.path.exists(again.address.fs_path())
    assert not os.path.exists(path)


def test_wait_over_mixed_transports() -> None:
    a, b = buzon.pipe()
    with buzon.listen("unix:w") as lst, buzon.listen("mq:w") as mql:
        mq_rx = mql.accept(timeout=5)
        mq_tx = buzon.connect("mq:w", timeout=5)
        with a, b, mq_rx, mq_tx:
            assert buzon.wait([b, lst, mq_rx], timeout=0.05) == []
            mq_tx.send("q")
            assert buzon.wait([b, lst, mq_rx], timeout=5) == [mq_rx]
            assert mq_rx.recv_nowait() == "q"
            a.send("p")
            assert buzon.wait([b, lst, mq_rx], timeout=5) == [b]
            assert b.recv_nowait() == "p"
            box: list[buzon.Channel] = []  # connect waits for accept's handshake
            t = threading.Thread(target=lambda: box.append(buzon.connect("unix:w", timeout=5)))
            t.start()
            assert buzon.wait([b, lst, mq_rx], timeout=5) == [lst]
            lst.accept(timeout=5).close()
            t.join(5)
            box[0].close()


def test_recv_bytes_into_reads_big_payload_in_place() -> None:
    a, b = buzon.pipe()
    payload = os.urandom(3 << 20)
    target = bytearray(4 << 20)
    with a, b:
        t = threading.Thread(target=a.send_bytes, args=(payload, 10))
        t.start()
        n = b.recv_bytes_into(target, timeout=10)
        t.join(10)
        assert n == len(payload) and bytes(target[:n]) == payload


def test_recv_bytes_into_timeout_mid_frame_gives_the_buffer_back() -> None:
    """If recv_bytes_into gives up while a big frame is arriving, later bytes of that
    frame must not land in the caller's buffer, and the frame is still delivered whole."""
    with buzon.listen("unix:sink") as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=5)))
        t.start()
        c = buzon.connect("unix:sink", timeout=5)
        t.join(5)
        server = box[0]
        with c, server:
            payload = os.urandom(1 << 20)
            frame = b"".join(bytes(x) for x in server._core.encode_bytes(payload))
            raw = c._core.transport.sock  # type: ignore[attr-defined]
            raw.setblocking(True)
            raw.sendall(frame[:100_000])  # fits the socket buffer: part of the frame
            target = bytearray(2 << 20)
            with pytest.raises(buzon.Timeout):
                server.recv_bytes_into(target, timeout=0.2)
            snapshot = bytes(target)
            rest = threading.Thread(target=raw.sendall, args=(frame[100_000:],))
            rest.start()
            assert server.recv_bytes(timeout=5) == payload
            rest.join(5)
            assert bytes(target) == snapshot  # untouched after the timeout


def test_big_numpy_arrays_arrive_aligned_and_writable() -> None:
    np = pytest.importorskip("numpy")
    a, b = buzon.pipe()
    arr = np.arange(1 << 18, dtype=np.float64)  # 2 MiB: read into a buffer of its own
    with a, b:
        t = threading.Thread(target=a.send, args=({"x": arr, "tag": 7}, 10))
        t.start()
        got = b.recv(timeout=10)
        t.join(10)
        x = got["x"]
        assert got["tag"] == 7 and (x == arr).all()
        assert x.ctypes.data % 16 == 0
        x[0] = -1.0  # the receive buffer is the array's own memory: writable


def test_udp_drops_are_counted() -> None:
    """A receiver that falls behind loses datagrams; the kernel's count is visible."""
    with buzon.listen("udp://127.0.0.1:0") as lst:
        rx = lst.accept(timeout=5)
        tx = buzon.connect(str(lst.address), timeout=5)
        with rx, tx:
            sent = 3000
            for i in range(sent):
                tx.send_bytes(i.to_bytes(4, "big") + b"p" * 1000)
            received = 0
            while True:
                try:
                    rx.recv_bytes(timeout=0.2)
                except buzon.Timeout:
                    break
                received += 1
            # the kernel stamps its drop count on the next datagram that gets through
            tx.send_bytes(b"tail")
            sent += 1
            assert rx.recv_bytes(timeout=5) == b"tail"
            received += 1
            stats = rx.statistics()
            assert stats.dropped > 0
            assert received + stats.dropped == sent
            assert stats.messages_received == received


def test_pickle_refused_where_no_peer_is_authenticated() -> None:
    with pytest.raises(buzon.SecurityError):
        buzon.listen("udp://127.0.0.1:0", pickle=True, authkey=b"k")  # no handshake on UDP
    with pytest.raises(buzon.InsecureBind):
        buzon.listen("tcp://0.0.0.0:0", raw=True, authkey=b"k")  # raw: the key is never used
    with pytest.raises(buzon.InsecureBind):
        buzon.listen("udp://0.0.0.0:0", authkey=b"k")
    for url in ("mq:/buzon-exact", "fifo:/tmp/buzon-exact", "unixgram:/tmp/buzon-exact"):
        with pytest.raises(buzon.SecurityError):
            buzon.listen(url, pickle=True)


def test_bound_datagram_end_knows_the_latest_sender() -> None:
    with buzon.listen("udp://127.0.0.1:0") as lst:
        rx = lst.accept(timeout=5)
        with rx, buzon.connect(str(lst.address), timeout=5) as tx:
            tx.send("hi")
            assert rx.recv(timeout=5) == "hi"
            assert rx.peer.address == tx._core.transport.sock.getsockname()  # type: ignore[attr-defined]


def test_data_right_behind_the_handshake_is_not_held_to_its_cap() -> None:
    """The server may send a big message at once after accept; the client reads the
    server's HELLO and that message in one read (regression: FrameTooLarge at 4 KiB)."""
    with buzon.listen("unix:behind") as lst:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with buzon.connect("unix:behind", timeout=5) as c:
                    code = 0 if c.recv(timeout=5) == b"x" * 100_000 else 2
            finally:
                os._exit(code)
        with lst.accept(timeout=5) as ch:
            ch.send(b"x" * 100_000)
            _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("url", ["unix:crash", "fifo:crash", "mq:crash", "unixgram:crash"])
def test_endpoint_of_a_killed_listener_is_reclaimed(url: str, runtime_dir: str) -> None:
    """SIGKILL a process that listens: the next listener gets the name, and closing
    it leaves nothing behind."""
    import signal

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            lst = buzon.listen(url)
            if not url.startswith("unix:"):
                lst.accept(timeout=5)
            os.write(w, b"!")
            time.sleep(30)
        finally:
            os._exit(1)
    try:
        assert os.read(r, 1) == b"!"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    with buzon.listen(url) as lst:
        if url.startswith("unix:"):
            assert lst.address.fs_path()
        else:
            lst.accept(timeout=5).close()
    leftovers = [n for n in os.listdir(runtime_dir)]
    assert leftovers == []
    if url.startswith("mq:"):
        from buzon.transport import mq

        assert not mq.queue_exists(lst.address)


def test_recv_of_a_big_send_bytes_message_gives_all_of_it() -> None:
    """Regression: recv() (not recv_bytes) of a raw payload over 4 KiB, which travels
    as an out-of-band buffer, returned only the empty body."""
    a, b = buzon.pipe()
    with a, b:
        payload = bytes(range(256)) * 64  # 16 KiB
        a.send_bytes(payload)
        assert b.recv(timeout=5) == payload
