"""Unix datagram sockets: message boundaries, reliable and ordered on one host.

The bound end lives at the address (0600, stale files replaced, like ``unix:``).
A connecting end needs an address of its own for replies; Linux would autobind it in
the abstract namespace, which buzon never uses, so it binds a private file
``c-PID-RANDOM.dgram`` in the runtime dir and removes it on close (``buzon clean``
removes those of dead processes). Closing the listener removes the endpoint's name:
no new senders can reach it, while the accepted channel keeps working until closed.
Messages are limited to 65507 bytes, as on UDP.
"""

from __future__ import annotations

import os
import secrets
import socket

from .._runtime import check_endpoint_path, runtime_dir
from ..address import Address
from ..errors import BuzonError, ConnectionRefused, NoSuchEndpoint, from_oserror
from ._dgram import DatagramTransport, SingleChannelListener
from .base import Connector, LinkProperties, Transport, TransportOptions
from .unix import bind_unix_path, unlink_if_ours

__all__ = ["MAX_MESSAGE", "UnixgramConnector", "connect", "listen"]

MAX_MESSAGE = 65507

PROPERTIES = LinkProperties(
    transport="unixgram",
    direction="duplex",
    boundaries="message",
    connection_oriented=False,
    reliable=True,
    ordered=True,
    local=True,
    max_message=MAX_MESSAGE,
    notes="the bound end replies to the last sender; a full receiver blocks senders",
)


def listen(addr: Address, opts: TransportOptions) -> SingleChannelListener:
    path = addr.fs_path(opts.runtime_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        st = bind_unix_path(sock, addr, path)
    except BaseException:
        sock.close()
        raise
    transport = DatagramTransport(
        sock, PROPERTIES, scheme="unixgram", connected=False, max_message=MAX_MESSAGE
    )
    transport.bound_inode = (st.st_dev, st.st_ino)
    return SingleChannelListener(addr, transport, lambda: unlink_if_ours(path, st))


class UnixgramConnector(Connector):
    want = "write"

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.path = addr.fs_path(opts.runtime_dir)
        self.rdir = opts.runtime_dir or runtime_dir()

    def step(self) -> Transport | None:
        check_endpoint_path(self.path, must_exist=True)
        if not os.path.lexists(self.path):
            raise NoSuchEndpoint(f"{self.address}: nothing is bound at {self.path!r}")
        own = os.path.join(self.rdir, f"c-{os.getpid()}-{secrets.token_hex(6)}.dgram")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        st = None
        try:
            st = bind_unix_path(sock, Address("unixgram", path=own), own)
            sock.connect(self.path)
        except BaseException as exc:
            sock.close()
            unlink_if_ours(own, st)
            if isinstance(exc, BuzonError) or not isinstance(exc, OSError):
                raise
            if isinstance(exc, ConnectionRefusedError):
                raise ConnectionRefused(
                    f"{self.address}: nothing is bound at {self.path!r}"
                ) from exc
            raise from_oserror(exc, f"connect {self.address}") from exc
        bound_st = st
        return DatagramTransport(
            sock,
            PROPERTIES,
            scheme="unixgram",
            connected=True,
            max_message=MAX_MESSAGE,
            on_close=lambda: unlink_if_ours(own, bound_st),
        )


def connect(addr: Address, opts: TransportOptions) -> UnixgramConnector:
    return UnixgramConnector(addr, opts)
