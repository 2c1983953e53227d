"""The RPC rows of ``buzon bench`` (issue 11): buzon.rpc over shm: and exactly-once, the
peers (Pyro5, RPyC, grpcio), msgpack-rpc to Neovim, and the (rpc) targets. Tiny runs,
no timing thresholds."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from test_bench_peers import _installed, _state  # tests/bench is on sys.path

from buzon.bench import all_cases, main
from buzon.bench._harness import Case, Quantity, Result
from buzon.bench._report import RPC_TARGETS, evaluate_targets, render

BUZON_ROWS = {
    "buzon-rpc-exactly-once/unix/rpcadd",
    "buzon-rpc/shm/rpcadd",
    "socket-floor/unix/rpcadd",  # the floor of any Python RPC (docs/benchmarks.md)
}
# module -> the rows it is needed for
PEER_ROWS = {
    "Pyro5": "pyro5/unix/rpcadd",
    "rpyc": "rpyc/unix/rpcadd",
    "grpc": "grpcio/unix/rpcadd",
}
# the same peers in their default configuration (docs/benchmarks.md)
DEFAULT_ROWS = {"Pyro5": "pyro5-default/unix/rpcadd", "rpyc": "rpyc-default/unix/rpcadd"}
NVIM_ROW = "buzon-msgpack-rpc/nvim/rpcadd"


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    runtime = tmp_path / "runtime"
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("BUZON_RUNTIME_DIR", str(runtime))
    return scratch, runtime


def _run(tmp_path: Path, only: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / "bench.json"
    args = ["--quick", "--seconds", "0.03", "--no-progress", "--json", str(out), "--only", only]
    rc = main(args)
    return rc, json.loads(out.read_text())


def _assert_clean(before: dict[str, Any], dirs: tuple[Path, Path]) -> None:
    assert _state() == before
    scratch, runtime = dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []


def _check_rate(r: dict[str, Any]) -> None:
    assert r["status"] == "ok", r["note"]
    assert r["values"]["rate"]["unit"] == "calls/s" and r["values"]["rate"]["value"] > 0
    assert r["values"]["p50"]["unit"] == "us"


def test_the_rows_are_listed() -> None:
    ids = {c.id for c in all_cases()}
    assert BUZON_ROWS | set(PEER_ROWS.values()) | set(DEFAULT_ROWS.values()) | {NVIM_ROW} <= ids


def test_shm_and_exactly_once_rows_run_and_leave_nothing_behind(
    tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    before = _state()
    rc, doc = _run(tmp_path, ",".join(BUZON_ROWS))
    assert rc == 0
    _assert_clean(before, private_dirs)
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == BUZON_ROWS
    for r in by_id.values():
        _check_rate(r)


@pytest.mark.parametrize("module", sorted(PEER_ROWS))
def test_peer_rows_run_and_leave_nothing_behind(
    module: str, tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    if not _installed(module):
        pytest.skip(f"{module} is not installed (make bench installs it)")
    before = _state()
    rc, doc = _run(tmp_path, PEER_ROWS[module])
    assert rc == 0
    _assert_clean(before, private_dirs)
    (r,) = doc["results"]
    _check_rate(r)


@pytest.mark.parametrize("module", sorted(DEFAULT_ROWS))
def test_default_config_rows_run_and_the_fast_config_does_not_leak_into_them(
    module: str, tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    if not _installed(module):
        pytest.skip(f"{module} is not installed (make bench installs it)")
    before = _state()
    rc, doc = _run(tmp_path, f"{PEER_ROWS[module]},{DEFAULT_ROWS[module]}")
    assert rc == 0
    _assert_clean(before, private_dirs)
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == {PEER_ROWS[module], DEFAULT_ROWS[module]}
    for r in by_id.values():
        _check_rate(r)
    if module == "Pyro5":  # marshal was the fast row's; the default row had serpent
        import importlib

        assert importlib.import_module("Pyro5").config.SERIALIZER == "serpent"


def test_nvim_row_measures_buzon_and_the_bare_loop(
    tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    if shutil.which("nvim") is None or not _installed("msgpack"):
        pytest.skip("needs nvim (.ci/run installs it) and msgpack (make bench)")
    before = _state()
    rc, doc = _run(tmp_path, NVIM_ROW)
    assert rc == 0
    _assert_clean(before, private_dirs)
    (r,) = doc["results"]
    _check_rate(r)
    assert r["values"]["bare"]["unit"] == "calls/s" and r["values"]["bare"]["value"] > 0
    target = next(t for t in doc["targets"] if t["transport"] == "nvim msgpack-rpc vs bare msgpack")
    assert target["ratio"] is not None and target["status"] in {"PASS", "FAIL"}


def test_missing_peers_and_nvim_are_reported_not_run(
    tmp_path: Path,
    private_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for module in ("Pyro5", "rpyc", "grpc"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    before = _state()
    rc, doc = _run(tmp_path, ",".join([*PEER_ROWS.values(), NVIM_ROW]))
    assert rc == 0
    _assert_clean(before, private_dirs)
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == {*PEER_ROWS.values(), NVIM_ROW}
    for row in PEER_ROWS.values():
        assert by_id[row]["status"] == "skipped"
        assert by_id[row]["note"].startswith("not installed: ")
        assert "make bench" in by_id[row]["note"]
    assert by_id[NVIM_ROW]["status"] == "skipped"
    assert "nvim" in by_id[NVIM_ROW]["note"]
    printed = capsys.readouterr().out
    assert "(rpc) RPC add(a, b)" in printed
    targets = {t["transport"]: t for t in doc["targets"] if t["id"] == "rpc"}
    assert targets["unix vs Pyro5"]["status"] == "n/a"


# --- the (rpc) targets from given numbers ----------------------------------------------


def _result(case_id: str, **values: float) -> Result:
    impl, transport, metric = case_id.split("/")
    case = Case(impl, transport, metric, lambda ctx: {})
    return Result(case, "ok", {k: Quantity(v, "calls/s") for k, v in values.items()})


PASSING = [
    _result("buzon-rpc/unix/rpcadd", rate=60e3),
    _result("buzon-rpc-exactly-once/unix/rpcadd", rate=50e3),  # >= 0.8 x 60k
    _result("mp-managers/unix/rpcadd", rate=25e3),  # 60k >= 2 x 25k; shm >= 4 x 25k
    _result("buzon-rpc/shm/rpcadd", rate=120e3),  # >= 100k
    _result("pyro5/unix/rpcadd", rate=5e3),  # 60k >= 8 x 5k
    _result("rpyc/unix/rpcadd", rate=3e3),
    _result("pyro5-default/unix/rpcadd", rate=4e3),
    _result("rpyc-default/unix/rpcadd", rate=1.5e3),
    _result("grpcio/unix/rpcadd", rate=2e3),
    _result("buzon-msgpack-rpc/nvim/rpcadd", rate=19e3, bare=20e3),  # >= 0.9 x 20k
]


def _rpc_targets(results: list[Result]) -> dict[str, str]:
    return {t.transport: t.status for t in evaluate_targets(results) if t.id == "rpc"}


def test_rpc_targets_pass_fail_and_na_from_given_numbers() -> None:
    labels = [spec[0] for spec in RPC_TARGETS]
    assert len(labels) == len(set(labels)) == 10
    assert _rpc_targets(PASSING) == dict.fromkeys(labels, "PASS")

    slower = {
        "buzon-rpc/unix/rpcadd": {"rate": 39e3},  # < 2 x managers, < 8 x Pyro5
        "buzon-rpc/shm/rpcadd": {"rate": 99e3},  # < 100k, < 4 x managers
        "buzon-msgpack-rpc/nvim/rpcadd": {"rate": 17e3, "bare": 20e3},  # 0.85x
    }
    changed = [
        _result(r.case.id, **slower[r.case.id]) if r.case.id in slower else r for r in PASSING
    ]
    got = _rpc_targets(changed)
    assert got == {
        "unix vs mp.managers": "FAIL",
        "unix vs Pyro5": "FAIL",
        "unix vs RPyC": "PASS",  # 39k >= 8 x 3k
        "unix vs Pyro5 (default config)": "PASS",  # 39k >= 8 x 4k
        "unix vs RPyC (root.add per call)": "PASS",
        "unix vs grpcio": "PASS",
        "shm vs 100k calls/s": "FAIL",
        "shm vs mp.managers": "FAIL",
        "exactly_once vs at_most_once": "PASS",  # 50k >= 0.8 x 39k
        "nvim msgpack-rpc vs bare msgpack": "FAIL",
    }
    without = [
        r for r in PASSING if r.case.impl not in ("pyro5", "pyro5-default", "buzon-msgpack-rpc")
    ]
    got = _rpc_targets(without)
    assert {k for k, v in got.items() if v == "n/a"} == {
        "unix vs Pyro5",
        "unix vs Pyro5 (default config)",
        "nvim msgpack-rpc vs bare msgpack",
    }


def test_render_shows_the_rpc_targets() -> None:
    from buzon.bench._harness import Config

    machine = {"platform": "test", "cpu_count": 2, "implementation": "CPython", "python": "3"}
    text = render(PASSING, Config(seconds=0.1), machine)
    assert "(rpc) RPC add(a, b) calls/s" in text
    line = next(x for x in text.splitlines() if "unix vs mp.managers" in x)
    assert "2.40x" in line and "PASS" in line and "60k vs 25k calls/s" in line
