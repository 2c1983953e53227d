"""buzon.names: registration owned by a process, gone at its death, race-safe, typed
errors on scribbled files; ``name:NAME`` wherever a URL goes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import buzon
from buzon import names
from buzon.errors import AddressError, EndpointInUse, NoSuchEndpoint, ProtocolError

_CHILD_REGISTERS = """
import sys, buzon
reg = buzon.names.register(sys.argv[1], "unix:calc", metadata={"v": 1})
print("ready", flush=True)
sys.stdin.read()
"""


def _owner(name: str) -> subprocess.Popen[str]:
    """A child process that registers ``name`` and lives until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD_REGISTERS, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            f.close()


def _gone_within(name: str, limit: float = 10.0) -> float:
    """Seconds until ``lookup(name)`` says NoSuchEndpoint (bounded generously)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        try:
            names.lookup(name)
        except NoSuchEndpoint:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"{name} still registered after {limit} s")


def test_register_lookup_list_remove() -> None:
    reg = names.register("calc", "unix:calc", metadata={"v": 1})
    rec = names.lookup("calc")
    assert (rec.address, rec.metadata, rec.pid) == ("unix:calc", {"v": 1}, os.getpid())
    assert [r.name for r in names.list()] == ["calc"]
    assert names.list(prefix="x") == []
    assert os.stat(rec.path).st_mode & 0o777 == 0o600
    reg.remove()
    reg.remove()  # idempotent
    with pytest.raises(NoSuchEndpoint):
        names.lookup("calc")
    assert names.list() == []


def test_a_live_name_is_not_replaced() -> None:
    with names.register("calc", "unix:calc"):
        with pytest.raises(EndpointInUse, match=str(os.getpid())):
            names.register("calc", "unix:other")
        assert names.lookup("calc").address == "unix:calc"
    names.register("calc", "unix:other").remove()  # free again


def test_owner_killed_with_sigkill_name_gone() -> None:
    proc = _owner("victim")
    try:
        assert names.lookup("victim").pid == proc.pid
        other = _owner("other")
    finally:
        _kill(proc)
    try:
        assert _gone_within("victim") < 10
        assert names.lookup("other").pid == other.pid  # the other owner's name stays
        assert not os.path.exists(os.path.join(names.names_dir(), "victim"))
        names.register("victim", "unix:new").remove()  # the name is free to take
    finally:
        _kill(other)


def test_another_process_cannot_take_a_live_name() -> None:
    proc = _owner("held")
    try:
        with pytest.raises(EndpointInUse, match=str(proc.pid)):
            names.register("held", "unix:mine")
    finally:
        _kill(proc)


_RACER = """
import sys, time, buzon
from buzon.errors import EndpointInUse
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    reg = buzon.names.register(sys.argv[1], "unix:x")
    print("won", flush=True)
    sys.stdin.read()
except EndpointInUse:
    print("lost", flush=True)
"""


def test_concurrent_registration_exactly_one_wins() -> None:
    for round_ in range(3):
        start = time.time() + 0.5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _RACER, f"race{round_}", str(start)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        try:
            results = [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]
            assert sorted(results) == ["lost"] * 5 + ["won"], results
            winner = procs[results.index("won")]
            assert names.lookup(f"race{round_}").pid == winner.pid
        finally:
            for p in procs:
                _kill(p)


def test_scribbled_registration_is_a_typed_error() -> None:
    reg = names.register("calc", "unix:calc")
    try:
        with open(reg.record.path, "wb") as f:  # another process of this user scribbles
            f.write(b"\x00garbage{")
        with pytest.raises(ProtocolError, match="scribbled"):
            names.lookup("calc")
        assert names.list() == []  # skipped, not a crash
        with pytest.raises(ProtocolError):
            buzon.connect("name:calc", timeout=1)
        rows = names.ls_rows()
        assert rows[0][0] == "name:calc" and "scribbled" in rows[0][3]
    finally:
        reg.remove()
    assert not os.path.exists(reg.record.path)


def test_dead_scribbled_file_is_absent() -> None:
    path = Path(names.names_dir()) / "junk"
    path.write_bytes(b"not json")
    with pytest.raises(NoSuchEndpoint):
        names.lookup("junk")  # nobody holds its lock: a dead owner's; removed
    assert not path.exists()


def test_reused_pid_does_not_keep_a_dead_name() -> None:
    """A record naming a live pid (ours: as if the dead owner's pid were reused) but
    whose lock nobody holds is dead."""
    path = Path(names.names_dir()) / "reused"
    body = {"name": "reused", "address": "unix:x", "pid": os.getpid(), "created": 0.0}
    path.write_text(json.dumps(body))
    with pytest.raises(NoSuchEndpoint):
        names.lookup("reused")
    assert not path.exists()
    names.register("reused", "unix:y").remove()


def test_bad_names_state_the_rule() -> None:
    for bad in ("a/b", "a\x00b", "x" * 65, ".hidden", ""):
        with pytest.raises(AddressError, match="1-64 characters"):
            names.register(bad, "unix:calc")
    with pytest.raises(AddressError):
        names.register("calc", "bogus:x")
    with pytest.raises(AddressError, match="another name"):
        names.register("calc", "name:other")
    with pytest.raises(AddressError, match="JSON"):
        names.register("calc", "unix:calc", metadata=object())
    with pytest.raises(AddressError, match="1-64"):
        buzon.connect("name:a/b")
    assert names.list() == []


def test_connect_and_listen_by_name() -> None:
    with buzon.listen("unix:calcsock", name="calc") as lst:
        assert names.lookup("calc").address == "unix:calcsock"
        got: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: got.append(buzon.connect("name:calc", timeout=10)))
        t.start()
        peer = lst.accept(timeout=10)
        t.join(timeout=10)
        ch = got[0]
        ch.send({"x": 1})
        assert peer.recv(timeout=10) == {"x": 1}
        ch.close()
        peer.close()
    with pytest.raises(NoSuchEndpoint):  # the name went with the listener
        names.lookup("calc")


def test_listen_on_a_name_url_and_tcp_port_zero() -> None:
    with buzon.listen("name:svc") as lst:
        assert names.lookup("svc").address == str(lst.address) == "unix:svc"
        with pytest.raises(EndpointInUse):
            buzon.listen("unix:other", name="svc")
    with buzon.listen("tcp://127.0.0.1:0", name="web") as lst:
        rec = names.lookup("web")
        assert rec.address == str(lst.address) and not rec.address.endswith(":0")
    assert names.list() == []


def test_a_name_whose_listener_died() -> None:
    """The owner lives but its listener is gone: connect fails as for the address."""
    reg = names.register("stale", "unix:nobody")
    try:
        with pytest.raises(NoSuchEndpoint):
            buzon.connect("name:stale", retry=False)
    finally:
        reg.remove()
    with pytest.raises(NoSuchEndpoint, match="stale"):
        buzon.connect("name:stale", retry=False)


def test_asyncio_connect_and_listen_by_name() -> None:
    async def main() -> None:
        lst = buzon.aio.listen("unix:acalc", name="acalc")
        try:
            ch, peer = await asyncio.gather(
                buzon.aio.connect("name:acalc", timeout=10), lst.accept(timeout=10)
            )
            await ch.send("hi")
            assert await peer.recv() == "hi"
            ch.close()
            peer.close()
        finally:
            lst.close()
        with pytest.raises(NoSuchEndpoint):
            names.lookup("acalc")

    asyncio.run(main())


def test_mailbox_by_name() -> None:
    box = buzon.mailbox("jobs-nm", capacity=4)
    try:
        with names.register("jobs", "mailbox:jobs-nm"):
            other = buzon.mailbox("name:jobs")
            box.send("job")
            assert other.recv(timeout=10) == "job"
            other.close()
        with pytest.raises(NoSuchEndpoint):
            buzon.mailbox("name:jobs", create=False)  # (create=None would make it)
        with names.register("notbox", "unix:calc"), pytest.raises(AddressError):
            buzon.mailbox("name:notbox")
    finally:
        box.remove()
        box.close()


def test_asyncio_mailbox_by_name() -> None:
    import asyncio

    from buzon import aio

    box = buzon.mailbox("jobs-anm", capacity=4)

    async def main() -> None:
        other = aio.mailbox("name:ajobs")
        try:
            box.send("job")
            assert await other.recv(timeout=10) == "job"
        finally:
            other.close()

    try:
        with names.register("ajobs", "mailbox:jobs-anm"):
            asyncio.run(main())
    finally:
        box.remove()
        box.close()


def test_server_by_name() -> None:
    server = buzon.Server("name:echo", lambda ch: ch.send(ch.recv()))
    runner = threading.Thread(target=server.serve_forever)
    runner.start()
    try:
        assert names.lookup("echo").address == "unix:echo"
        with buzon.connect("name:echo", timeout=10) as ch:
            ch.send(7)
            assert ch.recv(timeout=10) == 7
    finally:
        server.shutdown()
        runner.join(10)
    assert not runner.is_alive()
    with pytest.raises(NoSuchEndpoint):
        names.lookup("echo")


_OWNER_FORKS = """
import os, sys, time, buzon
reg = buzon.names.register("forked", "unix:x")
pid = os.fork()
if pid == 0:  # the child outlives its parent, the owner
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
sys.stdin.read()
"""


def test_a_forked_child_does_not_keep_its_parents_name() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER_FORKS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        assert names.lookup("forked").pid == proc.pid
        _kill(proc)  # the owner dies; its child lives on
        assert _gone_within("forked") < 10
    finally:
        _kill(proc)
        os.kill(child, signal.SIGKILL)
        for _ in range(1000):  # not our child: wait until it is gone
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.01)


def test_ls_and_clean() -> None:
    from buzon._forensics import clean, ls_rows
    from buzon._runtime import runtime_dir

    proc = _owner("dying")
    reg = names.register("alive", "unix:calc")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        rows = {r[0]: r for r in ls_rows(runtime_dir()) if r[1] == "name"}
        assert (
            rows["name:alive"][3].startswith("live") and str(os.getpid()) in rows["name:alive"][3]
        )
        assert rows["name:dying"][3].startswith("dead")
        assert rows["name:alive"][2] == "0600"
        removed = [r.path for r in clean(runtime_dir())]
        assert os.path.join(names.names_dir(), "dying") in removed
        assert names.lookup("alive").pid == os.getpid()
    finally:
        _kill(proc)
        reg.remove()


def test_cli_recv_and_send_by_name() -> None:
    env = os.environ.copy()
    recv = subprocess.Popen(
        [sys.executable, "-m", "buzon", "recv", "name:clin", "-n", "1", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:  # registered once it listens
            try:
                assert names.lookup("clin").address == "unix:clin"
                break
            except NoSuchEndpoint:
                assert time.monotonic() < deadline and recv.poll() is None
                time.sleep(0.02)
        sent = subprocess.run(
            [sys.executable, "-m", "buzon", "send", "name:clin", '{"hi": 1}'],
            capture_output=True,
            timeout=30,
            env=env,
        )
        assert sent.returncode == 0, sent.stderr
        out, err = recv.communicate(timeout=30)
        assert (recv.returncode, out) == (0, b'{"hi": 1}\n'), err
    finally:
        if recv.poll() is None:
            recv.kill()
        recv.wait(timeout=10)
        for f in (recv.stdout, recv.stderr):
            if f is not None:
                f.close()
    with pytest.raises(NoSuchEndpoint):
        names.lookup("clin")


def test_rpc_connect_by_name() -> None:
    from typing import Protocol

    class Calc(Protocol):
        def add(self, a: int, b: int) -> int: ...

    svc = buzon.rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    srv = buzon.rpc.Server("unix:rpcn", svc)
    runner = threading.Thread(target=srv.serve_forever)
    runner.start()
    try:
        with names.register("rpcn", "unix:rpcn"):
            calc = buzon.rpc.connect("name:rpcn", Calc, timeout=10)
            try:
                assert calc.add(1, 2) == 3
            finally:
                buzon.rpc.close(calc)
    finally:
        srv.shutdown()
        runner.join(10)


def test_name_addresses_are_refused_where_nothing_binds() -> None:
    from buzon._policy import prepare

    with pytest.raises(AddressError, match="name="):
        prepare("name:calc", listening=True)
    with pytest.raises(NoSuchEndpoint):
        prepare("name:calc", listening=False)


_OTHER_USER = """
import os, sys, buzon
import buzon.names, buzon._runtime  # imported first: the new user may not read the venv
from buzon.errors import NoSuchEndpoint, UnsafePath
os.setgid(65534)
os.setuid(65534)
try:
    buzon.names.lookup("mine")
    print("visible")
except (NoSuchEndpoint, UnsafePath, PermissionError) as exc:
    print(type(exc).__name__)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_another_users_names_are_invisible() -> None:
    with names.register("mine", "unix:mine"):
        env = os.environ.copy()
        # the other user pointed at our runtime dir: refused (not theirs, 0700)
        same = subprocess.run(
            [sys.executable, "-c", _OTHER_USER], capture_output=True, text=True, env=env, timeout=30
        )
        assert same.stdout.strip() in ("UnsafePath", "PermissionError"), same.stderr
        # and in their own runtime dir, the name does not exist
        home = tempfile.mkdtemp(prefix="bz-other-")
        try:
            os.chown(home, 65534, 65534)
            env["BUZON_RUNTIME_DIR"] = os.path.join(home, "rt")
            own = subprocess.run(
                [sys.executable, "-c", _OTHER_USER],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
            )
            assert own.stdout.strip() == "NoSuchEndpoint", own.stderr
        finally:
            shutil.rmtree(home)


def test_asyncio_server_by_name() -> None:
    async def echo(ch: buzon.aio.Channel) -> None:
        await ch.send(await ch.recv())

    async def main() -> None:
        server = buzon.aio.Server("name:aecho", echo)
        runner = asyncio.ensure_future(server.serve_forever())
        try:
            assert names.lookup("aecho").address == "unix:aecho"
            ch = await buzon.aio.connect("name:aecho", timeout=10)
            await ch.send(5)
            assert await ch.recv() == 5
            ch.close()
        finally:
            server.shutdown()
            await asyncio.wait_for(runner, 10)
        with pytest.raises(NoSuchEndpoint):
            names.lookup("aecho")

    asyncio.run(main())
