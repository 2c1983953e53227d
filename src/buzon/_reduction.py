"""Passing buzon objects to child processes, the way ``multiprocessing`` passes its own.

Theory of operation
-------------------
``multiprocessing`` pickles what it hands to another process with its
``ForkingPickler``: a ``Process``'s arguments under ``spawn`` and ``forkserver``, and
whatever goes through one of its queues or pipes under every start method. File
descriptors travel beside the pickle through :func:`multiprocessing.reduction.DupFd`:
inherited by a spawned child, sent over the forkserver's socket, or fetched from the
sending process's resource sharer with ``SCM_RIGHTS``. :func:`passable` (a one-line
hook where each class is defined) registers :func:`_reduce` for a class with
``ForkingPickler``, so those objects pass exactly as ``multiprocessing.Pipe`` ends do:

* **channel ends** (blocking driver): the transport's fds go through ``DupFd``; the
  child rebuilds the transport and a channel with the same options (codec, pickle,
  raw, max_frame, capacity, ...) and the same credit state (messages numbered, limits
  granted, a rendezvous offer out). pipe, fifo, mq, unix, seqpacket, tcp (without
  TLS), unixgram, udp (without ``reliable``) and shm ends pass; TLS and
  reliable-datagram ends keep state only this process can hold and are refused
  (:func:`_transport_parts`). An shm end's rings have no name once both ends attached:
  their segments go by fd too, with the peer's blocks it maps, and the child attaches
  them through ``/proc/self/fd`` (``ShmTransport.export``/``rebuild``); both processes
  then hold the end as after a fork (``shared``), and one with a loan or a received
  ring view open is refused.
* **listeners** (``unix:``, ``seqpacket:``, ``tcp://`` without TLS, ``shm:``): the
  listening socket.
* ``shared_array``, ``shared_value``: by the name of their segment (unguessable, so
  nobody else can plant one), which the child attaches. (Mailboxes, and
  :class:`~buzon.BoundedBuffer` which is one, pickle by name themselves.)

Both copies then exist, as with a ``multiprocessing.Pipe`` end: use each end in one
process at a time. Names stay with the original: the copy a child gets never removes
a socket file, a FIFO's credit pools or a datagram end's own socket file when it
closes (``remove()`` of a shared object still does, as it would in the parent).

A channel is refused while it holds state a copy cannot take along
(:func:`_why_not`): bytes accepted but not yet written, bytes or messages already read
here and not yet received, a send between taking its credit and writing. A plain
``pickle.dumps`` (or ``copy.copy``) of any of these objects raises :class:`TypeError`:
fds and mappings mean nothing in a pickle that is stored or sent anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from ._record import replace
from .errors import ChannelClosed, UnsupportedOperation

__all__ = ["passable"]

T = TypeVar("T", bound=type)

_WHAT = {
    "Channel": "channel end",
    "Listener": "listener",
    "SharedArray": "shared array",
    "SharedValue": "shared value",
}


_unregistered: list[type] = []


def passable(cls: T) -> T:
    """Let ``multiprocessing`` pass instances of ``cls`` to other processes, and make a
    plain ``pickle.dumps`` of one raise a :class:`TypeError` that says so. The class is
    registered with ``ForkingPickler`` by :func:`register`, when the first buzon object
    is made: ``import buzon`` does not import ``multiprocessing``."""
    _unregistered.append(cls)
    setattr(cls, "__reduce_ex__", _refuse_plain_pickle)  # noqa: B010 - a class hook
    return cls


def register() -> None:
    """Register the passable classes with ``multiprocessing``'s pickler (once; the
    constructors of channels, listeners and shared objects call it: an object can only
    be pickled after it was made)."""
    if _unregistered:
        from multiprocessing.reduction import ForkingPickler

        for cls in list(_unregistered):
            ForkingPickler.register(cls, _reduce)
        _unregistered.clear()


def _refuse_plain_pickle(self: object, protocol: object) -> Any:
    name = type(self).__name__
    what = _WHAT.get(name, "object")
    raise TypeError(
        f"cannot pickle a buzon {what} ({type(self).__module__}.{name}) with plain pickle: "
        "it passes only to another process through multiprocessing (a Process argument, "
        "a multiprocessing Queue or Pipe), which carries its file descriptors or "
        "re-attaches it by name (see docs/semantics.md, 'Passing ends to child processes')"
    )


def _reduce(obj: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    """The ``ForkingPickler`` reducer of every passable class."""
    from .shm._shared import SharedArray, SharedValue
    from .sync._channel import Channel
    from .sync._open import Listener

    kind = type(obj)
    if kind is Channel:
        return _reduce_channel(obj)
    if kind is Listener:
        return _reduce_listener(obj)
    if kind is SharedArray or kind is SharedValue:
        if obj.closed:
            raise ChannelClosed(f"shared object {obj.name!r} is closed; it cannot be passed")
        return _attach_shared, (kind is SharedArray, obj.name, obj.path, obj.segment_name)
    if kind.__module__.startswith("buzon.aio"):
        raise UnsupportedOperation(
            f"an asyncio {_WHAT.get(kind.__name__, 'object')} (buzon.aio) cannot be passed to "
            "another process: its waits belong to this process's event loop. Pass one made "
            "with the blocking API (buzon.pipe, buzon.connect, buzon.listen), or connect "
            "from the child with buzon.aio"
        )
    raise UnsupportedOperation(f"{kind.__name__} cannot be passed to another process")


def _attach_shared(array: bool, name: str, path: str, segment: str) -> Any:
    from .shm._shared import SharedArray, SharedValue

    return (SharedArray if array else SharedValue)._attach_segment(name, path, segment)


# -- file descriptors ----------------------------------------------------------------


class _Fds:
    """The distinct fds of one object, each passed once through ``DupFd``; ``slot(fd)``
    names an fd by its index so the child can rebuild aliases (one fd in two roles)."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self.dups: list[Any] = []

    def slot(self, fd: int) -> int:
        if fd < 0:
            return -1
        if fd not in self._index:
            self._index[fd] = len(self.dups)
            from multiprocessing.reduction import DupFd

            self.dups.append(DupFd(fd))
        return self._index[fd]


def _detach_all(dups: list[Any]) -> list[int]:
    """The child's side of :class:`_Fds`: take every fd over (close-on-exec, as buzon
    opens all its fds)."""
    fds: list[int] = []
    try:
        for dup in dups:
            fd = dup.detach()
            os.set_inheritable(fd, False)
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _at(fds: list[int], slot: int) -> int:
    return fds[slot] if slot >= 0 else -1


# -- channel ends ----------------------------------------------------------------------


class _ChannelState(NamedTuple):
    """What a child needs besides the fds to continue a channel where it stands."""

    options: Any  # ChannelOptions
    address: Any
    peer: Any
    capacity: int | None
    sflow: Any  # SendFlow | None
    rflow: Any  # RecvFlow | None
    taken: int
    tokens: tuple[Any, ...] | None  # a TokenPool's state, its fds as slots
    native_capacity: int  # a bound the mechanism keeps itself (a POSIX queue's maxmsg)
    taking: bool  # the receiver reports its takes (credits, receipts, tokens)


def _why_not(core: Any) -> str | None:
    """Why this channel cannot be copied to another process now (None: it can)."""
    if core.pending or core.backlog or core.stats.queued_bytes:
        return "bytes it accepted are still waiting to be written (call flush() first)"
    if core.credit_out is not None:
        return "a CREDIT frame is still waiting to be written (call flush() first)"
    decoder = core.decoder
    if decoder is not None and (decoder.buffered or decoder.frames or decoder.control):
        return (
            "part of the stream was already read here (a partially read frame, or "
            "messages not yet received): receive them first"
        )
    if core.inbox or core.raw_chunks:
        return "messages were already read here and not yet received: receive them first"
    tokens = core.tokens
    if tokens is not None and (tokens.held is not None or tokens.awaiting is not None):
        return "a send is in progress (it holds a credit token or waits for its ack)"
    return None


def _reduce_channel(channel: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    core = channel._core
    scheme = core.transport.scheme or "this"
    if core.closed:
        raise ChannelClosed(f"the {scheme} channel is closed; it cannot be passed")
    core.confirm_take()  # a deferred rendezvous take goes now: the child inherits none
    why = _why_not(core)
    if why is not None:
        raise UnsupportedOperation(f"this {scheme} channel cannot be passed now: {why}")
    fds = _Fds()
    parts = _transport_parts(core, fds)
    core.passed = True  # its close must not read away what the other process will read
    tokens = None
    pool = core.tokens
    if pool is not None:
        tokens = (
            pool.capacity,
            fds.slot(pool.credit_fd),
            fds.slot(pool.ack_fd),
            fds.slot(pool._wfd),
            fds.slot(pool._ack_w),
            pool.owner,
            pool.offering,
            pool.seq,
            fds.slot(pool.stake_fd),
            fds.slot(pool._stake_w),
        )
    state = _ChannelState(
        options=core.options,
        address=core.address,
        peer=core.peer,
        capacity=core.capacity,
        sflow=core.sflow,
        rflow=core.rflow,
        taken=core.taken,
        tokens=tokens,
        native_capacity=core.transport.native_capacity,
        taking=core.taking,
    )
    return _rebuild_channel, (fds.dups, parts, state)


def _transport_parts(core: Any, fds: _Fds) -> tuple[Any, ...]:
    """A transport as (kind, fd slots and attributes) to rebuild it in the child; or
    :class:`UnsupportedOperation` naming why it cannot be."""
    from .transport._dgram import DatagramTransport
    from .transport._fdstream import FdStreamTransport, SocketStreamTransport
    from .transport.fifo import FifoReader, FifoWriter
    from .transport.mq import MQTransport
    from .transport.seqpacket import SeqpacketTransport
    from .transport.shm import ShmTransport

    t = core.transport
    kind = type(t)
    if core.acked:
        raise UnsupportedOperation(
            f"a reliable {t.scheme} channel cannot be passed to another process: its "
            "delivery protocol (windows, acknowledgements, retransmission timers) runs in "
            "this one. Connect from the child instead"
        )
    if kind is FdStreamTransport:
        return ("fd", fds.slot(t._rfd), fds.slot(t._wfd), t.properties, t.scheme, t.peer)
    if kind is SocketStreamTransport:
        t.shared = True  # its receives no longer block in recv (see the class)
        return ("socket", fds.slot(t._fd), t.properties, t.scheme, t.peer)
    if kind is MQTransport:
        return ("mq", fds.slot(t._mqd), t.address, "r" if t._reading else "w")
    if kind is FifoReader:
        r = t.reassembler
        if r.messages or r._partial:
            raise UnsupportedOperation(
                "this fifo channel holds part of a message already read; receive it first"
            )
        return ("fifo-r", fds.slot(t._rfd), fds.slot(t._keepalive), t.framed)
    if kind is FifoWriter:
        if t._job is not None or t.held_bytes:
            raise UnsupportedOperation(
                "this fifo channel is in the middle of writing a message; finish it first"
            )
        return ("fifo-w", fds.slot(t._wfd), t.framed)  # the child writes as a new writer
    if kind is SeqpacketTransport:
        return ("seqpacket", fds.slot(t._fd), t.peer)
    if kind is DatagramTransport:
        t.shared = True  # a connected end's receives no longer sleep in recvmsg
        return (
            "dgram",
            fds.slot(t._fd),
            t.properties,
            t.scheme,
            t.connected,
            t.max_message,
            t.last_peer,
            t.peer,
        )
    if kind is ShmTransport:
        if t.lending():
            raise UnsupportedOperation(
                "this shm channel cannot be passed now: a loan or a received view of it "
                "is still open (finish the `with ch.loan()` / `with ch.recv_view()` first)"
            )
        return ("shm", t.export(fds.slot))
    if getattr(t, "tls", None) is not None:
        why = "its TLS session (keys, sequence numbers) lives in this process's OpenSSL"
    else:
        why = f"buzon does not know how to copy a {kind.__name__}"
    raise UnsupportedOperation(
        f"a {t.scheme} channel cannot be passed to another process: {why}. "
        "Connect from the child instead"
    )


def _rebuild_transport(parts: tuple[Any, ...], fds: list[int]) -> Any:
    import socket

    from .transport._dgram import DatagramTransport
    from .transport._fdstream import FdStreamTransport, SocketStreamTransport
    from .transport.mq import MQTransport

    kind = parts[0]
    if kind == "shm":
        from .transport.shm import ShmTransport

        return ShmTransport.rebuild(parts[1], fds)
    if kind in ("fifo-r", "fifo-w"):
        from .transport.fifo import FifoReader, FifoWriter

        end: FifoReader | FifoWriter
        if kind == "fifo-r":
            end = FifoReader(fds[parts[1]], _at(fds, parts[2]))
        else:
            end = FifoWriter(fds[parts[1]])
        end.framed = parts[-1]
        return end
    if kind == "fd":
        _, r, w, props, scheme, peer = parts
        return FdStreamTransport(_at(fds, r), _at(fds, w), props, scheme=scheme, peer=peer)
    if kind == "socket":
        _, s, props, scheme, peer = parts
        sock = socket.socket(fileno=fds[s])
        return SocketStreamTransport(sock, props, scheme=scheme, peer=peer, shared=True)
    if kind == "mq":
        _, q, address, mode = parts
        return MQTransport(fds[q], address, mode=mode)
    if kind == "seqpacket":
        from .transport.seqpacket import SeqpacketTransport

        return SeqpacketTransport(socket.socket(fileno=fds[parts[1]]), parts[2])
    _, s, props, scheme, connected, max_message, last_peer, peer = parts
    sock = socket.socket(fileno=fds[s])
    transport = DatagramTransport(
        sock, props, scheme=scheme, connected=connected, max_message=max_message, shared=True
    )
    transport.last_peer = last_peer
    transport.peer = peer
    return transport


def _rebuild_channel(dups: list[Any], parts: tuple[Any, ...], state: _ChannelState) -> Any:
    """The child's side of :func:`_reduce_channel`: a channel where the parent's stood."""
    from ._channel import DEFAULT_CAPACITY, ChannelCore
    from .sync._channel import Channel
    from .transport._tokens import TokenPool

    fds = _detach_all(dups)
    try:
        transport = _rebuild_transport(parts, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if state.tokens is not None:
        capacity, credit, ack, wfd, ack_w, owner, offering, seq, stake, stake_w = state.tokens
        pool = TokenPool(capacity, _at(fds, credit), _at(fds, ack), owner=owner)
        pool._wfd = _at(fds, wfd)
        pool._ack_w = _at(fds, ack_w)
        pool.stake_fd = _at(fds, stake)
        pool._stake_w = _at(fds, stake_w)
        pool.offering = offering
        pool.seq = seq
        transport.tokens = pool  # its FIFOs (paths) stay the original owner's to remove
    transport.native_capacity = state.native_capacity
    options = state.options
    if transport.tokens is None and transport.native_capacity < 0:
        options = replace(options, capacity=state.capacity)
    else:
        options = replace(options, capacity=DEFAULT_CAPACITY)
    core = ChannelCore(transport, options, address=state.address, peer=state.peer)
    if state.sflow is not None:
        core.sflow = state.sflow
    if state.rflow is not None:
        core.rflow = state.rflow
    core.taken = state.taken
    if state.taking and not core.taking:  # receipts were asked of it: it counts its takes
        core.taking = True
    core._fast_paths()  # the ring calls only where the carried-over state allows them
    return Channel(core)


# -- listeners ---------------------------------------------------------------------------


def _reduce_listener(listener: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    from .transport.reliable import ReliableListener
    from .transport.seqpacket import SeqpacketListener
    from .transport.shm import ShmListener
    from .transport.tcp import TcpListener
    from .transport.unix import UnixListener

    if listener.closed:
        raise ChannelClosed(f"the listener of {listener.address} is closed; it cannot be passed")
    prep = listener._prep
    lt = listener._lt
    kind = type(lt)
    if kind is ReliableListener:
        raise UnsupportedOperation(
            f"a reliable {listener.address.scheme}: listener cannot be passed to another "
            "process: its peers' connections (sequence numbers, acknowledgements, "
            "retransmissions) live in this process, on one datagram socket; listen in "
            "the child instead"
        )
    if kind not in (UnixListener, SeqpacketListener, ShmListener, TcpListener):
        raise UnsupportedOperation(
            f"a {listener.address.scheme}: listener cannot be passed to another process: "
            "its endpoint is a single channel; accept it and pass the channel"
        )
    if prep.transport.tls is not None:
        raise UnsupportedOperation(
            f"the TLS listener of {listener.address} cannot be passed to another process "
            "(an ssl.SSLContext cannot be copied); listen in the child instead"
        )
    from multiprocessing import context

    if prep.authkey is not None and context.get_spawning_popen() is None:
        raise UnsupportedOperation(
            f"the listener of {listener.address} has an authkey: like multiprocessing's "
            "own authkey it passes only as an argument of a Process being started, never "
            "through a queue or pipe"
        )
    fds = _Fds()
    slot = fds.slot(lt.fileno())
    if kind is TcpListener:
        extra: Any = lt._local
    else:
        extra = (lt.path, lt.ring_size if kind is ShmListener else None)
    return _rebuild_listener, (fds.dups, kind.__name__, slot, lt.address, extra, prep)


def _rebuild_listener(
    dups: list[Any], kind: str, slot: int, address: Any, extra: Any, prep: Any
) -> Any:
    """The child's copy of a listener: it accepts like the parent's, and its ``close``
    releases its socket only (the endpoint's file is the parent's to remove)."""
    import socket

    from .sync._open import Listener
    from .transport.seqpacket import SeqpacketListener
    from .transport.shm import ShmListener
    from .transport.tcp import TcpListener
    from .transport.unix import UnixListener

    fds = _detach_all(dups)
    sock = socket.socket(fileno=fds[slot])
    lt: Any
    if kind == "TcpListener":
        lt = TcpListener.__new__(TcpListener)
        lt._local = extra
        lt._tls = None
    else:
        cls = {"ShmListener": ShmListener, "SeqpacketListener": SeqpacketListener}.get(
            kind, UnixListener
        )
        lt = cls.__new__(cls)
        lt.path, ring_size = extra
        if ring_size is not None:
            lt.ring_size = ring_size
        lt.opts = prep.transport
        lt.rejected = 0
        lt._st = None  # never unlink the parent's socket file
    lt.address = address
    lt.sock = sock
    return Listener(lt, prep)
