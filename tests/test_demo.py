"""``buzon demo``: it runs every section between real processes, cleans up, and fails loudly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import buzon
from buzon import cli, demo

SRC = str(Path(buzon.__file__).resolve().parent.parent)


def _no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.fd_check
def test_demo_runs_every_section(capsys: pytest.CaptureFixture[str], runtime_dir: str) -> None:
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for key, _, _ in demo.SECTIONS:
        assert re.search(rf"^\d+\. {key}: ", out, re.MULTILINE), key
    assert "FAILED" not in out
    assert f"all {len(demo.SECTIONS)} sections passed" in out
    for transport in ("pipe", "fifo", "mq", "unix", "unixgram", "tcp", "udp"):
        assert f"{transport}:" in out
    assert out.count("   link     ") >= 7  # the properties of every transport
    m = re.search(r"runtime dir (\S+), removed", out)
    assert m is not None
    assert not os.path.exists(m.group(1))
    assert os.environ["BUZON_RUNTIME_DIR"] == runtime_dir  # restored
    assert _no_children_left()


def test_demo_as_a_command(runtime_dir: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-m", "buzon", "demo"],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert b"sections passed" in res.stdout


def test_demo_reports_a_failure_and_kills_its_children(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[int] = []

    def broken(kids: demo._Children) -> None:
        started.append(kids.fork(lambda: time.sleep(60)))
        raise demo.DemoFailure("the broken section broke")

    def fine(kids: demo._Children) -> None:
        kids.reap(kids.fork(lambda: None))

    monkeypatch.setattr(
        demo, "SECTIONS", [("broken", "a failing section", broken), ("fine", "works", fine)]
    )
    assert demo.main() == 1
    out = capsys.readouterr().out
    assert "FAILED   DemoFailure: the broken section broke" in out
    assert "1 of 2 failed: broken" in out
    with pytest.raises(ProcessLookupError):  # killed by its pid and reaped
        os.kill(started[0], signal.SIGKILL)
    assert _no_children_left()


def test_a_child_that_fails_fails_its_section(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def child_fails(kids: demo._Children) -> None:
        def body() -> None:
            raise RuntimeError("child trouble")

        kids.reap(kids.fork(body))

    monkeypatch.setattr(demo, "SECTIONS", [("child", "a failing child", child_fails)])
    assert demo.main() == 1
    assert "exited with status 1" in capsys.readouterr().out
