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
