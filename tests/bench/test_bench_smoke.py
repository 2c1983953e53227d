"""Smoke tests of ``buzon bench``: structure and cleanup, never timing thresholds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from buzon.bench import all_cases, main
from buzon.bench._harness import Case, Config, Ctx, Quantity, Result, combine, run_case

SRC = Path(__file__).resolve().parents[2] / "src"


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _children() -> set[str]:
    found: set[str] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            found.update(f.read().split())
    return found


def _process_state() -> dict[str, Any]:
    return {
        "fds": _fds(),
        "children": _children(),
        "threads": threading.active_count(),
        "sigusr1": signal.getsignal(signal.SIGUSR1),
        "sigterm": signal.getsignal(signal.SIGTERM),
        "affinity": os.sched_getaffinity(0),
    }


@pytest.fixture
def private_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Point the bench's temporary dir and buzon's runtime dir at empty directories."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    runtime = tmp_path / "runtime"
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("BUZON_RUNTIME_DIR", str(runtime))
    return scratch, runtime


def _check_document(doc: dict[str, Any], expected_ids: set[str]) -> None:
    assert doc["schema"] == "buzon-bench/1"
    machine = doc["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["python"].count(".") == 2
    assert isinstance(machine["platform"], str) and machine["platform"]
    assert doc["config"]["quick"] is True
    assert {r["id"] for r in doc["results"]} == expected_ids
    for r in doc["results"]:
        assert r["status"] in {"ok", "n/a", "skipped"}, (r["id"], r["note"])
        if r["status"] != "ok":
            assert r["note"], r["id"]
            continue
        assert r["values"], r["id"]
        for name, q in r["values"].items():
            assert set(q) == {"value", "unit"}, (r["id"], name)
            assert q["value"] > 0, (r["id"], name)
            assert isinstance(q["unit"], str) and q["unit"], (r["id"], name)
        if r["metric"] == "rt64":
            v = r["values"]
            assert v["p50"]["unit"] == "us"
            assert v["min"]["value"] <= v["p50"]["value"] <= v["p99"]["value"] <= v["max"]["value"]
        else:
            assert r["values"]["rate"]["unit"] == "msg/s"
            assert r["values"]["bandwidth"]["unit"] == "MB/s"
    ids = {t["id"] for t in doc["targets"]}
    assert ids == {"a", "b", "b-batch", "c", "d", "e", "f", "g", "g-batch", "h", "i", "m", "rpc"}
    for t in doc["targets"]:
        assert t["status"] in {"PASS", "FAIL", "n/a"}
        assert (t["ratio"] is None) == (t["status"] == "n/a")
        if t["ratio"] is not None:
            assert t["ratio"] > 0
            assert t["measured"]["value"] > 0 and t["reference"]["value"] > 0


def test_quick_pipe_run_writes_json_and_leaves_nothing_behind(
    tmp_path: Path, private_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    before = _process_state()

    rc = main(["--quick", "--only", "pipe", "--json", str(out), "--no-progress"])

    assert rc == 0
    assert _process_state() == before
    scratch, runtime = private_dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []

    doc = json.loads(out.read_text())
    expected = {c.id for c in all_cases() if "pipe" in c.id.lower()}
    assert {"raw/pipe/rt64", "mp/Pipe/rt64", "buzon/pipe/rt64"} <= expected
    _check_document(doc, expected)
    by_id = {r["id"]: r for r in doc["results"]}
    for case_id in ("raw/pipe/rt64", "raw/pipe/oneway64", "raw/pipe/oneway1m", "mp/Pipe/rt64"):
        assert by_id[case_id]["status"] == "ok", by_id[case_id]["note"]

    printed = capsys.readouterr().out
    assert "targets" in printed
    assert "mp.Pipe" in printed
    assert "raw" in printed


def test_named_endpoints_are_removed(tmp_path: Path, private_dirs: tuple[Path, Path]) -> None:
    """FIFOs, socket paths and queues, raw and buzon, are gone after the run."""
    queues_before = set(os.listdir("/dev/mqueue")) if os.path.isdir("/dev/mqueue") else None
    before = _process_state()
    out = tmp_path / "named.json"

    args = ["--quick", "--seconds", "0.03", "--only", "/fifo/,/unix,/mq/", "--no-progress"]
    rc = main([*args, "--json", str(out)])

    assert rc == 0
    assert _process_state() == before
    scratch, runtime = private_dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    if queues_before is not None:
        assert set(os.listdir("/dev/mqueue")) == queues_before
    doc = json.loads(out.read_text())
    assert {r["transport"] for r in doc["results"]} == {"fifo", "unix", "unixgram", "mq"}
    for r in doc["results"]:
        assert r["status"] in {"ok", "n/a", "skipped"}, (r["id"], r["note"])


def test_asyncio_rows_run_and_leave_nothing_behind(
    tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    """``buzon-aio``: an asyncio ping loop against an asyncio echo loop in the child."""
    before = _process_state()
    out = tmp_path / "aio.json"

    args = ["--quick", "--seconds", "0.03", "--only", "buzon-aio/", "--no-progress"]
    rc = main([*args, "--json", str(out)])

    assert rc == 0
    assert _process_state() == before
    scratch, runtime = private_dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    doc = json.loads(out.read_text())
    ids = {r["id"] for r in doc["results"]}
    assert {"buzon-aio/shm/rt64", "buzon-aio/unix/rt64", "buzon-aio/pipe/oneway64"} <= ids
    _check_document(doc, ids)
    for r in doc["results"]:
        assert r["status"] == "ok", (r["id"], r["note"])
    targets = {t["transport"]: t for t in doc["targets"] if t["id"] == "i"}
    assert targets["asyncio rt64 p50 vs 10 us"]["status"] in {"PASS", "FAIL"}


def test_a_hung_case_is_stopped_and_cleaned_up(tmp_path: Path) -> None:
    """The watchdog kills the child and unblocks a recv that has no EOF to wake it."""

    def hang(ctx: Ctx) -> dict[str, Quantity]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ctx.close_later(sock)
        sock.bind(("127.0.0.1", 0))
        ctx.spawn(lambda: time.sleep(60))
        sock.recv(16)
        return {}

    def crash(ctx: Ctx) -> dict[str, Quantity]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ctx.close_later(sock)
        sock.bind(("127.0.0.1", 0))

        def body() -> None:
            raise ValueError("boom")

        ctx.spawn(body)
        sock.recv(16)
        return {}

    before = _process_state()
    config = Config(seconds=0.01, time_limit=1.0)
    hung = run_case(Case("t", "t", "hang", hang), config, str(tmp_path), 1)
    crashed = run_case(Case("t", "t", "crash", crash), config, str(tmp_path), 2)
    assert _process_state() == before
    assert hung.status == "error" and "limit" in hung.note
    assert crashed.status == "error" and "ValueError: boom" in crashed.note


def test_ctrl_c_cleans_up(tmp_path: Path) -> None:
    """SIGINT to the process group (what Ctrl-C does) exits 130 and leaves nothing."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    env = dict(os.environ, PYTHONPATH=str(SRC), TMPDIR=str(scratch))
    env["BUZON_RUNTIME_DIR"] = str(tmp_path / "runtime")
    cmd = [sys.executable, "-m", "buzon.bench", "--seconds", "30", "--no-progress"]
    proc = subprocess.Popen(
        # a pipe case: it cannot end early (a UDP case on a loaded machine may lose
        # datagrams and fail before the interrupt lands, exiting 1)
        [*cmd, "--only", "raw/pipe/oneway64"],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # interrupt once the run is under way (its scratch dir exists), not while the
        # interpreter is still starting, which a loaded machine can make slow
        started = time.monotonic() + 30
        while not any(scratch.glob("buzon-bench-*")) and time.monotonic() < started:
            time.sleep(0.05)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, (out.decode(), err.decode())
    assert b"INTERRUPTED" in out
    deadline = time.monotonic() + 5
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _group_members(proc.pid) == []
    assert list(scratch.iterdir()) == []


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_list_and_filters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list", "--only", "raw/tcp"]) == 0
    assert capsys.readouterr().out.split() == [
        "raw/tcp/rt64",
        "raw/tcp/oneway64",
        "raw/tcp/oneway1m",
    ]
    assert main(["--only", "no-such-case"]) == 2
    ids = [c.id for c in all_cases()]
    assert len(ids) == len(set(ids))


def test_combine_takes_medians_and_keeps_failures() -> None:
    case = Case("raw", "pipe", "rt64", lambda ctx: {})
    rounds = [Result(case, "ok", {"p50": Quantity(v, "us")}) for v in (3.0, 1.0, 2.0)]
    merged = combine(rounds)
    assert merged.status == "ok"
    assert merged.values["p50"] == Quantity(2.0, "us")
    assert len(merged.rounds) == 3
    failed = combine([*rounds, Result(case, "error", note="boom")])
    assert failed.status == "error" and "boom" in failed.note


def test_a_repeated_run_gives_each_target_its_ratio_per_round() -> None:
    from buzon.bench._report import evaluate_targets

    def rounds(impl: str, values: tuple[float, ...]) -> Result:
        case = Case(impl, "pipe", "rt64", lambda ctx: {})
        return combine([Result(case, "ok", {"p50": Quantity(v, "us")}) for v in values])

    # the rounds pair up as measured: 1.2/1.0, 3.2/2.0, 1.0/1.0 (medians 1.2/1.0)
    results = [rounds("buzon-rv", (1.2, 3.2, 1.0)), rounds("buzon", (1.0, 2.0, 1.0))]
    (e,) = [t for t in evaluate_targets(results) if t.id == "e" and t.transport == "pipe"]
    assert e.ratio == pytest.approx(1.2)
    assert e.rounds == pytest.approx((1.2, 1.6, 1.0))
    assert e.spread == "rounds 1.00-1.60x, 2/3 pass"
    single = [Result(r.case, "ok", r.values) for r in results]
    (e,) = [t for t in evaluate_targets(single) if t.id == "e" and t.transport == "pipe"]
    assert e.rounds == () and e.spread == ""


def test_quick_reliable_rows_run_and_leave_nothing_behind(
    tmp_path: Path, private_dirs: tuple[Path, Path]
) -> None:
    out = tmp_path / "bench.json"
    before = _process_state()
    only = "buzon-reliable,raw/udp/oneway64"
    rc = main(["--quick", "--only", only, "--json", str(out), "--no-progress"])
    assert rc == 0
    assert _process_state() == before  # the chaos relays' threads are gone too
    scratch, runtime = private_dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    doc = json.loads(out.read_text())
    by_id = {r["id"]: r for r in doc["results"]}
    for case_id in (
        "buzon-reliable/udp/rt64",
        "buzon-reliable/udp/oneway64",
        "buzon-reliable-batch/udp/oneway64",
        "buzon-reliable-clean/udp/oneway64",
        "buzon-reliable-wifi/udp/oneway64",
        "buzon-reliable/unixgram/oneway64",
    ):
        assert by_id[case_id]["status"] == "ok", by_id[case_id]["note"]
    targets = {t["id"]: t for t in doc["targets"]}
    assert all(targets[t]["ratio"] is not None for t in ("g", "g-batch", "h"))


def test_quick_rpc_rows_run_and_leave_nothing_behind(
    tmp_path: Path, private_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    before = _process_state()

    only = "buzon-rpc-spin0,buzon-rpc/unix,mp-managers"  # the others: test_bench_rpc.py
    rc = main(["--quick", "--only", only, "--json", str(out), "--no-progress"])

    assert rc == 0
    assert _process_state() == before
    scratch, runtime = private_dirs
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    doc = json.loads(out.read_text())
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == {
        "buzon-rpc-spin0/unix/rpcadd",
        "buzon-rpc/unix/rpcadd",
        "mp-managers/unix/rpcadd",
    }
    for r in by_id.values():
        assert r["status"] == "ok", r["note"]
        assert r["values"]["rate"]["unit"] == "calls/s" and r["values"]["rate"]["value"] > 0
    assert "RPC add(a, b)" in capsys.readouterr().out
