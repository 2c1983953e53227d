"""A measuring script, not a test: what one small ``send_bytes`` / ``send_bytes_async``
costs the sending process, on pipe, unix and tcp, with no second process to share the
CPU with: one process writes batches of 100 messages of 64 B and then drains them raw
from the other end (so the kernel buffer never fills), and reports the median ns per
call over the batches. Comparing two checkouts: run it alternately from each.

    PYTHONPATH=src python tests/bench/send_cost.py [BATCHES]

The one-way rows of ``buzon bench`` (issue 9 (b), (f)) are bounded by this cost when
the receiver keeps up (the receiver's own cost per message is lower on sockets).

Two floors are measured in the same batches: ``raw``, the same 72-byte frame written by
the bare builtin a careful Python programmer would call (``os.write`` on the pipe,
``socket.send``), and ``c``, the frame written by one C call that does nothing else
(``protocol._stream.write_frame``/``send_frame``): what is left of ``plain`` over ``c``
is the channel's own work per send (its checks, the write lock, the counts).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable

import buzon
from buzon.protocol._stream import send_frame, write_frame

BATCH = 100


def _pair(kind: str) -> tuple[buzon.Channel, buzon.Channel]:
    if kind == "pipe":
        return buzon.pipe()
    url = f"unix:/tmp/buzon-send-cost-{os.getpid()}" if kind == "unix" else "tcp://127.0.0.1:0"
    lst = buzon.listen(url)
    box: list[buzon.Channel] = []
    t = threading.Thread(target=lambda: box.append(buzon.connect(str(lst.address), timeout=5)))
    t.start()
    try:
        served = lst.accept(timeout=5)
    finally:
        t.join(5)
        lst.close()
    return box[0], served


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    msg = b"Z" * 64
    frame = bytes([1, 1, 0, 0, len(msg), 0, 0, 0]) + msg  # the plain DATA frame of msg
    out = []
    for kind in ("pipe", "unix", "tcp"):
        w, r = _pair(kind)
        stream = w._core._stream  # type: ignore[attr-defined]
        rfd = r._core._stream.read_fileno()  # type: ignore[attr-defined]
        os.set_blocking(rfd, False)
        sink = bytearray(1 << 20)
        raw: Callable[[bytes], object]
        c: Callable[[bytes], object]
        if kind == "pipe":
            wfd = stream.write_fileno()
            raw = functools.partial(os.write, wfd)
            c = functools.partial(write_frame, wfd, 0)
        else:
            raw = stream.sock.send
            c = functools.partial(send_frame, stream.sock.fileno(), 0)
        cases = (
            ("raw", raw, frame),
            ("c", c, msg),
            ("plain", w.send_bytes, msg),
            ("receipts", w.send_bytes_async, msg),
        )
        per: dict[str, list[float]] = {name: [] for name, _, _ in cases}
        perf = time.perf_counter_ns
        for _ in range(batches):
            for name, send, data in cases:  # interleaved: a noisy machine hits all alike
                t0 = perf()
                for _ in range(BATCH):
                    send(data)
                per[name].append((perf() - t0) / BATCH)
                left = (len(msg) + 8) * BATCH
                while left > 0:
                    try:
                        left -= os.readv(rfd, [sink])
                    except BlockingIOError:
                        pass
        for name, values in per.items():
            values.sort()
            out.append(f"{kind}/{name} {values[len(values) // 2]:.0f}")
        w.close()
        r.close()
    print("ns per call (median):", "  ".join(out))


if __name__ == "__main__":
    main()
