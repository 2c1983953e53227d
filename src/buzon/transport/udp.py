"""UDP datagrams, raw: lossy, unordered, duplicable, exactly as the network gives them.

One datagram carries one frame, so a message never exceeds one datagram (65507 bytes
over IPv4, 65527 over IPv6); larger ones raise :class:`MessageTooLarge`. Reliability
is a separate, later layer. The bound end replies to the most recent sender.
"""

from __future__ import annotations

import socket

from ..address import Address
from ..errors import from_oserror
from ._dgram import DatagramTransport, SingleChannelListener
from .base import Connector, LinkProperties, Transport, TransportOptions
from .tcp import is_loopback, resolve

__all__ = ["UdpConnector", "connect", "listen"]


def _props(local: bool, max_message: int) -> LinkProperties:
    return LinkProperties(
        transport="udp",
        direction="duplex",
        boundaries="message",
        connection_oriented=False,
        reliable=False,
        ordered=False,
        local=local,
        max_message=max_message,
        notes=(
            "datagrams may be lost, duplicated or reordered; "
            "the bound end replies to the last sender"
        ),
    )


def _max_message(family: int) -> int:
    return 65527 if family == socket.AF_INET6 else 65507


def bind_udp(addr: Address) -> tuple[socket.socket, Address]:
    """A UDP socket bound to ``addr`` (IPv6: v6 only) and the address it got (port 0
    becomes the real port)."""
    family, sockaddr = resolve(addr, socket.SOCK_DGRAM, passive=True)
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise from_oserror(exc, f"bind {addr}") from exc
    return sock, addr.with_port(sock.getsockname()[1])


def listen(addr: Address, opts: TransportOptions) -> SingleChannelListener:
    sock, bound = bind_udp(addr)
    family = sock.family
    mm = _max_message(family)
    transport = DatagramTransport(
        sock, _props(is_loopback(addr), mm), scheme="udp", connected=False, max_message=mm
    )
    return SingleChannelListener(bound, transport, lambda: None)


class UdpConnector(Connector):
    want = "write"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr

    def step(self) -> Transport | None:
        family, sockaddr = resolve(self.address, socket.SOCK_DGRAM, passive=False)
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            raise from_oserror(exc, f"connect {self.address}") from exc
        mm = _max_message(family)
        local = is_loopback(self.address)
        return DatagramTransport(
            sock, _props(local, mm), scheme="udp", connected=True, max_message=mm
        )


def connect(addr: Address, opts: TransportOptions) -> UdpConnector:
    return UdpConnector(addr, opts)
