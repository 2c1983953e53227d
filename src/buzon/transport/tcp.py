"""TCP over IPv4 or IPv6, with ``TCP_NODELAY`` on every connection.

Binding a non-loopback address is a policy decision taken by the channel layer
(authentication or ``insecure=True`` required); this module only reports whether an
address is loopback (:func:`is_loopback`). Port 0 picks a free port and
:attr:`TcpListener.address` carries the real one.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from ..address import Address
from ..errors import AddressError, ConnectionRefused, from_oserror
from ._fdstream import SocketStreamTransport, TlsStreamTransport, accept_one
from .base import (
    Connector,
    LinkProperties,
    ListenerTransport,
    PeerInfo,
    Transport,
    TransportOptions,
)

__all__ = ["TcpConnector", "TcpListener", "connect", "is_loopback", "listen", "resolve"]


def _props(local: bool) -> LinkProperties:
    return LinkProperties(
        transport="tcp",
        direction="duplex",
        boundaries="stream",
        connection_oriented=True,
        reliable=True,
        ordered=True,
        local=local,
        notes="TCP_NODELAY; loopback-only unless authenticated or insecure=True",
    )


def resolve(addr: Address, kind: int, passive: bool) -> tuple[int, tuple[object, ...]]:
    """(family, sockaddr) of the first address ``addr`` resolves to."""
    try:
        infos = socket.getaddrinfo(
            addr.host, addr.port, type=kind, flags=socket.AI_PASSIVE if passive else 0
        )
    except socket.gaierror as exc:
        raise AddressError(f"{addr}: cannot resolve {addr.host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def is_loopback(addr: Address) -> bool:
    """True if every address ``addr.host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(addr.host, addr.port or 0)
    except socket.gaierror:
        return False
    ips = {info[4][0] for info in infos}
    return bool(ips) and all(ipaddress.ip_address(str(ip).split("%")[0]).is_loopback for ip in ips)


def _peer(sock: socket.socket) -> PeerInfo:
    try:
        return PeerInfo(address=sock.getpeername())
    except OSError:
        return PeerInfo()


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class TcpListener(ListenerTransport):
    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        family, sockaddr = resolve(addr, socket.SOCK_STREAM, passive=True)
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.sock.bind(sockaddr)
            self.sock.listen(opts.backlog)
            self.sock.setblocking(False)
        except OSError as exc:
            self.sock.close()
            raise from_oserror(exc, f"listen on {addr}") from exc
        self.address = addr.with_port(self.sock.getsockname()[1])
        self._local = is_loopback(addr)
        self._tls = opts.tls

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Transport | None:
        while True:
            conn = accept_one(self.sock, self.address)
            if conn is None:
                return None
            _nodelay(conn)
            if self._tls is not None:
                tls = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                return TlsStreamTransport(tls, _props(self._local), scheme="tcp", peer=_peer(tls))
            return SocketStreamTransport(conn, _props(self._local), scheme="tcp", peer=_peer(conn))

    def close(self) -> None:
        self.sock.close()

    def close_in_child(self) -> None:
        self.sock.close()


class TcpConnector(Connector):
    want = "write"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        family, self._sockaddr = resolve(addr, socket.SOCK_STREAM, passive=False)
        self.sock: socket.socket | None = socket.socket(
            family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        self._started = False
        self._tls = opts.tls

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def step(self) -> Transport | None:
        sock = self.sock
        assert sock is not None
        if not self._started:
            self._started = True
            err = sock.connect_ex(self._sockaddr)
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                return None
        else:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close()
            if err == errno.ECONNREFUSED:
                raise ConnectionRefused(f"{self.address}: connection refused (nobody listening)")
            raise from_oserror(OSError(err, errno.errorcode.get(err, str(err))), str(self.address))
        _nodelay(sock)
        self.sock = None
        local = is_loopback(self.address)
        if self._tls is not None:
            hostname = self.address.host if self._tls.check_hostname else None
            try:
                tls = self._tls.wrap_socket(
                    sock, server_hostname=hostname, do_handshake_on_connect=False
                )
            except BaseException:
                sock.close()
                raise
            return TlsStreamTransport(tls, _props(local), scheme="tcp", peer=_peer(tls))
        return SocketStreamTransport(sock, _props(local), scheme="tcp", peer=_peer(sock))

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def listen(addr: Address, opts: TransportOptions) -> TcpListener:
    return TcpListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> TcpConnector:
    return TcpConnector(addr, opts)
