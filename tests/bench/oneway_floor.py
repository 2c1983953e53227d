"""A measuring script, not a test: unix 64 B one-way throughput (issue 9 (b)) of
``multiprocessing.Pipe``, of a buzon ``unix:`` channel (``send_bytes`` per message, the
default spin, as the bench's ``buzon/unix/oneway64`` row), and of the floor of one
framed send per message from Python: the child sends each 72-byte frame with the bare C
call (``protocol._stream.send_frame``) on the same kind of socket and the parent drains
them with large raw reads (the least either side can do). Each round runs the three
back to back, sender and receiver pinned to CPUs 1 and 0; each prints msg/s and the
ratios to mp.Pipe, so what the target asks (>= 2x) can be set against what one send
per message allows on this machine.

    python tests/bench/oneway_floor.py [ROUNDS] [MESSAGES]
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import buzon
from buzon.protocol._stream import send_frame

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
N = (int(sys.argv[2]) if len(sys.argv) > 2 else 200_000) // 64 * 64
MSG = b"Z" * 64
TMP = tempfile.mkdtemp(prefix="oneway-floor-")


def _run(kind: str) -> float:
    """Messages per second of one run of ``kind`` (the receiver's clock, from the
    first message to the last)."""
    if kind == "mp":
        rx, tx = multiprocessing.Pipe()
    else:
        lst = buzon.listen(f"unix:{TMP}/{kind}")
    pid = os.fork()
    if pid == 0:  # the sender
        code = 1
        try:
            os.sched_setaffinity(0, {1})
            if kind == "mp":
                send = tx.send_bytes
            else:
                ch = buzon.connect(str(lst.address), timeout=10)
                if kind == "floor":
                    fd = ch._core._stream.sock.fileno()  # type: ignore[attr-defined]

                    def send(data: bytes, _fd: int = fd) -> None:
                        send_frame(_fd, 0, data)  # a full buffer: EAGAIN, retried below

                    send = _retrying(send)
                else:
                    send = ch.send_bytes
            for _ in range(N // 64):
                for _ in range(64):
                    send(MSG)
            send(b"end")
            time.sleep(0.5)  # the receiver reads the end before the socket goes
            code = 0
        finally:
            os._exit(code)
    os.sched_setaffinity(0, {0})
    try:
        if kind == "mp":
            recv = rx.recv_bytes
            recv()
            t0 = time.perf_counter()
            for _ in range(N - 1):
                recv()
            t1 = time.perf_counter()
            recv()
        else:
            ch = lst.accept(timeout=10)
            if kind == "floor":
                sock = ch._core._stream.sock  # type: ignore[attr-defined]
                buf = bytearray(1 << 20)
                want = (N - 1) * 72  # after the first read, until the frames are in
                sock.recv_into(buf)
                t0 = t1 = time.perf_counter()
                got = 0
                while got < want:
                    n = sock.recv_into(buf)
                    if not n:  # the sender ended (a short count: reported as is)
                        break
                    got += n
                    t1 = time.perf_counter()
            else:
                recv = ch.recv_bytes
                recv()
                t0 = time.perf_counter()
                for _ in range(N - 1):
                    recv()
                t1 = time.perf_counter()
                recv()
            ch.close()
            lst.close()
    finally:
        os.waitpid(pid, 0)
    return (N - 1) / (t1 - t0)


def _retrying(send):  # type: ignore[no-untyped-def]
    def retry(data: bytes) -> None:
        while True:
            try:
                return send(data)  # type: ignore[no-any-return]
            except BlockingIOError:
                time.sleep(0)

    return retry


def main() -> None:
    try:
        for r in range(ROUNDS):
            rate = {kind: _run(kind) for kind in ("mp", "buzon", "floor")}
            print(
                f"round {r}: mp {rate['mp'] / 1e3:.0f}k, buzon {rate['buzon'] / 1e3:.0f}k "
                f"({rate['buzon'] / rate['mp']:.2f}x), floor {rate['floor'] / 1e3:.0f}k "
                f"({rate['floor'] / rate['mp']:.2f}x) msg/s"
            )
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
