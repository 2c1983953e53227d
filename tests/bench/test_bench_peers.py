"""The peers' rows, the bulk cases and the shared-memory targets (no timing thresholds)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_bench_smoke import _process_state  # tests/bench is on sys.path (prepend mode)

from buzon.bench import _bulk, all_cases, main
from buzon.bench._harness import Case, Quantity, Result
from buzon.bench._report import SHM_TARGETS, evaluate_targets, render


def _state() -> dict[str, Any]:
    """The process state, minus multiprocessing's heap arenas (``/dev/shm/pym-*``):
    faster-fifo allocates its queues from that heap, which keeps small arenas, and their
    descriptors, for reuse until the process exits. (The listing's own descriptor, gone
    by the time it is read, is left out too: its number moves with the arenas.)"""
    state = _process_state()
    links = {fd: _link(fd) for fd in state["fds"]}
    state["fds"] = [fd for fd, to in links.items() if to and not to.startswith("/dev/shm/pym-")]
    return state


def _link(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _iox_files() -> set[str]:
    """iceoryx2's per-node and per-service files (its global management file stays)."""
    found = set(glob.glob("/dev/shm/iox2_*")) | set(glob.glob("/tmp/iceoryx2/*/*"))
    return {f for f in found if not f.endswith(".global_mgmt")}


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    runtime = tmp_path / "runtime"
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("BUZON_RUNTIME_DIR", str(runtime))
    return scratch, runtime


def _run(tmp_path: Path, only: str, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    args = ["--quick", "--seconds", "0.03", "--no-progress", "--json", str(out), "--only", only]
    rc = main([*args, *extra])
    return rc, json.loads(out.read_text())


def _assert_clean(before: dict[str, Any], dirs: tuple[Path, Path], iox: set[str]) -> None:
    assert _state() == before
    scratch, runtime = dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    assert _iox_files() == iox


PEER_ROWS = {
    "zmq": ["zmq/pair-ipc/rt64", "zmq/pair-ipc/oneway64", "zmq/pair-ipc/oneway1m"],
    "faster_fifo": [
        "faster-fifo/queue/rt64",
        "faster-fifo/queue/oneway64",
        "faster-fifo/queue/oneway1m",
        "faster-fifo-batch/queue/oneway64",
    ],
    "iceoryx2": ["iceoryx2/pubsub/rt64", "iceoryx2/pubsub/oneway64", "iceoryx2/pubsub/oneway1m"],
    "multiprocessing": ["mp/Queue/rt64", "mp/Queue/oneway64", "mp/Queue/oneway1m"],
}


@pytest.mark.parametrize("module", sorted(PEER_ROWS))
def test_peer_rows_run_and_leave_nothing_behind(
    module: str, tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    if not _installed(module):
        pytest.skip(f"{module} is not installed (pip install -e '.[bench]')")
    ids = PEER_ROWS[module]
    assert set(ids) <= {c.id for c in all_cases()}
    before, iox = _state(), _iox_files()
    rc, doc = _run(tmp_path, ",".join(ids))
    _assert_clean(before, private_dirs, iox)
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == set(ids)
    for case_id in ids:
        r = by_id[case_id]
        assert r["status"] == "ok", (case_id, r["note"])
        value = r["values"]["p50" if case_id.endswith("rt64") else "rate"]
        assert value["value"] > 0
    assert rc == 0


BULK_ROWS = {
    "buzon-loan/shm/numpy64m": "numpy",
    "buzon/shm/numpy64m": "numpy",
    "iceoryx2/pubsub/numpy64m": "iceoryx2",
    "zmq/pair-ipc/numpy64m": "zmq",
    "mp/Pipe/numpy64m": "numpy",
    "faster-fifo/queue/numpy64m": "faster_fifo",
    "buzon/BoundedBuffer/4p4c": "buzon",
    "mp/Queue/4p4c": "multiprocessing",
    "faster-fifo/queue/4p4c": "faster_fifo",
    # the mailbox rows (bench/_mailbox.py) whose ids say 4p4c
    "buzon/mailbox/4p4c": "buzon",
    "buzon-receipts/mailbox/4p4c": "buzon",
    "buzon/mailbox/4p4c-dict": "buzon",
    "mp/Queue/4p4c-dict": "multiprocessing",
    "faster-fifo/queue/4p4c-dict": "faster_fifo",
}


def test_bulk_cases_run_small(
    tmp_path: Path, private_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every numpy64m row (with 1 MiB arrays) and every 4p4c row, in one quick run."""
    bulk = ("numpy64m", "4p4c", "4p4c-dict")
    assert set(BULK_ROWS) == {c.id for c in all_cases() if c.metric in bulk}
    monkeypatch.setattr(_bulk, "NUMPY_BYTES", 1 << 20)
    before, iox = _state(), _iox_files()
    rc, doc = _run(tmp_path, "numpy64m,4p4c")
    _assert_clean(before, private_dirs, iox)
    assert rc == 0
    for r in doc["results"]:
        module = BULK_ROWS[r["id"]]
        if module != "buzon" and not _installed(module):
            assert r["status"] == "skipped" and r["note"].startswith("not installed"), r
            continue
        assert r["status"] == "ok", (r["id"], r["note"])
        if r["metric"] == "numpy64m":
            assert r["values"]["message_size"]["value"] == 1 << 20
            assert r["values"]["gbps"]["unit"] == "GB/s"
            assert r["values"]["gbps"]["value"] > 0
        else:
            assert r["values"]["rate"]["value"] > 0
            assert r["values"]["processes"]["value"] == 8


def test_a_missing_peer_is_reported_not_installed(
    tmp_path: Path,
    private_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for module in ("zmq", "faster_fifo", "iceoryx2"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    only = "zmq/,faster-fifo,iceoryx2"
    rc, doc = _run(tmp_path, only)
    assert rc == 0
    expected = {c.id for c in all_cases() if any(s in c.id for s in only.split(","))}
    assert {r["id"] for r in doc["results"]} == expected
    assert len(expected) == 15
    for r in doc["results"]:
        assert r["status"] == "skipped", r
        assert r["note"].startswith("not installed: "), r
        assert "make bench" in r["note"]
    printed = capsys.readouterr().out
    assert "pyzmq PAIR (not installed)" in printed  # the table's row
    assert re.search(r"pubsub +iceoryx2 +not installed", printed)  # the numpy table
    targets = {t["transport"]: t for t in doc["targets"] if t["id"] == "i"}
    assert targets["rt64 p50 vs iceoryx2"]["status"] == "n/a"


# --- the (i) targets from given numbers ----------------------------------------


def _result(case_id: str, **values: float) -> Result:
    impl, transport, metric = case_id.split("/")
    case = Case(impl, transport, metric, lambda ctx: {})
    units = {"p50": "us", "rate": "msg/s", "bandwidth": "MB/s", "gbps": "GB/s"}
    return Result(case, "ok", {k: Quantity(v, units[k]) for k, v in values.items()})


PASSING = [
    _result("buzon/shm/rt64", p50=2.0),
    _result("mp/Pipe/rt64", p50=50.0),  # 2 <= 0.05 x 50
    _result("iceoryx2/pubsub/rt64", p50=2.0),  # 2 <= 2 x 2
    _result("buzon-rv/shm/rt64", p50=2.5),  # <= 3 us
    _result("buzon-aio/shm/rt64", p50=8.0),  # <= 10 us
    _result("buzon/shm/oneway64", rate=2.5e6),
    _result("buzon-batch/shm/oneway64", rate=4e6),
    _result("mp/Pipe/oneway64", rate=4e5),  # 2.5M >= 5 x 400k
    _result("iceoryx2/pubsub/oneway64", rate=7e5),  # 2.5M >= 2.6 x 700k
    _result("zmq/pair-ipc/oneway64", rate=2.2e6),  # 2.5M (and 1.9M) >= 0.8 x 2.2M
    _result("buzon/shm/oneway1m", bandwidth=9000.0),
    _result("buzon-bytes/shm/oneway1m", bandwidth=8500.0),
    _result("faster-fifo/queue/oneway1m", bandwidth=8000.0),
    _result("buzon/shm/numpy64m", gbps=11.0),
    _result("buzon-loan/shm/numpy64m", gbps=16.0),
    _result("buzon/BoundedBuffer/4p4c", rate=3e6),
    _result("mp/Queue/4p4c", rate=2e5),
    _result("faster-fifo/queue/4p4c", rate=9e5),
]


def _shm_targets(results: list[Result]) -> dict[str, str]:
    return {t.transport: t.status for t in evaluate_targets(results) if t.id == "i"}


def test_shm_targets_pass_fail_and_na_from_given_numbers() -> None:
    labels = [spec[0] for spec in SHM_TARGETS]
    assert len(labels) == len(set(labels)) == 18
    assert _shm_targets(PASSING) == dict.fromkeys(labels, "PASS")

    slower = {
        "buzon/shm/rt64": {"p50": 5.1},  # > 0.05 x mp (2.5) and > 2 x iceoryx2 (4.0)
        "buzon-rv/shm/rt64": {"p50": 3.1},
        "buzon-aio/shm/rt64": {"p50": 10.5},
        "buzon-bytes/shm/oneway1m": {"bandwidth": 7900.0},  # < faster-fifo (8000)
        "buzon/shm/oneway64": {"rate": 1.9e6},  # < 2M and < 5 x 400k (still >= the others)
        "buzon/shm/numpy64m": {"gbps": 9.9},
        "buzon/BoundedBuffer/4p4c": {"rate": 1.9e6},  # < 10 x 200k and < 3 x 900k
    }
    changed = [
        _result(r.case.id, **slower[r.case.id]) if r.case.id in slower else r for r in PASSING
    ]
    got = _shm_targets(changed)
    for label in (
        "rt64 p50 vs mp.Pipe",
        "rt64 p50 vs iceoryx2",
        "rendezvous rt64 p50 vs 3 us",
        "asyncio rt64 p50 vs 10 us",
        "oneway1m recv_bytes() vs faster-fifo",
        "oneway64 vs 2M msg/s",
        "oneway64 vs mp.Pipe",
        "numpy64m channel vs 10 GB/s",
        "4p4c vs mp.Queue",
        "4p4c vs faster-fifo",
    ):
        assert got.pop(label) == "FAIL", label
    assert set(got.values()) == {"PASS"}

    # a peer not measured (or not installed): its targets are n/a, the others stand
    without_iox = [r for r in PASSING if r.case.impl != "iceoryx2"]
    got = _shm_targets(without_iox)
    assert {k for k, v in got.items() if v == "n/a"} == {
        "rt64 p50 vs iceoryx2",
        "oneway64 vs iceoryx2",
        "batch oneway64 vs iceoryx2",
    }


def test_render_shows_the_shm_block_and_bulk_tables() -> None:
    from buzon.bench._harness import Config

    machine = {"platform": "test", "cpu_count": 2, "implementation": "CPython", "python": "3"}
    text = render(PASSING, Config(seconds=0.1), machine)
    assert "(i) shared memory" in text
    assert "64 MiB numpy array, one way (GB/s)" in text
    assert "buzon ring loan" in text and "16.00" in text
    assert "4 producers x 4 consumers" in text
    line = next(x for x in text.splitlines() if "rt64 p50 vs mp.Pipe" in x)
    assert "0.04x" in line and "PASS" in line


def test_peers_are_an_optional_group_not_dev() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[2]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    names = {dep.split(">")[0].split("=")[0].strip() for dep in groups["bench"]}
    assert names == {
        "pyzmq",
        "faster-fifo",
        "iceoryx2",
        "numpy",
        "Pyro5",
        "rpyc",
        "grpcio",
        "msgpack",
    }
    assert not (names - {"numpy"}) & {d.split(">")[0] for d in groups["dev"]}
    makefile = (root / "Makefile").read_text()
    bench = makefile[makefile.index("\nbench:") :].split("\n\n")[0]
    assert ".[dev,bench]" in bench


def test_unpin_lets_the_case_and_its_children_use_every_cpu(tmp_path: Path) -> None:
    """4p4c runs 8 processes: after ``ctx.unpin()`` none is pinned (before it, the child
    is pinned to the second CPU), and the parent's own pinning is restored afterwards."""
    from buzon.bench._harness import Config, Ctx, choose_cpus, run_case

    pin = choose_cpus()
    if pin is None:
        pytest.skip("needs two CPUs")
    config = Config(seconds=0.01, pin=pin)
    seen: dict[str, Any] = {}

    def body(ctx: Ctx) -> dict[str, Quantity]:
        def report() -> dict[str, Any]:
            return {"cpus": sorted(os.sched_getaffinity(0))}

        seen["pinned"] = ctx.spawn(report).join()["cpus"]
        ctx.unpin()
        seen["parent"] = sorted(os.sched_getaffinity(0))
        seen["free"] = ctx.spawn(report).join()["cpus"]
        return {}

    before = os.sched_getaffinity(0)
    result = run_case(Case("t", "t", "unpin", body), config, str(tmp_path), 1)
    assert result.status == "ok", result.note
    assert seen["pinned"] == [pin[1]]
    assert seen["parent"] == seen["free"] == sorted(config.cpus)
    assert len(config.cpus) >= 2
    assert os.sched_getaffinity(0) == before
