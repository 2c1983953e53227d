"""The ``buzon`` command line, in-process (``main([...])``) and as ``python -m buzon``.

Subprocesses get the test's private runtime dir (the autouse ``runtime_dir`` fixture)
and are always reaped; one still running when a test ends is killed by its pid.
Receivers announce ``buzon: listening on ADDRESS`` on stderr once their endpoint
exists, which is what the tests wait for (never a sleep). Interop tests with
``socat``/``nc`` are skipped when the tool is missing.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import buzon
from buzon import cli
from buzon.transport import mq

SRC = str(Path(buzon.__file__).resolve().parent.parent)
LIMIT = 20.0  # seconds: the bound on every wait of these tests
PY = sys.executable

needs_socat = pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")


def _openbsd_nc() -> bool:
    if shutil.which("nc") is None:
        return False
    out = subprocess.run(["nc", "-h"], capture_output=True, timeout=LIMIT, check=False)
    return b"OpenBSD" in out.stdout + out.stderr


needs_nc = pytest.mark.skipif(not _openbsd_nc(), reason="OpenBSD netcat is not installed")


# -- helpers --------------------------------------------------------------------------


def _env(runtime_dir: str) -> dict[str, str]:
    env = dict(os.environ, BUZON_RUNTIME_DIR=runtime_dir)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


class Proc:
    """A background process with helpers to read its output against a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str], stdin: Any = subprocess.DEVNULL):
        self.p = subprocess.Popen(
            argv, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.out = b""
        self.err = b""

    def _read(self, which: str, until: Callable[[bytes], bool], timeout: float = LIMIT) -> bytes:
        stream = self.p.stdout if which == "out" else self.p.stderr
        assert stream is not None
        fd = stream.fileno()
        deadline = time.monotonic() + timeout
        while not until(getattr(self, which)):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting; {which} so far: {getattr(self, which)!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"{which} ended; so far: {getattr(self, which)!r}")
                setattr(self, which, getattr(self, which) + chunk)
        return getattr(self, which)  # type: ignore[no-any-return]

    def listening(self) -> str:
        """Wait for 'buzon: listening on ADDRESS' and return ADDRESS."""
        pattern = re.compile(rb"buzon: listening on (\S+).*\n")
        m = pattern.search(self._read("err", lambda b: pattern.search(b) is not None))
        assert m is not None
        return m.group(1).decode()

    def end_input(self, data: bytes = b"") -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(data)
        self.p.stdin.close()
        self.p.stdin = None  # so that communicate() leaves it alone

    def lines(self, n: int) -> list[str]:
        out = self._read("out", lambda b: b.count(b"\n") >= n)
        return out.decode().splitlines()

    def finish(self, timeout: float = LIMIT) -> tuple[int, bytes, bytes]:
        out, err = self.p.communicate(timeout=timeout)
        self.out += out
        self.err += err
        return self.p.returncode, self.out, self.err

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()  # only this process, by its pid
        self.p.communicate(timeout=LIMIT)


@pytest.fixture
def spawn(runtime_dir: str) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(*args: str, stdin: Any = subprocess.DEVNULL) -> Proc:
        proc = Proc([PY, "-m", "buzon", *args], _env(runtime_dir), stdin)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


@pytest.fixture
def run(runtime_dir: str) -> Callable[..., subprocess.CompletedProcess[bytes]]:
    def go(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [PY, "-m", "buzon", *args],
            env=_env(runtime_dir),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=LIMIT,
            check=False,
        )

    return go


def _tool(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=LIMIT, check=False, **kw)


@pytest.fixture
def queue_url() -> Iterator[str]:
    url = f"mq:cli-{uuid.uuid4().hex[:12]}"
    yield url
    mq.remove_queue(url)  # in case a receiver was killed before it could


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tcp_listening(port: int) -> bool:
    with open("/proc/net/tcp", encoding="ascii") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                return True
    return False


def _wait_for(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + LIMIT
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# -- pure helpers ---------------------------------------------------------------------


def test_to_jsonable_covers_what_codecs_produce() -> None:
    np = pytest.importorskip("numpy")
    when = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    obj = {
        "b": b"\x00\xff",
        "t": (1, 2.5, None, True),
        1: "int key",
        "arr": np.zeros((2, 3), dtype=np.float32),
        "scalar": np.int64(7),
        "when": when,
        "u": uuid.UUID(int=1),
        "other": complex(1, 2),
    }
    got = cli.to_jsonable(obj)
    assert got["b"] == {"$bytes": base64.b64encode(b"\x00\xff").decode()}
    assert got["t"] == [1, 2.5, None, True]
    assert got["1"] == "int key"
    assert got["arr"] == {"$ndarray": {"dtype": "<f4", "shape": [2, 3], "nbytes": 24}}
    assert got["scalar"] == 7
    assert got["when"] == when.isoformat()
    assert got["u"] == str(uuid.UUID(int=1))
    assert got["other"] == {"$repr": "(1+2j)"}
    json.dumps(got)  # all of it is JSON now


def test_message_text_is_json_or_string() -> None:
    assert cli._parse_message("42") == 42
    assert cli._parse_message('"42"') == "42"
    assert cli._parse_message('{"a": [1]}') == {"a": [1]}
    assert cli._parse_message("hello world") == "hello world"
    assert cli._parse_message("") == ""


# -- parsing, help, version -----------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"buzon {buzon.__version__}"


@pytest.mark.parametrize("command", ["send", "recv", "listen", "ls", "clean", "demo", "chaos"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: buzon {command}")


def test_main_help_lists_commands_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("send", "recv", "listen", "ls", "clean", "demo", "bench"):
        assert command in out
    assert "3 timeout" in out


@pytest.mark.parametrize(
    "argv",
    [[], ["frob"], ["recv", "-n", "0", "unix:x"], ["send", "--raw", "--json-codec", "unix:x", "a"]],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "error" in capsys.readouterr().err


def test_bench_is_dispatched_with_the_rest_of_the_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from buzon import bench

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    monkeypatch.setattr(bench, "main", fake_main)
    assert cli.main(["bench", "--quick", "--only", "unix"]) == 0
    assert seen == [["--quick", "--only", "unix"]]


# -- errors ---------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("buzon: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.fd_check
def test_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["send", "bogus:x", "hi"]) == cli.EXIT_ERROR
    line = _one_error_line(capsys.readouterr().err)
    assert "unknown scheme" in line and "hint:" in line


@pytest.mark.fd_check
@pytest.mark.parametrize("url", ["unix:nothing", "fifo:nothing", "unixgram:nothing"])
def test_connect_to_nothing(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # connect keeps trying until --timeout for an endpoint that is not there yet
    assert cli.main(["send", url, "hi", "--timeout", "0.2"]) == cli.EXIT_TIMEOUT
    line = _one_error_line(capsys.readouterr().err)
    assert f"buzon recv {url}" in line  # the hint says what to start


@pytest.mark.fd_check
def test_fifo_without_reader_times_out_with_code_3(
    runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.mkfifo(os.path.join(runtime_dir, "lonely.fifo"), 0o600)
    assert cli.main(["send", "fifo:lonely", "hi", "--timeout", "0.2"]) == cli.EXIT_TIMEOUT
    line = _one_error_line(capsys.readouterr().err)
    assert "timed out" in line


def test_error_from_subprocess_is_one_line(run: Callable[..., Any]) -> None:
    res = run("send", "tcp://127.0.0.1", "x")
    assert res.returncode == 1
    _one_error_line(res.stderr.decode())


def test_recv_on_a_busy_endpoint(run: Callable[..., Any]) -> None:
    with buzon.listen("unix:busy"):
        res = run("recv", "unix:busy", "-q")
    assert res.returncode == 1
    assert "buzon clean" in _one_error_line(res.stderr.decode())


# -- send, in-process -----------------------------------------------------------------


@pytest.mark.fd_check
def test_send_message_bytes_and_json_codec(queue_url: str) -> None:
    with buzon.listen(queue_url) as listener, listener.accept(LIMIT) as ch:
        assert cli.main(["send", queue_url, '{"a": [1, 2]}']) == 0
        assert cli.main(["send", queue_url, "plain text"]) == 0
        assert cli.main(["send", "--bytes", queue_url, "hé"]) == 0
        assert cli.main(["send", "--json-codec", queue_url, "[true]"]) == 0
        assert cli.main(["send", "--priority", "3", queue_url, "--", "-x"]) == 0
        assert [ch.recv(LIMIT) for _ in range(5)] == [
            "-x",  # priority 3 overtakes the rest
            {"a": [1, 2]},
            "plain text",
            "hé".encode(),
            [True],
        ]


@pytest.mark.fd_check
def test_send_stdin_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'1\nhello\r\n\n{"k": null}\n\xff\xfe\nlast'))
    monkeypatch.setattr(sys, "stdin", stdin)
    with buzon.listen("fifo:lines") as listener, listener.accept(LIMIT) as ch:
        assert cli.main(["send", "fifo:lines", "-"]) == 0
        got = [ch.recv(LIMIT) for _ in range(6)]
    assert got == [1, "hello", "", {"k": None}, b"\xff\xfe", "last"]


@pytest.mark.fd_check
def test_send_raw_stdin_to_a_message_transport_is_one_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\nb\x00")))
    with buzon.listen("unixgram:rawin", raw=True) as listener, listener.accept(LIMIT) as ch:
        assert cli.main(["send", "unixgram:rawin", "-", "--raw"]) == 0
        assert ch.recv_bytes(LIMIT) == b"a\nb\x00"


# -- recv, in-process -----------------------------------------------------------------


def _send_when_ready(url: str, path: str, items: list[Any]) -> threading.Thread:
    def body() -> None:
        _wait_for(lambda: os.path.exists(path))
        with buzon.connect(url, timeout=LIMIT) as ch:
            for item in items:
                ch.send(item, LIMIT)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


@pytest.mark.fd_check
def test_recv_prints_json_lines(runtime_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    np = pytest.importorskip("numpy")
    items = [{"a": 1}, b"\x00\x01", np.arange(4, dtype=np.int16), {2: "two"}, "ü"]
    thread = _send_when_ready("fifo:pr", os.path.join(runtime_dir, "pr.fifo"), items)
    try:
        assert cli.main(["recv", "fifo:pr", "-n", str(len(items)), "--timeout", "20"]) == 0
    finally:
        thread.join(LIMIT)
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [
        {"a": 1},
        {"$bytes": "AAE="},
        {"$ndarray": {"dtype": "<i2", "shape": [4], "nbytes": 8}},
        {"2": "two"},
        "ü",
    ]
    assert captured.err.startswith("buzon: listening on fifo:pr")
    assert not os.path.exists(os.path.join(runtime_dir, "pr.fifo"))  # removed at the end


@pytest.mark.fd_check
def test_recv_timeout_without_peer(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["recv", "unix:alone", "--timeout", "0.1"]) == cli.EXIT_TIMEOUT
    assert "no message for 0.1 s" in capsys.readouterr().err


# -- send/recv between processes ------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["unix:pair", "tcp://127.0.0.1:0", "fifo:pair", "mq", "udp://127.0.0.1:0", "unixgram:pair"],
)
def test_send_recv_between_processes(
    url: str, spawn: Callable[..., Proc], run: Callable[..., Any], queue_url: str
) -> None:
    if url == "mq":
        url = queue_url
    recv = spawn("recv", url, "-n", "3", "--timeout", str(LIMIT))
    address = recv.listening()
    sent = run("send", address, "-", input=b'{"a": [1, 2]}\nhello\n3.5\n')
    assert sent.returncode == 0, sent.stderr
    code, out, err = recv.finish()
    assert code == 0, err
    assert out.decode().splitlines() == ['{"a": [1, 2]}', '"hello"', "3.5"]


@pytest.mark.parametrize(
    "url",
    ["unix:seq", "tcp://127.0.0.1:0", "fifo:seq", "mq", "udp://127.0.0.1:0", "unixgram:seq"],
)
def test_recv_n_takes_messages_from_one_sender_after_another(
    url: str, spawn: Callable[..., Proc], run: Callable[..., Any], queue_url: str
) -> None:
    # three separate `buzon send` processes, one message each: on unix/tcp each is its
    # own connection, and `recv -n 3` accepts the next one until it has printed three
    if url == "mq":
        url = queue_url
    recv = spawn("recv", url, "-n", "3", "--timeout", str(LIMIT))
    address = recv.listening()
    for text in ("one", "two", "three"):
        sent = run("send", address, text)
        assert sent.returncode == 0, sent.stderr
    code, out, err = recv.finish()
    assert code == 0, err
    assert out.decode().splitlines() == ['"one"', '"two"', '"three"']


def test_recv_n_with_raw_unix_takes_connection_after_connection(
    spawn: Callable[..., Proc], runtime_dir: str
) -> None:
    path = os.path.join(runtime_dir, "raw-seq.sock")
    recv = spawn("recv", f"unix:{path}", "--raw", "-n", "2", "--timeout", str(LIMIT))
    recv.listening()
    for text in (b"a\n", b"b\n"):  # two foreign clients, one after the other
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            s.sendall(text)
        recv._read("out", lambda b, text=text: b.endswith(text))  # type: ignore[misc]
    code, out, err = recv.finish()
    assert (code, out) == (0, b"a\nb\n"), err


def test_recv_stops_when_the_peer_closes(
    spawn: Callable[..., Proc], run: Callable[..., Any]
) -> None:
    recv = spawn("recv", "unix:eof")
    recv.listening()
    assert run("send", "unix:eof", "only one").returncode == 0
    code, out, _ = recv.finish()
    assert (code, out) == (0, b'"only one"\n')


def _send_here(url: str, obj: Any) -> None:
    """Send ``obj`` from this process: a ``buzon send`` process takes an interpreter's
    start (1.7-2.7 s measured on a loaded machine), which a recv --timeout window of
    under a second must not have to contain."""
    with buzon.connect(url, timeout=LIMIT) as ch:
        ch.send(obj)


def test_recv_timeout_after_messages(spawn: Callable[..., Proc]) -> None:
    recv = spawn("recv", "fifo:slow", "--timeout", "0.5")
    recv.listening()
    _send_here("fifo:slow", "first")  # the timeout counts from the recv's start too
    code, out, err = recv.finish()
    assert code == cli.EXIT_TIMEOUT
    assert out == b'"first"\n'
    assert b"stopping after 1 received" in err


def test_raw_fifo_from_a_shell(spawn: Callable[..., Proc], runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "shell-fifo")
    recv = spawn("recv", f"fifo:{path}", "--raw", "-n", "1")
    recv.listening()
    assert _tool(["sh", "-c", f"printf hello > {path}"]).returncode == 0
    code, out, err = recv.finish()
    assert (code, out) == (0, b"hello"), err
    assert not os.path.exists(path)


def test_raw_message_transport_keeps_bytes(
    spawn: Callable[..., Proc], run: Callable[..., Any], queue_url: str
) -> None:
    recv = spawn("recv", queue_url, "--raw", "-n", "2")
    recv.listening()
    assert run("send", queue_url, "--raw", "-", input=b"line 1\nline 2\n\x00").returncode == 0
    assert run("send", queue_url, "--raw", "second").returncode == 0
    code, out, err = recv.finish()
    assert (code, out) == (0, b"line 1\nline 2\n\x00second"), err


def test_ls_does_not_disturb_a_raw_receiver(
    spawn: Callable[..., Proc], runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.path.join(runtime_dir, "quiet.sock")
    recv = spawn("recv", f"unix:{path}", "--raw")
    recv.listening()
    assert cli.main(["ls"]) == 0
    assert re.search(r"unix:quiet\s+unix\s+0600\s+listening", capsys.readouterr().out)
    with socket.socket(socket.AF_UNIX) as s:  # ls did not become the one peer: we are
        s.connect(path)
        s.sendall(b"raw \x00 bytes")
    code, out, err = recv.finish()
    assert (code, out) == (0, b"raw \x00 bytes"), err


@needs_socat
def test_socat_into_raw_unix_recv(spawn: Callable[..., Proc], runtime_dir: str) -> None:
    path = os.path.join(runtime_dir, "socat.sock")
    recv = spawn("recv", f"unix:{path}", "--raw")
    recv.listening()
    res = _tool(["socat", "-", f"UNIX-CONNECT:{path}"], input=b"hi from socat\n")
    assert res.returncode == 0, res.stderr
    code, out, err = recv.finish()
    assert (code, out) == (0, b"hi from socat\n"), err


@needs_socat
def test_socat_into_raw_tcp_recv(spawn: Callable[..., Proc]) -> None:
    recv = spawn("recv", "tcp://127.0.0.1:0", "--raw")
    port = recv.listening().rsplit(":", 1)[1]
    res = _tool(["socat", "-", f"TCP:127.0.0.1:{port}"], input=b"\x00\x01tcp")
    assert res.returncode == 0, res.stderr
    code, out, err = recv.finish()
    assert (code, out) == (0, b"\x00\x01tcp"), err


@needs_nc
def test_raw_send_into_nc(run: Callable[..., Any]) -> None:
    port = _free_port()
    nc = subprocess.Popen(
        ["nc", "-l", "127.0.0.1", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: _tcp_listening(port) or nc.poll() is not None)
        data = bytes(range(256)) * 64
        res = run("send", f"tcp://127.0.0.1:{port}", "-", "--raw", input=data)
        assert res.returncode == 0, res.stderr
        out, _ = nc.communicate(timeout=LIMIT)
        assert out == data
    finally:
        if nc.poll() is None:
            nc.kill()
        nc.communicate(timeout=LIMIT)


def test_non_raw_recv_explains_foreign_bytes(spawn: Callable[..., Proc], runtime_dir: str) -> None:
    """A framed FIFO skips a shell's bytes (they do not poison it for buzon writers),
    and recv says so with the --raw hint."""
    path = os.path.join(runtime_dir, "framed.fifo")
    recv = spawn("recv", f"fifo:{path}", "--timeout", "1")
    recv.listening()
    _tool(["sh", "-c", f"printf 'not a buzon frame at all' > {path}"])
    _send_here(f"fifo:{path}", "still fine")
    code, out, err = recv.finish()
    assert code == cli.EXIT_TIMEOUT
    assert out == b'"still fine"\n'
    assert "--raw" in err.decode().splitlines()[-1]


def test_raw_fifo_recv_ends_like_cat(spawn: Callable[..., Proc], runtime_dir: str) -> None:
    """`buzon recv fifo:PATH --raw` ends when the last writer closes (cat would)."""
    path = os.path.join(runtime_dir, "cat.fifo")
    recv = spawn("recv", f"fifo:{path}", "--raw")
    recv.listening()
    assert _tool(["sh", "-c", f"printf 'one two' > {path}"]).returncode == 0
    code, out, err = recv.finish()
    assert (code, out) == (0, b"one two"), err
    assert not os.path.exists(path)


# -- signals and pipes ----------------------------------------------------------------


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_recv_interrupted_cleans_up(
    sig: int, code: int, spawn: Callable[..., Proc], runtime_dir: str
) -> None:
    recv = spawn("recv", "unix:intr")
    recv.listening()
    recv.p.send_signal(sig)
    rc, _, err = recv.finish()
    assert rc == code
    assert b"Traceback" not in err
    assert not os.path.exists(os.path.join(runtime_dir, "intr.sock"))


def test_recv_into_a_closed_pipe(spawn: Callable[..., Proc], run: Callable[..., Any]) -> None:
    recv = spawn("recv", "fifo:head")
    recv.listening()
    assert run("send", "fifo:head", "one").returncode == 0
    assert recv.lines(1) == ['"one"']
    assert recv.p.stdout is not None
    recv.p.stdout.close()  # like `| head -1` exiting
    recv.p.stdout = None
    assert run("send", "fifo:head", "two").returncode == 0
    assert recv.p.wait(timeout=LIMIT) == cli.EXIT_BROKEN_PIPE
    assert recv.p.stderr is not None
    assert b"Traceback" not in recv.err + recv.p.stderr.read()


# -- listen ---------------------------------------------------------------------------


def test_listen_serves_clients_concurrently(
    spawn: Callable[..., Proc], run: Callable[..., Any], runtime_dir: str
) -> None:
    server = spawn("listen", "unix:srv")
    server.listening()
    # two clients connected at the same time, each waiting on the other's turn
    a = spawn("send", "unix:srv", "-", stdin=subprocess.PIPE)
    b = spawn("send", "unix:srv", "-", stdin=subprocess.PIPE)
    assert a.p.stdin is not None and b.p.stdin is not None
    a.p.stdin.write(b"from a\n")
    a.p.stdin.flush()
    b.p.stdin.write(b"from b\n")
    b.p.stdin.flush()
    server.lines(2)
    a.end_input()
    b.end_input()
    assert a.finish()[0] == 0 and b.finish()[0] == 0
    lines = server.lines(2)
    assert sorted(lines) == sorted([f'[pid {a.p.pid}] "from a"', f'[pid {b.p.pid}] "from b"'])
    server.p.send_signal(signal.SIGTERM)
    code, _, err = server.finish()
    assert code == 0
    assert f"pid {a.p.pid} connected".encode() in err
    assert f"pid {b.p.pid} disconnected".encode() in err
    assert not os.path.exists(os.path.join(runtime_dir, "srv.sock"))


def test_listen_raw_tcp_prefixes_lines(spawn: Callable[..., Proc]) -> None:
    server = spawn("listen", "tcp://127.0.0.1:0", "--raw")
    port = int(server.listening().rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=LIMIT) as s:
        s.sendall(b"first line\nsecond ")
        me = f"127.0.0.1:{s.getsockname()[1]}"
        server.lines(1)
        s.sendall(b"half\nno newline")
    server.lines(3)
    server.p.send_signal(signal.SIGINT)
    code, out, _ = server.finish()
    assert code == 0
    assert out.decode().splitlines() == [
        f"[{me}] first line",
        f"[{me}] second half",
        f"[{me}] no newline",
    ]


def test_listen_quiet_on_a_datagram_endpoint(
    spawn: Callable[..., Proc], run: Callable[..., Any], runtime_dir: str
) -> None:
    server = spawn("listen", "unixgram:q", "-q")
    _wait_for(lambda: os.path.exists(os.path.join(runtime_dir, "q.dgram")))  # bound = ready
    for i in range(3):
        assert run("send", "unixgram:q", str(i)).returncode == 0
    assert server.lines(3) == ["0", "1", "2"]
    server.p.send_signal(signal.SIGTERM)
    code, _, err = server.finish()
    assert (code, err) == (0, b"")


def test_listen_survives_a_client_that_is_not_buzon(
    spawn: Callable[..., Proc], runtime_dir: str, run: Callable[..., Any]
) -> None:
    server = spawn("listen", "unix:strict")
    server.listening()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(runtime_dir, "strict.sock"))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert run("send", "unix:strict", "still here").returncode == 0
    assert server.lines(1)[0].endswith('"still here"')
    server.p.send_signal(signal.SIGTERM)
    assert server.finish()[0] == 0


def test_listen_drops_a_message_it_cannot_decode(
    spawn: Callable[..., Proc], run: Callable[..., Any], runtime_dir: str
) -> None:
    from buzon.protocol.frames import CodecId, Kind, encode_frame

    server = spawn("listen", "unixgram:picky")
    server.listening()
    bad = b"".join(encode_frame(Kind.DATA, CodecId.MSGPACK, b"\xc1"))  # 0xc1: never valid
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(bad, os.path.join(runtime_dir, "picky.dgram"))
    assert run("send", "unixgram:picky", "fine").returncode == 0
    assert server.lines(1) == ['[unixgram] "fine"']
    server.p.send_signal(signal.SIGTERM)
    code, _, err = server.finish()
    assert code == 0
    assert b"dropped a message" in err


# -- ls and clean ---------------------------------------------------------------------


def _age(path: str) -> None:
    old = time.time() - 60
    os.utime(path, (old, old), follow_symlinks=False)


@pytest.mark.fd_check
def test_ls_and_clean(runtime_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    stale_sock = os.path.join(runtime_dir, "stale.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(stale_sock)  # closed without unlinking: a crashed listener's leftover
    dead_fifo = os.path.join(runtime_dir, "dead.fifo")
    os.mkfifo(dead_fifo, 0o600)
    dead_client = os.path.join(runtime_dir, "c-4194305-abcdef.dgram")  # > any pid_max
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(dead_client)
    young_fifo = os.path.join(runtime_dir, "young.fifo")
    os.mkfifo(young_fifo, 0o600)  # dead but just made: maybe an endpoint being set up
    for path in (stale_sock, dead_fifo, dead_client):
        _age(path)
    with (
        buzon.listen("unix:live") as live_sock,
        buzon.listen("fifo:live") as live_fifo,
        buzon.listen("unixgram:live") as live_dgram,
    ):
        for path in (f"{runtime_dir}/live.sock", f"{runtime_dir}/live.fifo"):
            _age(path)
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[0] == f"runtime dir: {runtime_dir}"
        assert re.search(r"unix:live\s+unix\s+0600\s+listening", out)
        assert re.search(r"fifo:live\s+fifo\s+0600\s+reader", out)
        assert re.search(r"unixgram:live\s+unixgram\s+0600\s+bound", out)
        assert re.search(r"unix:stale\s+unix\s+\d+\s+dead", out)
        assert re.search(r"fifo:dead\s+fifo\s+0600\s+no reader", out)
        assert "client of pid 4194305, gone" in out

        assert cli.main(["clean", "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert sorted(line.split()[2] for line in out.splitlines()) == sorted(
            [stale_sock, dead_fifo, dead_client]
        )
        assert all(line.startswith("would remove") for line in out.splitlines())
        assert os.path.exists(stale_sock)

        assert cli.main(["clean"]) == 0
        out = capsys.readouterr().out
        assert len(out.splitlines()) == 3
        assert all(line.startswith("removed") for line in out.splitlines())
        assert sorted(os.listdir(runtime_dir)) == [
            "live.dgram",
            "live.fifo",
            "live.sock",
            "young.fifo",
        ]
        assert cli.main(["clean"]) == 0
        assert capsys.readouterr().out.startswith("nothing to clean")
        assert not live_sock.closed and not live_fifo.closed and not live_dgram.closed


def test_ls_lists_queues(queue_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with buzon.listen(queue_url):
        assert cli.main(["ls"]) == 0
    name = queue_url.removeprefix("mq:")
    assert re.search(
        rf"{re.escape(queue_url)}\s+mq\s+.*/buzon-{os.getuid()}-{name}", capsys.readouterr().out
    )


def test_ls_empty(runtime_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"runtime dir: {runtime_dir}"
    assert runtime_dir not in "".join(lines[1:])  # nothing of ours (queues are host-wide)


def test_ls_shows_queue_owners_and_clean_drops_orphan_locks(
    runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"lockq-{uuid.uuid4().hex[:8]}"
    with buzon.listen(f"mq:{name}"):
        assert cli.main(["ls"]) == 0
        assert re.search(rf"mq:{name}\s+mq-lock\s+0600\s+listener alive", capsys.readouterr().out)
    orphan = os.path.join(runtime_dir, "gone.mq.lock")  # its queue no longer exists
    with open(orphan, "w"):
        pass
    _age(orphan)
    assert cli.main(["ls"]) == 0
    assert re.search(r"mq:gone\s+mq-lock\s+\d+\s+no listener", capsys.readouterr().out)
    assert cli.main(["clean"]) == 0
    assert "lock of a queue that is gone" in capsys.readouterr().out
    assert not os.path.exists(orphan)


def test_ls_shows_capacity_pools(runtime_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A simplex capacity's token pools are listed with their endpoint and capacity,
    and clean removes them once their listener is gone (not before)."""
    with buzon.listen("fifo:pooled", capacity=2):
        assert cli.main(["ls"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"fifo:pooled\s+credits\s+0600\s+capacity=2 credits, listener alive", out)
        assert cli.main(["clean"]) == 0
        assert os.path.exists(os.path.join(runtime_dir, "pooled.fifo.cap2.credit"))
    assert not [f for f in os.listdir(runtime_dir) if f.startswith("pooled")]
