"""The sequence diagrams of docs/mailboxes.md and docs/rpc.md are drawn by running the
scenarios (buzon._docseq): they are deterministic, leave nothing behind, and a scenario
whose objects misbehave fails the generation instead of drawing something false.
(tests/test_docs.py checks that the pages hold what the scenarios draw today.)"""

from __future__ import annotations

import os
from typing import Any

import pytest

from buzon import _docseq, docgen
from buzon.rpc._completion import MemoryTable


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"buzon-{os.getuid()}-")}


def test_the_diagrams_are_deterministic_and_leave_nothing(runtime_dir: str) -> None:
    before = _shm()
    first = (_docseq.render_mailbox_sequences(), _docseq.render_rpc_sequences())
    second = (_docseq.render_mailbox_sequences(), _docseq.render_rpc_sequences())
    assert first == second
    assert os.listdir(runtime_dir) == []
    assert _shm() == before
    assert str(os.getpid()) not in "".join(first)  # no pid reaches a page


def test_a_broadcast_that_drops_nothing_fails_the_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the actors are forked after this: they count no overflow
    monkeypatch.setattr(
        "buzon._mailbox.Mailbox.statistics", lambda self: {"dropped": 0}, raising=True
    )
    with pytest.raises(_docseq.DocScenarioError, match="dropped"):
        _docseq._scenario_broadcast()
    with pytest.raises(docgen.SectionError, match="mailbox scenario misbehaved"):
        docgen._render_mailbox_sequences()


def test_an_exactly_once_server_that_runs_a_retry_again_fails_the_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def run_again(
        self: Any, key: Any, body: Any, call: Any, at: Any = None, transactional: bool = False
    ) -> Any:
        return call()  # no completion table: the retry runs the call a second time

    def run_plain_again(self: Any, *key: Any) -> Any:
        return key[5](*key[6:])  # the path of requests taken apart in C: the same

    monkeypatch.setattr(MemoryTable, "run", run_again)
    monkeypatch.setattr(MemoryTable, "run_plain", run_plain_again)
    with pytest.raises(_docseq.DocScenarioError, match="exactly_once"):
        _docseq._scenario_semantics("exactly_once")


def test_a_relay_that_loses_no_reply_fails_the_generation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_docseq, "_lose_next_reply", lambda relay: None)
    with pytest.raises(_docseq.DocScenarioError, match="reset 0 connections"):
        _docseq._scenario_semantics("at_least_once")
