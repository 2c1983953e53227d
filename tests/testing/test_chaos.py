"""The chaos relay: every fault happens about as often as asked, and only then.

Datagram tests send 2000 numbered, checksummed datagrams through the relay on
loopback, paced (a batch at a time, waiting until the relay has read it) and received
into a deep socket queue (``dgram_socket``: the relay's delayed datagrams go out in
bursts) so that no kernel queue overflows and every loss seen is the relay's doing.
The receiver's view (missing, repeated, out-of-order, damaged, short datagrams) must
agree with the relay's counters, and the counters must be in a wide band around the
expectation.
Seeds are fixed, so a run is the same every time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import buzon
from buzon import docgen
from buzon.address import parse_address
from buzon.errors import AddressError, InsecureBind
from buzon.testing.chaos import (
    COUNTERS,
    PROFILES,
    Blackhole,
    ChaosRelay,
    Direction,
    DropRun,
    Faults,
    GilbertElliott,
    render_profiles,
)

pytestmark = pytest.mark.fd_check

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 10.0  # seconds: the bound on every wait; never reached when things work
N = 2000
BATCH = 40


# ------------------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], bool], what: str, timeout: float = LIMIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def payload(i: int) -> bytes:
    body = struct.pack("!I", i) + bytes((i + k) & 0xFF for k in range(60))
    return body + struct.pack("!I", zlib.crc32(body))


SIZE = len(payload(0))


def classify(data: bytes) -> int | str:
    """The index of an intact datagram, else 'short' or 'damaged'."""
    if len(data) != SIZE:
        return "short"
    if zlib.crc32(data[:-4]) != struct.unpack("!I", data[-4:])[0]:
        return "damaged"
    return int(struct.unpack("!I", data[:4])[0])


def dgram_socket(url: str) -> tuple[socket.socket, str, str | None]:
    """A bound datagram socket for ``url`` (port 0 or a runtime-dir name): (sock, url, file)."""
    addr = parse_address(url)
    if addr.scheme == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _deep(sock)
        sock.bind((addr.host, addr.port))
        return sock, f"udp://127.0.0.1:{sock.getsockname()[1]}", None
    path = addr.fs_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    return sock, url, path


def _deep(sock: socket.socket) -> None:
    """Room for all N datagrams in the collector's UDP queue: its thread may get no CPU
    for a while on a loaded machine (a 0.3 s stall lost all but 256 of a run with a
    delay fault: the kernel drops what a full UDP receiver cannot take, and the test
    then waited for datagrams that never came). A Unix datagram sender waits instead."""
    want = 8 << 20
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, want)  # past rmem_max
    except (OSError, AttributeError):  # not privileged: as much as rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)


class Collector:
    """Reads a datagram socket in a thread; optionally echoes each datagram to its sender."""

    def __init__(self, sock: socket.socket, *, echo: bool = False) -> None:
        self.sock = sock
        self.echo = echo
        self.got: list[bytes] = []
        self.senders: list[Any] = []
        self._stop = False
        sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data, sender = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:  # e.g. ECONNREFUSED on a connected UDP socket
                continue
            self.got.append(data)
            self.senders.append(sender)
            if self.echo:
                self.sock.sendto(data, sender)

    def stop(self) -> None:
        self._stop = True
        self._thread.join(LIMIT)


@pytest.fixture
def sink() -> Iterator[Callable[..., tuple[Collector, str]]]:
    """Make bound collectors: ``sink(url, echo=False)`` -> (collector, real url)."""
    made: list[tuple[Collector, str | None]] = []

    def make(url: str = "udp://127.0.0.1:0", echo: bool = False) -> tuple[Collector, str]:
        sock, real, path = dgram_socket(url)
        c = Collector(sock, echo=echo)
        made.append((c, path))
        return c, real

    yield make
    for c, path in made:
        c.stop()
        c.sock.close()
        if path is not None:
            os.unlink(path)


def client_for(relay: ChaosRelay, runtime_dir: str, name: str = "cl") -> socket.socket:
    addr = relay.address
    if addr.scheme == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((addr.host, addr.port))
        return sock
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(runtime_dir, f"{name}.client"))
    sock.connect(addr.fs_path())
    return sock


def blast(relay: ChaosRelay, sock: socket.socket, n: int = N, start: int = 0) -> None:
    """Send n datagrams a batch at a time, each batch once the relay read the last."""
    base = relay.statistics("forward")["received"]
    for i in range(start, start + n):
        sock.send(payload(i))
        sent = i - start + 1
        if sent % BATCH == 0 or sent == n:
            target = base + sent
            wait_for(lambda: relay.statistics("forward")["received"] >= target, "relay")  # noqa: B023


def settle(relay: ChaosRelay, direction: Direction, collector: Collector) -> dict[str, int]:
    """Wait until everything the relay decided to send in ``direction`` has arrived."""

    def expected(s: dict[str, int]) -> int:
        return s["received"] - s["dropped"] + s["duplicated"] - s["overflowed"]

    wait_for(
        lambda: relay.statistics(direction)["forwarded"] == expected(relay.statistics(direction)),
        "the relay to send everything",
    )
    stats = relay.statistics(direction)
    wait_for(lambda: len(collector.got) >= stats["forwarded"], "every datagram to arrive")
    return stats


def band(count: int, mean: float, low: float = 0.5, high: float = 1.5) -> bool:
    return low * mean <= count <= high * mean


def run_udp(
    faults: Faults, sink: Callable[..., tuple[Collector, str]], runtime_dir: str, seed: int = 1
) -> tuple[dict[str, int], list[int | str], ChaosRelay]:
    col, back = sink()
    with ChaosRelay("udp://127.0.0.1:0", back, profile=faults, seed=seed) as relay:
        client = client_for(relay, runtime_dir)
        try:
            blast(relay, client)
            stats = settle(relay, "forward", col)
        finally:
            client.close()
    return stats, [classify(d) for d in col.got], relay


def out_of_order(seen: list[int | str]) -> int:
    top, late = -1, 0
    for x in seen:
        if isinstance(x, int):
            if x < top:
                late += 1
            top = max(top, x)
    return late


def loss_runs(seen: list[int | str]) -> list[int]:
    """Lengths of the runs of consecutive missing indices."""
    got = {x for x in seen if isinstance(x, int)}
    runs, run = [], 0
    for i in range(N):
        if i in got:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


# ------------------------------------------------------------- the fault descriptions


def test_profiles_are_the_documented_six() -> None:
    assert list(PROFILES) == ["clean", "lan", "wifi", "hostile", "blackhole", "ack-loss"]
    assert PROFILES["clean"] == Faults()
    assert PROFILES["clean"].describe() == "nothing"
    assert 0.02 <= PROFILES["wifi"].expected_loss() <= 0.05
    assert 0.10 <= PROFILES["hostile"].expected_loss() <= 0.20
    assert PROFILES["blackhole"].expected_loss() == 1.0
    ack = PROFILES["ack-loss"]
    assert ack.for_direction("forward").expected_loss() == 0.0
    assert ack.for_direction("reply").drop == 0.3


def test_the_docs_table_is_generated_from_the_profiles() -> None:
    text = (ROOT / "docs" / "chaos.md").read_text(encoding="utf-8")
    fresh = docgen.render_page(text, {"chaos-profiles": render_profiles}, "chaos.md")
    assert fresh == text, "docs/chaos.md is stale: paste render_profiles() between its markers"
    for name in PROFILES:
        assert f"| `{name}` |" in render_profiles()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"drop": 1.5},
        {"duplicate": -0.1},
        {"delay": -1.0},
        {"jitter": float("inf")},
        {"slice": -1},
        {"corrupt_bits": 0},
        {"reorder_span": 0},
        {"reset_after": -5},
        {"jitter_distribution": "cauchy"},
        {"reply": Faults(reply=Faults())},
    ],
)
def test_bad_faults_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Faults(**kwargs)


def test_bad_burst_models_are_refused() -> None:
    with pytest.raises(ValueError):
        GilbertElliott(enter=0.0, leave=0.0)
    with pytest.raises(ValueError):
        DropRun(probability=0.1, length=0)
    with pytest.raises(ValueError):
        Blackhole(0.0, 2.0, period=1.0)


def test_directions_and_overrides() -> None:
    f = Faults(drop=0.1, reply=Faults(duplicate=0.2))
    assert f.for_direction("forward") == Faults(drop=0.1)
    assert f.for_direction("reply") == Faults(duplicate=0.2)
    both = f.with_(delay=0.01)
    assert both.for_direction("forward").delay == 0.01
    assert both.for_direction("reply").delay == 0.01
    assert Faults(drop=0.2).for_direction("reply") == Faults(drop=0.2)


def test_loss_models_mean_loss() -> None:
    assert GilbertElliott(enter=0.1, leave=0.3).mean_loss() == pytest.approx(0.25)
    assert DropRun(probability=0.5, length=1).mean_loss() == pytest.approx(0.5)
    assert Faults(drop=0.5, drop_run=DropRun(0.5, 1)).expected_loss() == pytest.approx(0.75)


def test_blackhole_windows() -> None:
    once = Blackhole(1.0, 0.5)
    assert [once.active(t) for t in (0.9, 1.0, 1.4, 1.5)] == [False, True, True, False]
    assert once.ends(1.2) == 1.5 and once.ends(3.0) == 3.0
    every = Blackhole(0.0, 0.2, period=1.0)
    assert [every.active(t) for t in (0.1, 0.5, 3.1, 3.3)] == [True, False, True, False]
    assert every.ends(3.1) == pytest.approx(3.2)
    assert Blackhole().active(1e9) and Blackhole().ends(5.0) == float("inf")


def test_unknown_profile_and_bad_address_pairs() -> None:
    with pytest.raises(ValueError, match="unknown chaos profile"):
        ChaosRelay("udp://127.0.0.1:0", "udp://127.0.0.1:9", profile="stormy")
    with pytest.raises(AddressError, match="both ends"):
        ChaosRelay("udp://127.0.0.1:0", "tcp://127.0.0.1:9")
    with pytest.raises(AddressError):
        ChaosRelay("fifo:x", "fifo:y")


def test_non_loopback_front_needs_insecure() -> None:
    relay = ChaosRelay("udp://0.0.0.0:0", "udp://127.0.0.1:9")
    with pytest.raises(InsecureBind):
        relay.start()
    relay.close()


def test_address_needs_start_and_start_is_once() -> None:
    relay = ChaosRelay("udp://127.0.0.1:0", "udp://127.0.0.1:9")
    with pytest.raises(RuntimeError):
        _ = relay.address
    with relay:
        assert relay.address.port != 0
        assert relay.running
        with pytest.raises(RuntimeError):
            relay.start()
    assert not relay.running
    relay.close()  # idempotent


# ------------------------------------------------------------ datagram fault rates


def test_clean_changes_nothing(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(PROFILES["clean"], sink, runtime_dir)
    assert seen == list(range(N))
    for key in ("dropped", "duplicated", "reordered", "corrupted", "truncated", "delayed"):
        assert stats[key] == 0, key
    assert stats["forwarded"] == N and stats["forwarded_bytes"] == N * SIZE


def test_drop(sink: Any, runtime_dir: str) -> None:
    stats, seen, relay = run_udp(Faults(drop=0.1), sink, runtime_dir)
    assert band(stats["dropped"], 0.1 * N)
    assert len(seen) == N - stats["dropped"] and len(set(seen)) == len(seen)
    assert all(isinstance(x, int) for x in seen)
    drops = [e for e in relay.events() if e.action == "drop"]
    assert {e.detail for e in drops} == {"random"}


def test_burst_loss_comes_in_runs(sink: Any, runtime_dir: str) -> None:
    model = GilbertElliott(enter=0.05, leave=0.25)
    stats, seen, _ = run_udp(Faults(burst=model), sink, runtime_dir)
    assert band(stats["dropped"], model.mean_loss() * N)
    assert len(seen) == N - stats["dropped"]
    runs = loss_runs(seen)
    assert sum(runs) / len(runs) > 2.0  # mean burst 1/leave = 4; independent loss: ~1.2


def test_drop_runs(sink: Any, runtime_dir: str) -> None:
    model = DropRun(probability=0.02, length=5)
    stats, seen, _ = run_udp(Faults(drop_run=model), sink, runtime_dir)
    assert band(stats["dropped"], model.mean_loss() * N)
    runs = loss_runs(seen)
    if N - 1 not in seen:
        runs.pop()  # the last run may be cut short by the end of the test
    assert runs and all(r % 5 == 0 for r in runs)  # whole runs of 5 (maybe back to back)


def test_duplicate(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(Faults(duplicate=0.1), sink, runtime_dir)
    assert band(stats["duplicated"], 0.1 * N)
    assert len(seen) == N + stats["duplicated"]
    assert len(seen) - len(set(seen)) == stats["duplicated"]
    assert set(seen) == set(range(N))


def test_reorder(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(Faults(reorder=0.1, reorder_span=3), sink, runtime_dir)
    assert band(stats["reordered"], 0.1 * N)
    assert stats["released"] == stats["reordered"]
    assert sorted(seen, key=lambda x: int(x)) == list(range(N))  # nothing lost or added
    assert 0.3 * stats["reordered"] <= out_of_order(seen) <= stats["reordered"]


def test_corrupt(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(Faults(corrupt=0.1, corrupt_bits=3), sink, runtime_dir)
    assert band(stats["corrupted"], 0.1 * N)
    assert len(seen) == N
    assert seen.count("damaged") == stats["corrupted"]  # CRC-32 catches every 3-bit error


def test_truncate(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(Faults(truncate=0.1), sink, runtime_dir)
    assert band(stats["truncated"], 0.1 * N)
    assert len(seen) == N
    assert seen.count("short") == stats["truncated"]


@pytest.mark.parametrize("dist", ["uniform", "normal"])
def test_delay_with_jitter_is_bounded(sink: Any, runtime_dir: str, dist: str) -> None:
    faults = Faults(delay=0.001, jitter=0.0008, jitter_distribution=dist)  # type: ignore
    stats, seen, relay = run_udp(faults, sink, runtime_dir)
    assert stats["delayed"] == N
    assert sorted(seen, key=lambda x: int(x)) == list(range(N))
    delays = [float(e.detail.split()[0]) for e in relay.events() if e.action == "delay"]
    assert len(delays) == N
    assert all(0.2 - 1e-9 <= d <= 1.8 + 1e-9 for d in delays)  # 1 ms ± 0.8 ms, in ms
    spread = max(delays) - min(delays)
    assert spread > 0.4  # it does jitter


def test_blackhole_profile_drops_everything(sink: Any, runtime_dir: str) -> None:
    stats, seen, relay = run_udp(PROFILES["blackhole"], sink, runtime_dir)
    assert stats["dropped"] == N and stats["forwarded"] == 0 and seen == []
    assert {e.detail for e in relay.events() if e.action == "drop"} == {"blackhole"}


def test_a_blackhole_in_the_future_drops_nothing(sink: Any, runtime_dir: str) -> None:
    stats, seen, _ = run_udp(Faults(blackhole=Blackhole(start=3600.0)), sink, runtime_dir)
    assert stats["dropped"] == 0 and len(seen) == N


def run_echo(
    faults: Faults, sink: Any, runtime_dir: str, n: int = N
) -> tuple[dict[str, int], dict[str, int], Collector, Collector]:
    server, back = sink(echo=True)
    with ChaosRelay("udp://127.0.0.1:0", back, profile=faults, seed=3) as relay:
        client = client_for(relay, runtime_dir)
        replies = Collector(client)
        try:
            blast(relay, client, n)
            fwd = settle(relay, "forward", server)
            wait_for(lambda: relay.statistics("reply")["received"] == fwd["forwarded"], "replies")
            rep = settle(relay, "reply", replies)
        finally:
            replies.stop()
            client.close()
    return fwd, rep, server, replies


def test_ack_loss_drops_replies_only(sink: Any, runtime_dir: str) -> None:
    fwd, rep, server, replies = run_echo(PROFILES["ack-loss"], sink, runtime_dir)
    assert fwd["dropped"] == 0 and len(server.got) == N
    assert band(rep["dropped"], 0.3 * N, 0.7, 1.3)
    assert len(replies.got) == N - rep["dropped"]


def test_cut_one_direction(sink: Any, runtime_dir: str) -> None:
    fwd, rep, server, replies = run_echo(Faults(reply=Faults(cut=True)), sink, runtime_dir, 200)
    assert len(server.got) == 200 and fwd["forwarded"] == 200
    assert rep["dropped"] == 200 and replies.got == []


# ------------------------------------------------------------------- determinism


def decisions(relay: ChaosRelay) -> list[tuple[Any, ...]]:
    """The event log without times and without the (port-bearing) open/close lines."""
    return [tuple(e)[1:] for e in relay.events() if e.action not in ("open", "close")]


def test_same_seed_same_log(sink: Any, runtime_dir: str) -> None:
    faults = PROFILES["hostile"].with_(delay=0.0, jitter=0.0)
    logs = []
    for seed in (11, 11, 12):
        col, back = sink()
        with ChaosRelay("udp://127.0.0.1:0", back, profile=faults, seed=seed) as relay:
            client = client_for(relay, runtime_dir)
            try:
                blast(relay, client, 500)
                settle(relay, "forward", col)
            finally:
                client.close()
        logs.append(decisions(relay))
    assert len(logs[0]) > 1000
    actions = {d[1] for d in logs[0]}
    assert {"drop", "duplicate", "reorder", "corrupt", "truncate", "release"} <= actions
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]


def test_log_file_holds_the_run(sink: Any, runtime_dir: str, tmp_path: Path) -> None:
    col, back = sink()
    log = tmp_path / "chaos.jsonl"
    with ChaosRelay("udp://127.0.0.1:0", back, profile="hostile", seed=5, log=log) as relay:
        client = client_for(relay, runtime_dir)
        try:
            blast(relay, client, 100)
            settle(relay, "forward", col)
        finally:
            client.close()
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    header = lines[0]["relay"]
    assert header["seed"] == 5 and header["profile"] == "hostile"
    assert header["faults"]["drop"] == 0.1
    events = [tuple(d.values()) for d in lines[1:]]
    assert events == [tuple(e) for e in relay.events()]
    assert set(relay.statistics()) == {*COUNTERS.values(), "forwarded_bytes"}
    assert relay.summary().startswith("received=")


# ---------------------------------------------------------- datagram reply routing


@pytest.mark.parametrize("front", ["udp://127.0.0.1:0", "unixgram:front"])
def test_replies_find_their_client(sink: Any, runtime_dir: str, front: str) -> None:
    back_url = "udp://127.0.0.1:0" if front.startswith("udp") else "unixgram:back"
    _, back = sink(back_url, echo=True)
    with ChaosRelay(front, back, seed=1) as relay:
        clients = [client_for(relay, runtime_dir, name) for name in ("a", "b")]
        try:
            for i in range(20):
                for name, c in zip("ab", clients, strict=True):
                    c.send(f"{name}{i}".encode())
            for name, c in zip("ab", clients, strict=True):
                c.settimeout(LIMIT)
                got = [c.recv(100).decode() for _ in range(20)]
                assert got == [f"{name}{i}" for i in range(20)]
            assert relay.statistics()["opened"] == 2
        finally:
            for c in clients:
                c.close()  # (their files go with the runtime dir)
    leftovers = sorted(os.listdir(runtime_dir))
    assert not [f for f in leftovers if f.startswith("c-") or f == "front.dgram"], leftovers


def test_least_recently_used_flow_is_evicted(sink: Any, runtime_dir: str) -> None:
    _, back = sink()
    with ChaosRelay("udp://127.0.0.1:0", back, max_flows=2) as relay:
        clients = [client_for(relay, runtime_dir) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.send(payload(i))
                n = i + 1
                wait_for(lambda: relay.statistics()["received"] == n, "the relay")  # noqa: B023
            s = relay.statistics()
            assert s["opened"] == 3 and s["closed"] == 1
        finally:
            for c in clients:
                c.close()
    assert [e.detail for e in relay.events() if e.action == "close"] == [
        "evicted: too many clients"
    ]


# ------------------------------------------------------------------------ streams

STREAMS = [
    pytest.param("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", id="tcp"),
    pytest.param("unix:front", "unix:back", id="unix"),
]


class StreamServer:
    """A raw stream listener that serves ONE connection with ``handle`` in a thread."""

    def __init__(self, url: str, handle: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        addr = parse_address(url)
        self.path: str | None = None
        if addr.scheme == "tcp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.bind(("127.0.0.1", 0))
            self.url = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            self.path = addr.fs_path()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(self.path)
            self.url = url
        self.sock.listen(4)
        self.sock.settimeout(LIMIT)
        self.handle = handle
        self.result: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as exc:
            self.result["error"] = exc
            return
        with conn:
            conn.settimeout(LIMIT)
            try:
                self.handle(conn, self.result)
            except Exception as exc:
                self.result["error"] = exc

    def join(self) -> dict[str, Any]:
        self.thread.join(LIMIT)
        assert not self.thread.is_alive(), "the test server did not finish"
        return self.result

    def close(self) -> None:
        self.sock.close()
        if self.path is not None:
            os.unlink(self.path)


@pytest.fixture
def stream_server() -> Iterator[Callable[..., StreamServer]]:
    made: list[StreamServer] = []

    def make(url: str, handle: Callable[[socket.socket, dict[str, Any]], None]) -> StreamServer:
        made.append(StreamServer(url, handle))
        return made[-1]

    yield make
    for s in made:
        s.join()
        s.close()


def connect_stream(relay: ChaosRelay) -> socket.socket:
    addr = relay.address
    if addr.scheme == "tcp":
        sock = socket.create_connection((addr.host, addr.port), timeout=LIMIT)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(LIMIT)
        sock.connect(addr.fs_path())
    return sock


def read_all(sock: socket.socket, result: dict[str, Any] | None = None) -> bytes:
    """Read to the end; ``result['end']`` says how it ended: 'eof' or 'reset'."""
    chunks = []
    end = "eof"
    try:
        while d := sock.recv(65536):
            chunks.append(d)
    except ConnectionResetError:
        end = "reset"
    if result is not None:
        result["end"] = end
        result["reads"] = len(chunks)
    return b"".join(chunks)


def echo_all(conn: socket.socket, result: dict[str, Any]) -> None:
    result["data"] = data = read_all(conn, result)
    conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def take_all(conn: socket.socket, result: dict[str, Any]) -> None:
    result["data"] = read_all(conn, result)


def round_trip(relay: ChaosRelay, data: bytes, pieces: int = 1) -> bytes:
    client = connect_stream(relay)
    with client:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            client.sendall(data[i : i + step])
        client.shutdown(socket.SHUT_WR)
        return read_all(client)


@pytest.mark.parametrize(("front", "back"), STREAMS)
def test_slice_into_tiny_writes(stream_server: Any, front: str, back: str) -> None:
    data = os.urandom(20000)
    srv = stream_server(back, echo_all)
    with ChaosRelay(front, srv.url, profile=Faults(slice=7), seed=2) as relay:
        assert round_trip(relay, data) == data
        result = srv.join()
        wait_for(lambda: relay.statistics()["closed"] == 1, "the connection to end")
    assert result["data"] == data and result["reads"] > 1
    for direction in ("forward", "reply"):
        writes = [e for e in relay.events() if e.action == "forward" and e.direction == direction]
        assert all(1 <= e.size <= 7 and e.detail == "slice" for e in writes)
        assert len(writes) >= len(data) / 5  # pieces of 1..7 bytes average 4
        assert sum(e.size for e in writes) == len(data)


def test_slice_with_gaps_and_delay_keeps_the_bytes(stream_server: Any) -> None:
    data = os.urandom(600)
    faults = Faults(slice=5, slice_gap=0.0005, delay=0.001, jitter=0.001)
    srv = stream_server("tcp://127.0.0.1:0", echo_all)
    with ChaosRelay("tcp://127.0.0.1:0", srv.url, profile=faults, seed=4) as relay:
        assert round_trip(relay, data, pieces=30) == data
        assert srv.join()["data"] == data
    assert relay.statistics()["delayed"] >= 2


@pytest.mark.parametrize(("front", "back"), STREAMS)
def test_reset_after_n_bytes(stream_server: Any, front: str, back: str) -> None:
    data = os.urandom(5000)
    srv = stream_server(back, take_all)
    with ChaosRelay(front, srv.url, profile=Faults(reset_after=1000), seed=1) as relay:
        with connect_stream(relay) as client:
            client.sendall(data)
            with pytest.raises(ConnectionResetError):
                client.recv(100)
        result = srv.join()
    assert result["data"] == data[:1000]
    # TCP resets the back end too; a Unix socket only sees its end of stream
    assert result["end"] == ("reset" if front.startswith("tcp") else "eof")
    assert relay.statistics("forward")["resets"] == 1
    assert [e.detail for e in relay.events() if e.action == "reset"] == ["after 1000 bytes"]


@pytest.mark.parametrize(("front", "back"), STREAMS)
def test_reset_with_probability(stream_server: Any, front: str, back: str) -> None:
    srv = stream_server(back, take_all)
    with ChaosRelay(front, srv.url, profile=Faults(reset=1.0), seed=1) as relay:
        with connect_stream(relay) as client:
            client.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                client.recv(100)
        result = srv.join()
    assert result["data"] == b""
    assert relay.statistics()["resets"] == 1 and relay.statistics()["forwarded"] == 0


def test_stream_corruption_flips_bits(stream_server: Any) -> None:
    data = bytes(3000)
    srv = stream_server("tcp://127.0.0.1:0", take_all)
    with ChaosRelay("tcp://127.0.0.1:0", srv.url, profile=Faults(corrupt=1.0), seed=9) as relay:
        with connect_stream(relay) as client:
            for i in range(0, len(data), 1000):
                client.sendall(data[i : i + 1000])
            client.shutdown(socket.SHUT_WR)
            assert client.recv(10) == b""
        got = srv.join()["data"]
    assert len(got) == len(data)
    flipped = sum(bin(b).count("1") for b in got)
    assert flipped == relay.statistics("forward")["corrupted"] >= 1


def test_stream_blackhole_stalls(stream_server: Any) -> None:
    srv = stream_server("tcp://127.0.0.1:0", take_all)
    with (
        ChaosRelay("tcp://127.0.0.1:0", srv.url, profile="blackhole", seed=1) as relay,
        connect_stream(relay) as client,
    ):
        client.sendall(b"into the void")
        wait_for(lambda: relay.statistics()["stalled"] == 1, "the stall")
    assert srv.join()["data"] == b""  # the relay closed with the bytes still held
    assert relay.statistics()["forwarded"] == 0


def test_stream_cut_one_direction(stream_server: Any) -> None:
    def answer(conn: socket.socket, result: dict[str, Any]) -> None:
        result["data"] = read_all(conn)
        conn.sendall(b"pong")

    srv = stream_server("tcp://127.0.0.1:0", answer)
    with ChaosRelay("tcp://127.0.0.1:0", srv.url, profile=Faults(reply=Faults())) as r0:
        assert round_trip(r0, b"ping") == b"pong"  # the control
    assert srv.join()["data"] == b"ping"
    srv = stream_server("tcp://127.0.0.1:0", answer)
    faults = Faults(cut=True, reply=Faults())
    with ChaosRelay("tcp://127.0.0.1:0", srv.url, profile=faults) as relay:
        assert round_trip(relay, b"ping") == b"pong"  # the end of stream still passes
    assert srv.join()["data"] == b""
    assert relay.statistics("forward")["dropped"] == 1


def test_unreachable_back_end_closes_the_client(runtime_dir: str) -> None:
    with ChaosRelay("unix:front", "unix:nobody") as relay:
        with connect_stream(relay) as client:
            assert client.recv(10) == b""  # nothing unread at the relay: end of stream
        wait_for(lambda: relay.statistics()["errors"] == 1, "the error")
    assert "connect unix:nobody" in next(e.detail for e in relay.events() if e.action == "error")


# ------------------------------------------------------------ buzon through the relay

ALL = [
    pytest.param("udp://127.0.0.1:0", "udp://127.0.0.1:0", id="udp"),
    pytest.param("unixgram:front", "unixgram:back", id="unixgram"),
    *STREAMS,
]


@pytest.mark.parametrize(("front", "back"), ALL)
def test_buzon_channels_work_through_a_clean_relay(runtime_dir: str, front: str, back: str) -> None:
    lst = buzon.listen(back)
    try:
        with ChaosRelay(front, lst.address, profile="clean", seed=1) as relay:
            box: list[buzon.Channel] = []
            t = threading.Thread(target=lambda: box.append(lst.accept(timeout=LIMIT)))
            t.start()
            with buzon.connect(relay.address, timeout=LIMIT) as ch:
                t.join(LIMIT)
                with box[0] as srv:
                    for i in range(50):
                        ch.send({"i": i, "blob": b"x" * i})
                        assert srv.recv(timeout=LIMIT) == {"i": i, "blob": b"x" * i}
                        srv.send(i * 2)
                        assert ch.recv(timeout=LIMIT) == i * 2
            s = relay.statistics()
    finally:
        lst.close()
    assert s["dropped"] == s["corrupted"] == s["resets"] == 0
    assert sorted(os.listdir(runtime_dir)) == [], "the relay left files behind"


# ------------------------------------------------------------------------- the CLI


def test_cli_help_and_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    from buzon import cli

    assert cli.main(["chaos", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: buzon chaos") and "ack-loss" in out
    bad = ["chaos", "udp://127.0.0.1:0", "udp://127.0.0.1:9", "--drop", "2"]
    assert cli.main(bad) == cli.EXIT_USAGE
    assert cli.main(["chaos", "udp://127.0.0.1:0", "udp://127.0.0.1:9", "--profile", "x"]) == 2
    capsys.readouterr()


def read_line(proc: subprocess.Popen[bytes], timeout: float = LIMIT) -> str:
    import selectors

    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line from the relay; so far {line!r}")
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"the relay exited; so far {line!r}")
            line += chunk
    return line.decode()


def test_cli_relays_and_exits_cleanly_on_sigterm(
    sink: Any, runtime_dir: str, tmp_path: Path
) -> None:
    col, back = sink("unixgram:sink")
    log = tmp_path / "run.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), BUZON_RUNTIME_DIR=runtime_dir)
    argv = [sys.executable, "-W", "error", "-m", "buzon", "chaos", "unixgram:front", back]
    argv += ["--profile", "lan", "--drop", "0", "--seed", "5", "--log", str(log)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = read_line(proc)
        assert re.fullmatch(
            r"buzon: relaying unixgram:front -> unixgram:sink \(profile lan, seed 5\)\n", line
        )
        client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with client:
            client.bind(os.path.join(runtime_dir, "cli.client"))
            client.connect(parse_address("unixgram:front").fs_path())
            for i in range(20):
                client.send(payload(i))
                n = i + 1
                wait_for(lambda: len(col.got) == n, "the datagram")  # noqa: B023
        assert any(f.startswith("c-") for f in os.listdir(runtime_dir))  # its upstream file
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().startswith("chaos: received=20 forwarded=20 dropped=0 ")
    assert out.decode().count("\n") == 1 and err == b""
    assert [classify(d) for d in col.got] == list(range(20))
    lines = log.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["relay"]["seed"] == 5
    assert sum(json.loads(x)["action"] == "delay" for x in lines[1:]) == 20
    left = sorted(os.listdir(runtime_dir))
    assert left == ["cli.client", "sink.dgram"], left
