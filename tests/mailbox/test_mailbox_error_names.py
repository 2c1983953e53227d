"""A mailbox's errors name the mailbox the user opened, never its shared-memory segment
(``/buzon-UID-<hex>``, an implementation detail): full, timed out, removed, for every
policy's receiving ring, the inbox and a bounded buffer."""

from __future__ import annotations

import os
import uuid

import pytest

import buzon
from buzon.errors import EndOfChannel, Full, Timeout


def _name() -> str:
    return f"errname-{uuid.uuid4().hex[:8]}"


def _no_segment(message: str) -> None:
    assert f"/buzon-{os.getuid()}-" not in message, message


@pytest.mark.parametrize("policy", ["any", "exclusive", "round_robin", "broadcast"])
def test_a_timed_out_receive_names_the_mailbox(policy: str) -> None:
    name = _name()
    box = buzon.mailbox(name, capacity=4, policy=policy)
    try:
        with pytest.raises(Timeout) as err:
            box.recv(timeout=0.01)
        assert f"mailbox {name!r}" in str(err.value)
        _no_segment(str(err.value))
    finally:
        box.remove()


def test_a_full_mailbox_and_a_removed_one_are_named() -> None:
    name = _name()
    box = buzon.mailbox(name, capacity=1)
    other = buzon.mailbox(name)
    try:
        box.send(b"x")
        with pytest.raises(Full) as full:
            box.send_nowait(b"y")
        with pytest.raises(Timeout) as timed:
            box.send(b"y", timeout=0.01)
        for err in (full, timed):
            assert f"mailbox {name!r}" in str(err.value)
            _no_segment(str(err.value))
        assert other.recv(timeout=1) == b"x"
    finally:
        box.remove()
    with pytest.raises(EndOfChannel) as gone:
        other.recv(timeout=1)
    assert str(gone.value) == f"mailbox {name!r} was removed and is empty"
    other.close()


def test_the_inbox_and_a_bounded_buffer_say_what_they_are() -> None:
    me = buzon.inbox()
    try:
        with pytest.raises(Timeout) as err:
            buzon.recv_from(os.getpid(), timeout=0.01)
        assert f"the inbox of process {os.getpid()}" in str(err.value)
        _no_segment(str(err.value))
    finally:
        me.remove()
    name = _name()
    bb = buzon.BoundedBuffer(name, 2, 8)
    try:
        with pytest.raises(Timeout) as err:
            bb.get(timeout=0.01)
        assert f"bounded buffer {name!r}" in str(err.value)
    finally:
        bb.remove()
