"""The exception tree: exactly the one drawn in ``buzon.errors``' docstring."""

from __future__ import annotations

import errno
import queue
import re

import pytest

import buzon
from buzon import errors
from buzon.errors import BuzonError, from_oserror

# Each class's direct bases, in order, as the docstring draws them.
TREE: dict[str, tuple[type, ...]] = {
    "BuzonError": (Exception,),
    "AddressError": (errors.BuzonError, ValueError),
    "Timeout": (errors.BuzonError, TimeoutError),
    "DeadlineExceeded": (errors.Timeout,),
    "ChannelError": (errors.BuzonError,),
    "Empty": (errors.ChannelError, queue.Empty),
    "Full": (errors.ChannelError, queue.Full),
    "EndOfChannel": (errors.ChannelError, EOFError),
    "ServerRestarted": (errors.EndOfChannel,),
    "ChannelClosed": (errors.ChannelError,),
    "Undelivered": (errors.ChannelError,),
    "MessageTooLarge": (errors.ChannelError,),
    "ConnectError": (errors.BuzonError, ConnectionError),
    "ConnectionRefused": (errors.ConnectError, ConnectionRefusedError),
    "NoSuchEndpoint": (errors.ConnectError, FileNotFoundError),
    "EndpointInUse": (errors.ConnectError, FileExistsError),
    "PermissionDenied": (errors.BuzonError, PermissionError),
    "SecurityError": (errors.BuzonError,),
    "UnsafePath": (errors.SecurityError,),
    "PeerCredentialsRejected": (errors.SecurityError,),
    "InsecureBind": (errors.SecurityError,),
    "ProtocolError": (errors.BuzonError,),
    "FrameError": (errors.ProtocolError,),
    "FrameTooLarge": (errors.FrameError,),
    "HandshakeError": (errors.ProtocolError,),
    "AuthenticationError": (errors.ProtocolError,),
    "CodecError": (errors.BuzonError,),
    "ValidationError": (errors.CodecError, ValueError),
    "PickleRejected": (errors.CodecError,),
    "RemoteError": (errors.BuzonError,),
    "UnsupportedOperation": (errors.BuzonError,),
}


def _all_error_classes() -> set[type]:
    found: set[type] = set()
    stack: list[type] = [BuzonError]
    while stack:
        cls = stack.pop()
        if cls.__module__ == "buzon.errors" and cls not in found:
            found.add(cls)
            stack.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("name", sorted(TREE))
def test_class_has_the_drawn_bases(name: str) -> None:
    cls = getattr(errors, name)
    assert cls.__bases__ == TREE[name]
    assert getattr(buzon, name) is cls, "every error is re-exported by the package"


def test_tree_lists_every_class() -> None:
    assert {c.__name__ for c in _all_error_classes()} == set(TREE)
    assert set(TREE) | {"from_oserror"} == set(errors.__all__)


def _drawn_tree() -> dict[str, str]:
    """Parse the docstring's drawing into {class: parent}, from each name's column."""
    doc = errors.__doc__
    assert doc is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (column, name) of the open ancestors
    for line in doc.splitlines():
        m = re.match(r"^[\s│├└─]*([A-Z][A-Za-z]+)\b", line)
        if m is None or m.group(1) not in TREE:
            continue
        column = m.start(1)
        while stack and stack[-1][0] >= column:
            stack.pop()
        if stack:
            parents[m.group(1)] = stack[-1][1]
        stack.append((column, m.group(1)))
    return parents


def test_docstring_drawing_matches_the_classes() -> None:
    drawn = _drawn_tree()
    assert set(drawn) | {"BuzonError"} == set(TREE)
    for name, parent in drawn.items():
        assert TREE[name][0] is getattr(errors, parent), name


def test_docstring_names_the_builtin_bases() -> None:
    doc = errors.__doc__
    assert doc is not None
    for name, bases in TREE.items():
        builtin = [b for b in bases if b.__module__ in ("builtins", "queue")]
        for b in builtin:
            if b is Exception:
                continue
            shown = f"{b.__module__}.{b.__name__}" if b.__module__ == "queue" else b.__name__
            assert re.search(rf"{name} \({re.escape(shown)}\)", doc), (name, shown)


def test_builtin_catches_keep_working() -> None:
    with pytest.raises(TimeoutError):
        raise errors.Timeout("late")
    with pytest.raises(queue.Empty):
        raise errors.Empty("nothing")
    with pytest.raises(queue.Full):
        raise errors.Full("no room")
    with pytest.raises(EOFError):
        raise errors.EndOfChannel("bye")
    with pytest.raises(ValueError):
        raise errors.AddressError("bad")
    assert issubclass(errors.Timeout, TimeoutError)
    assert issubclass(errors.Timeout, OSError)  # TimeoutError is an OSError


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (errno.ECONNREFUSED, errors.ConnectionRefused),
        (errno.ENXIO, errors.ConnectionRefused),
        (errno.ENOENT, errors.NoSuchEndpoint),
        (errno.EADDRINUSE, errors.EndpointInUse),
        (errno.EEXIST, errors.EndpointInUse),
        (errno.EACCES, errors.PermissionDenied),
        (errno.EPERM, errors.PermissionDenied),
        (errno.EMSGSIZE, errors.MessageTooLarge),
        (errno.ETIMEDOUT, errors.Timeout),
        (errno.EPIPE, errors.EndOfChannel),
        (errno.ECONNRESET, errors.EndOfChannel),
        (errno.ENOTCONN, errors.EndOfChannel),
        (errno.ELOOP, errors.UnsafePath),
        (errno.EADDRNOTAVAIL, errors.AddressError),
        (errno.ENAMETOOLONG, errors.AddressError),
    ],
)
def test_from_oserror_mapping(code: int, cls: type[BuzonError]) -> None:
    err = from_oserror(OSError(code, "strerror text"), "unix:calc")
    assert type(err) is cls
    assert err.errno == code  # type: ignore[attr-defined]
    assert str(err).startswith("unix:calc: ")


def test_from_oserror_unknown_errno_is_the_root_class() -> None:
    err = from_oserror(OSError(errno.EIO, "I/O error"))
    assert type(err) is BuzonError
    assert str(err) == "I/O error"
    assert err.errno == errno.EIO  # type: ignore[attr-defined]


def test_from_oserror_without_errno() -> None:
    err = from_oserror(OSError("odd"))
    assert type(err) is BuzonError
    assert "odd" in str(err)


def test_from_oserror_messages_explain() -> None:
    fifo = from_oserror(OSError(errno.ENXIO, "No such device or address"), "fifo:x")
    assert "no process has the FIFO open for reading" in str(fifo)
    refused = from_oserror(OSError(errno.ECONNREFUSED, "Connection refused"), "tcp://h:1")
    assert "is anybody listening there?" in str(refused)


def test_from_oserror_keeps_the_subclass_builtin_contract() -> None:
    # callers may still catch the builtin the OS error would have been
    with pytest.raises(FileNotFoundError):
        raise from_oserror(FileNotFoundError(errno.ENOENT, "gone"))
    with pytest.raises(ConnectionRefusedError):
        raise from_oserror(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
