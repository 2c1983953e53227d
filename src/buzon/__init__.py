"""buzon: one message-passing API over every IPC mechanism an OS course teaches.

>>> import buzon
>>> a, b = buzon.pipe()
>>> a.send({"hello": "world"})
>>> b.recv()
{'hello': 'world'}

See ``docs/concepts.md`` for the map from lecture concepts to this API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._channel import Receipt, Statistics
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
    DeadlineExceeded,
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
    RemoteError,
    SecurityError,
    ServerRestarted,
    Timeout,
    Undelivered,
    UnsafePath,
    UnsupportedOperation,
    ValidationError,
)
from .sync import Channel, Listener, Server, connect, listen, pipe, wait
from .transport.base import LinkProperties, PeerInfo

if TYPE_CHECKING:  # imported on first use (see __getattr__), so ``import buzon`` stays light
    from . import aio, names, rpc, signals
    from ._direct import Inbox, inbox, recv_from, send_to
    from ._mailbox import Mailbox, MailboxReceipt, Message, mailbox
    from ._serve import serve
    from .shm import BoundedBuffer, shared_array, shared_value

# name -> (module, attribute or "" for the module itself). asyncio comes in with ``aio``
# only, and the shared-memory objects with their first use: a blocking program that never
# touches them pays nothing for them at import.
_LAZY: dict[str, tuple[str, str]] = {
    "aio": ("buzon.aio", ""),
    "signals": ("buzon.signals", ""),
    "names": ("buzon.names", ""),
    "rpc": ("buzon.rpc", ""),
    "serve": ("buzon._serve", "serve"),
    "mailbox": ("buzon._mailbox", "mailbox"),
    "Mailbox": ("buzon._mailbox", "Mailbox"),
    "MailboxReceipt": ("buzon._mailbox", "MailboxReceipt"),
    "Message": ("buzon._mailbox", "Message"),
    "Inbox": ("buzon._direct", "Inbox"),
    "inbox": ("buzon._direct", "inbox"),
    "send_to": ("buzon._direct", "send_to"),
    "recv_from": ("buzon._direct", "recv_from"),
    "BoundedBuffer": ("buzon.shm", "BoundedBuffer"),
    "shared_array": ("buzon.shm", "shared_array"),
    "shared_value": ("buzon.shm", "shared_value"),
}


def __getattr__(name: str) -> Any:
    """Import a lazily loaded public name on first access and keep it (PEP 562).

    A submodule (``buzon.shm``, ``buzon._core``...) is imported on first access too, as
    it was reachable as an attribute when ``import buzon`` loaded more eagerly.
    """
    import importlib

    if name not in _LAZY:
        if name.startswith("__"):  # probes such as __wrapped__ are not submodules
            raise AttributeError(f"module 'buzon' has no attribute {name!r}")
        try:
            return importlib.import_module(f"{__name__}.{name}")  # sets the attribute
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'buzon' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazily loaded ones included."""
    return sorted(set(globals()) | set(_LAZY))


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
    "DeadlineExceeded",
    "Empty",
    "EndOfChannel",
    "EndpointInUse",
    "FrameError",
    "FrameTooLarge",
    "Full",
    "HandshakeError",
    "Inbox",
    "InsecureBind",
    "LinkProperties",
    "Listener",
    "Mailbox",
    "MailboxReceipt",
    "Message",
    "MessageTooLarge",
    "NoSuchEndpoint",
    "PeerCredentialsRejected",
    "PeerInfo",
    "PermissionDenied",
    "PickleRejected",
    "ProtocolError",
    "Receipt",
    "RemoteError",
    "SecurityError",
    "Server",
    "ServerRestarted",
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
    "inbox",
    "listen",
    "mailbox",
    "names",
    "parse_address",
    "pipe",
    "recv_from",
    "rpc",
    "send_to",
    "serve",
    "shared_array",
    "shared_value",
    "signals",
    "wait",
]
