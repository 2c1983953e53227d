"""buzon's POSIX queues against C programs that use mq_send(3)/mq_receive(3) directly.

The helpers live in ``tests/c``; each test compiles them into its temporary directory
(skipped without gcc) and moves raw bytes, so nothing buzon-specific is on the wire.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from buzon import _posixmq
from buzon.address import Address, parse_address
from buzon.transport import mq
from buzon.transport.base import TransportOptions

C_DIR = Path(__file__).resolve().parent.parent / "c"
CFLAGS = ["-std=c11", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1"]
OPTS = TransportOptions(mq_maxmsg=8, mq_msgsize=256)


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed")
    out = tmp_path_factory.mktemp("mq-c")
    built = {}
    for name in ("mq_send", "mq_recv"):
        exe = out / name
        subprocess.run(
            [gcc, *CFLAGS, "-o", str(exe), str(C_DIR / f"{name}.c"), "-lrt"],
            check=True,
            timeout=60,
        )
        built[name] = exe
    return built


@pytest.fixture
def address() -> Iterator[Address]:
    addr = parse_address(f"mq:interop-{uuid.uuid4().hex[:16]}")
    yield addr
    try:
        _posixmq.unlink(addr.mq_name())
    except FileNotFoundError:
        pass


def _run(*args: str | Path) -> str:
    done = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=10, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_buzon_receives_what_a_c_program_sent(programs: dict[str, Path], address: Address) -> None:
    lst = mq.listen(address, OPTS)
    reader = lst.accept()
    assert isinstance(reader, mq.MQTransport)
    try:
        _run(programs["mq_send"], reader.name, "1", "first", "second")
        _run(programs["mq_send"], reader.name, "7", "urgent message")
        got = []
        while (msg := reader.recv_message()) is not None:
            got.append((msg, reader.last_priority))
        assert got == [(b"urgent message", 7), (b"first", 1), (b"second", 1)]
    finally:
        reader.close()
        lst.close()


def test_a_c_program_receives_what_buzon_sent(programs: dict[str, Path], address: Address) -> None:
    lst = mq.listen(address, OPTS)
    writer = mq.connect(address, OPTS).step()
    try:
        binary = bytes(range(256))[:200]
        assert writer.send_message([b"\x00\x01", memoryview(binary)], priority=3)
        assert writer.send_message([b"hello"])
        assert writer.send_message([], priority=9)  # an empty message is a message
        out = _run(programs["mq_recv"], writer.name, "3")
        assert out.splitlines() == [
            "9:",
            "3:" + (b"\x00\x01" + binary).hex(),
            "0:" + b"hello".hex(),
        ]
    finally:
        writer.close()
        lst.close()
    assert not mq.queue_exists(address)
