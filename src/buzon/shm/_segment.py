"""Named shared-memory segments: create, attach, list, remove, clean.

Theory of operation
-------------------
Every buzon segment is a POSIX shared-memory object named ``buzon-UID-HEX`` (HEX: 128
random bits, so nobody can guess or pre-create it), created ``O_CREAT|O_EXCL`` with
mode 0600 and visible as ``/dev/shm/buzon-UID-HEX``.

Ownership is proved by the kernel, not by pids or heartbeats: every process using a
segment holds an OFD lock (``F_OFD_SETLK``) on one byte of it (its *participant
slot*, see :mod:`buzon._core`). The kernel drops the lock when the process dies,
however it dies. A segment is *in use* while any such lock is held.

:func:`clean` removes a segment only after taking the locks of *all* slots itself,
which succeeds only if nobody holds one and stops anybody from attaching until the
segment is unlinked; a segment younger than ``grace`` seconds is left alone (its
creator may be between ``shm_open`` and taking its lock). Nothing here uses
:mod:`multiprocessing.resource_tracker`: a segment lives exactly as long as its
owner says or until :func:`clean` proves it dead.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from ..errors import BuzonError, NoSuchEndpoint, ProtocolError, from_oserror

__all__ = [
    "SHM_DIR",
    "SegmentInfo",
    "clean_segments",
    "create_ring",
    "attach_ring",
    "list_segments",
    "list_unnamed",
    "new_segment_name",
    "remove_segment",
    "segment_exists",
]

SHM_DIR = "/dev/shm"


def _prefix() -> str:
    return f"buzon-{os.getuid()}-"


def new_segment_name() -> str:
    """A fresh, unguessable segment name (without the leading slash)."""
    return _prefix() + secrets.token_hex(16)


def _shm(name: str) -> str:
    return name if name.startswith("/") else "/" + name


def _check_name(name: str) -> str:
    bare = name.removeprefix("/")
    if not bare.startswith(_prefix()) or "/" in bare or not bare:
        raise ProtocolError(f"{name!r} is not a buzon segment of this user")
    return bare


def create_ring(
    capacity: int, *, label: str = "", slots: int = 64, records: int = 0, record_size: int = 0
) -> _core.Ring:
    """Create a ring segment with a fresh name; the caller removes it when done."""
    for _ in range(3):
        name = new_segment_name()
        try:
            return _core.Ring.create("/" + name, capacity, slots, label, records, record_size)
        except FileExistsError:  # pragma: no cover - 128 random bits
            continue
        except OSError as exc:
            raise from_oserror(exc, f"creating segment {name}") from exc
    raise BuzonError("could not find a free segment name")  # pragma: no cover


def attach_ring(name: str) -> _core.Ring:
    """Attach an existing ring (validated: owner, mode, every header field)."""
    _check_name(name)
    try:
        return _core.Ring.attach(_shm(name))
    except FileNotFoundError as exc:
        raise NoSuchEndpoint(f"segment {name} does not exist") from exc
    except OSError as exc:
        raise from_oserror(exc, f"attaching segment {name}") from exc


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, _check_name(name)))


def remove_segment(name: str) -> bool:
    """Unlink a segment (attached processes keep their mapping); False if absent."""
    try:
        _core.unlink(_shm(_check_name(name)))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise from_oserror(exc, f"removing segment {name}") from exc
    return True


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """One segment of this user, as :func:`list_segments` saw it."""

    name: str
    size: int
    kind: str  # "ring", "block", or "unknown" for a segment whose header does not validate
    alive: bool  # some process holds a participant lock
    label: str = ""
    owner_pid: int | None = None
    capacity: int = 0
    used: int = 0
    pids: tuple[int, ...] = ()
    age: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def fill(self) -> float:
        """Fraction of the ring in use (0 for non-rings)."""
        return self.used / self.capacity if self.capacity else 0.0


def _in_use(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return _core.in_use(fd)
    finally:
        os.close(fd)


def list_segments() -> list[SegmentInfo]:
    """This user's buzon segments, sorted by name, with owner, liveness and fill."""
    out = []
    try:
        names = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(_prefix()))
    except FileNotFoundError:  # pragma: no cover - Linux always has /dev/shm
        return []
    now = time.time()
    for name in names:
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        age = max(0.0, now - st.st_mtime)
        try:
            info = _core.inspect("/" + name)
        except (ProtocolError, PermissionError, OSError):
            alive = _in_use(path)
            out.append(SegmentInfo(name, st.st_size, "unknown", alive, age=age))
            continue
        out.append(_info(name, st.st_size, info, age))
    return out


def _info(name: str, size: int, info: dict[str, Any], age: float = 0.0) -> SegmentInfo:
    parts = info["participants"]
    return SegmentInfo(
        name,
        size,
        info["kind"],
        any(live for _s, _p, live in parts),
        label=info["label"],
        owner_pid=info["creator_pid"],
        capacity=info["limit"],
        used=info["used"],
        pids=tuple(sorted({pid for _slot, pid, live in parts if live})),
        age=age,
        details=info,
    )


def list_unnamed() -> list[SegmentInfo]:
    """This user's segments whose names are gone but which processes still hold: the
    rings of ``shm:`` channels (unlinked once both ends attached), found through
    ``/proc/PID/fd``, once each. ``name`` is ``"(unnamed) buzon-UID-HEX"``; nothing here
    is ever a candidate for ``buzon clean`` (a process holds each one)."""
    target = re.compile(rf"^{re.escape(SHM_DIR)}/({re.escape(_prefix())}[0-9a-f]+) \(deleted\)$")
    uid = os.getuid()
    seen: set[tuple[int, int]] = set()
    out = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        fd_dir = f"/proc/{pid}/fd"
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to look at
            continue
        for fd in fds:
            path = f"{fd_dir}/{fd}"
            try:
                m = target.match(os.readlink(path))
                if m is None:
                    continue
                st = os.stat(path)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                info = _core.inspect(path)
            except (BuzonError, OSError):  # closed meanwhile, or not a ring of ours
                continue
            out.append(_info(f"(unnamed) {m[1]}", st.st_size, info))
    return sorted(out, key=lambda seg: (seg.label, seg.name))


def clean_segments(
    *,
    dry_run: bool = False,
    grace: float = 2.0,
    keep: Callable[[SegmentInfo], str | None] | None = None,
) -> list[SegmentInfo]:
    """Remove this user's segments that no live process uses; return what was removed.

    A segment is removed only while we hold the locks of all its participant slots
    (so nobody is attached and nobody can attach meanwhile), and only if it is older
    than ``grace`` seconds and ``keep`` (if given) gives no reason to keep it (a
    mailbox with messages in it: :func:`buzon._mailbox.keeps`).
    """
    removed = []
    for seg in list_segments():
        if seg.alive or seg.age < grace or (keep is not None and keep(seg)):
            continue
        path = os.path.join(SHM_DIR, seg.name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                continue
            if not _core.claim_all(fd):
                continue  # somebody attached since we looked
            if not dry_run:
                try:
                    cur = os.lstat(path)
                except FileNotFoundError:
                    continue
                if (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                    continue  # replaced: not the segment we judged
                try:
                    _core.unlink("/" + seg.name)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise from_oserror(exc, f"removing segment {seg.name}") from exc
                    continue
            removed.append(seg)
        finally:
            os.close(fd)
    return removed
