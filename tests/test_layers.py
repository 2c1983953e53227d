"""The tree keeps its layers: drivers do not import each other, transports do not wait,
the C ring knows nothing of frames."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import buzon

ROOT = Path(buzon.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute-ish module names imported by ``path`` (relative imports resolved)."""
    package = ".".join(["buzon", *path.relative_to(ROOT).parent.parts])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _files(sub: str) -> list[Path]:
    return sorted((ROOT / sub).glob("*.py"))


@pytest.mark.parametrize("path", _files("sync"), ids=lambda p: p.name)
def test_the_blocking_driver_does_not_import_the_asyncio_one(path: Path) -> None:
    assert not any(n == "buzon.aio" or n.startswith("buzon.aio.") for n in _imports(path))


@pytest.mark.parametrize("path", _files("aio"), ids=lambda p: p.name)
def test_the_asyncio_driver_does_not_import_the_blocking_one(path: Path) -> None:
    assert not any(n == "buzon.sync" or n.startswith("buzon.sync.") for n in _imports(path))


def _sleeps(path: Path) -> bool:
    tree = ast.parse(path.read_text(), str(path))
    return any(isinstance(node, ast.Attribute) and node.attr == "sleep" for node in ast.walk(tree))


@pytest.mark.parametrize("path", _files("transport"), ids=lambda p: p.name)
def test_transports_never_wait(path: Path) -> None:
    """Reading a clock is allowed (protocol timers take ``now``); sleeping is not."""
    names = _imports(path)
    assert not names & {"selectors", "asyncio", "threading"}
    assert not any(n.startswith(("buzon.sync", "buzon.aio")) for n in names)
    assert not _sleeps(path)


def test_the_import_reader_resolves_relative_imports() -> None:
    names = _imports(ROOT / "sync" / "_open.py")
    assert "buzon._channel" in names and "buzon.transport" in names


@pytest.mark.parametrize("name", ["_engine.py", "_channel.py"])
def test_the_engine_and_the_core_never_wait(name: str) -> None:
    """Operations are written once, as steps: the engine and the core neither wait, nor
    read the clock, nor know the drivers; only sync/ and aio/ do that."""
    path = ROOT / name
    names = _imports(path)
    assert not names & {"selectors", "select", "asyncio", "threading", "time"}
    assert not any(n.startswith(("buzon.sync", "buzon.aio")) for n in names)
    assert not _sleeps(path)


def _calls(path: Path, name: str) -> list[int]:
    """Lines of ``path`` that call a function named ``name``."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (
            (isinstance(node.func, ast.Name) and node.func.id == name)
            or (isinstance(node.func, ast.Attribute) and node.func.attr == name)
        )
    ]


def test_only_the_blocking_driver_runs_the_c_wait() -> None:
    """A plain receive's wait may run in one protocol C call (``wait_frame``, which
    releases the GIL in poll(2) and reads): the blocking driver makes that call, with
    the fd, buffer and limit the core names (``ChannelCore.wait_read``); the engine,
    the core and the asyncio driver never do."""
    assert _calls(ROOT / "sync" / "_channel.py", "wait_frame")
    for name in ("_engine.py", "_channel.py", "aio/_channel.py"):
        assert not _calls(ROOT / name, "wait_frame"), name


def test_only_the_blocking_driver_runs_the_message_c_wait() -> None:
    """The message transports' and fifo's twin of that call (``protocol._dgram``: a
    ``Receiver``'s or ``FifoWaiter``'s ``wait``, which the core names with
    ``ChannelCore.wait_message``): the blocking driver asks for it and runs it; the
    engine, the core and the asyncio driver never wait in it."""
    assert _calls(ROOT / "sync" / "_channel.py", "wait_message")
    for name in ("_engine.py", "_channel.py", "aio/_channel.py"):
        assert not _calls(ROOT / name, "wait_message"), name
        assert not _calls(ROOT / name, "wait_fifo"), name


def test_the_drivers_send_through_the_engine() -> None:
    """Both drivers run the engine's send, flush and loan operations (no twin loops)."""
    for sub in ("sync", "aio"):
        names = _imports(ROOT / sub / "_channel.py")
        for op in ("send_steps", "flush_steps", "loan_steps"):
            assert f"buzon._engine.{op}" in names, (sub, op)


@pytest.mark.parametrize(
    "name", ["_channel.py", "_engine.py", "_establish.py", "sync/_channel.py", "aio/_channel.py"]
)
def test_the_core_reads_declared_capabilities_never_probes(name: str) -> None:
    """A transport declares what it can do in typed fields (transport/base.py): the
    core and the drivers never getattr/hasattr a transport."""
    path = ROOT / name
    probes = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and "transport" in ast.unparse(node.args[0])
        ):
            probes.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not probes
    assert "type: ignore[attr-defined]" not in path.read_text()


def _c_code(path: Path) -> str:
    """A C source without its comments (code and string literals are left)."""
    text = re.sub(r"/\*.*?\*/", " ", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


@pytest.mark.parametrize("path", sorted(ROOT.glob("_core*.[ch]")), ids=lambda p: p.name)
def test_the_c_ring_knows_nothing_of_frames(path: Path) -> None:
    """buzon._core moves opaque records: no unit of it (code or strings) names a frame,
    reads a frame header or keeps frame state; that is buzon.protocol._frames' job."""
    assert "frame" not in _c_code(path).lower()


def test_the_frame_speedup_is_protocol_owned() -> None:
    """The frame calls of the shm: hot path live in protocol/ and reach the ring through
    the core's C API only (_core_api.h), never its internals (_core.h)."""
    assert not (ROOT / "_core_frames.c").exists()
    source = (ROOT / "protocol" / "_frames.c").read_text()
    assert re.findall(r'#include\s+"([^"]+)"', source) == ["_core_api.h"]
    assert "frame" in _c_code(ROOT / "protocol" / "_frames.c")


@pytest.mark.parametrize("path", sorted(ROOT.glob("_core*.[ch]")), ids=lambda p: p.name)
def test_the_c_ring_builds_no_record_of_a_higher_layer(path: Path) -> None:
    """Nor does it build or parse what a mailbox puts in a record (a frame with a codec,
    a message id, a sender, a time): no unit of buzon._core names them."""
    code = _c_code(path).lower()
    assert not [w for w in ("mailbox", "codec", "message_id", "sender", "sent_at") if w in code]


def test_the_core_module_offers_rings_not_records() -> None:
    """buzon._core has no module function that builds or takes a record of a higher layer;
    the mailbox's hot path is protocol-owned (buzon.protocol._frames) and reaches the ring
    through the C API only."""
    from buzon import _core
    from buzon.protocol import _frames

    assert not [n for n in dir(_core) if "mailbox" in n.lower() or "frame" in n.lower()]
    assert "mailbox" not in (ROOT / "_core.pyi").read_text().lower()
    assert not list(ROOT.glob("_core_mailbox*"))
    assert callable(_frames.mailbox_send) and callable(_frames.mailbox_recv)
    names = _imports(ROOT / "_mailbox.py")
    assert "buzon.protocol._frames.MailboxCore" in names


def test_the_channel_core_packs_no_frame_header() -> None:
    """The core asks protocol/frames.py for its small frames (data_frame, loan_header,
    plain_data_flags): it packs and unpacks no header itself."""
    names = _imports(ROOT / "_channel.py")
    assert "struct" not in names
    assert not {"buzon.protocol.frames.HEADER", "buzon.protocol.frames._frame_total"} & names
    for path in [ROOT / "_channel.py", *_files("transport")]:
        private = {n for n in _imports(path) if n.startswith("buzon.protocol.frames._")}
        assert not private, (path.name, private)
