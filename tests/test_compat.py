"""buzon channels interoperate with multiprocessing.connection peers (compat mode)."""

from __future__ import annotations

import os
import threading
from multiprocessing.connection import Client, Listener
from typing import Any

import pytest

import buzon


def _stdlib_client(address: Any, authkey: bytes | None, out: list[Any]) -> None:
    try:
        conn = Client(address, authkey=authkey)
        conn.send_bytes(b"from the stdlib")
        out.append(conn.recv_bytes())
        conn.send({"pickled": [1, 2]})
        conn.close()
    except BaseException as exc:  # reported by the test
        out.append(exc)


@pytest.mark.parametrize("authkey", [None, b"secret key"])
@pytest.mark.parametrize("url", ["tcp://127.0.0.1:0", "unix:compat"])
def test_stdlib_client_to_buzon_listener(url: str, authkey: bytes | None) -> None:
    opts: dict[str, Any] = {"compat": "multiprocessing", "authkey": authkey}
    if authkey is not None:
        opts["pickle"] = True  # authenticated: pickles from this peer are acceptable
    with buzon.listen(url, **opts) as lst:
        addr = lst.address
        target: Any = (addr.host, addr.port) if addr.scheme == "tcp" else addr.fs_path()
        out: list[Any] = []
        t = threading.Thread(target=_stdlib_client, args=(target, authkey, out))
        t.start()
        with lst.accept(timeout=10) as ch:
            assert ch.recv_bytes(timeout=10) == b"from the stdlib"
            ch.send_bytes(b"from buzon")
            if authkey is not None:
                assert ch.recv(timeout=10) == {"pickled": [1, 2]}
            else:
                with pytest.raises(buzon.PickleRejected):
                    ch.recv(timeout=10)  # a pickle from an unauthenticated peer: refused
        t.join(10)
        assert out == [b"from buzon"]


@pytest.mark.parametrize("authkey", [None, b"k"])
def test_buzon_client_to_stdlib_listener(authkey: bytes | None) -> None:
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    got: list[Any] = []

    def serve() -> None:
        conn = listener.accept()
        got.append(conn.recv_bytes())
        conn.send_bytes(b"reply")
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        port = listener.address[1]
        with buzon.connect(
            f"tcp://127.0.0.1:{port}", timeout=10, compat="multiprocessing", authkey=authkey
        ) as ch:
            ch.send_bytes(b"x" * 100_000)
            assert ch.recv_bytes(timeout=10) == b"reply"
    finally:
        t.join(10)
        listener.close()
    assert got == [b"x" * 100_000]


def test_wrong_authkey_fails_on_both_sides() -> None:
    with buzon.listen("tcp://127.0.0.1:0", compat="multiprocessing", authkey=b"right") as lst:
        errors: list[BaseException] = []

        def client() -> None:
            try:
                Client(("127.0.0.1", lst.address.port), authkey=b"wrong")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=client)
        t.start()
        with pytest.raises(buzon.Timeout):
            lst.accept(timeout=1.0)  # the failing peer is rejected, not returned
        t.join(10)
        assert lst.rejected == 1
        assert errors and "digest" in str(errors[0]).lower()


def test_compat_needs_a_stream_socket() -> None:
    with pytest.raises(buzon.UnsupportedOperation):
        buzon.listen("fifo:x", compat="multiprocessing")


def test_stdlib_child_process_roundtrip() -> None:
    """A separate process using only the standard library talks to a buzon listener."""
    import subprocess
    import sys

    with buzon.listen("tcp://127.0.0.1:0", compat="multiprocessing", authkey=b"pw") as lst:
        code = (
            "from multiprocessing.connection import Client\n"
            f"c = Client(('127.0.0.1', {lst.address.port}), authkey=b'pw')\n"
            "c.send_bytes(c.recv_bytes()[::-1])\n"
            "c.close()\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ))
        try:
            with lst.accept(timeout=20) as ch:
                ch.send_bytes(b"abc")
                assert ch.recv_bytes(timeout=20) == b"cba"
        finally:
            proc.wait(20)
        assert proc.returncode == 0
