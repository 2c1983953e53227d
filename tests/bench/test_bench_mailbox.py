"""Smoke test of the mailbox rows of ``buzon bench`` (bench/_mailbox.py): they run,
print their rows and targets, and leave nothing behind. Never timing thresholds."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from buzon.bench import main


def _fds() -> set[str]:
    """Open fds, except multiprocessing's heap arenas (``/dev/shm/pym-*``: faster-fifo's
    queues are allocated there, and multiprocessing keeps its arenas for reuse)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own fd
        if not target.startswith("/dev/shm/pym-"):
            out.add(f"{fd} {target}")
    return out


MAILBOX_IDS = {
    "buzon/mailbox/4p4c",
    "buzon-receipts/mailbox/4p4c",
    "buzon/mailbox/4p4c-dict",
    "mp/Queue/4p4c-dict",
    "faster-fifo/queue/4p4c-dict",
    "buzon-direct/inbox/rt64",
    "buzon/mailbox/bcast4",
}


def test_mailbox_rows_run_print_and_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    runtime = tmp_path / "runtime"
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("BUZON_RUNTIME_DIR", str(runtime))
    fds = _fds()
    out = tmp_path / "mbox.json"

    args = ["--quick", "--seconds", "0.03", "--only", "mailbox,inbox,4p4c-dict"]
    rc = main([*args, "--json", str(out), "--no-progress"])

    assert rc == 0
    assert _fds() == fds
    assert list(scratch.iterdir()) == []
    assert not runtime.exists() or list(runtime.iterdir()) == []
    doc = json.loads(out.read_text())
    by_id = {r["id"]: r for r in doc["results"]}
    assert set(by_id) == MAILBOX_IDS
    for r in by_id.values():
        if r["id"].startswith("faster-fifo") and r["status"] == "skipped":
            assert r["note"].startswith("not installed"), r["note"]
            continue
        assert r["status"] == "ok", (r["id"], r["note"])
        assert r["values"]["p50" if r["metric"] == "rt64" else "rate"]["value"] > 0
    bcast = by_id["buzon/mailbox/bcast4"]["values"]
    assert bcast["receivers"]["value"] == 4
    # every copy was taken or dropped (and counted); the sender's end mark (not counted
    # in "sent") may itself drop one oldest copy per receiver, counted in "dropped", and
    # an end mark repeated by the parent may drop a few more, counted by the parent's
    # object
    sent = bcast["sent"]["value"]
    assert 0 < bcast["delivered"]["value"] <= 4 * sent
    assert bcast["delivered"]["value"] + bcast["dropped"]["value"] <= 4 * (sent + 1)
    mailbox_targets = [t for t in doc["targets"] if t["id"] == "m"]
    assert len(mailbox_targets) == 8
    ratios = {t["transport"]: t["ratio"] for t in mailbox_targets}
    for label in (
        "4p4c dict vs mp.Queue",
        "4p4c receipts vs plain",
        "broadcast to each vs 1M msg/s",
    ):
        assert ratios[label] is not None and ratios[label] > 0, label
    printed = capsys.readouterr().out
    assert "4 producers x 4 consumers, a dict of three fields" in printed
    assert "broadcast, 1 sender -> 4 receivers" in printed
    assert "buzon send_to/recv_from" in printed
    assert "(m) mailboxes (issue 10)" in printed
