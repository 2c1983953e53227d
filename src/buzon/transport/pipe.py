"""Anonymous pipes: the lecture's "ordinary pipe" between a parent and its children.

``os.pipe()`` is simplex; a duplex pair is two pipes crossed. The fds are inherited
by ``fork`` (not by ``exec``), which is how a parent shares them with a child: create
the pair, fork, and let each side close the end it does not use (``Channel.close``).
"""

from __future__ import annotations

import os

from ._fdstream import FdStreamTransport
from ._tokens import TokenPool
from .base import LinkProperties

__all__ = ["pipe_pair"]


def _props(duplex: bool) -> LinkProperties:
    return LinkProperties(
        transport="pipe",
        direction="duplex" if duplex else "simplex",
        boundaries="stream",
        connection_oriented=True,
        reliable=True,
        ordered=True,
        local=True,
        notes="parent/child only (shared by fork); duplex is two pipes crossed",
    )


def pipe_pair(
    duplex: bool = True, capacity: int | None = -1
) -> tuple[FdStreamTransport, FdStreamTransport]:
    """Return two connected ends. With ``duplex=False`` the first end only receives
    and the second only sends (like ``multiprocessing.Pipe(duplex=False)``); a
    ``capacity`` of 0 or N then gives the two ends a pool of credit tokens."""
    props = _props(duplex)
    r1, w1 = os.pipe()
    if not duplex:
        reader = FdStreamTransport(r1, -1, props, scheme="pipe")
        writer = FdStreamTransport(-1, w1, props, scheme="pipe")
        if capacity is not None and capacity >= 0:
            reader.tokens, writer.tokens = TokenPool.anonymous(capacity)
        return reader, writer
    r2, w2 = os.pipe()
    return (
        FdStreamTransport(r1, w2, props, scheme="pipe"),
        FdStreamTransport(r2, w1, props, scheme="pipe"),
    )
