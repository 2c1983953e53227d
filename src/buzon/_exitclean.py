"""Endpoint files this process made are removed when the interpreter exits.

A socket file or FIFO outlives the process that created it unless someone unlinks it;
``close()`` does, and so, for a program that exits without closing (a script that
ends, an uncaught exception), does this module at interpreter exit, as
``multiprocessing``'s ``Listener`` does for its socket. The rules:

* Only files this process created are registered (:func:`own` right after ``bind`` or
  ``mkfifo``), and :func:`disown` takes a file off the list when ``close`` removes it
  (or gives it to another process).
* At exit a file is removed only if the path still leads to the same inode (another
  process may have replaced it since) and only by the process that created it: a
  forked child that exits normally leaves its parent's endpoints alone.
* Nothing is done on ``os._exit``, a fatal signal or ``SIGKILL``: ``buzon clean``
  removes what such a process leaves (see ``buzon.cli``).
"""

from __future__ import annotations

import atexit
import os
import threading

__all__ = ["disown", "own"]

# path -> (pid of the creator, st_dev, st_ino)
_owned: dict[str, tuple[int, int, int]] = {}
_lock = threading.Lock()
_registered = False


def own(path: str, st: os.stat_result | None = None) -> None:
    """Remove ``path`` at interpreter exit unless :func:`disown` is called first.

    ``st`` is the file's ``lstat`` (taken now if not given); the file is removed only
    while the path still names that inode.
    """
    global _registered
    if st is None:
        try:
            st = os.lstat(path)
        except OSError:
            return
    with _lock:
        _owned[path] = (os.getpid(), st.st_dev, st.st_ino)
        if not _registered:
            atexit.register(_remove_owned)
            _registered = True


def disown(path: str) -> None:
    """Forget ``path`` (it was removed, or another process is responsible for it now)."""
    with _lock:
        _owned.pop(path, None)


def _remove_owned() -> None:
    pid = os.getpid()
    with _lock:
        items = list(_owned.items())
        _owned.clear()
    for path, (creator, dev, ino) in items:
        if creator != pid:
            continue  # a forked child: the endpoint is its parent's
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass  # already gone, or not ours to remove any more
