"""RPC servers publish what they do, for ``buzon ls`` (and ``buzon clean``).

Theory of operation
-------------------
Each :class:`buzon.rpc.Server` owns one file in the runtime dir,
``rpc.d/PID-INSTANCE.rpc`` (0600, the directory 0700), made when it binds and removed
when it stops serving. The file is the server's counters followed by a description:

==========  ======  ====================================================
offset      size    field
==========  ======  ====================================================
0           4       magic ``BZRP``
4           4       u32 layout version (1)
8           4       u32 length L of the description
12          4       zero
16          8       i64 calls served (replies sent)
24          8       i64 errors (error replies and refused messages)
32          8       i64 calls started (and notifications)
40          8       i64 calls ended; in flight = started - ended
48          16      zero
64          L       JSON: service, name, address, wire, semantics, pid, instance, started
==========  ======  ====================================================

The counters are the file's pages mapped into the server (``mmap``, shared): the
server adds to them as it would to an attribute, with no system call per call, and a
reader (``buzon ls``) reads the same page. Every counter only grows (calls in flight
are the difference of two of them), and each is added to without a lock, like the
plain attributes they replace: in CPython an ``+=`` on a memoryview item is not
interrupted by another thread of the process (no switch point inside it), and were an
increment lost, a statistic would blur, nothing more. With ``mode="process"`` the
forked children add to the same counters (the mapping is shared), so the file counts
the whole server; there two processes adding at the same instant can lose an
increment (the counts are then approximate, by one).

Liveness is the kernel's, as for :mod:`buzon.names`: the server holds an exclusive
``flock`` on its file for as long as its process lives; a reader that can take a
shared lock knows the owner is dead (even if its pid was reused), ``buzon ls`` shows
it dead and ``buzon clean`` removes it. Processes forked from the server (its
``mode="process"`` children included) close their copy of the descriptor, so a child
that outlives the server does not keep it looking alive.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["Counter", "Publication", "Published", "clean", "ls_rows", "publish_server", "read_all"]

DIR = "rpc.d"
"""The directory, in the runtime dir, of the servers' files."""

_MAGIC = b"BZRP"
_VERSION = 1
_HEAD = struct.Struct("<4sII4x")
_COUNTS = 16  # offset of the counters
_META = 64  # offset of the description
CALLS, ERRORS, STARTED, ENDED = 0, 1, 2, 3
_NCOUNTERS = 4
_MAX_META = 1 << 16  # a description longer than this is not a server's file


class Publication:
    """One server's counters, published in its file once :meth:`publish` ran.

    ``counters`` is a memoryview of i64: private memory before :meth:`publish`, the
    file's mapped page after it (still mapped after :meth:`close` removed the file).
    """

    __slots__ = ("__weakref__", "_fd", "_map", "counters", "path")

    def __init__(self) -> None:
        self.counters: memoryview = memoryview(bytearray(8 * _NCOUNTERS)).cast("q")
        self._fd = -1
        self._map: mmap.mmap | None = None
        self.path: str | None = None

    @property
    def in_flight(self) -> int:
        """Calls started and not yet ended (by every process adding to the counters)."""
        counters = self.counters
        return max(0, counters[STARTED] - counters[ENDED])

    def publish(self, meta: dict[str, Any], rdir: str | None = None) -> None:
        """Make the file, mapped and locked; the counters so far are carried over."""
        if rdir is None:
            from .._runtime import runtime_dir

            rdir = runtime_dir()
        directory = os.path.join(rdir, DIR)
        body = json.dumps(meta, sort_keys=True).encode()
        size = max(mmap.PAGESIZE, _META + len(body))
        final = os.path.join(directory, f"{os.getpid()}-{meta['instance']}.rpc")
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{meta['instance']}")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        for attempt in range(8):  # the last server to stop removes the directory
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)
            try:
                fd = os.open(tmp, flags, 0o600)
                break
            except FileNotFoundError:
                if attempt == 7:
                    raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, size)
            head = bytearray(_META)
            _HEAD.pack_into(head, 0, _MAGIC, _VERSION, len(body))
            os.pwrite(fd, bytes(head) + body, 0)
            # mapped through another open file description: Python's mmap keeps a dup
            # of the fd it maps, and a dup of the locked one would hold the lock too
            # (in forked children as well)
            other = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                mapped = mmap.mmap(other, _META, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(other)
            counters = memoryview(mapped)[_COUNTS : _COUNTS + 8 * _NCOUNTERS].cast("q")
            for i in range(_NCOUNTERS):
                counters[i] = self.counters[i]
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd, self._map, self.counters, self.path = fd, mapped, counters, final
        _live.add(self)

    def close(self) -> None:
        """Remove the file (this process's own only) and unmap it; idempotent. The
        counters go on in private memory (a call still finishing may add to them)."""
        _live.discard(self)
        path, self.path = self.path, None
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if path is not None:
            with contextlib.suppress(OSError):
                st, current = os.fstat(fd), os.lstat(path)
                if (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino):
                    os.unlink(path)
            with contextlib.suppress(OSError):  # not empty: another server's files
                os.rmdir(os.path.dirname(path))
        os.close(fd)
        mapped, self._map = self._map, None
        if mapped is not None:
            # Python's mmap holds a descriptor of the file until it is closed. Callers
            # read self.counters afresh for each += (server code never keeps the view
            # across a switch point), so the old view is nobody's once replaced.
            old = self.counters
            private = memoryview(bytearray(8 * _NCOUNTERS)).cast("q")
            for i in range(_NCOUNTERS):
                private[i] = old[i]
            self.counters = private
            old.release()
            with contextlib.suppress(BufferError):  # a view still exported: GC closes it
                mapped.close()

    def _drop_in_child(self) -> None:
        """In a forked child: keep adding to the shared counters, but hold no lock
        (the file is the parent's) and remove nothing."""
        fd, self._fd = self._fd, -1
        self.path = None
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)  # the parent's lock stays: it is the parent's file


class Counter:
    """A data descriptor: ``server.calls += 1`` adds to the published counter."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return obj._pub.counters[self.index]

    def __set__(self, obj: Any, value: int) -> None:
        obj._pub.counters[self.index] = value


def publish_server(server: Any) -> None:
    """Publish a bound :class:`buzon.rpc.Server`: its file goes when the server stops
    serving (its ``serve_forever`` ends) or, never served, when the object goes."""
    pub: Publication = server._pub
    pub.publish(
        {
            "service": server.service.name,
            "name": server.name,
            "address": str(server.address),
            "wire": server.wire,
            "semantics": server.semantics,
            "pid": os.getpid(),
            "instance": server.instance,
            "started": round(time.time(), 3),
        }
    )
    weakref.finalize(server, pub.close)


_live: weakref.WeakSet[Publication] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pub in list(_live):
        pub._drop_in_child()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------ readers: buzon ls


@dataclass(frozen=True, slots=True)
class Published:
    """What a server's file says, and whether its server lives."""

    path: str
    live: bool
    meta: dict[str, Any]
    calls: int
    errors: int
    in_flight: int


def _read(path: str) -> Published | None:
    """The file at ``path``; None if it went meanwhile or is not a server's file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            live = False
        except BlockingIOError:
            live = True
        head = os.pread(fd, _META, 0)
        if len(head) < _META:
            return None
        magic, version, length = _HEAD.unpack_from(head)
        if magic != _MAGIC or version != _VERSION or length > _MAX_META:
            return None
        try:
            meta = json.loads(os.pread(fd, length, _META))
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        calls, errors, started, ended = struct.unpack_from("<qqqq", head, _COUNTS)
        return Published(path, live, meta, calls, errors, max(0, started - ended))
    finally:
        os.close(fd)


def read_all(rdir: str) -> list[Published]:
    """Every server file in ``rdir``, by name."""
    directory = os.path.join(rdir, DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".rpc"):
            got = _read(os.path.join(directory, name))
            if got is not None:
                out.append(got)
    return out


def describe(p: Published) -> str:
    """The STATE column of ``buzon ls`` for one server."""
    m = p.meta
    where = m.get("address", "?")
    name = f"name {m['name']}, " if m.get("name") else ""
    state = "live" if p.live else "dead"
    return (
        f"{state} (pid {m.get('pid', '?')}, service {m.get('service', '?')}, {name}at {where}, "
        f"wire {m.get('wire', '?')}, {m.get('semantics', '?')}; {p.calls} calls served, "
        f"{p.in_flight} in flight, {p.errors} errors)"
    )


def ls_rows(rdir: str) -> list[tuple[str, str, str, str, str]]:
    """``buzon ls`` rows of the RPC servers: (address, "rpc", mode, state, path)."""
    rows = []
    for p in read_all(rdir):
        m = p.meta
        label = f"name:{m['name']}" if m.get("name") else str(m.get("address", "?"))
        try:
            mode = f"{os.lstat(p.path).st_mode & 0o777:04o}"
        except OSError:
            continue
        rows.append((label, "rpc", mode, describe(p), p.path))
    return rows


def clean(rdir: str, dry_run: bool = False) -> list[str]:
    """Remove the files of servers that died (and temporary files left by a crash
    while publishing); the paths removed."""
    directory = os.path.join(rdir, DIR)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    removed = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if name.startswith(".tmp-") and time.time() - st.st_mtime < 2.0:
                continue  # being written
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its server lives
            if dry_run:
                removed.append(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                current = os.lstat(path)
                if (current.st_dev, current.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(path)
                    removed.append(path)
        finally:
            os.close(fd)
    if removed and not dry_run:
        with contextlib.suppress(OSError):  # not empty: live servers' files
            os.rmdir(directory)
    return removed
