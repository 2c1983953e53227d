"""``serve(mode="process")`` on ``shm:``: a forked child per client.

The parent accepts (creating the client's rings), forks, and closes its copy; the child
runs the handshake and the handler, and alone removes what the end created. The server
runs in a process of its own, as it would in real use (a client in the server's process
would be inherited by every child forked after it, so its end would never close). The
conftest checks that nothing is left in ``/dev/shm`` and no fd is left open here; each
test checks that the server and every child it forked are gone.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import buzon
from buzon import shm
from buzon.transport.shm import _setup as shm_setup

T = 10.0


class _Server:
    """A ``buzon.Server(mode="process")`` in a forked process; ``forked`` is readable
    once per client, after the server forked its child and closed its own copy."""

    def __init__(self, url: str, handler: Callable[[Any], Any], **options: Any) -> None:
        self.url = url
        self.stats: dict[str, int] = {}
        self.forked, forked_w = os.pipe()
        stats_r, stats_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the server process
            code = 1
            try:
                os.close(self.forked)
                os.close(stats_r)

                class Server(buzon.Server):
                    def _fork(self, transport: Any) -> None:
                        super()._fork(transport)
                        if os.getpid() == server_pid:  # (the child never returns here)
                            os.write(forked_w, b"f")

                server_pid = os.getpid()
                server = Server(url, handler, mode="process", **options)
                signal.signal(signal.SIGTERM, lambda *_: server.shutdown())
                os.write(stats_w, b"R")
                server.serve_forever()
                stats = {"served": server.served, "failed": server.failed}
                stats["active"] = server.active
                stats["endpoint_left"] = int(os.path.exists(server.address.fs_path()))
                os.write(stats_w, json.dumps(stats).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(forked_w)
        os.close(stats_w)
        self._stats = stats_r
        assert os.read(stats_r, 1) == b"R"  # listening

    def wait_forked(self) -> None:
        ready, _, _ = select.select([self.forked], [], [], T)
        assert ready and os.read(self.forked, 1) == b"f"

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        _, status = os.waitpid(self.pid, 0)
        data = os.read(self._stats, 4096)
        os.close(self._stats)
        os.close(self.forked)
        assert os.waitstatus_to_exitcode(status) == 0
        self.stats = json.loads(data)
        assert self.stats["active"] == 0 and not self.stats["endpoint_left"]


@contextmanager
def _serving(url: str, handler: Callable[[Any], Any], **options: Any) -> Iterator[_Server]:
    server = _Server(url, handler, **options)
    try:
        yield server
    finally:
        server.stop()
    with pytest.raises(ChildProcessError):  # the server was our only child
        os.waitpid(-1, os.WNOHANG)


def _gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")  # reaped, not even a zombie


def _echo(ch: Any) -> None:
    for msg in ch:
        ch.send_bytes(str(os.getpid()).encode() + b":" + msg)


def test_each_client_gets_its_own_process_in_ring_and_out_of_line() -> None:
    pids: set[int] = set()
    with _serving("shm:ps", _echo, grace=2.0, ring_size=4096) as server:
        clients = [buzon.connect("shm:ps", timeout=T) for _ in range(3)]
        try:
            for size in (10, 4000, 100_000):  # 100 000 goes out of line both ways
                for i, c in enumerate(clients):
                    c.send_bytes(bytes([i]) * size, timeout=T)
                for i, c in enumerate(clients):
                    pid, _, body = c.recv_bytes(T).partition(b":")
                    assert body == bytes([i]) * size
                    pids.add(int(pid))
            for c in clients:  # let each end drop its handles on the blocks taken
                c.send_bytes(b"x")
                c.recv_bytes(T)
        finally:
            for c in clients:
                c.close()  # each child's loop ends with EndOfChannel, and it exits
    assert len(pids) == 3 and os.getpid() not in pids and server.pid not in pids
    assert server.stats == {"served": 3, "failed": 0, "active": 0, "endpoint_left": 0}
    assert all(_gone(pid) for pid in pids)
    assert shm.list_segments() == []


def test_a_client_may_attach_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handshake runs in the server's accept engine, before any fork: a client
    slow to attach its rings is simply a pending handshake, and is served."""
    with _serving("shm:late", _echo) as server:
        attach = shm_setup.attach_ring

        def attach_late(name: str) -> Any:
            if not delayed:
                time.sleep(0.3)
                ready, _, _ = select.select([server.forked], [], [], 0)
                assert not ready, "the server forked before the handshake"
                delayed.append(True)
            return attach(name)

        delayed: list[bool] = []
        monkeypatch.setattr(shm_setup, "attach_ring", attach_late)
        with buzon.connect("shm:late", timeout=T) as ch:
            ch.send_bytes(b"late")
            assert ch.recv_bytes(T).endswith(b":late")
        server.wait_forked()
        assert delayed == [True]
    assert server.stats["failed"] == 0
    assert shm.list_segments() == []


def test_a_client_that_never_attaches_leaves_no_segment(runtime_dir: str) -> None:
    with _serving("shm:never", _echo, handshake_timeout=0.5) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(os.path.join(runtime_dir, "never.shm"))
            deadline = time.monotonic() + T
            while len(shm.list_segments()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(shm.list_segments()) == 2  # the rings, waiting for us
        # gone before attaching: its handshake times out in the server (no child was
        # ever forked for it), which removes the rings
        deadline = time.monotonic() + T
        while shm.list_segments() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert shm.list_segments() == []
        ready, _, _ = select.select([server.forked], [], [], 0)
        assert not ready
    assert server.stats["served"] == 0


def test_unread_out_of_line_messages_are_removed_by_the_child() -> None:
    sent_r, sent_w = os.pipe()  # inherited by the server and its child

    def handler(ch: Any) -> None:
        ch.send("ready")
        ch.recv(T)  # the first message only; the large one after it is never read
        os.read(sent_r, 1)  # ...but it is in the ring before we close

    try:
        with (
            _serving("shm:unread", handler, ring_size=4096) as server,
            buzon.connect("shm:unread", timeout=T) as c,
        ):
            assert c.recv(T) == "ready"
            c.send("one")
            c.send_bytes(b"b" * 50_000)  # out of line: a block only the child can remove
            os.write(sent_w, b"s")
            with pytest.raises(buzon.EndOfChannel):  # the handler returned
                c.recv(T)
            assert shm.list_segments() == []
    finally:
        os.close(sent_r)
        os.close(sent_w)
    assert server.stats["failed"] == 0


def test_shutdown_terminates_a_blocked_child_and_its_client_sees_the_end() -> None:
    def handler(ch: Any) -> None:
        ch.send("in")
        ch.recv()  # blocks until the server terminates us

    with _serving("shm:stuck", handler, grace=0.1) as server:
        c = buzon.connect("shm:stuck", timeout=T)
        try:
            assert c.recv(T) == "in"
            os.kill(server.pid, signal.SIGTERM)  # shutdown: grace, then SIGTERM the child
            with pytest.raises(buzon.EndOfChannel):
                c.recv(T)
        finally:
            c.close()
