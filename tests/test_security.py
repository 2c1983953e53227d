"""One test (at least) per security default of DESIGN.md, through the public API.

Raw sockets play the hostile peer: they speak the sans-IO handshake by hand and then
send what a well-behaved buzon never would. Tests that act as another user fork a
child that drops to ``nobody`` (65534); they need root and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import buzon
from buzon import _runtime
from buzon.errors import (
    AuthenticationError,
    FrameTooLarge,
    InsecureBind,
    PickleRejected,
    SecurityError,
    Timeout,
    UnsafePath,
)
from buzon.protocol.frames import HEADER, VERSION, CodecId, FrameDecoder, Kind, encode_frame
from buzon.protocol.handshake import Handshake

pytestmark = [pytest.mark.fd_check, pytest.mark.timeout(60)]

NOBODY = 65534
KEY = b"the right key"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """A root-owned 0755 directory another user can traverse (for the SO_PEERCRED tests)."""
    path = tempfile.mkdtemp(prefix="bz-pc-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def use_runtime_dir(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("BUZON_RUNTIME_DIR", path)
    _runtime._cached = None


# ------------------------------------------------------------------ raw, hostile peers


class RawPeer:
    """A blocking socket that speaks the buzon handshake by hand (client side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)
        self.hs = Handshake("client", pid=os.getpid(), options={})

    @classmethod
    def connect(cls, lst: buzon.Listener) -> RawPeer:
        addr = lst.address
        if addr.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = addr.fs_path()
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (addr.host, addr.port)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send_hello(self) -> None:
        self.sock.sendall(self.hs.outgoing())

    def finish_handshake(self) -> None:
        dec = FrameDecoder()
        while not dec.frames:
            data = self.sock.recv(4096)
            assert data, "the server closed during the handshake"
            dec.feed(data)
        self.hs.receive(dec.next_frame())
        assert self.hs.done

    def send_frame(self, kind: int, codec: int, body: bytes) -> None:
        self.sock.sendall(b"".join(bytes(p) for p in encode_frame(kind, codec, body)))

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def hostile_channel(url: str, **options: Any) -> Iterator[tuple[RawPeer, buzon.Channel]]:
    """A buzon listener's accepted channel, with a raw peer on the other end."""
    with buzon.listen(url, **options) as lst:
        peer = RawPeer.connect(lst)
        try:
            peer.send_hello()  # the kernel queues it; accept() reads it and replies
            ch = lst.accept(timeout=10)
            try:
                peer.finish_handshake()
                yield peer, ch
            finally:
                ch.close()
        finally:
            peer.close()


def run_as_nobody(body: Callable[[], int]) -> int:
    """Fork; the child drops to uid/gid 65534, runs ``body`` and exits with its result."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = body()
        except BaseException:
            code = 98
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 10.0) -> int:
    """Wait for a child we forked (killing it after ``timeout``); return its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child did not finish in time")
        time.sleep(0.01)


# ------------------------------------------------------------------------ runtime dir


def test_runtime_dir_is_created_0700_even_with_umask_0(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str
) -> None:
    fresh = os.path.join(runtime_dir, "fresh")
    use_runtime_dir(monkeypatch, fresh)
    with umask(0), buzon.listen("unix:calc"):
        st = os.lstat(fresh)
        assert stat.S_ISDIR(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.getuid()


def test_runtime_dir_symlink_refused(monkeypatch: pytest.MonkeyPatch, runtime_dir: str) -> None:
    real = os.path.join(runtime_dir, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(runtime_dir, "link")
    os.symlink(real, link)
    use_runtime_dir(monkeypatch, link)
    with pytest.raises(UnsafePath, match="symlink"):
        buzon.listen("unix:calc")
    with pytest.raises(UnsafePath, match="symlink"):
        buzon.connect("unix:calc", timeout=1)
    with pytest.raises(UnsafePath, match="symlink"):
        buzon.listen("fifo:calc")
    assert os.listdir(real) == []


@needs_root
def test_runtime_dir_owned_by_another_user_refused(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str
) -> None:
    foreign = os.path.join(runtime_dir, "foreign")
    os.mkdir(foreign, 0o700)
    os.chown(foreign, NOBODY, NOBODY)
    use_runtime_dir(monkeypatch, foreign)
    with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
        buzon.listen("unix:calc")
    with pytest.raises(UnsafePath, match="owned by uid"):
        buzon.connect("fifo:calc", timeout=1)
    assert os.listdir(foreign) == []


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o777, 0o1777])
def test_runtime_dir_with_loose_mode_refused(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str, mode: int
) -> None:
    loose = os.path.join(runtime_dir, "loose")
    os.mkdir(loose)
    os.chmod(loose, mode)
    use_runtime_dir(monkeypatch, loose)
    with pytest.raises(UnsafePath, match="it must be 0700"):
        buzon.listen("unix:calc")
    assert os.listdir(loose) == []


def test_runtime_dir_that_is_a_file_refused(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str
) -> None:
    path = os.path.join(runtime_dir, "file")
    Path(path).write_bytes(b"")
    use_runtime_dir(monkeypatch, path)
    with pytest.raises(UnsafePath, match="not a directory"):
        buzon.listen("unix:calc")


def test_xdg_runtime_dir_is_used_when_private(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str
) -> None:
    monkeypatch.delenv("BUZON_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    _runtime._cached = None
    with buzon.listen("unix:calc") as lst:
        assert lst.address.fs_path() == os.path.join(runtime_dir, "buzon", "calc.sock")
    assert mode_of(os.path.join(runtime_dir, "buzon")) == 0o700


def test_loose_xdg_runtime_dir_is_not_used(
    monkeypatch: pytest.MonkeyPatch, runtime_dir: str
) -> None:
    os.chmod(runtime_dir, 0o755)
    monkeypatch.delenv("BUZON_RUNTIME_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime_dir)
    # only the choice is checked: the fallback in /tmp is not created by this test
    assert _runtime._candidate() == f"/tmp/buzon-{os.getuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "relative/dir")
    assert _runtime._candidate() == f"/tmp/buzon-{os.getuid()}"


# ---------------------------------------------------------------- endpoint permissions


@pytest.mark.parametrize(
    ("url", "suffix"), [("unix:ep", ".sock"), ("unixgram:ep", ".dgram"), ("fifo:ep", ".fifo")]
)
def test_endpoints_are_0600_even_with_umask_0(runtime_dir: str, url: str, suffix: str) -> None:
    path = os.path.join(runtime_dir, "ep" + suffix)
    with umask(0), buzon.listen(url):
        assert mode_of(path) == 0o600
        assert os.lstat(path).st_uid == os.getuid()
    assert not os.path.exists(path)  # closing removed it


def test_absolute_endpoints_are_0600_even_with_umask_0(runtime_dir: str) -> None:
    for scheme in ("unix", "unixgram", "fifo"):
        path = os.path.join(runtime_dir, f"abs-{scheme}")
        with umask(0), buzon.listen(f"{scheme}:{path}"):
            assert mode_of(path) == 0o600, scheme


def test_unixgram_client_file_is_0600(runtime_dir: str) -> None:
    with umask(0), buzon.listen("unixgram:ep"), buzon.connect("unixgram:ep", timeout=5):
        mine = [n for n in os.listdir(runtime_dir) if n.startswith("c-")]
        assert len(mine) == 1
        assert mode_of(os.path.join(runtime_dir, mine[0])) == 0o600


# ------------------------------------------------------------------ symlinked endpoints


@pytest.mark.parametrize(
    ("scheme", "suffix"), [("unix", ".sock"), ("fifo", ".fifo"), ("unixgram", ".dgram")]
)
def test_symlinked_endpoint_refused_for_connect_and_listen(
    runtime_dir: str, scheme: str, suffix: str
) -> None:
    real = os.path.join(runtime_dir, "real" + suffix)
    link = os.path.join(runtime_dir, "name" + suffix)
    with buzon.listen(f"{scheme}:{real}"):
        os.symlink(real, link)
        with pytest.raises(UnsafePath, match="symlink"):
            buzon.connect(f"{scheme}:name", timeout=2)
        with pytest.raises(UnsafePath, match="symlink"):
            buzon.connect(f"{scheme}:{link}", timeout=2)
        with pytest.raises(UnsafePath, match="symlink"):
            buzon.listen(f"{scheme}:name")
        assert os.path.islink(link)  # nothing was replaced or followed
        assert not os.path.islink(real)


@pytest.mark.parametrize("scheme", ["unix", "fifo", "unixgram"])
def test_dangling_symlink_is_not_followed_by_listen(runtime_dir: str, scheme: str) -> None:
    target = os.path.join(runtime_dir, "planted-target")
    link = os.path.join(runtime_dir, "dangling")
    os.symlink(target, link)
    with pytest.raises(UnsafePath, match="symlink"):
        buzon.listen(f"{scheme}:{link}")
    assert not os.path.lexists(target)


@needs_root
def test_endpoint_owned_by_another_user_refused(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "calc.sock")
    with buzon.listen("unix:calc"):
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(UnsafePath, match=f"owned by uid {NOBODY}"):
            buzon.connect("unix:calc", timeout=2)
        os.chown(path, 0, 0)


def test_world_writable_parent_without_sticky_bit_refused(runtime_dir: str) -> None:
    open_dir = os.path.join(runtime_dir, "open")
    os.mkdir(open_dir)
    os.chmod(open_dir, 0o777)
    with pytest.raises(UnsafePath, match="world-writable"):
        buzon.listen(f"unix:{open_dir}/s")
    os.chmod(open_dir, 0o1777)  # like /tmp: acceptable
    with buzon.listen(f"unix:{open_dir}/s"):
        pass


@pytest.mark.parametrize("scheme", ["unix", "fifo", "unixgram"])
def test_endpoint_in_a_missing_directory_is_a_buzon_error(runtime_dir: str, scheme: str) -> None:
    missing = os.path.join(runtime_dir, "missing", "ep")
    with pytest.raises(buzon.NoSuchEndpoint, match="missing"):
        buzon.listen(f"{scheme}:{missing}")
    not_a_dir = os.path.join(runtime_dir, "file")
    Path(not_a_dir).write_bytes(b"")
    with pytest.raises(buzon.BuzonError, match="Not a directory"):
        buzon.listen(f"{scheme}:{not_a_dir}/ep")


# -------------------------------------------------------------- no abstract sockets


def _socket_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _unix_table() -> dict[int, str]:
    """inode -> path ('' if unnamed, '@...' if abstract) from /proc/net/unix."""
    table = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            cols = line.split()
            table[int(cols[6])] = cols[7] if len(cols) > 7 else ""
    return table


def test_the_abstract_socket_check_can_see_one() -> None:
    before = _socket_inodes()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(f"\0buzon-test-{os.getpid()}")
        (inode,) = _socket_inodes() - before
        assert _unix_table()[inode].startswith("@")


def test_no_abstract_sockets(runtime_dir: str) -> None:
    before = _socket_inodes()
    with contextlib.ExitStack() as stack:
        lst = stack.enter_context(buzon.listen("unix:s"))
        stack.enter_context(buzon.listen("unixgram:g"))
        client = stack.enter_context(buzon.connect("unixgram:g", timeout=5))
        client.send("hello")
        result: dict[str, buzon.Channel] = {}
        t = threading.Thread(target=lambda: result.setdefault("ch", lst.accept(timeout=10)))
        t.start()
        stack.enter_context(buzon.connect("unix:s", timeout=10))
        t.join(10)
        stack.enter_context(result["ch"])
        ours = _socket_inodes() - before
        assert len(ours) >= 5
        table = _unix_table()
        paths = {inode: table[inode] for inode in ours}
        assert not [p for p in paths.values() if p.startswith("@")], paths
        named = [p for p in paths.values() if p]
        assert named and all(p.startswith(runtime_dir) for p in named), paths


# --------------------------------------------------------------------- SO_PEERCRED


def _nobody_connects_and_expects_to_be_dropped(path: str) -> Callable[[], int]:
    def body() -> int:  # pragma: no cover - runs in the child
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(Handshake("client", pid=os.getpid(), options={}).outgoing())
                data = s.recv(4096)
            except (BrokenPipeError, ConnectionResetError):
                return 2  # dropped without being told why
            # refused with the cause (a WELCOME {ok: false, cause: credentials}), then EOF
            return 0 if b"credentials" in data and b"uid" in data and s.recv(4096) == b"" else 1

    return body


def _serve_until_child_exits(lst: buzon.Listener, pid: int) -> tuple[int, list[buzon.Channel]]:
    accepted: list[buzon.Channel] = []
    deadline = time.monotonic() + 15
    try:
        while True:
            with contextlib.suppress(Timeout):
                accepted.append(lst.accept(timeout=0.05))
                accepted[-1].close()
            wpid, status = os.waitpid(pid, os.WNOHANG)
            if wpid:
                return os.waitstatus_to_exitcode(status), accepted
            if time.monotonic() > deadline:
                pytest.fail("the child did not finish in time")
    finally:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


@needs_root
def test_peercred_rejects_another_user(shared_dir: str) -> None:
    path = os.path.join(shared_dir, "s.sock")
    with buzon.listen(f"unix:{path}") as lst:
        # 0600 would stop nobody at connect(); open it up so the credential check is
        # what refuses them
        os.chmod(path, 0o666)
        pid = run_as_nobody(_nobody_connects_and_expects_to_be_dropped(path))
        code, accepted = _serve_until_child_exits(lst, pid)
        assert accepted == [], "a peer of another uid was accepted"
        assert code == 0, "the child was not dropped"
        assert lst.rejected == 1
        assert lst.accepted == 0


@needs_root
def test_allow_uids_admits_another_user(shared_dir: str) -> None:
    path = os.path.join(shared_dir, "s.sock")

    def body() -> int:  # pragma: no cover - runs in the child
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            peer = RawPeer(s)
            s.connect(path)
            peer.send_hello()
            peer.finish_handshake()
            peer.send_frame(Kind.DATA, CodecId.MSGPACK, msgspec.msgpack.encode("from nobody"))
            return 0 if s.recv(1) == b"" else 1

    with buzon.listen(f"unix:{path}", allow_uids=(NOBODY,)) as lst:
        os.chmod(path, 0o666)
        pid = run_as_nobody(body)
        try:
            with lst.accept(timeout=10) as ch:
                assert ch.peer.uid == NOBODY
                assert ch.peer.pid == pid
                assert ch.recv(timeout=10) == "from nobody"
        finally:
            code = reap(pid)
        assert code == 0
        assert lst.rejected == 0


def test_peer_credentials_are_on_the_channel(runtime_dir: str) -> None:
    with buzon.listen("unix:s") as lst:
        result: dict[str, buzon.Channel] = {}
        t = threading.Thread(target=lambda: result.setdefault("ch", lst.accept(timeout=10)))
        t.start()
        with buzon.connect("unix:s", timeout=10) as client:
            t.join(10)
            with result["ch"] as server:
                for ch in (client, server):
                    assert (ch.peer.pid, ch.peer.uid, ch.peer.gid) == (
                        os.getpid(),
                        os.getuid(),
                        os.getgid(),
                    )


# --------------------------------------------------------------------- TCP binding


@pytest.mark.parametrize("url", ["tcp://0.0.0.0:0", "tcp://[::]:0", "udp://0.0.0.0:0"])
def test_non_loopback_bind_needs_authentication(url: str) -> None:
    with pytest.raises(InsecureBind, match="not a loopback address"):
        buzon.listen(url)


@pytest.mark.parametrize(
    "options", [{"authkey": KEY}, {"insecure": True}], ids=["authkey", "insecure"]
)
def test_non_loopback_bind_with_authkey_or_insecure(options: dict[str, Any]) -> None:
    with buzon.listen("tcp://0.0.0.0:0", **options) as lst:
        assert lst.address.port  # bound; closed at once, no traffic sent
    if "insecure" in options:
        with buzon.listen("udp://0.0.0.0:0", **options):
            pass


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "tcp://localhost:0", "udp://127.0.0.1:0"])
def test_loopback_needs_nothing(url: str) -> None:
    with buzon.listen(url):
        pass


# ----------------------------------------------------------------- time-boxed phases


@pytest.mark.parametrize("stall_after", [b"", b"\x01\x02\x00"], ids=["silent", "half-header"])
def test_handshake_timeout_rejects_a_silent_peer(stall_after: bytes) -> None:
    with buzon.listen("tcp://127.0.0.1:0", handshake_timeout=0.3) as lst:
        bad = socket.create_connection((lst.address.host, lst.address.port), timeout=10)
        try:
            bad.sendall(stall_after)
            # a good client arrives after the bad one and must still be served
            result: dict[str, Any] = {}

            def good() -> None:
                try:
                    result["ch"] = buzon.connect(lst.address, timeout=10)
                except Exception as exc:  # reported by the assertion below
                    result["error"] = exc

            t = threading.Thread(target=good)
            t.start()
            try:
                ch = lst.accept(timeout=10)
            finally:
                t.join(15)
            with ch, result["ch"] as client:
                client.send("after the staller")
                assert ch.recv(timeout=10) == "after the staller"
            assert lst.accepted == 1
            with pytest.raises(Timeout):  # meanwhile the staller's own deadline passes
                lst.accept(timeout=1.0)
            assert lst.rejected == 1
            bad.settimeout(10)
            told = b""
            while chunk := bad.recv(4096):  # told why, then disconnected
                told += chunk
            assert b"handshake timed out" in told
        finally:
            bad.close()


def test_oversized_handshake_frame_is_rejected_before_allocating() -> None:
    with buzon.listen("tcp://127.0.0.1:0") as lst:
        bad = socket.create_connection((lst.address.host, lst.address.port), timeout=10)
        with bad:
            # a HELLO announcing 32 MiB: under the data cap, far over the 4 KiB handshake cap
            bad.sendall(HEADER.pack(VERSION, Kind.HELLO, CodecId.MSGPACK, 0, 32 << 20))
            result: dict[str, Any] = {}
            t = threading.Thread(
                target=lambda: result.setdefault("ch", buzon.connect(lst.address, timeout=10))
            )
            t.start()
            tracemalloc.start()
            try:
                ch = lst.accept(timeout=10)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
                t.join(15)
            with ch, result["ch"]:
                pass
            # two channels' read buffers were made meanwhile; 32 MiB were not
            assert peak < 8 << 20, f"{peak} bytes allocated for a refused handshake"
            assert lst.rejected == 1 and lst.accepted == 1
            told = b""
            while chunk := bad.recv(4096):  # told why, then disconnected
                told += chunk
            assert b"bad handshake frame" in told


def test_accept_timeout_with_only_a_silent_peer() -> None:
    with buzon.listen("tcp://127.0.0.1:0", handshake_timeout=0.2) as lst:
        silent = socket.create_connection((lst.address.host, lst.address.port), timeout=10)
        with silent, pytest.raises(Timeout):
            lst.accept(timeout=0.5)
        assert lst.rejected == 1


# ------------------------------------------------------------------------- frame cap


@pytest.mark.parametrize(
    ("max_frame", "announce"),
    [
        (None, HEADER.pack(VERSION, Kind.DATA, CodecId.MSGPACK, 0, 0xFFFFFFFF)),  # 4 GiB
        (None, HEADER.pack(VERSION, Kind.DATA, CodecId.RAW, 1, 0) + struct.pack("<Q", 2**40)),
        (4096, HEADER.pack(VERSION, Kind.DATA, CodecId.RAW, 0, 4096)),  # just over
    ],
    ids=["4GiB-body", "1TiB-buffer", "over-custom-cap"],
)
@pytest.mark.parametrize("url", ["unix:cap", "tcp://127.0.0.1:0"])
def test_frame_over_the_cap_is_refused_before_allocating(
    url: str, max_frame: int | None, announce: bytes
) -> None:
    options = {} if max_frame is None else {"max_frame": max_frame}
    with hostile_channel(url, **options) as (peer, ch):
        peer.sock.sendall(announce)
        tracemalloc.start()
        try:
            with pytest.raises(FrameTooLarge):
                ch.recv(timeout=10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, f"{peak} bytes allocated while refusing the frame"
        assert ch.statistics().rejected_frames == 1


# ----------------------------------------------------------------------- pickle canary


class _Canary:
    """Unpickling this creates a file: proof that unpickling happened."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("url", ["unix:pk", "tcp://127.0.0.1:0"])
def test_pickle_frame_rejected_before_unpickling(url: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    with hostile_channel(url) as (peer, ch):
        peer.send_frame(Kind.DATA, CodecId.PICKLE, pickle.dumps(_Canary(str(canary)), protocol=5))
        peer.send_frame(Kind.DATA, CodecId.MSGPACK, msgspec.msgpack.encode("next"))
        with pytest.raises(PickleRejected):
            ch.recv(timeout=10)
        assert not canary.exists()
        assert ch.recv(timeout=10) == "next"  # the channel stays in sync
    assert not canary.exists()


def test_pickle_rejection_is_counted(tmp_path: Path) -> None:
    with hostile_channel("unix:pk") as (peer, ch):
        peer.send_frame(Kind.DATA, CodecId.PICKLE, pickle.dumps({1, 2}, protocol=5))
        with pytest.raises(PickleRejected):
            ch.recv(timeout=10)
        stats = ch.statistics()
        assert (stats.rejected_frames, stats.messages_received) == (1, 0)


def test_pickle_sender_to_a_receiver_without_pickle(tmp_path: Path, runtime_dir: str) -> None:
    canary = tmp_path / "canary"
    with buzon.listen("unix:pk") as lst:
        result: dict[str, buzon.Channel] = {}
        t = threading.Thread(target=lambda: result.setdefault("ch", lst.accept(timeout=10)))
        t.start()
        with buzon.connect("unix:pk", timeout=10, codec="pickle", pickle=True) as sender:
            t.join(10)
            with result["ch"] as receiver:
                sender.send(_Canary(str(canary)))
                with pytest.raises(PickleRejected):
                    receiver.recv(timeout=10)
    assert not canary.exists()


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "udp://127.0.0.1:0"])
@pytest.mark.parametrize(
    "options", [{"pickle": True}, {"pickle": True, "codec": "pickle"}], ids=["pickle", "codec"]
)
def test_pickle_over_inet_needs_an_authkey(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(SecurityError, match="needs an authenticated peer"):
        buzon.listen(url, **options)
    with pytest.raises(SecurityError, match="needs an authenticated peer"):
        buzon.connect(url.replace(":0", ":9"), timeout=1, **options)


def test_pickle_is_opt_in() -> None:
    with pytest.raises(ValueError, match="opt-in"):
        buzon.listen("unix:x", codec="pickle")
    with pytest.raises(SecurityError, match="allow_uids"):
        buzon.listen("unix:x", pickle=True, allow_uids=(NOBODY,))


def test_pickle_over_tcp_with_an_authkey() -> None:
    with buzon.listen("tcp://127.0.0.1:0", pickle=True, authkey=KEY) as lst:
        result: dict[str, buzon.Channel] = {}
        t = threading.Thread(target=lambda: result.setdefault("ch", lst.accept(timeout=10)))
        t.start()
        with buzon.connect(
            lst.address, timeout=10, codec="pickle", pickle=True, authkey=KEY
        ) as client:
            t.join(10)
            with result["ch"] as server:
                client.send({1, 2, 3})
                assert server.recv(timeout=10) == {1, 2, 3}


# -------------------------------------------------------------------------- authkey


def test_authkey_right_key_connects_wrong_key_is_rejected() -> None:
    with buzon.listen("tcp://127.0.0.1:0", authkey=KEY) as lst:
        result: dict[str, Any] = {}

        def serve() -> None:
            try:
                result["ch"] = lst.accept(timeout=20)
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        t = threading.Thread(target=serve)
        t.start()
        try:
            with pytest.raises(AuthenticationError, match="server does not know the authkey"):
                buzon.connect(lst.address, timeout=10, authkey=b"wrong key")
            with pytest.raises(AuthenticationError, match="authkey"):
                buzon.connect(lst.address, timeout=10)  # no key at all
            client = buzon.connect(lst.address, timeout=10, authkey=KEY)
        finally:
            t.join(20)
        assert "error" not in result, result
        with client, result["ch"] as server:
            client.send("authenticated")
            assert server.recv(timeout=10) == "authenticated"
            server.send("both ways")
            assert client.recv(timeout=10) == "both ways"
        assert lst.rejected == 2
        assert lst.accepted == 1


def test_client_with_authkey_refuses_a_server_without_one() -> None:
    with buzon.listen("tcp://127.0.0.1:0") as lst:
        result: dict[str, buzon.Channel] = {}
        t = threading.Thread(target=lambda: result.setdefault("ch", lst.accept(timeout=10)))
        t.start()
        try:
            with pytest.raises(AuthenticationError, match="did not authenticate"):
                buzon.connect(lst.address, timeout=10, authkey=KEY)
        finally:
            t.join(10)
        with result["ch"] as server, pytest.raises(buzon.EndOfChannel):
            server.recv(timeout=10)
