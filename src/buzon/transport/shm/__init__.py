"""Shared-memory channels: ``shm:NAME`` (rendezvous ``NAME.shm`` in the runtime dir).

Theory of operation
-------------------
The messages travel through two rings of :mod:`buzon._core` (one per direction) in two
fresh segments; a Unix stream socket is used only to meet, to hand over what the rings
cannot carry (file descriptors), and to notice the peer's death.

* :func:`listen` binds the socket ``NAME.shm`` (0600, in the private runtime dir, stale
  ones replaced, live ones refused: the same rules as ``unix:``). Its fd is readable
  when a peer connects. ``ring_size=`` (a listener option: :func:`check_ring_size`)
  sizes the rings of every peer it accepts; :data:`CAPACITY` is the default.
* :meth:`ShmListener.accept` checks the peer's uid (``SO_PEERCRED``), creates the two
  rings (``c>s`` and ``s>c``, mode 0600, unguessable names), two eventfds and two
  one-slot pipes, and sends the ring names with four fds (``SCM_RIGHTS``) in a single
  message. It never waits: a fresh socket always has room for one small message.
* The :class:`ShmConnector` connects, waits until that message is readable, attaches
  both rings (validating their headers) and unlinks their names: from then on the two
  processes hold the only mappings and nothing is left in ``/dev/shm`` whatever happens
  to them. The server unlinks them too when it closes, in case the client never came.

Readiness without threads or polling, for both drivers and :func:`buzon.wait`:

* **data**: the reader's fd is an epoll instance watching the ring's *data eventfd* and
  the socket. The ring is *armed* (a flag in its header) whenever the eventfd is empty:
  a producer that commits while the flag is set clears it and writes the eventfd, and
  the reader drains the eventfd only when the ring is empty, then re-arms and checks
  once more. So one wake-up covers a whole burst. Peer death (or close) makes the
  socket readable at EOF.
* **space**: the writer's fd is the write end of a pipe whose size is one page, kept
  non-empty while the writer waits: it polls writable only when the consumer, seeing
  the ring's space flag armed, empties it. If the consumer dies, the pipe loses its
  only reader and polls as an error, which wakes the writer too.

End of channel is the socket's: when every process holding one end has closed it (or
died, even by SIGKILL), the other end's socket reads EOF, and its reader gets every
message that was committed, then :class:`~buzon.errors.EndOfChannel`; a message the
peer had only half written is never delivered (see docs/shm.md). So an end shared with a
forked child (``serve(mode="process")``) stays open while either process holds it,
exactly as a Unix socket does.

Messages larger than the ring travel *out of line*: the sender copies them into a block
segment (:class:`buzon._core.Block`) of a small per-connection pool and sends only a
reference (:data:`_REF`), in a record flagged ``OOB``; the receiver maps the block once
(unlinking its name), lends the message as a read-only :class:`buzon._core.BlockView`
(a numpy array received with ``recv`` stays on the block), and gives the block back by
releasing that view: the C core stores 0 in the block's *lease* word, and the sender
reuses it. A sender whose blocks are all sent and not yet taken waits (the receiver
empties the space pipe whenever it takes one); blocks the receiver keeps (arrays alive)
make the sender use one-shot blocks instead. Each new block's fd is handed to the peer
over the socket right away, so the block stays *in use* for ``buzon clean`` until the
receiver has attached it, even if the sender closes or dies first. See docs/shm.md
("Out-of-line blocks") for the lease states and the clean-up rules.

Loans (:meth:`ShmTransport.loan_message`) and views (:meth:`recv_view_message`) lend
the ring record or the block to ``Channel.loan`` / ``Channel.recv_view``.

The package's modules: ``_ring`` (:class:`ShmTransport`: ring I/O, readiness, the
out-of-line send and receive, closing), ``_pool`` (the sans-IO block pool: which block
carries the next out-of-line message, the reference's wire format), ``_loans`` (the
space of one message lent to the caller) and ``_setup`` (the rendezvous: listener,
connector, ring sizes).
"""

from __future__ import annotations

# the out-of-line wire format and the link description, for tests and docgen
from ._pool import _ONESHOT as _ONESHOT
from ._pool import _OOB as _OOB
from ._pool import _POOLED as _POOLED
from ._pool import _REF as _REF
from ._pool import POOL_BLOCKS as POOL_BLOCKS
from ._ring import ShmTransport
from ._ring import _properties as _properties
from ._setup import (
    CAPACITY,
    MAX_RING_SIZE,
    MIN_RING_SIZE,
    ShmConnector,
    ShmListener,
    check_ring_size,
    connect,
    listen,
)

__all__ = [
    "CAPACITY",
    "MAX_RING_SIZE",
    "MIN_RING_SIZE",
    "ShmConnector",
    "ShmListener",
    "ShmTransport",
    "check_ring_size",
    "connect",
    "listen",
]
