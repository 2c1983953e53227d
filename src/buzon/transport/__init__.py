"""Transports: one OS mechanism per module, all non-blocking (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from typing import Any

from ..address import Address
from ..errors import AddressError
from .base import (
    Connector,
    LinkProperties,
    ListenerTransport,
    MessageTransport,
    PeerInfo,
    StreamTransport,
    Transport,
    TransportOptions,
)

__all__ = [
    "Connector",
    "LinkProperties",
    "ListenerTransport",
    "MessageTransport",
    "PeerInfo",
    "StreamTransport",
    "Transport",
    "TransportOptions",
    "open_connector",
    "open_listener",
]

_MODULES = {
    "fifo": "fifo",
    "mq": "mq",
    "unix": "unix",
    "unixgram": "unixgram",
    "tcp": "tcp",
    "udp": "udp",
    "shm": "shm",
}


def _module(addr: Address, opts: TransportOptions) -> Any:
    if opts.reliable and addr.scheme in ("udp", "unixgram"):
        return importlib.import_module(f"{__name__}.reliable")  # one module, both schemes
    name = _MODULES.get(addr.scheme)
    if name is None:
        raise AddressError(f"{addr}: cannot listen on or connect to this scheme")
    return importlib.import_module(f"{__name__}.{name}")


def open_listener(addr: Address, opts: TransportOptions) -> ListenerTransport:
    listener: ListenerTransport = _module(addr, opts).listen(addr, opts)
    return listener


def open_connector(addr: Address, opts: TransportOptions) -> Connector:
    connector: Connector = _module(addr, opts).connect(addr, opts)
    return connector
