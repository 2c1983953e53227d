"""Names: binding an endpoint to a name on this host, with no daemon.

>>> import buzon
>>> reg = buzon.names.register("calc-doc", "unix:calc", metadata={"v": 1})
>>> buzon.names.lookup("calc-doc").address
'unix:calc'
>>> reg.remove()

A registration is a file ``names.d/NAME`` in buzon's private runtime dir (0700, so
another user's names are invisible), 0600, holding JSON: the address, the metadata,
the owner's pid and the time. Its owner holds an exclusive ``flock`` on it for as long
as the registration lives; the kernel drops that lock the instant the owner dies, so a
dead owner's entry is recognised at once (a free lock), by every reader, whatever pid
the system hands out next: :func:`lookup` and :func:`list` treat it as absent and
remove it, and ``buzon clean`` removes it too.

Race safety: the owner writes and locks the file under a temporary name, then
``link``\\ s it into place, which fails if the name exists: of two processes
registering one name at once exactly one wins, and a reader never sees a torn or
unlocked entry. A dead entry is unlinked only while its lock (proving it dead) and
the directory's lock are held and after checking the path still names that very
file, so a cleaner can never remove a newer, live registration.

The registration belongs to the process that made it: a forked child drops its copy
of the lock (the fd is also close-on-exec), so the name goes when its owner dies, not
when the last child does.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .address import Address, check_name, parse_address
from .errors import AddressError, EndpointInUse, NoSuchEndpoint, ProtocolError

__all__ = ["NameRecord", "Registration", "list", "lookup", "register", "resolve"]

_builtin_list = list
_DIR = "names.d"
_MAX_FILE = 64 * 1024  # bytes a registration file may hold (metadata included)
_MAX_ATTEMPTS = 64  # replace-the-dead rounds before giving up (each needs a death)


@dataclass(frozen=True, slots=True)
class NameRecord:
    """What :func:`lookup` finds: the name, the address it stands for, the metadata
    given at registration, the owner's pid and when it registered (epoch seconds)."""

    name: str
    address: str
    metadata: Any = None
    pid: int = 0
    created: float = 0.0
    path: str = field(default="", compare=False)


def names_dir(create: bool = True, rdir: str | None = None) -> str:
    """The directory of this user's registrations (in the private runtime dir)."""
    if rdir is None:
        from ._runtime import runtime_dir

        rdir = runtime_dir()
    path = os.path.join(rdir, _DIR)
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    return path


def _check(name: str) -> None:
    if not isinstance(name, str):
        raise AddressError(f"a name is a string, not {type(name).__name__}")
    check_name(f"name:{name}", name)


def _check_address(address: str | Address) -> str:
    """The registered address as text: a URL buzon parses, or ``mailbox:NAME``."""
    if isinstance(address, Address):
        address = str(address)
    if not isinstance(address, str):
        raise AddressError(f"an address is a string like 'unix:calc', not {type(address).__name__}")
    if address.startswith("mailbox:"):
        check_name(address, address.removeprefix("mailbox:"))
        return address
    if parse_address(address).scheme == "name":
        raise AddressError(f"{address!r}: a name stands for an address, not for another name")
    return address


class Registration:
    """A name this process registered (:func:`register`); gone with :meth:`remove`, with
    the process, or at the end of a ``with`` block. Dropping the object does not remove
    the name: it lasts as long as the process unless removed."""

    def __init__(self, record: NameRecord, fd: int) -> None:
        self.record = record
        self._fd = fd
        self._lock = threading.Lock()
        _live[id(self)] = self  # kept (and registered) until remove() or the end

    @property
    def name(self) -> str:
        """The registered name."""
        return self.record.name

    @property
    def address(self) -> str:
        """The address the name stands for."""
        return self.record.address

    @property
    def removed(self) -> bool:
        """True once :meth:`remove` ran (or a forked child dropped its copy)."""
        return self._fd < 0

    def remove(self) -> None:
        """Remove the name (idempotent); lookups then raise :class:`NoSuchEndpoint`."""
        with self._lock:
            fd, self._fd = self._fd, -1
            if fd < 0:
                return
            try:
                _unlink_if_same(self.record.path, os.fstat(fd))
            finally:
                os.close(fd)  # the lock goes with the fd
                _live.pop(id(self), None)

    def _drop_in_child(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)  # the parent's lock stays: it is the parent's name
            except OSError:
                pass

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "live"
        return f"<buzon.names.Registration {self.name!r} -> {self.address!r} ({state})>"


_live: dict[int, Registration] = {}


def _after_fork_in_child() -> None:
    for reg in _builtin_list(_live.values()):
        reg._drop_in_child()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def register(name: str, address: str | Address, metadata: Any = None) -> Registration:
    """Bind ``name`` to ``address`` on this host, owned by the calling process.

    ``metadata``: anything JSON can carry (a version, a protocol), returned by
    :func:`lookup`. The name lasts until :meth:`Registration.remove` or the owner's
    death (at once: the kernel releases the owner's lock). A name a live process holds
    raises :class:`EndpointInUse` naming its pid; a dead owner's is replaced.
    ``address`` is a URL (``unix:calc``, ``tcp://127.0.0.1:7000``) or ``mailbox:NAME``.
    """
    _check(name)
    text = _check_address(address)
    body = {
        "name": name,
        "address": text,
        "metadata": metadata,
        "pid": os.getpid(),
        "created": time.time(),
    }
    try:
        data = json.dumps(body).encode()
    except (TypeError, ValueError) as exc:
        raise AddressError(f"metadata of name {name!r} must be JSON-serialisable: {exc}") from None
    if len(data) > _MAX_FILE:
        raise AddressError(f"name {name!r}: metadata over {_MAX_FILE} bytes")
    ndir = names_dir()
    path = os.path.join(ndir, name)
    tmp = os.path.join(ndir, f".tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: never blocks
        os.write(fd, data)
        for _ in range(_MAX_ATTEMPTS):
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                pass
            holder = _probe(path)  # a live holder's record, or None once a dead one went
            if holder is not None:
                raise EndpointInUse(
                    f"name {name!r} is registered by live pid {holder.pid} "
                    f"(-> {holder.address}); remove it there first"
                )
        else:
            raise EndpointInUse(f"name {name!r}: could not register it (contended)")
    except BaseException:
        os.close(fd)
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    record = NameRecord(name, text, metadata, body["pid"], body["created"], path)
    return Registration(record, fd)


def _probe(path: str) -> NameRecord | None:
    """The live record at ``path``; None if there is none (a dead one is removed).
    A live but unreadable one raises :class:`ProtocolError`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ProtocolError(f"{path} is a symbolic link, not a registration") from None
        raise
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _parse(path, _read(fd, path))  # its owner holds the lock: live
        _remove_dead(path, st)  # nobody holds it: the owner is dead
        return None
    finally:
        os.close(fd)


def _read(fd: int, path: str) -> bytes:
    data = os.pread(fd, _MAX_FILE + 1, 0)
    if len(data) > _MAX_FILE:
        raise ProtocolError(f"registration {path} is over {_MAX_FILE} bytes: not buzon's")
    return data


def _parse(path: str, data: bytes) -> NameRecord:
    try:
        body = json.loads(data)
        name, address, pid = body["name"], body["address"], body["pid"]
        created = float(body.get("created", 0.0))
        if not (isinstance(name, str) and isinstance(address, str) and isinstance(pid, int)):
            raise TypeError("bad field types")
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError(
            f"registration {path} is scribbled on (not buzon's record: {exc}); "
            "its owner should re-register"
        ) from None
    return NameRecord(name, address, body.get("metadata"), pid, created, path)


def _unlink_if_same(path: str, st: os.stat_result) -> bool:
    """Unlink ``path`` if it is still the file ``st`` (under the directory's lock)."""
    lock = os.open(
        os.path.join(os.path.dirname(path), ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced since: a newer registration, not ours to remove
        os.unlink(path)
        return True
    finally:
        os.close(lock)


def _remove_dead(path: str, st: os.stat_result) -> bool:
    return _unlink_if_same(path, st)


def lookup(name: str) -> NameRecord:
    """The live registration of ``name``: a :class:`NameRecord` (``address``,
    ``metadata``, ``pid``). :class:`NoSuchEndpoint` if nobody alive holds it (a dead
    owner's entry is removed on the way); :class:`ProtocolError` if the file was
    scribbled on."""
    _check(name)
    record = _probe(os.path.join(names_dir(), name))
    if record is None:
        raise NoSuchEndpoint(f"no live process has registered the name {name!r}")
    return record


def list(
    prefix: str = "",
) -> _builtin_list[NameRecord]:  # the fixed public name shadows a builtin here
    """Every live registration whose name starts with ``prefix``, sorted by name (dead
    owners' entries are removed; scribbled ones are skipped: ``buzon ls`` shows them)."""
    return [r for r in _scan(prefix) if isinstance(r, NameRecord)]


def _scan(prefix: str = "") -> Iterator[NameRecord | tuple[str, str]]:
    """Live records, and (path, problem) for the entries that are not readable."""
    ndir = names_dir()
    for entry in sorted(os.listdir(ndir)):
        if entry.startswith(".") or not entry.startswith(prefix):
            continue
        path = os.path.join(ndir, entry)
        try:
            record = _probe(path)
        except (ProtocolError, OSError) as exc:
            yield (path, str(exc))
            continue
        if record is not None:
            yield record


def resolve(address: str | Address) -> Address:
    """``name:NAME`` -> the parsed address registered under NAME; other addresses as
    they are (parsed). :class:`NoSuchEndpoint` if the name is not registered."""
    addr = parse_address(address)
    if addr.scheme != "name":
        return addr
    assert addr.name is not None
    record = lookup(addr.name)
    if record.address.startswith("mailbox:"):
        raise AddressError(
            f"name {addr.name!r} stands for {record.address}: open it with buzon.mailbox"
        )
    return parse_address(record.address)


def resolve_mailbox(name: str) -> str:
    """``name:NAME`` registered as ``mailbox:BOX`` -> ``BOX``."""
    record = lookup(name.removeprefix("name:"))
    if not record.address.startswith("mailbox:"):
        raise AddressError(
            f"{name!r} stands for {record.address}, not a mailbox (register 'mailbox:NAME')"
        )
    return record.address.removeprefix("mailbox:")


def clean(dry_run: bool = False, rdir: str | None = None) -> _builtin_list[str]:
    """Remove dead owners' registrations and abandoned temporary files; the paths."""
    ndir = names_dir(create=False, rdir=rdir)
    if not os.path.isdir(ndir):
        return []
    removed = []
    for entry in sorted(os.listdir(ndir)):
        if entry == ".lock":
            continue
        path = os.path.join(ndir, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if entry.startswith(".tmp-") and time.time() - st.st_mtime < 2.0:
                continue  # a registration being written
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if dry_run or _unlink_if_same(path, st):
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def ls_rows(rdir: str | None = None) -> _builtin_list[tuple[str, str, str, str, str]]:
    """``buzon ls`` rows of the names: (name:NAME, "name", mode, state, path)."""
    ndir = names_dir(create=False, rdir=rdir)
    if not os.path.isdir(ndir):
        return []
    rows = []
    for entry in sorted(os.listdir(ndir)):
        if entry.startswith("."):
            continue
        path = os.path.join(ndir, entry)
        try:
            mode = f"{os.lstat(path).st_mode & 0o777:04o}"
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                live = False
            except BlockingIOError:
                live = True
            try:
                rec = _parse(path, _read(fd, path))
                what = f"-> {rec.address}, owner pid {rec.pid}"
            except ProtocolError:
                what = "scribbled on"
        finally:
            os.close(fd)
        state = f"{'live' if live else 'dead'} ({what})"
        rows.append((f"name:{entry}", "name", mode, state, path))
    return rows


def listen_address(url: str | Address, name: str | None) -> tuple[Address, str | None]:
    """What a listener binds and registers: ``name:NAME`` binds ``unix:NAME`` and
    registers NAME (``name=`` as well would be a contradiction unless equal)."""
    addr = parse_address(url)
    if addr.scheme != "name":
        return addr, name
    if name is not None and name != addr.name:
        raise AddressError(f"listen({str(addr)!r}, name={name!r}): two different names")
    return Address("unix", name=addr.name), addr.name


def bind(listener: Any, name: str, metadata: Any = None) -> Any:
    """Register ``name`` for ``listener``'s real address; the name goes with its close.
    A failed registration closes the listener (nothing bound stays behind)."""
    try:
        listener._registration = register(name, str(listener.address), metadata)
    except BaseException:
        listener.close()
        raise
    return listener
