"""The asyncio twin of buzon's API: same names, same semantics, awaitable.

>>> ch = await buzon.aio.connect("unix:calc")
>>> await ch.send({"op": "add", "args": [1, 2]})
>>> await ch.recv(timeout=1.0)
"""

from ._channel import Channel
from ._mailbox import AioMailbox, AioMailboxReceipt, mailbox
from ._open import Listener, connect, listen, pipe, wait
from ._server import Server, serve

__all__ = [
    "AioMailbox",
    "AioMailboxReceipt",
    "Channel",
    "Listener",
    "Server",
    "connect",
    "listen",
    "mailbox",
    "pipe",
    "rpc",
    "serve",
    "wait",
]


def __getattr__(name: str) -> object:
    """``buzon.aio.rpc`` is imported on first use (PEP 562)."""
    if name == "rpc":
        import importlib

        return importlib.import_module(f"{__name__}.rpc")
    raise AttributeError(f"module 'buzon.aio' has no attribute {name!r}")
