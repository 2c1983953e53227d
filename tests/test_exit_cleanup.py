"""Endpoint files go away when the process that made them exits without ``close()``.

Socket files and FIFOs outlive their process unless unlinked; ``multiprocessing``'s
``Listener`` removes its socket at interpreter exit, and so does buzon, for every file
it created (unix, unixgram and shm: sockets, unixgram client sockets, FIFOs and their
credit pools), only while the path is still that file, and only in the creating
process (not in a forked child that exits).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_child(code: str, runtime_dir: str) -> str:
    env = dict(os.environ, BUZON_RUNTIME_DIR=runtime_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _endpoint_files(runtime_dir: str) -> list[str]:
    """Sockets and FIFOs in the runtime dir (what an exiting process must not leave)."""
    out = []
    for name in sorted(os.listdir(runtime_dir)):
        mode = os.lstat(os.path.join(runtime_dir, name)).st_mode
        if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode):
            out.append(name)
    return out


CHILD_LEAVES_WITHOUT_CLOSE = """
import os, buzon
unix = buzon.listen("unix:left")
fifo = buzon.listen("fifo:left")
pooled = buzon.listen("fifo:pooled", capacity=4)  # a credit-pool FIFO beside it
gram = buzon.listen("unixgram:left")
client = buzon.connect("unixgram:left", timeout=5)  # its own bound c-PID-*.dgram file
shm = buzon.listen("shm:left")
print(" ".join(sorted(os.listdir(os.environ["BUZON_RUNTIME_DIR"]))))
# no close(): the interpreter exits with all of them open
"""


def test_a_process_that_exits_without_close_leaves_no_endpoint_files(runtime_dir: str) -> None:
    made = _run_child(CHILD_LEAVES_WITHOUT_CLOSE, runtime_dir).split()
    assert "left.sock" in made or any(n.startswith("left") for n in made), made
    assert any(n.startswith("c-") and n.endswith(".dgram") for n in made), made
    assert any(".cap4." in n for n in made), made
    assert _endpoint_files(runtime_dir) == []


def test_an_uncaught_exception_still_removes_them(runtime_dir: str) -> None:
    code = 'import buzon\nlst = buzon.listen("unix:boom")\nraise SystemExit(0)\n'
    _run_child(code, runtime_dir)
    assert _endpoint_files(runtime_dir) == []


def test_a_file_replaced_since_is_left_alone(runtime_dir: str) -> None:
    # the socket file was removed and another socket bound at the path (as a new
    # listener in another process would): the exiting process must not remove that one
    code = """
import os, socket, buzon
lst = buzon.listen("unix:swap")
path = lst.address.fs_path()
os.unlink(path)
other = socket.socket(socket.AF_UNIX)
other.bind(path)
print(os.path.basename(path))
"""
    name = _run_child(code, runtime_dir).strip()
    try:
        assert _endpoint_files(runtime_dir) == [name]
    finally:
        os.unlink(os.path.join(runtime_dir, name))


def test_a_closed_endpoint_is_not_removed_again(runtime_dir: str) -> None:
    code = """
import os, socket, buzon
lst = buzon.listen("unix:again")
path = lst.address.fs_path()
lst.close()
assert not os.path.exists(path)
other = socket.socket(socket.AF_UNIX)
other.bind(path)  # the name is someone else's now
print(os.path.basename(path))
"""
    name = _run_child(code, runtime_dir).strip()
    try:
        assert _endpoint_files(runtime_dir) == [name]
    finally:
        os.unlink(os.path.join(runtime_dir, name))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_that_exits_leaves_its_parents_endpoints(runtime_dir: str) -> None:
    code = """
import os, sys, buzon
lst = buzon.listen("unix:parent")
fifo = buzon.listen("fifo:parent")
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal interpreter exit in the child: atexit handlers run there
os.waitpid(pid, 0)
print(len(os.listdir(os.environ["BUZON_RUNTIME_DIR"])))
"""
    count = int(_run_child(code, runtime_dir).strip())
    assert count >= 2  # both still there after the child's exit
    assert _endpoint_files(runtime_dir) == []  # and gone after the parent's
