"""The scheme registry: one entry per address scheme says everything other layers ask.

A scheme is one transport module (``buzon.transport.<module>``) plus one
:class:`SchemeInfo` here. Everything that lists or tells schemes apart reads this table
and nothing else:

* :mod:`buzon.address` parses URLs by the entry's address kind (a runtime-dir name or
  absolute path, a queue name, ``host:port``) and names the schemes in its errors;
* :mod:`buzon._policy` applies the entry's security and capacity rules;
* :func:`buzon.transport.open_listener` imports the entry's module;
* the servers (``buzon.Server``, ``buzon.aio.Server``, ``buzon.serve``) take the
  servable schemes;
* :mod:`buzon._forensics` (``buzon ls`` / ``buzon clean``) recognises the runtime
  files the entries declare;
* :mod:`buzon.testing.conformance` runs the entries' conformance variants;
* :mod:`buzon.docgen` draws the transport and address tables from them.

``tests/test_registry.py`` checks that no other module keeps a list of schemes of
its own, and that each entry agrees with its module's ``LinkProperties``. This module
imports nothing but :mod:`buzon._record`, so that :mod:`buzon.address` (imported by
``import buzon``) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from ._record import Record

__all__ = [
    "SCHEMES",
    "RuntimeFile",
    "SchemeInfo",
    "describe",
    "scheme_info",
    "url_schemes",
]

AddressKind = Literal["local", "queue", "inet", "none"]
UnixSocketType = Literal["stream", "dgram", "seqpacket"]


class RuntimeFile(Record, frozen=True):
    """A kind of file a scheme leaves in buzon's runtime dir, for ``ls`` and ``clean``.

    ``role``:

    * ``"endpoint"``: ``NAME<suffix>``, the endpoint of address ``scheme:NAME``; a
      ``socket`` of ``socket_type`` or a ``fifo``. Removable once nothing is bound to
      it (a socket) or nobody reads it (a FIFO).
    * ``"client"``: ``c-PID-RANDOM<suffix>``, a connecting end's own socket;
      removable once process PID is gone and nothing is bound to it.
    * ``"lock"``: ``NAME<suffix>``, a plain file the listener holds an ``flock`` on
      (its kernel object, ``guards``, lives elsewhere: a POSIX queue); removable once
      unlocked and the object is gone (``exists``: the transport module's function
      that tells, given the address).
    * ``"pool"``: ``NAME<suffix>.capN.credit`` / ``.ack``, the token-pool FIFOs of a
      simplex capacity (``transport/_tokens.py``); removable once nobody reads them.
    """

    role: Literal["endpoint", "client", "lock", "pool"]
    suffix: str
    file_type: Literal["socket", "fifo", "file"]
    socket_type: UnixSocketType | None = None
    guards: str = ""
    exists: str | None = None

    def __repr__(self) -> str:
        return f"<RuntimeFile {self.role} *{self.suffix}>"


class SchemeInfo(Record, frozen=True):
    """Everything buzon knows about one scheme, outside its transport module."""

    name: str
    #: a few words for humans ("Unix stream socket")
    summary: str
    #: the transport module, ``buzon.transport.<module>``
    module: str
    #: how its URLs are written: ``"local"`` NAME in the runtime dir or ``/abs/path``;
    #: ``"queue"`` NAME (private prefix) or ``/NAME``; ``"inet"`` ``//HOST:PORT``;
    #: ``"none"`` no URL at all (``buzon.pipe()``)
    address: AddressKind
    #: the URL's shape in hints: ``unix:NAME``, ``tcp://HOST:PORT``
    form: str
    #: example URLs (the first is the canonical one); docs/transports.md lists them all
    examples: tuple[str, ...]
    #: file-name suffix of a runtime-dir NAME (``"local"`` addresses)
    suffix: str | None = None
    #: the AF_UNIX socket type at a ``"local"`` path, None for a FIFO (no length limit)
    unix_socket: UnixSocketType | None = None
    #: each accepted peer is a channel of its own (and ``accept`` can be called again);
    #: otherwise the endpoint is one channel that every sender writes into
    connection_oriented: bool = False
    #: the transport keeps message boundaries (raw mode sends whole messages)
    message_boundaries: bool = False
    #: buzon's handshake runs on a framed link (reliable=True links add their own)
    handshake: bool = False
    #: ``buzon.serve`` / ``buzon.Server`` accept it
    servable: bool = False
    #: ``authkey=`` authenticates the peer (the handshake proves it)
    authkey: bool = False
    #: ``compat="multiprocessing"`` (a byte stream the multiprocessing framing can use)
    compat: bool = False
    #: ``tls=`` wraps each connection
    tls: bool = False
    #: ``reliable=True`` runs the reliable datagram protocol from this module
    reliable_module: str | None = None
    #: ``ring_size=`` sizes its shared-memory rings (a listener option)
    ring_size: bool = False
    #: when ``pickle=True`` is allowed: ``"peer-checked"`` always (the kernel proves the
    #: peer is this user), ``"private-name"`` on private names only, ``"authenticated"``
    #: with an authenticated peer only (``authkey=``, client certificates)
    pickle: Literal["peer-checked", "private-name", "authenticated"] = "peer-checked"
    #: how a ``capacity=`` is kept: ``"link"`` credits on the duplex link;
    #: ``"needs-reliable"`` only with ``reliable=True``; ``"pool"`` token pools in the
    #: runtime dir; ``"pool-private-rendezvous"`` the same, capacity 0 on private names only
    credits: Literal["link", "needs-reliable", "pool", "pool-private-rendezvous"] = "link"
    #: the conformance suite's transports for it (``NAME-reliable``: ``reliable=True``)
    conformance: tuple[str, ...] = ()
    #: the capacity suite's transports for it
    capacity_conformance: tuple[str, ...] = ()
    #: what it leaves in the runtime dir
    runtime_files: tuple[RuntimeFile, ...] = ()

    def __repr__(self) -> str:
        return f"<SchemeInfo {self.name}: transport/{self.module}.py>"

    @property
    def prefix(self) -> str:
        """How its URLs start: ``unix:``, ``tcp://``."""
        return f"{self.name}://" if self.address == "inet" else f"{self.name}:"

    @property
    def has_url(self) -> bool:
        """False for ``pipe``: it has an :class:`~buzon.address.Address`, not a URL."""
        return self.address != "none"


SCHEMES: tuple[SchemeInfo, ...] = (
    SchemeInfo(
        name="pipe",
        summary="anonymous pipe",
        module="pipe",
        address="none",
        form="buzon.pipe()",
        examples=(),
        conformance=("pipe",),
        capacity_conformance=("pipe", "pipe-simplex"),
    ),
    SchemeInfo(
        name="fifo",
        summary="named pipe",
        module="fifo",
        address="local",
        form="fifo:NAME",
        examples=("fifo:jobs", "fifo:/srv/app/jobs.fifo"),
        suffix=".fifo",
        pickle="private-name",
        credits="pool",
        conformance=("fifo",),
        capacity_conformance=("fifo",),
        runtime_files=(
            RuntimeFile("endpoint", ".fifo", "fifo"),
            RuntimeFile("pool", ".fifo", "fifo"),
        ),
    ),
    SchemeInfo(
        name="mq",
        summary="POSIX message queue",
        module="mq",
        address="queue",
        form="mq:NAME",
        examples=("mq:jobs", "mq:/jobs"),
        message_boundaries=True,
        pickle="private-name",
        credits="pool-private-rendezvous",
        conformance=("mq",),
        capacity_conformance=("mq",),
        runtime_files=(
            RuntimeFile("lock", ".mq.lock", "file", guards="queue", exists="queue_exists"),
            RuntimeFile("pool", ".mq", "fifo"),
        ),
    ),
    SchemeInfo(
        name="unix",
        summary="Unix stream socket",
        module="unix",
        address="local",
        form="unix:NAME",
        examples=("unix:calc", "unix:/srv/app/calc.sock"),
        suffix=".sock",
        unix_socket="stream",
        connection_oriented=True,
        handshake=True,
        servable=True,
        authkey=True,
        compat=True,
        conformance=("unix",),
        capacity_conformance=("unix",),
        runtime_files=(RuntimeFile("endpoint", ".sock", "socket", "stream"),),
    ),
    SchemeInfo(
        name="unixgram",
        summary="Unix datagram socket",
        module="unixgram",
        address="local",
        form="unixgram:NAME",
        examples=("unixgram:log", "unixgram:/srv/app/log.dgram"),
        suffix=".dgram",
        unix_socket="dgram",
        message_boundaries=True,
        reliable_module="reliable",
        pickle="private-name",
        credits="needs-reliable",
        conformance=("unixgram", "unixgram-reliable"),
        capacity_conformance=("unixgram-reliable",),
        runtime_files=(
            RuntimeFile("endpoint", ".dgram", "socket", "dgram"),
            RuntimeFile("client", ".dgram", "socket", "dgram"),
        ),
    ),
    SchemeInfo(
        name="seqpacket",
        summary="Unix sequenced-packet socket",
        module="seqpacket",
        address="local",
        form="seqpacket:NAME",
        examples=("seqpacket:tasks", "seqpacket:/srv/app/tasks.seqpacket"),
        suffix=".seqpacket",
        unix_socket="seqpacket",
        connection_oriented=True,
        message_boundaries=True,
        handshake=True,
        servable=True,
        authkey=True,
        conformance=("seqpacket",),
        capacity_conformance=("seqpacket",),
        runtime_files=(RuntimeFile("endpoint", ".seqpacket", "socket", "seqpacket"),),
    ),
    SchemeInfo(
        name="tcp",
        summary="TCP socket",
        module="tcp",
        address="inet",
        form="tcp://HOST:PORT",
        examples=("tcp://127.0.0.1:7000", "tcp://[::1]:0"),
        connection_oriented=True,
        handshake=True,
        servable=True,
        authkey=True,
        compat=True,
        tls=True,
        pickle="authenticated",
        conformance=("tcp",),
        capacity_conformance=("tcp",),
    ),
    SchemeInfo(
        name="udp",
        summary="UDP socket",
        module="udp",
        address="inet",
        form="udp://HOST:PORT",
        examples=("udp://localhost:9999",),
        message_boundaries=True,
        reliable_module="reliable",
        pickle="authenticated",
        credits="needs-reliable",
        conformance=("udp", "udp-reliable"),
        capacity_conformance=("udp-reliable",),
    ),
    SchemeInfo(
        name="shm",
        summary="shared memory",
        module="shm",
        address="local",
        form="shm:NAME",
        examples=("shm:frames",),
        suffix=".shm",
        unix_socket="stream",
        connection_oriented=True,
        message_boundaries=True,
        handshake=True,
        servable=True,
        authkey=True,
        ring_size=True,
        conformance=("shm",),
        capacity_conformance=("shm",),
        runtime_files=(RuntimeFile("endpoint", ".shm", "socket", "stream"),),
    ),
)
"""Every scheme, in the order the docs and error messages list them."""

NAME_FORM = "name:NAME"
"""Not a transport but an indirection: ``name:NAME`` is the address a process registered
under NAME (:mod:`buzon.names`); it is resolved before a transport is chosen, so it is
no entry of :data:`SCHEMES`, and the address parser lists it in its errors."""

_BY_NAME = {info.name: info for info in SCHEMES}


def scheme_info(name: str) -> SchemeInfo:
    """The entry of scheme ``name``; :class:`KeyError` if there is none."""
    return _BY_NAME[name]


def url_schemes() -> tuple[SchemeInfo, ...]:
    """The schemes that have URLs (``buzon.listen``/``connect`` take them)."""
    return tuple(info for info in SCHEMES if info.has_url)


def describe(
    which: Callable[[SchemeInfo], object],
    *,
    conj: str = "or",
    form: bool = False,
    extra: tuple[str, ...] = (),
) -> str:
    """The URL prefixes (or ``form=True``: shapes) of the schemes ``which`` selects,
    as English: ``"unix:, tcp:// or shm:"``; ``extra`` words go last (the address
    parser adds ``name:``, a registered name: :data:`NAME_FORM`)."""
    words = [info.form if form else info.prefix for info in url_schemes() if which(info)]
    words += extra
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {conj} {words[-1]}"
