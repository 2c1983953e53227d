"""Runtime-dir forensics: what ``buzon ls`` shows and what ``buzon clean`` may remove.

Theory of operation
-------------------
Every entry of the private runtime dir is recognised by the runtime files the schemes
declare in the registry (:attr:`buzon._schemes.SchemeInfo.runtime_files`), so a new
scheme is listed and cleaned without a change here:

* an **endpoint** ``NAME<suffix>`` of the declared file type is address
  ``scheme:NAME``. A socket is ``listening``/``bound`` when ``/proc/net/unix`` shows it
  bound (else a connection attempt of the scheme's socket type decides; refused means
  ``dead``); a FIFO has a ``reader`` when a non-blocking write-open succeeds (which
  wakes a foreign reader blocked in ``open``: buzon's own readers are not disturbed);
* a **client** socket ``c-PID-RANDOM<suffix>`` belongs to process PID;
* a **lock** file is held (``flock``) by the listener of an object that lives outside
  the runtime dir; the scheme's module says whether that object still exists;
* a **pool** ``NAME<suffix>.capN.credit`` / ``.ack`` / ``.stake`` holds a simplex
  capacity's tokens.

Besides the schemes' files, the runtime dir holds the names of shared-memory objects
(``NAME.array``, ``NAME.value``, ``NAME.bbuf``: :mod:`buzon.shm`), and ``ls`` adds this
user's POSIX queues and shared-memory segments, which live outside it.

:func:`clean` removes only what is provably dead and older than :data:`CLEAN_GRACE`
seconds (younger entries may be endpoints being set up), and only if the entry is
still the inode that was judged.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import re
import socket
import stat
import time
from dataclasses import dataclass

from ._schemes import SCHEMES, RuntimeFile, SchemeInfo
from .errors import BuzonError

__all__ = ["CLEAN_GRACE", "Entry", "Removal", "clean", "ls_rows", "scan"]

_NAMES_DIR = "names.d"  # buzon.names' directory in the runtime dir
_RPC_DIR = "rpc.d"  # RPC servers' published counters (buzon.rpc._publish)
CLEAN_GRACE = 2.0  # seconds: entries younger than this may be endpoints being set up

_SOCKET_TYPES = {
    "stream": socket.SOCK_STREAM,
    "dgram": socket.SOCK_DGRAM,
    "seqpacket": socket.SOCK_SEQPACKET,
}
# NAME.array, NAME.value, NAME.bbuf: shared_array, shared_value, BoundedBuffer names
_SHM_NAMES = {".array": "array", ".value": "value", ".bbuf": "bbuf", ".mbox": "mailbox"}


def _declared(role: str) -> list[tuple[SchemeInfo, RuntimeFile]]:
    return [(info, f) for info in SCHEMES for f in info.runtime_files if f.role == role]


_ENDPOINTS: dict[tuple[str, str], tuple[SchemeInfo, RuntimeFile]] = {
    (f.suffix, f.file_type): (info, f) for info, f in _declared("endpoint")
}
_CLIENTS = {f.suffix: (info, f) for info, f in _declared("client")}
_LOCKS = _declared("lock")
_POOLS = {f.suffix: info for info, f in _declared("pool")}
_POOL_RE = re.compile(
    r"^(.+)(" + "|".join(re.escape(s) for s in _POOLS) + r")\.cap(\d+)\.(credit|ack|stake)$"
)
Row = tuple[str, str, str, str, str]


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "file"


class Entry:
    """One entry of the runtime dir, recognised (and, after :meth:`probe`, probed)."""

    def __init__(self, rdir: str, name: str) -> None:
        self.name = name
        self.path = os.path.join(rdir, name)
        self.st = os.lstat(self.path)
        self.mode = stat.S_IMODE(self.st.st_mode)
        self.file_type = _file_type(self.st.st_mode)
        stem, suffix = os.path.splitext(name)
        self.client_pid: int | None = None
        self.scheme: SchemeInfo | None = None
        self.declared: RuntimeFile | None = None  # what the scheme says the file is
        self.kind = self.file_type
        self.address = "-"
        self.pool = ""
        self.lock: RuntimeFile | None = None
        endpoint = _ENDPOINTS.get((suffix, self.file_type))
        if endpoint is not None:
            self.scheme, self.declared = endpoint
            self.kind, self.address = endpoint[0].name, f"{endpoint[0].name}:{stem}"
        client = _CLIENTS.get(suffix) if self.file_type == "socket" else None
        if client is not None and (pid := _client_pid(name, suffix)) is not None:
            (self.scheme, self.declared), self.client_pid = client, pid
            self.kind, self.address = client[0].name, "-"
        for info, lock in _LOCKS:
            if self.file_type == lock.file_type and name.endswith(lock.suffix):
                self.scheme, self.lock, self.kind = info, lock, f"{info.name}-lock"
                self.address = f"{info.name}:{name[: -len(lock.suffix)]}"
        if self.file_type == "file" and suffix in _SHM_NAMES:  # names a segment
            self.kind = "shm-name"
            self.address = f"{_SHM_NAMES[suffix]}:{stem}"
        pool = _POOL_RE.match(name) if self.file_type == "fifo" and _POOLS else None
        if pool is not None:  # a capacity's token pool (transport/_tokens.py)
            info = _POOLS[pool[2]]
            self.scheme = info
            self.pool = f"capacity={pool[3]} {pool[4]}s"
            self.kind = {"credit": "credits", "ack": "acks"}.get(pool[4], "stakes")
            self.address = f"{info.name}:{pool[1]}"
        self.live: bool | None = None  # True live, False provably dead, None unknown
        self.state = "-"

    def probe(self, bound: dict[str, bool] | None) -> None:
        """Find out whether anyone still uses it (``bound``: see :func:`scan`)."""
        if self.lock is not None:
            self.live = _lock_held(self.path)
            self.state = {True: "listener alive", False: "no listener", None: "?"}[self.live]
        elif self.kind == "shm-name":
            from .shm import segment_exists
            from .shm._names import lookup

            try:
                segment = lookup(self.path)
            except (BuzonError, OSError):  # not ours, or not a name file after all
                segment = None
            if segment is not None and segment_exists(segment):
                self.state = f"names {segment.lstrip('/')}"
                if self.name.endswith(".mbox"):
                    from ._direct import owner_state
                    from ._mailbox import describe

                    self.kind = "mailbox"
                    try:
                        self.state = describe(segment, self.path)
                    except BuzonError as exc:  # not a mailbox's ring after all
                        self.state = f"names {segment.lstrip('/')} ({exc})"
                    owner = owner_state(self.name[: -len(".mbox")])
                    if owner is not None:  # buzon.inbox(): a process's own mailbox
                        self.state = f"{owner}; {self.state}"
            else:
                self.state = "names a segment that is gone"
        elif self.pool:  # the listener holds its pools open
            self.live = _fifo_has_reader(self.path)
            owner = {True: "listener alive", False: "no listener", None: "?"}[self.live]
            self.state = f"{self.pool}, {owner}"
        elif self.file_type == "fifo":
            self.live = _fifo_has_reader(self.path)
            self.state = {True: "reader", False: "no reader", None: "?"}[self.live]
        elif self.file_type == "socket":
            declared = self.declared.socket_type if self.declared is not None else None
            self.live, listening = _socket_state(self.path, declared, bound)
            if self.live is None:
                self.state = "?"
            elif self.live:
                self.state = "listening" if listening else "bound"
            else:
                self.state = "dead"
            if self.client_pid is not None:
                alive = _pid_alive(self.client_pid)
                self.state += f" (client of pid {self.client_pid}{'' if alive else ', gone'})"

    def removable(self, now: float) -> str | None:
        """Why this entry is provably dead, or None to keep it."""
        if now - self.st.st_mtime < CLEAN_GRACE or self.live is not False:
            return None
        if self.client_pid is not None:
            if _pid_alive(self.client_pid):
                return None
            return f"client {self.kind} socket of dead pid {self.client_pid}"  # c-PID-*
        if self.lock is not None and self.scheme is not None:
            module = importlib.import_module(f"buzon.transport.{self.scheme.module}")
            if self.lock.exists and getattr(module, self.lock.exists)(self.address):
                return None  # its object (a queue's messages) waits for the next listener
            return f"lock of a {self.lock.guards} that is gone"
        if self.pool:
            return "credit pool of a listener that is gone"
        if self.file_type == "fifo":
            return "FIFO with no reader"
        if self.file_type == "socket":
            return f"{self.kind} socket nobody is bound to"
        return None


def _lock_held(path: str) -> bool | None:
    """Whether a listener holds the flock on ``path`` (the kernel drops it at death)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)
    return False


def _client_pid(name: str, suffix: str) -> int | None:
    if not (name.startswith("c-") and name.endswith(suffix)):
        return None
    pid, _, rest = name[2:].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fifo_has_reader(path: str) -> bool | None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return False
        return None
    os.close(fd)
    return True


def _bound_unix_paths() -> dict[str, bool] | None:
    """Path -> listening, for every Unix socket bound to a path (``/proc/net/unix``)."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    bound: dict[str, bool] = {}
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) < 8 or not fields[7].startswith("/"):
            continue  # unbound, or abstract (@...)
        try:
            listening = bool(int(fields[3], 16) & 0x10000)  # __SO_ACCEPTCON
        except ValueError:
            continue
        path = fields[7]
        bound[path] = bound.get(path, False) or listening
    return bound


def _socket_state(
    path: str, unix_socket: str | None, bound: dict[str, bool] | None
) -> tuple[bool | None, bool]:
    """(live, listening): the kernel's table first, a connection attempt only if absent.

    Connecting only to sockets the table does not show keeps ``ls`` from being taken
    for a peer by a live raw receiver. A socket of no known scheme is tried as every type.
    """
    if bound is not None and path in bound:
        return True, bound[path]
    if unix_socket is not None:
        types: tuple[int, ...] = (_SOCKET_TYPES[unix_socket],)
    else:
        types = tuple(_SOCKET_TYPES.values())
    for kind in types:
        sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                return False, False
            if exc.errno == errno.EPROTOTYPE:
                continue
            if exc.errno == errno.ENOENT:
                return None, False
            return True, False  # EAGAIN (backlog full), EPERM (a connected dgram socket)...
        else:
            return True, kind != socket.SOCK_DGRAM
        finally:
            sock.close()
    return None, False


def scan(rdir: str) -> list[Entry]:
    """Every entry of ``rdir``, recognised and probed, sorted by name."""
    bound = _bound_unix_paths()
    entries = []
    for name in sorted(os.listdir(rdir)):
        if name in (_NAMES_DIR, _RPC_DIR):
            continue  # buzon.names' registrations, RPC servers: their own rows / clean
        try:
            entry = Entry(rdir, name)
        except FileNotFoundError:
            continue  # removed while we looked
        entry.probe(bound)
        entries.append(entry)
    return entries


def ls_rows(rdir: str) -> list[Row]:
    """``buzon ls``: (address, type, mode, state, path) of every runtime-dir entry, this
    user's POSIX queues and shared-memory segments."""
    from .names import ls_rows as names_rows
    from .transport.mq import list_queues

    rows = [(e.address, e.kind, f"{e.mode:04o}", e.state, e.path) for e in scan(rdir)]
    rows += names_rows(rdir)
    from .rpc._publish import ls_rows as rpc_rows

    rows += rpc_rows(rdir)
    prefix = f"/buzon-{os.getuid()}-"
    for q in list_queues():
        rows.append((f"mq:{q.removeprefix(prefix)}", "mq", "-", "-", q))
    return rows + _shm_rows()


def _shm_rows() -> list[Row]:
    from ._mailbox_bcast import SUFFIX as BCAST
    from .shm import SHM_DIR, list_segments, list_unnamed

    rows = []
    for seg in [*list_segments(), *list_unnamed()]:
        kind, label = seg.kind, seg.label
        if kind == "unknown" and seg.name.endswith(BCAST):  # no ring header of its own
            kind, label = "bcast", f"broadcast ring of {seg.name[: -len(BCAST)]}"

        # a live slot without a pid: a block's fd handed over in a socket (shm: channels)
        holders = [f"pid {','.join(str(p) for p in seg.pids if p)}"] if any(seg.pids) else []
        holders += ["an fd in flight"] if 0 in seg.pids else []
        owner = " + ".join(holders) if seg.alive else f"created by pid {seg.owner_pid or '?'}"
        fill = f", {seg.fill:.0%} full" if seg.kind == "ring" else ""
        state = f"{'live' if seg.alive else 'dead'} ({owner}{fill})"
        where = f"{SHM_DIR}/{seg.name}"
        if seg.name.startswith("(unnamed) "):  # held by its processes, name removed
            where = f"{seg.name} (held open; no name in {SHM_DIR})"
        rows.append((label or seg.name, f"shm-{kind}", "0600", state, where))
    return rows


@dataclass(frozen=True, slots=True)
class Removal:
    """One thing :func:`clean` removed (or, on a dry run, would remove), and why."""

    path: str
    why: str


def clean(
    rdir: str, *, dry_run: bool = False, now: float | None = None, force: bool = False
) -> list[Removal]:
    """Remove what is provably dead: shared-memory segments no live process holds (a
    mailbox only when empty, or with ``force``), the names of segments that are gone,
    and runtime-dir entries (see :meth:`Entry.removable`)."""
    from ._direct import clean_inboxes
    from ._mailbox import keeps
    from .shm import SHM_DIR, clean_segments
    from .shm._names import clean_names

    now = time.time() if now is None else now
    # the inboxes of processes that are gone first: their messages have nobody to go to
    removed = [Removal(path, why) for path, why in clean_inboxes(rdir, now, CLEAN_GRACE, dry_run)]
    segments = clean_segments(dry_run=dry_run, keep=lambda s: keeps(s, force=force))
    if not dry_run and any(s.label.startswith("mailbox ") for s in segments):
        # the out-of-line blocks of a removed mailbox's messages went with it
        segments += clean_segments(keep=lambda s: keeps(s, force=force))
    removed += [
        Removal(f"{SHM_DIR}/{seg.name}", "shared memory; no live process attached")
        for seg in segments
    ]
    removed += [
        Removal(path, "names a shared-memory segment that is gone")
        for path in clean_names(dry_run=dry_run)
    ]
    from .names import clean as clean_registrations

    removed += [
        Removal(path, "a registered name whose owner died")
        for path in clean_registrations(dry_run=dry_run, rdir=rdir)
    ]
    from .rpc._publish import clean as clean_services

    removed += [
        Removal(path, "the counters of an RPC server that died")
        for path in clean_services(rdir, dry_run=dry_run)
    ]
    for entry in scan(rdir):
        why = entry.removable(now)
        if why is None:
            continue
        if not dry_run:
            try:
                current = os.lstat(entry.path)
            except FileNotFoundError:
                continue
            if (current.st_dev, current.st_ino) != (entry.st.st_dev, entry.st.st_ino):
                continue  # replaced since we probed it: not the entry we judged
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
        removed.append(Removal(entry.path, why))
    return removed
