"""buzon: one message-passing API over every IPC mechanism an OS course teaches.

>>> import buzon
>>> a, b = buzon.pipe()
>>> a.send({"hello": "world"})
>>> b.recv()
{'hello': 'world'}

See ``docs/concepts.md`` for the map from lecture concepts to this API.
"""

from __future__ import annotations

from . import aio, errors, signals
from ._channel import Receipt, Statistics
from ._serve import serve
from .address import Address, parse_address
from .errors import (
    AddressError,
    AuthenticationError,
    BuzonError,
    ChannelClosed,
    ChannelError,
    CodecError,
    ConnectError,
    ConnectionRefused,
    Empty,
    EndOfChannel,
    EndpointInUse,
    FrameError,
    FrameTooLarge,
    Full,
    HandshakeError,
    InsecureBind,
    MessageTooLarge,
    NoSuchEndpoint,
    PeerCredentialsRejected,
    PermissionDenied,
    PickleRejected,
    ProtocolError,
    SecurityError,
    Timeout,
    Undelivered,
    UnsafePath,
    UnsupportedOperation,
    ValidationError,
)
from .shm import BoundedBuffer, shared_array, shared_value
from .sync import Channel, Listener, Server, connect, listen, pipe, wait
from .transport.base import LinkProperties, PeerInfo

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AddressError",
    "AuthenticationError",
    "BoundedBuffer",
    "BuzonError",
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "CodecError",
    "ConnectError",
    "ConnectionRefused",
    "Empty",
    "EndOfChannel",
    "EndpointInUse",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "HandshakeError",
    "InsecureBind",
    "LinkProperties",
    "Listener",
    "MessageTooLarge",
    "NoSuchEndpoint",
    "PeerCredentialsRejected",
    "PeerInfo",
    "PermissionDenied",
    "PickleRejected",
    "ProtocolError",
    "Receipt",
    "SecurityError",
    "Server",
    "Statistics",
    "Timeout",
    "Undelivered",
    "UnsafePath",
    "UnsupportedOperation",
    "ValidationError",
    "__version__",
    "aio",
    "connect",
    "errors",
    "listen",
    "parse_address",
    "pipe",
    "serve",
    "shared_array",
    "shared_value",
    "signals",
    "wait",
]
