"""The seams of the split modules hold: fault models and pools are sans-IO, the old import
paths still work (tests/test_layers.py checks that no C unit of buzon._core reads frame
bytes)."""

from __future__ import annotations

import ast
import importlib
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "buzon"

# modules that do I/O or keep time: a sans-IO module imports none of them
IO_MODULES = {"socket", "selectors", "threading", "time", "os", "select", "asyncio", "mmap"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_chaos_fault_models_are_sans_io() -> None:
    assert imported_modules(SRC / "testing" / "chaos" / "faults.py").isdisjoint(IO_MODULES)


def test_chaos_keeps_its_import_path() -> None:
    chaos = importlib.import_module("buzon.testing.chaos")
    faults = importlib.import_module("buzon.testing.chaos.faults")
    relay = importlib.import_module("buzon.testing.chaos.relay")
    for name in chaos.__all__:
        assert hasattr(chaos, name), name
    assert chaos.ChaosRelay is relay.ChaosRelay
    assert chaos.Faults is faults.Faults and chaos.PROFILES is faults.PROFILES


def test_chaos_decisions_depend_on_the_seed_alone() -> None:
    """The datagram shaper runs without sockets: the same seed, the same verdicts."""
    faults = importlib.import_module("buzon.testing.chaos.faults")
    profile = faults.PROFILES["hostile"]

    def verdicts(seed: int) -> list[tuple[bytes, str | None, int, list[float]]]:
        shaper = faults._Shaper(profile, random.Random(seed))
        out = []
        for i in range(500):
            v = shaper.datagram(bytes([i % 256]) * 40, i * 0.001)
            out.append((v.payload, v.drop, v.hold, v.delays))
        return out

    assert verdicts(7) == verdicts(7)
    assert verdicts(7) != verdicts(8)


def test_the_shm_block_pool_is_sans_io() -> None:
    names = imported_modules(SRC / "transport" / "shm" / "_pool.py")
    assert names.isdisjoint(IO_MODULES | {"buzon"}), names


def test_shm_keeps_its_import_path() -> None:
    shm = importlib.import_module("buzon.transport.shm")
    for name in shm.__all__:
        assert hasattr(shm, name), name
    ring = importlib.import_module("buzon.transport.shm._ring")
    assert shm.ShmTransport is ring.ShmTransport
    assert shm.check_ring_size(shm.CAPACITY) == shm.CAPACITY


def test_chaos_stream_dice_depend_on_the_seed_alone() -> None:
    """A stream direction's draws run without sockets too: same seed, same chunks."""
    faults = importlib.import_module("buzon.testing.chaos.faults")
    profile = faults.Faults(reset=0.01, corrupt=0.1, delay=0.001, jitter=0.001)

    def chunks(seed: int) -> list[tuple[bool, bytes, list[int] | None]]:
        pipe = faults._Pipe("forward", profile, random.Random(seed))
        out = []
        for i in range(300):
            dice = pipe.dice()
            data, bits = pipe.take(bytes([i % 256]) * 100, dice)
            out.append((dice.reset, data, bits))
        return out

    assert chunks(3) == chunks(3)
    assert chunks(3) != chunks(4)
