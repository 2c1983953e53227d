"""``seqpacket:``: Unix SOCK_SEQPACKET, connected, reliable, one frame per packet.

(The conformance and capacity suites run it too: tests/testing/test_conformance.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

import buzon
from buzon import aio, cli
from buzon.transport import seqpacket

pytestmark = [pytest.mark.fd_check, pytest.mark.timeout(60)]

NOBODY = 65534
T = 10.0


@contextlib.contextmanager
def pair(url: str = "seqpacket:sp", **options: object) -> Iterator[tuple[buzon.Channel, ...]]:
    with buzon.listen(url, **options) as lst:  # type: ignore[arg-type]
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        con = buzon.connect(str(lst.address), timeout=T, **options)  # type: ignore[arg-type]
        t.join(T)
        with con, box[0] as acc:
            yield con, acc


def test_the_socket_file_is_0600_in_the_runtime_dir_and_goes_with_the_listener(
    runtime_dir: str,
) -> None:
    path = os.path.join(runtime_dir, "sp.seqpacket")
    old = os.umask(0)  # 0600 is chmod's doing, not the umask's
    try:
        lst = buzon.listen("seqpacket:sp")
    finally:
        os.umask(old)
    with lst:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with probe:
            probe.connect(path)  # really a SOCK_SEQPACKET socket
    assert not os.path.exists(path)


def test_round_trip_credentials_and_boundaries() -> None:
    with pair() as (con, acc):
        assert con.peer.pid == acc.peer.pid == os.getpid()
        assert con.peer.uid == os.getuid()
        props = con.properties
        assert props.transport == "seqpacket" and props.connection_oriented
        assert props.boundaries == "message" and props.credentials
        con.send({"x": [1, 2]})
        assert acc.recv(timeout=T) == {"x": [1, 2]}
        acc.send_bytes(b"back")
        assert con.recv_bytes(timeout=T) == b"back"


def test_raw_packets_keep_their_boundaries_and_an_empty_one_is_not_the_end() -> None:
    with pair(raw=True) as (con, acc):
        for data in (b"one", b"", b"two" * 1000):
            con.send_bytes(data)
        assert [acc.recv_bytes(timeout=T) for _ in range(3)] == [b"one", b"", b"two" * 1000]
        con.send_bytes(b"")
        con.send_bytes(b"after an empty one")
        con.close()  # with packets still queued: the empty one is not taken for the close
        assert acc.recv_bytes(timeout=T) == b""
        assert acc.recv_bytes(timeout=T) == b"after an empty one"
        with pytest.raises(buzon.EndOfChannel):
            acc.recv_bytes(timeout=T)


def test_a_message_over_the_packet_limit_is_refused_naming_it() -> None:
    limit = seqpacket.MAX_MESSAGE
    with pair() as (con, acc):
        assert con.properties.max_message == limit
        frame = con._core.encode_bytes(b"a" * limit)  # type: ignore[attr-defined]
        header = sum(memoryview(b).nbytes for b in frame) - limit  # this size's header
        con.send_bytes(b"a" * (limit - header))  # exactly the limit: goes through
        assert acc.recv_bytes(timeout=T) == b"a" * (limit - header)
        with pytest.raises(buzon.MessageTooLarge, match=f"at most {limit} bytes"):
            con.send_bytes(b"b" * (limit - header + 1))
        with pytest.raises(buzon.MessageTooLarge, match=str(limit)):
            con.send({"big": b"c" * limit})
        con.send("still usable")  # nothing of the refused ones was sent
        assert acc.recv(timeout=T) == "still usable"


def test_a_foreign_packet_too_large_to_read_whole_is_a_frame_error(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "big.seqpacket")
    with (
        buzon.listen("seqpacket:big", raw=True) as lst,
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw,
    ):
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * seqpacket.MAX_MESSAGE)
        if raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < 2 * seqpacket.MAX_MESSAGE:
            pytest.skip("net.core.wmem_max too small to send an oversized packet")
        raw.connect(path)
        with lst.accept(timeout=T) as ch:
            raw.sendall(b"x" * (seqpacket.MAX_MESSAGE + 100))
            raw.sendall(b"next")
            with pytest.raises(buzon.FrameError, match="more than"):
                ch.recv_bytes(timeout=T)
            assert ch.recv_bytes(timeout=T) == b"next"  # the link goes on


def test_end_of_channel_after_every_message() -> None:
    with pair() as (con, acc):
        for i in range(50):
            con.send(i)
        con.close()
        assert list(acc) == list(range(50))


def test_a_full_link_says_full_and_loses_nothing() -> None:
    with pair() as (con, acc):
        sent = 0
        with pytest.raises(buzon.Full):
            while True:
                con.send_nowait(b"p" * 1000)
                sent += 1
        assert sent > 10
        assert [len(acc.recv(timeout=T)) for _ in range(sent)] == [1000] * sent


def test_stale_files_are_replaced_and_live_ones_refused(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "st.seqpacket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(path)  # closed without unlinking: a crashed listener's leftover
    with buzon.listen("seqpacket:st"), pytest.raises(buzon.EndpointInUse):
        buzon.listen("seqpacket:st")


def test_symlinks_are_never_followed(runtime_dir: str) -> None:
    real = os.path.join(runtime_dir, "real.seqpacket")
    link = os.path.join(runtime_dir, "name.seqpacket")
    with buzon.listen(f"seqpacket:{real}"):
        os.symlink(real, link)
        with pytest.raises(buzon.UnsafePath, match="symlink"):
            buzon.connect("seqpacket:name", timeout=2)
        with pytest.raises(buzon.UnsafePath, match="symlink"):
            buzon.listen("seqpacket:name")
        assert os.path.islink(link) and not os.path.islink(real)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_an_endpoint_of_another_user_is_refused(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "calc.seqpacket")
    with buzon.listen("seqpacket:calc"):
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(buzon.UnsafePath, match=f"owned by uid {NOBODY}"):
            buzon.connect("seqpacket:calc", timeout=2)
        os.chown(path, 0, 0)


def test_connect_to_nothing_fails(runtime_dir: str) -> None:
    # (whether connect first waits for the endpoint to appear is issue 9, item 4h)
    with pytest.raises((buzon.NoSuchEndpoint, buzon.Timeout)):
        buzon.connect("seqpacket:nobody", timeout=0.2)


def test_connect_to_a_stream_socket_says_what_it_is(runtime_dir: str) -> None:
    with buzon.listen("unix:stream") as lst:
        path = lst.address.fs_path()
        with pytest.raises(buzon.ConnectError, match="not a seqpacket socket") as info:
            buzon.connect(f"seqpacket:{path}", timeout=1)
        assert not isinstance(info.value, buzon.ConnectionRefused)  # raised at once


def test_policy_pickle_and_authkey_as_on_unix() -> None:
    with pair(pickle=True, codec="pickle") as (con, acc):
        con.send({1, 2})  # a set: msgpack cannot, pickle can
        assert acc.recv(timeout=T) == {1, 2}
    with pair(authkey=b"k") as (con, acc):
        con.send("authenticated")
        assert acc.recv(timeout=T) == "authenticated"
    with pytest.raises(buzon.UnsupportedOperation, match="compat"):
        buzon.listen("seqpacket:x", compat="multiprocessing")
    with pytest.raises(buzon.UnsupportedOperation, match="reliable=True"):
        buzon.listen("seqpacket:x", reliable=True)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_served_by_buzon_server(mode: str) -> None:
    def echo(ch: buzon.Channel) -> None:
        for msg in ch:
            ch.send(msg * 2)

    server = buzon.Server("seqpacket:srv", echo, mode=mode, grace=2)
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        clients = [buzon.connect("seqpacket:srv", timeout=T) for _ in range(3)]
        for i, ch in enumerate(clients):
            ch.send(i + 1)
        assert [ch.recv(timeout=T) for ch in clients] == [2, 4, 6]
        for ch in clients:
            ch.close()
    finally:
        server.shutdown()
        t.join(T)


def test_served_by_the_asyncio_server() -> None:
    async def echo(ch: aio.Channel) -> None:
        async for msg in ch:
            await ch.send(msg + 1)

    async def main() -> list[int]:
        server = aio.Server("seqpacket:asrv", echo, grace=2)
        task = asyncio.ensure_future(server.serve_forever())
        try:
            out = []
            for i in range(3):
                ch = await aio.connect("seqpacket:asrv", timeout=T)
                await ch.send(i)
                out.append(await ch.recv(T))
                await ch.aclose()
            return out
        finally:
            server.shutdown()
            await asyncio.wait_for(task, T)

    assert asyncio.run(main()) == [1, 2, 3]


def test_ls_shows_it_and_clean_removes_only_a_dead_one(
    runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = os.path.join(runtime_dir, "dead.seqpacket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(stale)
    old = time.time() - 60
    os.utime(stale, (old, old), follow_symlinks=False)
    with buzon.listen("seqpacket:live"):
        live = os.path.join(runtime_dir, "live.seqpacket")
        os.utime(live, (old, old), follow_symlinks=False)
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"seqpacket:live\s+seqpacket\s+0600\s+listening", out)
        assert re.search(r"seqpacket:dead\s+seqpacket\s+\d+\s+dead", out)
        assert cli.main(["clean"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines() == [f"removed {stale} (seqpacket socket nobody is bound to)"]
        assert os.path.exists(live)


# ------------------------------------------------------------------ SO_PEERCRED


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


@needs_root
def test_peercred_drops_another_user() -> None:
    shared = tempfile.mkdtemp(prefix="bz-sp-", dir="/tmp")
    os.chmod(shared, 0o755)
    path = os.path.join(shared, "s.seqpacket")
    try:
        with buzon.listen(f"seqpacket:{path}") as lst:
            os.chmod(path, 0o666)  # let nobody reach it: the credential check must refuse
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 99
                try:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                        s.settimeout(10)
                        s.connect(path)
                        try:
                            code = 0 if s.recv(100) == b"" else 1  # closed on us
                        except ConnectionResetError:
                            code = 0
                finally:
                    os._exit(code)
            try:
                deadline = time.monotonic() + 15
                while not os.waitpid(pid, os.WNOHANG)[0]:
                    with pytest.raises(buzon.Timeout):
                        lst.accept(timeout=0.05)
                    assert time.monotonic() < deadline, "the child did not finish"
                    continue
                pid = 0
            finally:
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
            assert lst.rejected == 1 and lst.accepted == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_cli_raw_send_is_one_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    """``buzon send --raw`` sends stdin whole as one message on a scheme that keeps
    boundaries (the registry's ``message_boundaries``), as on unixgram:."""
    import io

    payload = b"line one\nline two\n" * 5000  # more than one read of stdin
    stdin = io.TextIOWrapper(io.BytesIO(payload))
    monkeypatch.setattr("sys.stdin", stdin)
    with buzon.listen("seqpacket:clisend", raw=True) as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        assert cli.main(["send", "--raw", "seqpacket:clisend"]) == 0
        t.join(T)
        with box[0] as ch:
            assert ch.recv_bytes(timeout=T) == payload
            with pytest.raises(buzon.EndOfChannel):
                ch.recv_bytes(timeout=T)


def test_connect_unix_to_a_seqpacket_socket_says_what_it_is(runtime_dir: str) -> None:
    with buzon.listen("seqpacket:pk") as lst:
        path = lst.address.fs_path()
        with pytest.raises(buzon.ConnectError, match="not a unix socket") as info:
            buzon.connect(f"unix:{path}", timeout=5)
        assert not isinstance(info.value, buzon.ConnectionRefused)  # raised at once
