"""Transports: one OS mechanism per module, all non-blocking (see :mod:`.base`)."""

from __future__ import annotations

import importlib
from typing import Any

from .._schemes import scheme_info
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


def _module(addr: Address, opts: TransportOptions) -> Any:
    """The transport module of ``addr``'s scheme (its registry entry names it)."""
    info = scheme_info(addr.scheme)
    name = info.reliable_module if opts.reliable and info.reliable_module else info.module
    if not info.has_url:
        raise AddressError(f"{addr}: cannot listen on or connect to this scheme")
    return importlib.import_module(f"{__name__}.{name}")


def open_listener(addr: Address, opts: TransportOptions) -> ListenerTransport:
    listener: ListenerTransport = _module(addr, opts).listen(addr, opts)
    return listener


def open_connector(addr: Address, opts: TransportOptions) -> Connector:
    connector: Connector = _module(addr, opts).connect(addr, opts)
    return connector
