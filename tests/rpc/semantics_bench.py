"""exactly_once vs at_most_once, calls/s of add(a, b) over unix:, two processes.

Usage: python tests/rpc/semantics_bench.py [SECONDS_PER_CASE] [ROUNDS] [THREADS] [OLD_SRC]

Cases, measured in alternation, each round every case once:
  at_most_once         memory table unused
  exactly_once/memory  the in-memory completion table
  exactly_once/sqlite  SqliteTable, synchronous=FULL (fsync per group commit)
  exactly_once/normal  SqliteTable, synchronous=NORMAL (survives a killed process)
and the SQLite cases again with THREADS clients at once (one connection each), where
group commit batches completions. OLD_SRC: a copy of another version's ``src``
directory; its SQLite servers run in the same rounds, as the cases marked "old".
Prints calls/s per round and the median ratios.
(A quick script until the rpcbench rows exist; not part of the test suite.)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from buzon import rpc

_SERVER = """
import sys
from buzon import rpc
svc = rpc.Service("calc")

@svc.method
def add(a: int, b: int) -> int:
    return a + b

url, table = sys.argv[1], sys.argv[2]
if table == "-":
    t = None
else:
    path, sync = table.split(",")
    t = rpc.SqliteTable(path, synchronous=sync)
srv = rpc.Server(url, svc, table=t)
print("ready", flush=True)
srv.serve_forever()
"""


def _server(url: str, table: str, src: str | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, url, table], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _rate(url: str, semantics: str, seconds: float, threads: int = 1) -> float:
    clients = [rpc.connect(url, timeout=60, semantics=semantics) for _ in range(threads)]
    counts = [0] * threads
    try:
        for c in clients:
            c.add(1, 2)  # warm
        end = time.perf_counter() + seconds

        def run(i: int) -> None:
            c = clients[i]
            n = 0
            while time.perf_counter() < end:
                for _ in range(50):
                    c.add(n, 1)
                n += 50
            counts[i] = n

        start = time.perf_counter()
        ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return sum(counts) / (time.perf_counter() - start)
    finally:
        for c in clients:
            c.close()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    old = sys.argv[4] if len(sys.argv) > 4 else None
    tmp = tempfile.mkdtemp(prefix="bzsem")
    os.environ["BUZON_RUNTIME_DIR"] = tmp
    procs = [
        _server("unix:mem", "-"),
        _server("unix:full", f"{tmp}/full.db,FULL"),
        _server("unix:normal", f"{tmp}/normal.db,NORMAL"),
    ]
    cases = [
        ("at_most_once", "unix:mem", "at_most_once", 1),
        ("exactly_once/memory", "unix:mem", "exactly_once", 1),
        ("exactly_once/sqlite", "unix:full", "exactly_once", 1),
        ("exactly_once/normal", "unix:normal", "exactly_once", 1),
        (f"exactly_once/sqlite x{threads}", "unix:full", "exactly_once", threads),
        (f"exactly_once/normal x{threads}", "unix:normal", "exactly_once", threads),
    ]
    if old is not None:
        procs.append(_server("unix:ofull", f"{tmp}/ofull.db,FULL", old))
        procs.append(_server("unix:onormal", f"{tmp}/onormal.db,NORMAL", old))
        cases += [
            ("old exactly_once/sqlite", "unix:ofull", "exactly_once", 1),
            ("old exactly_once/normal", "unix:onormal", "exactly_once", 1),
            (f"old exactly_once/sqlite x{threads}", "unix:ofull", "exactly_once", threads),
            (f"old exactly_once/normal x{threads}", "unix:onormal", "exactly_once", threads),
        ]
    results: dict[str, list[float]] = {name: [] for name, *_ in cases}
    try:
        for r in range(rounds):
            line = []
            for name, url, sem, n in cases:
                rate = _rate(url, sem, seconds, n)
                results[name].append(rate)
                line.append(f"{name} {rate:,.0f}")
            print(f"round {r + 1}: " + " | ".join(line), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait()
            assert p.stdout is not None
            p.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
    amo = results["at_most_once"]
    for name, rates in results.items():
        ratios = [x / y for x, y in zip(rates, amo, strict=True)]
        print(
            f"{name:28s} median {statistics.median(rates):>9,.0f} calls/s "
            f"(min {min(rates):,.0f} max {max(rates):,.0f}); vs at_most_once median "
            f"{statistics.median(ratios):.2f} (per round {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
