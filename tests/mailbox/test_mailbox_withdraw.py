"""Rendezvous mailboxes (``capacity=0``): a send that raises delivered nothing.

The mailbox twin of issue 9's contract 4a (tests/test_rendezvous_withdraw.py): a send
that timed out or was cancelled WITHDRAWS its message. Exactly one of "a receiver took
it and ``send`` returns" / "``send`` raises and no receiver ever sees it" happens, so a
retry loop on ``Timeout`` delivers each message exactly once. Each test here failed on
60416ea: the timed-out message stayed in the mailbox and a later receive took it, so
the retry delivered it twice.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import threading
import time

import pytest
from _mb_helpers import fork as _fork

import buzon

T = 10.0
N = 300


def _receiver(name: str, seed: int, w: int, go: int) -> None:
    """A receiver that gives up often and naps (no receiver waits then), reporting
    what it took through pipe ``w``; it starts when ``go`` is readable."""
    rnd = random.Random(seed)
    got: list[int] = []
    with buzon.mailbox(name) as box:
        os.read(go, 1)
        while True:
            try:
                item = box.recv(timeout=rnd.choice((0.0001, 0.0003, 0.001)))
            except buzon.Timeout:
                time.sleep(rnd.choice((0.0, 0.0003, 0.001)))
                continue
            if item is None:
                break
            got.append(item)
            time.sleep(rnd.choice((0.0, 0.0, 0.0005, 0.0015)))  # busy: nobody waits
    os.write(w, pickle.dumps(got))
    os.close(w)


def _collect(pipes: list[tuple[int, int]], pids: list[int]) -> list[list[int]]:
    out = []
    for (r, _w), pid in zip(pipes, pids, strict=True):
        chunks = []
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
        os.close(r)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        out.append(pickle.loads(b"".join(chunks)))
    return out


@pytest.mark.parametrize("policy", ["any", "exclusive", "round_robin"])
def test_a_retry_loop_delivers_each_message_exactly_once_across_processes(policy: str) -> None:
    receivers = 1 if policy == "exclusive" else 2
    box = buzon.mailbox("rdv", capacity=0, policy=policy)  # type: ignore[arg-type]
    try:
        pipes = [os.pipe() for _ in range(receivers)]
        go_r, go_w = os.pipe()
        pids = []
        for k, (_r, w) in enumerate(pipes):
            pids.append(_fork(lambda k=k, w=w: _receiver("rdv", k, w, go_r)))  # type: ignore[misc]
            os.close(w)
        os.close(go_r)
        with pytest.raises(buzon.Timeout):  # nobody receives yet: withdrawn, still in the
            box.send(-1, timeout=0.001)  # ring, where a receiver must skip it
        os.write(go_w, b"g" * receivers)
        os.close(go_w)
        timeouts = 1
        end = time.monotonic() + 60
        for i in [*range(N), *([None] * receivers)]:
            while True:
                assert time.monotonic() < end, f"stuck at {i} (a receiver died?)"
                try:
                    box.send(i, timeout=0.001 if i is not None else T)
                    break
                except buzon.Timeout:
                    timeouts += 1
        histories = _collect(pipes, pids)
        seen = sorted(x for h in histories for x in h)
        assert seen == list(range(N)), f"duplicates or losses after {timeouts} timeouts"
        for h in histories:
            assert h == sorted(h)  # one sender: in order at each receiver
        assert timeouts > 0  # the test did exercise the withdrawal
    finally:
        box.remove()


def test_a_timed_out_send_is_never_received() -> None:
    box = buzon.mailbox("rdv", capacity=0)
    rx = buzon.mailbox("rdv")
    try:
        with pytest.raises(buzon.Timeout, match="withdrawn"):
            box.send("too late", timeout=0.01)
        with pytest.raises(buzon.Empty):
            rx.recv_nowait()  # the withdrawn one is skipped, not taken
        t = threading.Timer(0.05, lambda: box.send("next", timeout=T))
        t.start()
        assert rx.recv(T) == "next"
        t.join(T)
        assert rx.statistics()["withdrawn"] == 1
    finally:
        rx.close()
        box.remove()


def test_a_message_taken_before_the_timeout_makes_send_return() -> None:
    """The receiver took the message: send returns although its timeout passed while
    it checked (the receiver's acknowledgement decides, never the clock)."""
    box = buzon.mailbox("rdv", capacity=0)
    rx = buzon.mailbox("rdv")
    got: list[object] = []
    try:
        for i in range(50):
            t = threading.Thread(target=lambda: got.append(rx.recv(T)))
            t.start()
            try:
                box.send(i, timeout=0.0005)
                sent = True
            except buzon.Timeout:
                sent = False
            if not sent:
                box.send(i, timeout=T)  # the retry
            t.join(T)
        assert got == list(range(50))
    finally:
        rx.close()
        box.remove()


def test_asyncio_cancelled_and_timed_out_sends_deliver_exactly_once() -> None:
    async def main() -> list[int]:
        box = buzon.aio.mailbox("rdva", capacity=0)
        rx = buzon.aio.mailbox("rdva")
        got: list[int] = []
        rnd = random.Random(4)

        async def receive() -> None:
            while True:
                try:
                    item = await rx.recv(timeout=rnd.choice((0.0001, 0.0003, 0.001)))
                except buzon.Timeout:
                    await asyncio.sleep(rnd.choice((0.0, 0.0003, 0.001)))
                    continue
                if item is None:
                    return
                got.append(item)
                await asyncio.sleep(rnd.choice((0.0, 0.0, 0.0005, 0.0015)))

        task = asyncio.ensure_future(receive())
        try:
            for i in [*range(200), None]:
                while True:
                    try:
                        if i is not None and i % 2:  # cancelled by wait_for
                            await asyncio.wait_for(box.send(i), 0.001)
                        else:
                            await box.send(i, timeout=0.001 if i is not None else T)
                        break
                    except (TimeoutError, buzon.Timeout):
                        pass
            await asyncio.wait_for(task, 30)
        finally:
            rx.close()
            box.remove()
        return got

    assert asyncio.run(main()) == list(range(200))
