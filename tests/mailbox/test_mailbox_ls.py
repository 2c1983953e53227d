"""``buzon ls`` for mailboxes: last use and rates (``_mailbox.describe``), from marks the
hot path sets at most once a second (the wake-up FIFO's mtime and atime)."""

from __future__ import annotations

import os
import re
import time

import pytest

import buzon
from buzon import _mailbox
from buzon._mailbox import describe

T = 10.0


def test_a_send_and_a_take_mark_the_mailboxs_last_use() -> None:
    box = buzon.mailbox("jobs")
    wake = box.path + ".wake"
    try:
        os.utime(wake, (1, 1))  # long ago
        fresh = buzon.mailbox("jobs")  # an object that has not marked yet
        fresh.send(b"x")
        assert os.stat(wake).st_mtime > time.time() - 60
        assert os.stat(wake).st_atime == 1
        fresh.send({"y": 1})
        fresh.recv(T)
        assert os.stat(wake).st_atime > time.time() - 60
        fresh.close()
    finally:
        box.remove()


def test_ls_shows_last_use_counts_and_rates_of_a_busy_mailbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    box = buzon.mailbox("jobs", capacity=None)
    segment = box._ring.name
    try:
        idle = describe(segment, box.path)
        assert "last send never, last take never, 0 sent, 0 taken, 0 lost" in idle
        assert "sent/s" not in idle  # not used lately: no rate measured
        for i in range(3):
            box.send(i)
        box.recv(T)
        state = describe(segment, box.path)
        assert re.search(r"last send \d+ s ago, last take \d+ s ago, 3 sent, 1 taken", state)

        def traffic(_seconds: float) -> None:  # what happens while describe looks away
            for i in range(5):
                box.send(i)
            for _ in range(3):
                box.recv(T)

        monkeypatch.setattr(_mailbox.time, "sleep", traffic)
        rates = re.search(r"now (\d+) sent/s (\d+) taken/s", describe(segment, box.path))
        assert rates is not None and int(rates[1]) > 0 and int(rates[2]) > 0
    finally:
        box.remove()


@pytest.mark.parametrize("policy", ["broadcast", "round_robin"])
def test_ls_counts_what_a_fanned_mailbox_carries(policy: str) -> None:
    """broadcast/round_robin messages go to the receivers' own rings, not the
    mailbox's: ``ls`` sums those (a broadcast message once per receiver it reached),
    and keeps the counts of receivers gone (closed, or dead: its backlog lost)."""
    box = buzon.mailbox("fan", capacity=8, policy=policy)  # type: ignore[arg-type]
    segment = box._ring.name
    rx1, rx2 = buzon.mailbox("fan"), buzon.mailbox("fan")
    try:
        rx1._rx()
        rx2._rx()
        for i in range(4):
            box.send(i)
        copies = 8 if policy == "broadcast" else 4
        rx1.recv(T)
        state = describe(segment, box.path)
        assert f" {copies} sent, 1 taken, 0 lost" in state, state
        assert f"depth={copies - 1}," in state, state
        rx2.close()  # round_robin: its backlog goes to rx1; broadcast: lost with it
        state = describe(segment, box.path)
        if policy == "broadcast":
            assert " 8 sent, 1 taken, 4 lost" in state, state
        else:
            assert " 4 sent, 1 taken, 0 lost" in state, state
            assert "depth=3," in state, state
    finally:
        rx1.close()
        rx2.close()
        box.remove()
