"""The private runtime directory and the safety checks on endpoint paths.

Local endpoints named without a path live in one directory only the user can enter:

1. ``$BUZON_RUNTIME_DIR`` if set (tests and unusual deployments),
2. else ``$XDG_RUNTIME_DIR/buzon`` when ``XDG_RUNTIME_DIR`` is ours and private,
3. else ``/tmp/buzon-UID``.

Whichever it is, buzon creates it mode 0700 and then *verifies* it: a real directory
(not a symlink), owned by this user, with no access for group or others. A directory
someone else planted there makes buzon refuse with :class:`UnsafePath` rather than
put a socket where another user can reach it.
"""

from __future__ import annotations

import os
import stat

from .errors import UnsafePath, from_oserror

__all__ = ["check_endpoint_path", "runtime_dir"]

_cached: tuple[str, str] | None = None  # (configured source, verified path)


def _candidate() -> str:
    env = os.environ.get("BUZON_RUNTIME_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        if st is not None and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return os.path.join(xdg, "buzon")
    return f"/tmp/buzon-{os.getuid()}"


def runtime_dir() -> str:
    """Return the verified private runtime directory, creating it (0700) if needed."""
    global _cached
    path = _candidate()
    if _cached is not None and _cached[0] == path:
        return _cached[1]
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePath(f"cannot create the runtime dir {path!r}: {exc.strerror}") from exc
    _verify_private_dir(path)
    _cached = (path, path)
    return path


def _verify_private_dir(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"runtime dir {path!r} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"runtime dir {path!r} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafePath(f"runtime dir {path!r} is owned by uid {st.st_uid}, not by you")
    if st.st_mode & 0o077:
        raise UnsafePath(
            f"runtime dir {path!r} has mode {stat.S_IMODE(st.st_mode):o}; it must be 0700"
        )


def check_endpoint_path(
    path: str, *, must_exist: bool, allow_uids: frozenset[int] = frozenset()
) -> None:
    """Refuse symlinks and paths owned by another user; check the parent is not hostile.

    ``must_exist=False`` allows the path to be absent (we are about to create it).
    ``allow_uids`` are other owners accepted too (a connector that was told to trust
    a server running as another user).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if must_exist:
            return  # the caller reports NoSuchEndpoint when it opens the path
        st = None
    except OSError as exc:  # e.g. a path component that is not a directory
        raise from_oserror(exc, repr(path)) from exc
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{path!r} is a symlink; buzon does not follow links to endpoints")
        if st.st_uid != os.getuid() and st.st_uid not in allow_uids:
            raise UnsafePath(f"{path!r} is owned by uid {st.st_uid}, not by you")
    parent = os.path.dirname(path) or "/"
    try:
        pst = os.stat(parent)
    except OSError as exc:  # a missing directory: NoSuchEndpoint, not a bare OSError
        raise from_oserror(exc, f"directory {parent!r}") from exc
    # A parent writable by others is only acceptable with the sticky bit (like /tmp).
    if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
        raise UnsafePath(f"{parent!r} is world-writable without the sticky bit")
