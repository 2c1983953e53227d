"""The blocking driver: channels, listeners, ``wait`` and servers over ``select.poll``."""

from ._channel import Channel
from ._open import Listener, connect, listen, pipe, wait

__all__ = ["Channel", "Listener", "connect", "listen", "pipe", "wait"]
