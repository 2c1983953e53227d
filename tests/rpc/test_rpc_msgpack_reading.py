"""wire="msgpack-rpc": who reads the connection. A calling thread reads its own response
(no hand-over from a reader thread), concurrent callers all get their own responses
whatever the order, and the peer's requests between calls are still answered."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from typing import Any

import msgspec
import pytest
from test_rpc_msgpack import _read_message, _service, fake_peer, needs_nvim

from buzon import rpc
from buzon.rpc._msgpack import MsgpackRpcClient, object_end

__all__ = ["fake_peer"]  # the fixture, imported for its use here

Peer = tuple[MsgpackRpcClient, socket.socket, list[str]]


def _answer(peer: socket.socket, reversed_batches: int = 1, count: int = 1 << 30) -> None:
    """Answer ``count`` requests ``[0, id, "add", [a, b]]`` with ``a + b``, in batches of
    ``reversed_batches`` answered last-first."""
    enc = msgspec.msgpack.encode
    dec = msgspec.msgpack.Decoder()
    buf = b""
    batch: list[Any] = []
    done = 0
    peer.settimeout(0.05)
    while done < count:
        try:
            data = peer.recv(65536)
        except TimeoutError:  # no more requests coming now: answer what we have
            for m in reversed(batch):
                peer.sendall(enc([1, m[1], None, m[3][0] + m[3][1]]))
            done += len(batch)
            batch = []
            continue
        except OSError:
            return
        if not data:
            return
        buf += data
        while (end := object_end(buf)) >= 0:
            msg = dec.decode(buf[:end])
            buf = buf[end:]
            batch.append(msg)
            if len(batch) >= reversed_batches:
                for m in reversed(batch):
                    peer.sendall(enc([1, m[1], None, m[3][0] + m[3][1]]))
                done += len(batch)
                batch = []


def _record_readers(client: MsgpackRpcClient, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that dispatched each response."""
    seen: list[str] = []
    original = client._dispatch

    def dispatch(msg: Any) -> None:
        if type(msg) is list and msg and msg[0] == 1:
            seen.append(threading.current_thread().name)
        original(msg)

    monkeypatch.setattr(client, "_dispatch", dispatch)
    return seen


def test_a_call_reads_its_own_response(fake_peer: Peer, monkeypatch: pytest.MonkeyPatch) -> None:
    client, peer, _ = fake_peer
    seen = _record_readers(client, monkeypatch)
    t = threading.Thread(target=_answer, args=(peer,), daemon=True)
    t.start()
    me = threading.current_thread().name
    for i in range(50):
        assert client.call("add", i, 1) == i + 1
    # back-to-back calls: the calling thread read (at most the first came through the
    # session's reader thread, which may have been reading when the call was sent)
    assert seen.count(me) >= 49, seen


def test_concurrent_callers_get_their_own_responses_in_any_order(fake_peer: Peer) -> None:
    client, peer, _ = fake_peer
    threads_n, calls = 6, 60
    t = threading.Thread(target=_answer, args=(peer, 3, threads_n * calls), daemon=True)
    t.start()
    errors: list[BaseException] = []

    def caller(k: int) -> None:
        try:
            for i in range(calls):
                assert client.call("add", k * 1000, i) == k * 1000 + i
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers)
    assert errors == []


def test_the_peers_request_between_calls_is_answered(fake_peer: Peer) -> None:
    client, peer, ran = fake_peer
    t = threading.Thread(target=_answer, args=(peer, 1, 1), daemon=True)
    t.start()
    assert client.call("add", 1, 2) == 3
    t.join(30)
    # no call in flight now: the session's reader thread reads the peer's request
    peer.sendall(msgspec.msgpack.encode([0, 9, "add", [4, 5]]))
    assert _read_message(peer) == [1, 9, None, 9]
    assert ran == ["add"]


@needs_nvim
def test_neovim_answers_threads_calling_at_once(runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "nvim.sock")
    proc = subprocess.Popen(
        ["nvim", "--headless", "--clean", "-n", "--listen", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            assert time.monotonic() < deadline, "nvim did not listen"
            time.sleep(0.02)
        ran: list[str] = []
        with rpc.connect(
            f"unix:{path}", wire="msgpack-rpc", handler=_service(ran), timeout=30
        ) as nv:
            channel = nv.call("nvim_get_api_info")[0]
            errors: list[BaseException] = []

            def caller(k: int) -> None:
                try:
                    for i in range(30):
                        assert nv.nvim_eval(f"{k}*100+{i}") == k * 100 + i
                except BaseException as exc:
                    errors.append(exc)

            workers = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert errors == []
            # and nvim's own request, while our call waits, after all that
            assert nv.nvim_eval(f'rpcrequest({channel}, "add", 20, 3)') == 23
        assert ran == ["add"]
    finally:
        proc.terminate()
        proc.wait(10)
