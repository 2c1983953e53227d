"""A measuring script, not a test: what one ``recv_bytes()`` of a ``spin=0`` channel
costs the receiving process on unix and tcp, against the bare ``socket.recv`` of the
same frame, with no second process: one process sends a 72-byte frame with a bare
``socket.send`` and receives it at once, in batches of 200, alternating ``raw`` (the
frame read by ``socket.recv``) and ``buzon`` (``recv_bytes()`` of the channel); the
data is always there, so no wait is measured, only the work around the system call.
Reports the lowest and the median ns per send+receive over the batches, and buzon's
cost over raw.

    PYTHONPATH=src python tests/bench/recv_cost.py [BATCHES]

The spin=0 round trip of ``buzon bench`` (issue 9 (a)) pays this twice per exchange.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import buzon

BATCH = 200


def _pair(kind: str) -> tuple[buzon.Channel, buzon.Channel]:
    url = f"unix:/tmp/buzon-recv-cost-{os.getpid()}" if kind == "unix" else "tcp://127.0.0.1:0"
    lst = buzon.listen(url, spin=0)
    box: list[buzon.Channel] = []
    t = threading.Thread(
        target=lambda: box.append(buzon.connect(str(lst.address), timeout=5, spin=0))
    )
    t.start()
    try:
        served = lst.accept(timeout=5)
    finally:
        t.join(5)
        lst.close()
    return box[0], served


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    frame = bytes([1, 1, 0, 0, 64, 0, 0, 0]) + b"Z" * 64
    out = []
    for kind in ("unix", "tcp"):
        w, r = _pair(kind)
        send = w._core._stream.sock.send  # type: ignore[attr-defined]
        raw_recv = r._core._stream.sock.recv  # type: ignore[attr-defined]
        send(frame)
        r.recv_bytes()  # the first receive notes the decoder's buffer (the Python way)
        per: dict[str, list[float]] = {"raw": [], "buzon": []}
        perf = time.perf_counter_ns
        for _ in range(batches):
            recv = r.recv_bytes
            t0 = perf()
            for _ in range(BATCH):
                send(frame)
                raw_recv(72)
            per["raw"].append((perf() - t0) / BATCH)
            t0 = perf()
            for _ in range(BATCH):
                send(frame)
                recv()
            per["buzon"].append((perf() - t0) / BATCH)
        low = {k: min(v) for k, v in per.items()}
        mid = {k: statistics.median(v) for k, v in per.items()}
        out.append(
            f"{kind}: raw {low['raw']:.0f}/{mid['raw']:.0f}  buzon {low['buzon']:.0f}/"
            f"{mid['buzon']:.0f}  (+{low['buzon'] - low['raw']:.0f} ns)"
        )
        w.close()
        r.close()
    print("ns per send+receive (lowest/median):", "   ".join(out))


if __name__ == "__main__":
    main()
