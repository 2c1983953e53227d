"""TLS on tcp:// (``tls=ssl.SSLContext``): encryption, verification, and the bind policy."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import buzon
from buzon import aio

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: Path, name: str, ca: str, san: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _issue(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _issue(d, "client", "ca", "DNS:client")
    yield d


def server_ctx(pki: Path, *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.pem")
    return ctx


def client_ctx(pki: Path, *, ca: str = "ca", cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / f"{ca}.pem")
    if cert:
        ctx.load_cert_chain(pki / "client.pem", pki / "client.key")
    return ctx


def _pair(lst: buzon.Listener, **client: Any) -> tuple[buzon.Channel, buzon.Channel]:
    box: list[Any] = []

    def accept() -> None:
        try:
            box.append(lst.accept(timeout=10))
        except BaseException as exc:  # reported below
            box.append(exc)

    t = threading.Thread(target=accept)
    t.start()
    try:
        c = buzon.connect(str(lst.address), timeout=10, **client)
    finally:
        t.join(15)
    if isinstance(box[0], BaseException):
        raise box[0]
    return c, box[0]


def test_roundtrip_over_tls(pki: Path) -> None:
    with buzon.listen("tcp://127.0.0.1:0", tls=server_ctx(pki)) as lst:
        c, s = _pair(lst, tls=client_ctx(pki))
        with c, s:
            c.send({"secret": [1, 2, 3]})
            assert s.recv(timeout=10) == {"secret": [1, 2, 3]}
            s.send_bytes(b"back")
            assert c.recv_bytes(timeout=10) == b"back"
            assert c.peer.extra["tls"].startswith("TLS")
            assert c.peer.extra["peer_certificate"]["subject"] == ((("commonName", "server"),),)


def test_big_messages_over_tls(pki: Path) -> None:
    """Several TLS records per message: decrypted bytes left in the TLS buffer must not
    stall a receiver that waits on the fd."""
    payload = os.urandom(3 << 20)
    with buzon.listen("tcp://127.0.0.1:0", tls=server_ctx(pki)) as lst:
        c, s = _pair(lst, tls=client_ctx(pki))
        with c, s:
            for _ in range(3):
                t = threading.Thread(target=c.send_bytes, args=(payload, 20))
                t.start()
                assert s.recv_bytes(timeout=20) == payload
                t.join(20)
            c.send_many([{"n": i} for i in range(500)], timeout=10)
            assert [s.recv(timeout=10)["n"] for _ in range(500)] == list(range(500))


def test_server_with_an_unknown_ca_is_refused(pki: Path) -> None:
    with buzon.listen("tcp://127.0.0.1:0", tls=server_ctx(pki), handshake_timeout=2) as lst:
        t = threading.Thread(target=lambda: _accept_quietly(lst))
        t.start()
        with pytest.raises(buzon.HandshakeError, match="TLS"):
            buzon.connect(str(lst.address), timeout=10, tls=client_ctx(pki, ca="other-ca"))
        t.join(15)
        assert lst.rejected == 1


def _accept_quietly(lst: buzon.Listener) -> None:
    try:
        lst.accept(timeout=2).close()
    except buzon.Timeout:
        pass


def test_mutual_tls_requires_a_client_certificate(pki: Path) -> None:
    ctx = server_ctx(pki, require_client=True)
    with buzon.listen("tcp://127.0.0.1:0", tls=ctx, handshake_timeout=2) as lst:
        t = threading.Thread(target=lambda: _accept_quietly(lst))
        t.start()
        with pytest.raises(buzon.BuzonError):
            c = buzon.connect(str(lst.address), timeout=10, tls=client_ctx(pki))
            c.recv(timeout=5)  # TLS 1.3: the refusal may arrive after the handshake
        t.join(15)
        assert lst.rejected == 1
        c, s = _pair(lst, tls=client_ctx(pki, cert=True))
        with c, s:
            assert s.peer.extra["peer_certificate"]["subject"] == ((("commonName", "client"),),)


def test_tls_with_client_certificates_allows_a_public_bind(pki: Path) -> None:
    with pytest.raises(buzon.InsecureBind):
        buzon.listen("tcp://0.0.0.0:0", tls=server_ctx(pki))  # anyone could connect
    buzon.listen("tcp://0.0.0.0:0", tls=server_ctx(pki, require_client=True)).close()
    with pytest.raises(buzon.UnsupportedOperation):
        buzon.listen("unix:tls", tls=server_ctx(pki))


def test_asyncio_over_tls(pki: Path) -> None:
    async def main() -> Any:
        lst = aio.listen("tcp://127.0.0.1:0", tls=server_ctx(pki))
        try:
            acc = asyncio.ensure_future(lst.accept(timeout=10))
            c = await aio.connect(str(lst.address), timeout=10, tls=client_ctx(pki))
            s = await acc
            payload = os.urandom(1 << 20)
            sender = asyncio.ensure_future(c.send_bytes(payload, 10))
            got = await s.recv_bytes(timeout=10)
            await sender
            await c.send("hi")
            hi = await s.recv(timeout=10)
            await c.aclose()
            await s.aclose()
            return got == payload, hi
        finally:
            lst.close()

    assert asyncio.run(main()) == (True, "hi")


def test_an_evicted_tls_peer_is_told_why(pki: Path) -> None:
    """A peer that completed TLS and then stayed silent is evicted to make room
    (``max_pending``): it is told why over its TLS link, as a peer without TLS is. On
    f43dbb5 the TLS listener closed it without a word."""
    import socket

    from buzon.protocol.frames import FrameDecoder, Kind

    with buzon.listen("tcp://127.0.0.1:0", tls=server_ctx(pki), max_pending=1) as lst:
        raw = socket.create_connection((lst.address.host, lst.address.port), timeout=10)
        silent = client_ctx(pki).wrap_socket(
            raw, server_hostname="127.0.0.1", do_handshake_on_connect=False
        )
        try:
            shake = threading.Thread(target=silent.do_handshake)
            shake.start()
            with pytest.raises(buzon.Timeout):
                lst.accept(timeout=0.5)  # drives the silent peer's TLS handshake
            shake.join(10)
            c, s = _pair(lst, tls=client_ctx(pki))  # the second evicts the silent one
            with c, s:
                dec = FrameDecoder()
                while not dec.frames:
                    data = silent.recv(65536)
                    assert data, "closed without a refusal"
                    dec.feed(data)
                frame = dec.next_frame()
                assert frame.kind == Kind.WELCOME
                assert b"max_pending" in bytes(frame.body)
        finally:
            silent.close()
        assert lst.evicted == 1


def test_a_refused_tls_peer_is_told_why(pki: Path) -> None:
    """A peer that completed TLS and is then refused (here: beyond a server's
    max_clients) hears the cause, as on a link without TLS."""
    release = threading.Event()

    def handler(ch: buzon.Channel) -> None:
        ch.send("in")
        release.wait(10)

    server = buzon.Server("tcp://127.0.0.1:0", handler, max_clients=1, tls=server_ctx(pki))
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        first = buzon.connect(str(server.address), timeout=10, tls=client_ctx(pki))
        assert first.recv(timeout=10) == "in"
        with pytest.raises(buzon.HandshakeError, match="max_clients=1"):
            buzon.connect(str(server.address), timeout=10, tls=client_ctx(pki)).close()
        release.set()
        first.close()
    finally:
        release.set()
        server.shutdown()
        t.join(10)
    assert server.refused == 1
