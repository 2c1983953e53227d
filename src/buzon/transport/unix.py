"""Unix domain stream sockets, with the peer's credentials checked both ways.

* The socket file is bound, set to 0600 and only then put in listening state, so no
  other user can connect during the window between ``bind`` and ``chmod``.
* A stale socket file (left by a crashed process: connecting to it is refused) is
  replaced; a live one raises :class:`EndpointInUse`. Close unlinks the file only if it
  is still the one this listener bound (same inode), never someone else's.
* ``SO_PEERCRED`` gives the peer's pid, uid and gid. By default both sides accept only
  a peer of their own uid (``allow_uids`` adds more); an accepted connection from
  another user comes out of :meth:`UnixListener.accept` marked ``refused`` (the
  listener's accept engine tells the peer why, closes it and counts it).
* No Linux abstract-namespace sockets: every socket is a file with permissions.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import ClassVar

from .._exitclean import disown, own
from .._runtime import check_endpoint_path
from ..address import Address
from ..errors import (
    ConnectError,
    ConnectionRefused,
    EndpointInUse,
    NoSuchEndpoint,
    PeerCredentialsRejected,
    UnsafePath,
    from_oserror,
)
from ._fdstream import SocketStreamTransport, accept_one
from .base import (
    Connector,
    LinkProperties,
    ListenerTransport,
    PeerInfo,
    Transport,
    TransportOptions,
)

__all__ = [
    "UnixConnector",
    "UnixListener",
    "bind_unix_path",
    "connect",
    "listen",
    "peer_credentials",
]

PROPERTIES = LinkProperties(
    transport="unix",
    direction="duplex",
    boundaries="stream",
    connection_oriented=True,
    reliable=True,
    ordered=True,
    local=True,
    credentials=True,
    notes="SO_PEERCRED checked: same user by default",
)

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> PeerInfo:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return PeerInfo(pid=pid, uid=uid, gid=gid)


def _check_uid(peer: PeerInfo, opts: TransportOptions, what: str) -> None:
    if peer.uid != os.getuid() and peer.uid not in opts.allow_uids:
        raise PeerCredentialsRejected(
            f"{what}: peer pid {peer.pid} runs as uid {peer.uid}; only uid {os.getuid()}"
            + (f" and {sorted(opts.allow_uids)}" if opts.allow_uids else "")
            + " are allowed"
        )


def bind_unix_path(sock: socket.socket, addr: Address, path: str) -> os.stat_result:
    """Bind ``sock`` at ``path`` (replacing a stale socket file), chmod 0600, return its stat."""
    check_endpoint_path(path, must_exist=False)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise EndpointInUse(f"{addr}: {path!r} exists and is not a socket")
        if _is_live(path, sock.type):
            raise EndpointInUse(f"{addr}: another process is listening at {path!r}")
        os.unlink(path)  # stale: its owner died without cleaning up
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise from_oserror(exc, f"bind {path}") from exc
    st = os.lstat(path)
    own(path, st)  # removed at interpreter exit if close() never runs
    return st


def _is_live(path: str, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def unlink_if_ours(path: str, st: os.stat_result | None) -> None:
    """Remove ``path`` only if it is still the inode we created."""
    disown(path)
    if st is None:
        return
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(path)


class UnixListener(ListenerTransport):
    """A bound, listening Unix socket (mode 0600; the peer's credentials checked on
    accept). Another kind of Unix socket (``seqpacket:``) changes :attr:`sock_type` and
    :meth:`_transport`."""

    sock_type: ClassVar[int] = socket.SOCK_STREAM

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.opts = opts
        self.path = addr.fs_path(opts.runtime_dir)
        self.rejected = 0
        self.sock = socket.socket(socket.AF_UNIX, self.sock_type | socket.SOCK_CLOEXEC)
        self._st: os.stat_result | None = None
        try:
            self._st = bind_unix_path(self.sock, addr, self.path)
            self.sock.listen(opts.backlog)
            self.sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Transport | None:
        while True:
            conn = accept_one(self.sock, self.address)
            if conn is None:
                return None
            peer = peer_credentials(conn)
            transport = self._transport(conn, peer)
            try:
                _check_uid(peer, self.opts, str(self.address))
            except PeerCredentialsRejected as exc:
                transport.refused = str(exc)  # the accept engine tells it why and closes
            return transport

    def _transport(self, conn: socket.socket, peer: PeerInfo) -> Transport:
        """The transport of an accepted connection."""
        return SocketStreamTransport(conn, PROPERTIES, scheme="unix", peer=peer)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.close()
        unlink_if_ours(self.path, self._st)
        self._st = None

    def close_in_child(self) -> None:
        self._st = None  # the parent owns the socket file
        self.sock.close()


def client_socket(
    addr: Address, path: str, allow_uids: frozenset[int], sock_type: int = socket.SOCK_STREAM
) -> socket.socket:
    """A non-blocking Unix socket (``sock_type``) to connect to ``path``, once the path
    is checked to be a socket nobody untrusted could have put there."""
    check_endpoint_path(path, must_exist=True, allow_uids=allow_uids)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise NoSuchEndpoint(f"{addr}: nothing listens at {path!r}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"{addr}: {path!r} is not a socket")
    return socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)


class UnixConnector(Connector):
    """Connects to a Unix listener (its credentials checked). Another kind of Unix
    socket (``seqpacket:``) changes :attr:`sock_type` and :meth:`_transport`."""

    want = "write"
    sock_type: ClassVar[int] = socket.SOCK_STREAM

    def __init__(self, addr: Address, opts: TransportOptions) -> None:
        self.address = addr
        self.opts = opts
        self.path = addr.fs_path(opts.runtime_dir)
        self.sock: socket.socket | None = client_socket(
            addr, self.path, opts.allow_uids, self.sock_type
        )
        self._started = False

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def step(self) -> Transport | None:
        sock = self.sock
        assert sock is not None
        if not self._started:
            err = sock.connect_ex(self.path)
            if err in (errno.EAGAIN, errno.EINPROGRESS):
                # listen backlog full: Unix sockets give no readiness; retry shortly
                self.want = "retry"
                return None
            self._started = err == 0
            if err:
                self.close()
                if err == errno.ECONNREFUSED:
                    raise ConnectionRefused(f"{self.address}: nobody accepts at {self.path!r}")
                if err == errno.EPROTOTYPE:  # no waiting mends this: not "not there yet"
                    raise ConnectError(
                        f"{self.address}: {self.path!r} is not a {self.address.scheme} socket "
                        "(is it another kind of endpoint: unix:, unixgram:, seqpacket:?)"
                    )
                raise from_oserror(OSError(err, os.strerror(err)), str(self.address))
        peer = peer_credentials(sock)
        try:
            _check_uid(peer, self.opts, str(self.address))
        except PeerCredentialsRejected:
            self.close()
            raise
        self.sock = None
        return self._transport(sock, peer)

    def _transport(self, sock: socket.socket, peer: PeerInfo) -> Transport:
        """The transport of the connected socket."""
        return SocketStreamTransport(sock, PROPERTIES, scheme="unix", peer=peer)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def listen(addr: Address, opts: TransportOptions) -> UnixListener:
    return UnixListener(addr, opts)


def connect(addr: Address, opts: TransportOptions) -> UnixConnector:
    return UnixConnector(addr, opts)
