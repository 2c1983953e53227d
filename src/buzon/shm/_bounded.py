"""The bounded buffer of the producer/consumer problem: a raw-bytes mailbox.

Theory of operation
-------------------
A :class:`BoundedBuffer` is a :class:`buzon.Mailbox` (policy ``"any"``) in its
*raw-bytes fixed-slot* mode: one mechanism, not two. Its ring holds ``slots`` fixed
records of at most ``item_size`` bytes each, and each record is the item's bytes as
they are (no frame, no codec, no message id or sender): ``put`` and ``get`` are one
call into the ring each, as fast as the ring itself. All ``slots`` items fit at once
(not ``slots - 1``: the ring tells full from empty by its byte cursors). Any number of
producers and consumers, in any processes and threads, ``put`` and ``get``
concurrently; items are handed out once each, in the order their space was reserved,
and a process killed in the middle of a ``put`` never leaves a partial item behind.

Everything else is the mailbox's (``buzon/_mailbox.py``): the name
``BoundedBuffer("jobs", ...)`` is the mailbox ``jobs`` (the 0600 name file
``jobs.mbox`` in the runtime dir, an unguessable 0600 segment); the ring's label
records ``raw``, the slots and the item size, so attaching with other sizes, or to a
mailbox of objects, raises ``ValueError``. Lifecycle: it lives until :meth:`remove`
(waiting consumers then get ``EndOfChannel``, later puts ``NoSuchEndpoint``);
``buzon ls`` shows it as a mailbox (``raw``), ``buzon clean`` removes it once nobody
uses it and only when it is empty (``--force`` otherwise). ``buzon.wait`` and
``buzon.aio.wait`` take it (its wake-up FIFO); it passes to child processes by name
(multiprocessing or pickle); ``buzon.mailbox("jobs")`` opens the same buffer (its
``send``/``recv`` take and give bytes). What a raw record cannot carry is refused:
``recv_message`` and ``send_async`` (no id, sender or receipt) raise
:class:`~buzon.errors.UnsupportedOperation`.
"""

from __future__ import annotations

from typing import Any

from .._mailbox import _SUFFIX, DEFAULT_MAX_BYTES, Mailbox
from ..errors import ChannelClosed
from ..protocol.frames import DEFAULT_MAX_FRAME
from ._names import name_path

__all__ = ["BoundedBuffer"]


class BoundedBuffer(Mailbox):
    """``slots`` items of at most ``item_size`` bytes shared by N producers and M consumers.

    ``put``/``get`` block (``timeout=None``: forever; a number: then raise
    :class:`~buzon.errors.Timeout`); ``put_nowait``/``get_nowait`` raise
    :class:`~buzon.errors.Full`/:class:`~buzon.errors.Empty`. Pass ``slots`` and
    ``item_size`` to create the buffer if it does not exist; omit them to attach only
    (``NoSuchEndpoint`` if it does not exist). It is a :class:`buzon.Mailbox` whose
    records are raw bytes: ``remove``, ``close``, ``exists``, ``qsize``, ``fileno``
    (``buzon.wait``) and passing to child processes are the mailbox's.
    """

    slots: int
    """How many items fit."""
    item_size: int
    """The largest item, in bytes (``MessageTooLarge`` above it)."""

    def __init__(self, name: str, slots: int | None = None, item_size: int | None = None) -> None:
        if (slots is None) != (item_size is None):
            raise ValueError("pass both slots and item_size (to create), or neither")
        if slots is not None and item_size is not None and (slots < 1 or item_size < 0):
            raise ValueError("slots must be at least 1 and item_size at least 0")
        self.name = name
        self.max_message = DEFAULT_MAX_FRAME
        self.path = name_path(name, _SUFFIX)
        ring, self.created = self._open(
            ... if slots is None else slots,
            "any",
            False if slots is None else None,
            item_size or 0,
            DEFAULT_MAX_BYTES,
            raw=True,
        )
        self._setup(ring)

    def _setup(self, ring: Any) -> None:
        super()._setup(ring)
        self.slots = self.capacity or 0
        self.item_size = self.max_inline

    def __reduce__(self) -> tuple[Any, ...]:
        if self._closed:
            raise ChannelClosed(f"bounded buffer {self.name!r} is closed; it cannot be passed")
        return (_attach_bounded, (self.name, self.path, self._segment))

    # ---- the producer/consumer API: the raw mode's one-call paths -------------------

    put = Mailbox._put_raw
    put_nowait = Mailbox._put_raw_nowait
    get = Mailbox._get_raw
    get_nowait = Mailbox._get_raw_nowait

    def __enter__(self) -> BoundedBuffer:
        return self

    def __repr__(self) -> str:
        return f"<BoundedBuffer {self.name!r} slots={self.slots} item_size={self.item_size}>"


def _attach_bounded(name: str, path: str, segment: str) -> BoundedBuffer:
    """The buffer ``name`` (name file ``path``) by its segment: how a child process
    attaches the buffer it was passed, wherever its own runtime dir is."""
    return BoundedBuffer._attach_segment(name, path, segment)
