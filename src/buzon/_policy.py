"""Options and security policy shared by both drivers, decided before any I/O waits.

Both ``buzon.connect``/``buzon.listen`` and their asyncio twins call :func:`prepare`,
so defaults and refusals are identical in the two drivers. Which rule applies to a
scheme is its registry entry's to say (:mod:`buzon._schemes`); the schemes named below
are today's:

* TCP/UDP listeners bind loopback unless authenticated or ``insecure=True`` —
  :class:`InsecureBind` otherwise. Only a handshake authenticates: ``authkey=`` on a
  framed (or multiprocessing-compat) TCP link; never on UDP or with ``raw=True``.
* ``pickle=True`` needs a peer that is provably the same user (pipes, Unix sockets
  checked with ``SO_PEERCRED``, and FIFOs, queues and datagram sockets under buzon's
  private 0600 names) or authenticated (TCP with ``authkey``); anything else raises
  :class:`SecurityError`.
* ``compat="multiprocessing"`` exists for stream sockets only.
* ``ring_size=`` sizes the rings of ``shm:`` channels and is a listener option: the
  listener creates the rings, so ``connect`` refuses it, as does any other transport
  (:class:`UnsupportedOperation`); a size that is not a power of two from 4 KiB to
  1 GiB raises :class:`ValueError`. A connector reads the size it got in
  ``channel.properties.notes``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._channel import DEFAULT_CAPACITY, DEFAULT_MAX_QUEUE, ChannelCore, ChannelOptions
from ._record import Record
from ._schemes import SCHEMES, describe, scheme_info
from .address import Address, parse_address
from .errors import AddressError, InsecureBind, SecurityError, UnsupportedOperation

if TYPE_CHECKING:
    import ssl  # loaded only when tls= is used (importing buzon does not load it)
from .protocol.credit import check_capacity
from .protocol.frames import DEFAULT_MAX_FRAME
from .transport.base import TransportOptions
from .transport.pipe import pipe_pair

__all__ = ["Prepared", "capacity_support", "prepare"]


class Prepared(Record, frozen=True):
    address: Address
    transport: TransportOptions
    channel: ChannelOptions
    authkey: bytes | None
    compat: str | None

    @property
    def handshake(self) -> bool:
        """buzon's own handshake runs on connection-oriented, framed links: stream
        sockets, and the message links with a connection per peer (reliable datagrams,
        shared memory), where it agrees on the capacity like everywhere else."""
        connected = scheme_info(self.address.scheme).handshake or bool(self.transport.reliable)
        return connected and self.compat is None and not self.channel.raw


# what the buzon handshake's HELLO options say themselves; hello= adds other entries
# (an RPC server's instance id), which the peer sees in ``peer.extra["options"]``
_HELLO_OWN = ("codec", "pickle", "capacity")


def prepare(
    url: str | Address,
    *,
    listening: bool,
    codec: str = "msgpack",
    pickle: bool = False,
    raw: bool = False,
    authkey: bytes | None = None,
    compat: str | None = None,
    insecure: bool = False,
    max_frame: int = DEFAULT_MAX_FRAME,
    spin: float | None = None,
    handshake_timeout: float = 10.0,
    frame_timeout: float | None = 30.0,
    idle_timeout: float | None = None,
    backlog: int = 128,
    allow_uids: tuple[int, ...] | frozenset[int] = (),
    mq_maxmsg: int | None = None,
    mq_msgsize: int | None = None,
    tls: ssl.SSLContext | None = None,
    reliable: Any = False,
    capacity: int | None = DEFAULT_CAPACITY,
    max_queue: int = DEFAULT_MAX_QUEUE,
    ring_size: int | None = None,
    hello: dict[str, Any] | None = None,
) -> Prepared:
    addr = parse_address(url)
    if addr.scheme == "name":  # name:NAME (buzon.names): resolved before the transport
        addr = _resolve_name(addr, listening)
    info = scheme_info(addr.scheme)
    if ring_size is not None:
        _check_ring_size(addr, ring_size, listening=listening)
    if reliable:
        # reliable datagrams (transport/reliable.py): the protocol authenticates nobody,
        # so every rule below for udp/unixgram applies unchanged
        from .protocol.reliable import ReliableConfig

        if info.reliable_module is None:
            raise UnsupportedOperation(
                f"reliable=True works on {_RELIABLE} addresses, not {addr.scheme}:"
            )
        if reliable is not True and not isinstance(reliable, ReliableConfig):
            raise TypeError("reliable is a bool or a buzon.protocol.reliable.ReliableConfig")
    if capacity != DEFAULT_CAPACITY:
        capacity = check_capacity(capacity)
        _check_capacity_support(addr, capacity, raw=raw, compat=compat, reliable=bool(reliable))
    if max_queue < 1:
        raise ValueError("max_queue must be at least 1 byte")
    if authkey is not None and not isinstance(authkey, bytes | bytearray):
        raise TypeError("authkey must be bytes")
    if compat not in (None, "multiprocessing"):
        raise ValueError(f"unknown compat mode {compat!r}; the one supported is 'multiprocessing'")
    if compat is not None and not info.compat:
        raise UnsupportedOperation(f"compat={compat!r} works on {_COMPAT} addresses only")
    if raw and pickle:
        raise ValueError("raw=True moves bytes only; it cannot be combined with pickle=True")
    if not 1024 <= max_frame <= 2**40:
        raise ValueError("max_frame must be between 1 KiB and 1 TiB")
    if codec == "pickle" and not pickle:
        raise ValueError("codec='pickle' needs pickle=True as well (pickle is opt-in)")
    # An authkey authenticates the peer only where a handshake uses it: buzon's own on
    # framed connections, the multiprocessing one in compat mode. Never on datagrams.
    authenticated = authkey is not None and not raw and info.authkey
    if tls is not None:
        if not info.tls:
            raise UnsupportedOperation(f"tls= works on {_TLS} addresses, not {addr.scheme}:")
        import ssl

        if not isinstance(tls, ssl.SSLContext):
            raise TypeError("tls must be an ssl.SSLContext")
        # TLS authenticates the side whose certificate is verified: a listener that
        # requires client certificates knows its peers; a client verifies the server
        authenticated = authenticated or tls.verify_mode == ssl.CERT_REQUIRED
    if addr.is_inet:
        from .transport.tcp import is_loopback

        if listening and not authenticated and not insecure and not is_loopback(addr):
            raise InsecureBind(
                f"{addr} is not a loopback address: anyone on the network could connect. "
                + (
                    f"{addr.scheme.upper()} has no handshake, so only insecure=True allows this"
                    if not info.authkey
                    else "Pass authkey=b'...' or tls= with client certificates required "
                    "(or insecure=True if you really mean it)"
                )
            )
    if pickle and info.pickle == "authenticated" and not authenticated:
        raise SecurityError(
            f"pickle over {addr.scheme} needs an authenticated peer"
            + (
                ": pass authkey=b'...'"
                if info.authkey
                else f" ({addr.scheme.upper()} cannot have one)"
            )
        )
    if pickle and info.pickle == "private-name" and not addr.private:
        # buzon creates private endpoints 0600 in its 0700 namespace; an exact name may be
        # an object some other program made, writable by other users.
        raise SecurityError(
            f"pickle=True on {addr}: only private names ({addr.scheme}:NAME) guarantee that "
            "nobody but you can send into it"
        )
    if pickle and allow_uids:
        raise SecurityError("pickle=True cannot be combined with allow_uids (other users' data)")
    if hello and not all(type(k) is str and k not in _HELLO_OWN for k in hello):
        raise ValueError(f"hello= keys are strings other than {', '.join(_HELLO_OWN)}")
    channel = ChannelOptions(
        codec="pickle" if codec == "pickle" else codec,
        pickle=pickle or codec == "pickle",
        raw=raw,
        max_frame=max_frame,
        spin=_default_spin() if spin is None else float(spin),
        handshake_timeout=handshake_timeout,
        frame_timeout=frame_timeout,
        idle_timeout=idle_timeout,
        compat=compat,
        capacity=capacity,
        max_queue=max_queue,
        hello=tuple(hello.items()) if hello else (),
    )
    topts = TransportOptions(
        backlog=backlog,
        mq_maxmsg=mq_maxmsg,
        mq_msgsize=mq_msgsize,
        insecure=insecure,
        allow_uids=frozenset(allow_uids),
        tls=tls,
        capacity=capacity,
        reliable=reliable or False,
        ring_size=ring_size,
    )
    return Prepared(addr, topts, channel, bytes(authkey) if authkey is not None else None, compat)


def _check_ring_size(addr: Address, ring_size: int, *, listening: bool) -> None:
    if not scheme_info(addr.scheme).ring_size:
        raise UnsupportedOperation(
            f"ring_size= sizes the rings of {_RINGS} channels; {addr.scheme}: has none"
        )
    if not listening:
        raise UnsupportedOperation(
            f"ring_size= is a listener option: the listener of {addr} creates the rings "
            "and chooses their size (the channel's properties.notes say which)"
        )
    from .transport.shm import check_ring_size

    check_ring_size(ring_size)


def _check_capacity_support(
    addr: Address, capacity: int | None, *, raw: bool, compat: str | None, reliable: bool = False
) -> None:
    """Refuse at once, with the reason, what no transport of this kind can honour."""
    if raw or compat is not None:
        raise UnsupportedOperation(
            f"capacity={capacity} needs buzon framing: not with raw=True or compat="
        )
    if capacity is None:
        return
    info = scheme_info(addr.scheme)
    if info.credits == "needs-reliable" and not reliable:
        raise UnsupportedOperation(
            f"capacity={capacity} on {addr.scheme}: credits need a link that loses and "
            "reorders nothing, and a peer per channel (use reliable=True)"
        )
    if info.credits == "pool-private-rendezvous" and capacity == 0 and not addr.private:
        raise UnsupportedOperation(
            f"capacity=0 on {addr}: its credit pool lives in buzon's runtime dir, so it "
            f"needs a private name ({info.form}), not an exact one"
        )


def capacity_support(scheme: str, duplex: bool = True) -> dict[str, str | None]:
    """For the docs: each capacity mode (``"0"``, ``"N"``, ``"None"``) on ``scheme``
    (``"reliable"``: reliable datagrams), ``None`` when supported, else the reason it is
    refused (the same checks ``listen``, ``connect`` and ``pipe`` make)."""
    out: dict[str, str | None] = {}
    reliable = scheme == "reliable"
    if reliable:
        scheme = next(i.name for i in SCHEMES if i.reliable_module is not None)
    info = scheme_info(scheme)
    addr = parse_address(info.examples[0]) if info.has_url else Address(scheme)
    for label, capacity in (("0", 0), ("N", 8), ("None", None)):
        try:
            _check_capacity_support(addr, capacity, raw=False, compat=None, reliable=reliable)
        except UnsupportedOperation as exc:
            out[label] = str(exc)
        else:
            out[label] = None
    return out


# the schemes each option works on, for the refusals' messages
_RELIABLE = describe(lambda i: i.reliable_module, conj="and")
_COMPAT = describe(lambda i: i.compat, conj="and")
_TLS = describe(lambda i: i.tls, conj="and")
_RINGS = describe(lambda i: i.ring_size, conj="and")


def pipe_cores(duplex: bool, **options: Any) -> tuple[ChannelCore, ChannelCore]:
    """The two cores of ``buzon.pipe``/``buzon.aio.pipe`` (each driver wraps them).

    Both ends of a pipe belong to the program that made it, so ``pickle=True`` without
    a ``codec`` means the pickle codec (on ``connect``/``listen`` it only lets the peer's
    pickles in: there the peer may be someone else).
    """
    if options.get("codec") is None:
        options["codec"] = "pickle" if options.get("pickle") else "msgpack"
    options = {k: v for k, v in options.items() if v is not None or k == "capacity"}
    prep = prepare(Address("pipe"), listening=False, **options)
    capacity = prep.channel.capacity
    # a duplex pipe carries CREDIT frames back; a one-way pipe gets a token pool
    a, b = pipe_pair(duplex, -1 if duplex else capacity)
    return ChannelCore(a, prep.channel), ChannelCore(b, prep.channel)


def _default_spin() -> float:
    """Spin budget before blocking: 50 µs, or ``BUZON_SPIN_US`` (0 disables)."""
    env = os.environ.get("BUZON_SPIN_US")
    if env:
        try:
            return max(0.0, float(env)) / 1e6
        except ValueError:
            pass
    return 50e-6


def _resolve_name(addr: Address, listening: bool) -> Address:
    """``name:NAME`` -> the address registered under NAME (``connect``'s side); a
    listener binds a real address and registers it (``listen(url, name=...)``)."""
    if listening:
        raise AddressError(
            f"{addr}: listen on a real address and register it: listen('unix:NAME', name=...)"
        )
    from .names import resolve

    return resolve(addr)
