"""The segment layer (buzon.shm) and ``buzon ls`` / ``buzon clean`` on segments."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator

import pytest

from buzon import _core, cli, shm
from buzon.errors import NoSuchEndpoint, ProtocolError

T = 10.0


@pytest.fixture
def ring() -> Iterator[_core.Ring]:
    r = shm.create_ring(1 << 16, label="shm:test a>b")
    yield r
    r.close()
    shm.remove_segment(r.name)


def _names() -> set[str]:
    return {s.name for s in shm.list_segments()}


def test_names_are_private_and_unguessable(ring: _core.Ring) -> None:
    bare = ring.name.lstrip("/")
    assert bare.startswith(f"buzon-{os.getuid()}-") and len(bare.split("-")[-1]) == 32
    assert shm.segment_exists(ring.name)
    with pytest.raises(ProtocolError):
        shm.attach_ring("/not-buzon")
    with pytest.raises(NoSuchEndpoint):
        shm.attach_ring(shm.new_segment_name())


def test_list_shows_owner_liveness_and_fill(ring: _core.Ring) -> None:
    ring.send(b"x" * 8000)
    (seg,) = [s for s in shm.list_segments() if s.name == ring.name.lstrip("/")]
    assert seg.kind == "ring" and seg.alive and seg.label == "shm:test a>b"
    assert seg.owner_pid == os.getpid() and seg.pids == (os.getpid(),)
    assert 0.1 < seg.fill < 0.2


def _orphan() -> str:
    """A ring whose only participant (a child) died without removing it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        ring = shm.create_ring(1 << 16, label="orphan")
        os.write(w, ring.name.encode())
        os.kill(os.getpid(), signal.SIGKILL)
    os.close(w)
    name = os.read(r, 200).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return name.lstrip("/")


def test_clean_removes_only_dead_segments(ring: _core.Ring) -> None:
    dead = _orphan()
    segs = {s.name: s for s in shm.list_segments()}
    assert not segs[dead].alive and segs[ring.name.lstrip("/")].alive
    assert shm.clean_segments(grace=3600) == []  # too young: maybe still being created
    dry = shm.clean_segments(grace=0, dry_run=True)
    assert [s.name for s in dry] == [dead] and dead in _names()
    assert [s.name for s in shm.clean_segments(grace=0)] == [dead]
    assert dead not in _names() and ring.name.lstrip("/") in _names()


def test_clean_never_removes_a_segment_a_live_process_holds() -> None:
    """The creator died, but another process is still attached: in use, kept."""
    dead = _orphan()
    holder = shm.attach_ring(dead)
    try:
        assert shm.clean_segments(grace=0) == []
        assert dead in _names()
        holder.send(b"still works")
        assert holder.recv(timeout=T) == b"still works"
    finally:
        holder.close()
    assert [s.name for s in shm.clean_segments(grace=0)] == [dead]


def test_unknown_segment_is_listed_and_cleaned_only_when_unheld() -> None:
    name = shm.new_segment_name()
    fd = os.open(f"{shm.SHM_DIR}/{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _core.hold(fd)
        (seg,) = [s for s in shm.list_segments() if s.name == name]
        assert seg.kind == "unknown" and seg.alive
        assert shm.clean_segments(grace=0) == []
    finally:
        os.close(fd)
    assert [s.name for s in shm.clean_segments(grace=0)] == [name]


def test_cli_ls_and_clean(ring: _core.Ring, capsys: pytest.CaptureFixture[str]) -> None:
    dead = _orphan()
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "shm:test a>b" in out and f"live (pid {os.getpid()}" in out
    assert dead in out and "dead (created by pid" in out
    os.utime(f"{shm.SHM_DIR}/{dead}", (1, 1))  # older than the 2-second grace
    assert cli.main(["clean"]) == 0
    out = capsys.readouterr().out
    assert f"removed {shm.SHM_DIR}/{dead}" in out and ring.name.lstrip("/") not in out
    assert dead not in _names()


def test_ls_shows_shm_listeners_blocks_and_buffers(capsys: pytest.CaptureFixture[str]) -> None:
    import buzon

    with buzon.listen("shm:svc"), buzon.shared_value("v", int) as v:
        buf = buzon.BoundedBuffer("q", slots=2, item_size=8)
        try:
            buf.put(b"1")
            assert cli.main(["ls"]) == 0
            out = capsys.readouterr().out
            assert "shm:svc" in out and "listening" in out
            assert "shm-block" in out and "capacity=2 raw item_size=8 depth=1" in out
            kinds = {s.kind for s in shm.list_segments()}
            assert kinds == {"block", "ring"}
        finally:
            buf.remove()
            buf.close()
            v.remove()


def test_ls_shows_the_unnamed_rings_of_live_channels_and_the_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A shm: channel's rings have no name once both ends attached; ls still finds them
    (through /proc/PID/fd), with their label and fill, and clean leaves them alone."""
    import threading

    import buzon

    with buzon.listen("shm:live") as lst, buzon.shared_array("grid", (2, 2), "uint8") as arr:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=T)))
        t.start()
        a = buzon.connect("shm:live", timeout=T)
        t.join(T)
        try:
            for _ in range(50):
                a.send_bytes(b"x" * 1000)
            unnamed = {s.label: s for s in shm.list_unnamed()}
            assert set(unnamed) >= {"shm:live c>s", "shm:live s>c"}
            assert unnamed["shm:live c>s"].used > 50_000 > unnamed["shm:live s>c"].used
            assert os.getpid() in unnamed["shm:live c>s"].pids
            assert cli.main(["ls"]) == 0
            out = capsys.readouterr().out
            assert "shm:live c>s" in out and "no name in /dev/shm" in out
            assert re.search(rf"array:grid +shm-name +0600 +names {arr.segment_name} ", out)
            assert cli.main(["clean"]) == 0
            assert "shm:live" not in capsys.readouterr().out
            assert box[0].recv_bytes(timeout=T) == b"x" * 1000  # untouched
        finally:
            a.close()
            box[0].close()
            arr.remove()
    assert not [s for s in shm.list_unnamed() if s.label.startswith("shm:live")]


def test_clean_removes_names_whose_segment_is_gone(
    runtime_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import buzon

    kept = buzon.shared_value("kept", int)
    gone = buzon.shared_value("gone", int)
    try:
        shm.remove_segment(gone.segment_name)  # as `buzon clean` does once nobody is left
        for name in ("kept.value", "gone.value"):
            os.utime(os.path.join(runtime_dir, name), (1, 1))
        assert cli.main(["clean"]) == 0
        out = capsys.readouterr().out
        assert "gone.value (names a shared-memory segment that is gone)" in out
        assert sorted(os.listdir(runtime_dir)) == ["kept.value"]
    finally:
        gone.close()
        kept.remove()
        kept.close()
