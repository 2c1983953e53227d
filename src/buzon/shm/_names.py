"""Named shared objects: ``NAME.SUFFIX`` in the private runtime dir names a segment.

A segment's own name is unguessable (``buzon-UID-HEX``); a buzon name like ``jobs``
finds it through a 0600 file in the runtime dir holding that segment name, published
atomically with ``link(2)`` so two creators cannot both win.
"""

from __future__ import annotations

import os
import secrets

from .._runtime import check_endpoint_path, runtime_dir
from ..address import _check_name

__all__ = ["name_path", "lookup", "publish", "unpublish"]


def name_path(name: str, suffix: str) -> str:
    _check_name(f"{suffix.lstrip('.')}:{name}", name)
    return os.path.join(runtime_dir(), name + suffix)


def lookup(path: str) -> str | None:
    """The segment name stored at ``path``, or None if there is none."""
    check_endpoint_path(path, must_exist=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, 256).decode("ascii", "replace").strip() or None
    finally:
        os.close(fd)


def publish(path: str, segment: str) -> bool:
    """Make ``path`` name ``segment`` atomically; False if it already names something."""
    check_endpoint_path(path, must_exist=False)
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, segment.encode("ascii") + b"\n")
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def unpublish(path: str, segment: str) -> None:
    """Remove ``path`` if it still names ``segment``."""
    if lookup(path) == segment:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


SUFFIXES = (".bbuf", ".array", ".value", ".mbox")


def clean_names(*, dry_run: bool = False, grace: float = 2.0) -> list[str]:
    """Remove name files of the runtime dir whose segment is gone; return their paths.

    Only provably dead names go: the segment they name no longer exists in /dev/shm (a
    name without a segment can never be attached again), and the file is older than
    ``grace`` seconds (its creator may be between writing it and publishing it).
    """
    import time

    rdir = runtime_dir()
    removed = []
    now = time.time()
    for entry in sorted(os.listdir(rdir)):
        if not entry.endswith(SUFFIXES):
            continue
        path = os.path.join(rdir, entry)
        try:
            st = os.lstat(path)
            segment = lookup(path)
        except OSError:
            continue
        if now - st.st_mtime < grace or segment is None:
            continue
        bare = segment.lstrip("/")
        if "/" in bare or os.path.exists(os.path.join("/dev/shm", bare)):
            continue
        if not dry_run:
            unpublish(path, segment)
        removed.append(path)
    return removed
