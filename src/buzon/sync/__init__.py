"""The blocking driver: channels, listeners, ``wait`` and servers over ``select.poll``."""

from ._channel import Channel
from ._open import Listener, connect, listen, pipe, wait
from ._server import Server

__all__ = ["Channel", "Listener", "Server", "connect", "listen", "pipe", "wait"]
