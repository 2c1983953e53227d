"""``buzon call URL METHOD ARGS...``: RPC from the shell, against servers the tests start."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _rpc_helpers import Recorder, calc_service, serving

import buzon
from buzon import cli
from buzon.errors import RemoteError

SRC = str(Path(buzon.__file__).resolve().parent.parent)


def _call(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["call", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_call_prints_the_result_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    with serving("unix:calc", calc_service(Recorder())):
        assert _call(capsys, "unix:calc", "add", "1", "2") == (0, "3\n", "")
        # an ARG that is no JSON is a string; '"42"' is the string 42
        assert _call(capsys, "unix:calc", "echo", "hello world")[1] == '"hello world"\n'
        assert _call(capsys, "unix:calc", "echo", '"42"')[1] == '"42"\n'
        assert _call(capsys, "unix:calc", "kw", "1", "2", "3")[1] == "6\n"


def test_remote_errors_print_code_and_message_and_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with serving("unix:calc", calc_service(Recorder())):
        code, out, err = _call(capsys, "unix:calc", "fails", "boom")
        assert (code, out) == (cli.EXIT_ERROR, "")
        assert f"remote error {RemoteError.SERVER_ERROR}: " in err and "boom" in err
        code, out, err = _call(capsys, "unix:calc", "nope")
        assert code == cli.EXIT_ERROR
        assert f"remote error {RemoteError.METHOD_NOT_FOUND}: " in err
        code, out, err = _call(capsys, "unix:calc", "add", "1", "x")  # a string for an int
        assert code == cli.EXIT_ERROR
        assert f"remote error {RemoteError.INVALID_PARAMS}: " in err
        # the server keeps serving
        assert _call(capsys, "unix:calc", "add", "2", "2")[:2] == (0, "4\n")


def test_a_deadline_that_passes_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder()
    with serving("unix:calc", calc_service(rec)):
        code, out, err = _call(capsys, "unix:calc", "block", "b", "--timeout", "0.2")
        assert (code, out) == (cli.EXIT_TIMEOUT, "")
        assert "buzon: error:" in err
        assert rec.event("b:cancelled").wait(20)  # the handler saw the call cancelled


def test_notify_sends_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    rec = Recorder()
    with serving("unix:calc", calc_service(rec)):
        assert _call(capsys, "unix:calc", "log", "started", "--notify") == (0, "", "")
        assert rec.event("logged").wait(20)
        assert "log started" in rec.ran


def test_wire_jsonrpc(capsys: pytest.CaptureFixture[str]) -> None:
    with serving("unix:jcalc", calc_service(Recorder()), wire="jsonrpc"):
        assert _call(capsys, "unix:jcalc", "add", "20", "22", "--wire", "jsonrpc")[:2] == (
            0,
            "42\n",
        )
        code, _, err = _call(capsys, "unix:jcalc", "nope", "--wire", "jsonrpc")
        assert code == cli.EXIT_ERROR and f"{RemoteError.METHOD_NOT_FOUND}" in err


@pytest.mark.skipif(shutil.which("nvim") is None, reason="Neovim is not installed")
def test_wire_msgpack_rpc_to_neovim(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, runtime_dir: str
) -> None:
    sock = tmp_path / "nvim.sock"
    nvim = subprocess.Popen(
        ["nvim", "--headless", "--clean", "--listen", str(sock)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"unix:{sock}"
        for _ in range(2000):
            if sock.exists():
                break
            if nvim.poll() is not None:
                pytest.fail("nvim exited")
            time.sleep(0.01)
        code, out, err = _call(capsys, url, "nvim_eval", '"20+22"', "--wire", "msgpack-rpc")
        assert (code, out) == (0, "42\n"), err
    finally:
        nvim.kill()
        nvim.wait(20)


def test_no_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    # (connecting to unix: waits for the endpoint to appear, up to --timeout)
    code, out, err = _call(capsys, "unix:nobody-here", "add", "1", "2", "--timeout", "0.3")
    assert code == cli.EXIT_TIMEOUT and out == ""
    assert err.startswith("buzon: error:") and "is an RPC server running at" in err


def test_bad_wire_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["call", "unix:x", "add", "--wire", "soap"]) == cli.EXIT_USAGE


def test_call_as_a_command(runtime_dir: str) -> None:
    env = dict(os.environ, BUZON_RUNTIME_DIR=runtime_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    with serving("unix:calc", calc_service(Recorder())):
        res = subprocess.run(
            [sys.executable, "-m", "buzon", "call", "unix:calc", "add", "40", "2"],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == 42
