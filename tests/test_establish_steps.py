"""Establishment speaks the engine's vocabulary: connect and the handshake yield
:class:`buzon._engine.Step` s, which the drivers run with their step runners (on
f43dbb5 they yielded tuples of their own, run by loops of their own)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import buzon
from buzon import _engine
from buzon._channel import ChannelCore
from buzon._establish import connect_steps, establish_steps
from buzon._policy import prepare

ROOT = Path(buzon.__file__).parent


def test_connect_steps_are_engine_steps() -> None:
    prep = prepare("unix:nobody-listens-here", listening=False)
    steps = connect_steps(prep, time.monotonic() + 5, retry=True)
    step = next(steps)
    assert isinstance(step, _engine.Step)
    assert step.kind == _engine.SLEEP and step.budget is not None
    steps.close()


def test_handshake_steps_are_engine_steps() -> None:
    with buzon.listen("unix:stepshs") as lst:
        box: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: box.append(lst.accept(timeout=10)))
        prep = prepare("unix:stepshs", listening=False)
        transport = buzon.sync._channel.run_steps(connect_steps(prep, None, True), None)
        core = ChannelCore(transport, prep.channel, address=prep.address)
        steps = establish_steps(core, prep, "client")
        seen = []
        try:
            step = next(steps)  # HELLO written, nobody accepting yet: the client must wait
            t.start()  # (started before, a quick server answered before any wait)
            while True:
                seen.append(step)
                assert isinstance(step, _engine.Step)
                assert step.kind in (_engine.READ, _engine.WRITE)
                buzon.sync._channel.wait_fds(
                    step.fd, step.fd, step.kind == _engine.READ, step.kind == _engine.WRITE, None
                )
                step = steps.send(None)
        except StopIteration:
            pass
        assert seen, "the client waited for the server's WELCOME at least once"
        t.join(10)
        box[0].close()
        core.close()


def test_the_drivers_have_no_handshake_loop_of_their_own() -> None:
    for path in (ROOT / "sync" / "_open.py", ROOT / "aio" / "_open.py"):
        text = path.read_text()
        assert "Establishing" not in text and "advance()" not in text
