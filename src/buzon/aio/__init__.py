"""The asyncio twin of buzon's API: same names, same semantics, awaitable.

>>> ch = await buzon.aio.connect("unix:calc")
>>> await ch.send({"op": "add", "args": [1, 2]})
>>> await ch.recv(timeout=1.0)
"""

from typing import TYPE_CHECKING

from ._channel import Channel
from ._mailbox import AioMailbox, AioMailboxReceipt, mailbox
from ._open import Listener, connect, listen, pipe, wait
from ._server import Server, serve

if TYPE_CHECKING:  # imported on first use (see __getattr__)
    from ._direct import AioInbox, inbox, recv_from, send_to

__all__ = [
    "AioInbox",
    "AioMailbox",
    "AioMailboxReceipt",
    "Channel",
    "Listener",
    "Server",
    "connect",
    "inbox",
    "listen",
    "mailbox",
    "pipe",
    "recv_from",
    "rpc",
    "send_to",
    "serve",
    "wait",
]


_DIRECT = frozenset({"AioInbox", "inbox", "recv_from", "send_to"})


def __getattr__(name: str) -> object:
    """``buzon.aio.rpc`` and direct communication (``buzon.aio.send_to``,
    ``recv_from``, ``inbox``) are imported on first use (PEP 562)."""
    import importlib

    if name == "rpc":
        return importlib.import_module(f"{__name__}.rpc")
    if name in _DIRECT:
        value = getattr(importlib.import_module(f"{__name__}._direct"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'buzon.aio' has no attribute {name!r}")
