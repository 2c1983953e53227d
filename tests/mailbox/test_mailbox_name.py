"""``buzon.mailbox("name:NAME")`` opens the mailbox registered under NAME, or, if
nobody holds NAME, opens or creates the mailbox NAME and registers it under NAME
(owned by this process: gone with ``remove()`` or the process's death)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import buzon
from buzon import names
from buzon.errors import EndpointInUse, NoSuchEndpoint

T = 10.0


def test_a_mailbox_opened_by_a_free_name_registers_itself() -> None:
    box = buzon.mailbox("name:jobs", capacity=4)
    try:
        record = names.lookup("jobs")
        assert record.address == "mailbox:jobs"
        assert record.metadata == {"policy": "any"}
        other = buzon.mailbox("name:jobs")  # registered now: opens the same mailbox
        try:
            assert other._registration is None
            box.send("job")
            assert other.recv(T) == "job"
        finally:
            other.close()
        plain = buzon.mailbox("jobs")  # the mailbox's own name reaches it too
        plain.close()
        box.close()  # close keeps the name (the mailbox stays, as do its messages)
        assert names.lookup("jobs").address == "mailbox:jobs"
    finally:
        buzon.mailbox("name:jobs").remove()
        box.remove()
    with pytest.raises(NoSuchEndpoint):  # remove() took the name with it
        names.lookup("jobs")


def test_create_false_and_true_with_a_name() -> None:
    with pytest.raises(NoSuchEndpoint):
        buzon.mailbox("name:nobody", create=False)
    box = buzon.mailbox("name:once", create=True)
    try:
        with pytest.raises(EndpointInUse):
            buzon.mailbox("name:once", create=True)
    finally:
        box.remove()


def test_the_name_goes_with_the_registering_process() -> None:
    code = (
        "import buzon, sys\n"
        "box = buzon.mailbox('name:short', capacity=4)\n"
        "box.send('left behind')\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert names.lookup("short").pid == proc.pid
        other = buzon.mailbox("name:short")
        assert other.recv(T) == "left behind"
        other.close()
    finally:
        proc.stdin.close()
        proc.wait(T)
        proc.stdout.close()
    with pytest.raises(NoSuchEndpoint):
        names.lookup("short")
    buzon.mailbox("short").remove()  # the mailbox itself outlives its registrar


def test_an_asyncio_mailbox_registers_itself_too() -> None:
    import asyncio

    async def main() -> None:
        box = buzon.aio.mailbox("name:ajobs2", capacity=4)
        try:
            assert names.lookup("ajobs2").address == "mailbox:ajobs2"
            await box.send("x")
            assert await box.recv(timeout=T) == "x"
        finally:
            box.remove()

    asyncio.run(main())
    with pytest.raises(NoSuchEndpoint):
        names.lookup("ajobs2")
