"""Sequence diagrams of mailboxes and RPC, drawn by running them (for :mod:`buzon.docgen`).

Theory of operation
-------------------
Each scenario is a short script that drives real objects: mailboxes opened by forked
*actor* processes (each with its own mailbox object, so a receipt names a distinct
pid), and RPC servers, clients and a chaos relay in threads of this process. The
script moves one step at a time and waits for each step to finish (or checks that it
is still waiting, for a step that must block), so the order of the events is the
order of the scenario's own protocol, never a race between threads. Every event is
what an object reported: the message id and body a receiver got, the pid a receipt
named (shown as the actor of that pid), the number of runs a handler counted, the
exception a call raised. A scenario that does not behave as its page says fails the
generation (:class:`SectionError`), and so ``tests/test_docs.py``.

The output is a Mermaid ``sequenceDiagram`` per scenario: no pids, times or random
names reach it, so the pages render the same on every machine and run.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["DocScenarioError", "render_mailbox_sequences", "render_rpc_sequences"]


class DocScenarioError(Exception):
    """A scenario did not behave as the page says it does."""


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise DocScenarioError(what)


# ================================================================ the diagram itself


class _Diagram:
    """Mermaid sequenceDiagram lines, participants in the order given."""

    def __init__(self, *participants: tuple[str, str]) -> None:
        self.lines = ["sequenceDiagram"]
        for key, label in participants:
            self.lines.append(f"    participant {key} as {label}")

    def arrow(
        self, src: str, dst: str, text: str, *, reply: bool = False, lost: bool = False
    ) -> None:
        kind = "--x" if lost else ("-->>" if reply else "->>")
        self.lines.append(f"    {src}{kind}{dst}: {text}")

    def note(self, who: str, text: str) -> None:
        self.lines.append(f"    Note over {who}: {text}")

    def render(self) -> str:
        return "```mermaid\n" + "\n".join(self.lines) + "\n```"


# ========================================================================= mailboxes


def _actor_main(conn: Any, name: str, options: dict[str, Any]) -> None:
    """An actor process: opens the mailbox, then runs the commands it is sent."""
    import buzon
    from buzon.errors import BuzonError

    box = buzon.mailbox(name, **options)
    receipts: dict[int, Any] = {}
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                return
            try:
                if op == "recv_message":
                    m = box.recv_message(timeout=args[0])
                    out: Any = (m.id, m.body, m.sender.pid)
                elif op == "recv_nowait":
                    out = box.recv_nowait()
                elif op == "send":
                    box.send(args[0], timeout=args[1])
                    out = None
                elif op == "send_nowait":
                    box.send_nowait(args[0])
                    out = None
                elif op == "send_async":
                    r = box.send_async(args[0])
                    receipts[r.id] = r
                    out = r.id
                elif op == "receipt":
                    r = receipts[args[0]]
                    r.wait(timeout=args[1])
                    out = sorted(p.pid for p in r.receivers)
                elif op == "statistics":
                    out = box.statistics()
                elif op == "close":
                    box.close()
                    out = None
                elif op == "pid":
                    out = os.getpid()
                else:  # pragma: no cover - a typo in a scenario
                    raise ValueError(op)
                conn.send(("ok", out))
            except BuzonError as exc:
                conn.send(("error", type(exc).__name__))
            if op == "close":
                return
    finally:
        box.close()
        conn.close()


class _Actor:
    """One forked process with its own mailbox object, driven step by step."""

    _STEP = 15.0  # generous: a step that takes this long is a failure, not slowness

    def __init__(self, label: str, name: str, options: dict[str, Any]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.label = label
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_actor_main, args=(child, name, options), daemon=True)
        self.proc.start()
        child.close()
        self.pid = self.do("pid")

    def start(self, op: str, *args: Any) -> None:
        self.conn.send((op, args))

    def finish(self) -> Any:
        if not self.conn.poll(self._STEP):
            raise DocScenarioError(f"{self.label}: a step did not finish")
        kind, value = self.conn.recv()
        return (kind, value)

    def do(self, op: str, *args: Any) -> Any:
        """Run one step; its result, or ("error", exception name) via :meth:`fails`."""
        self.start(op, *args)
        kind, value = self.finish()
        if kind != "ok":
            raise DocScenarioError(f"{self.label}: {op} raised {value}")
        return value

    def fails(self, op: str, *args: Any) -> str:
        self.start(op, *args)
        kind, value = self.finish()
        _expect(kind == "error", f"{self.label}: {op} should have failed, returned {value!r}")
        return str(value)

    def waiting(self) -> bool:
        """True if the step started last is still waiting (checked for a short while:
        a step that must block cannot have finished, so this never misreads a slow
        machine as correct behaviour)."""
        return not self.conn.poll(0.05)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:  # the child holds copies of other pipes' ends: say so, not by EOF
                self.conn.send(("close", ()))
            except OSError:  # pragma: no cover - it went meanwhile
                pass
        self.conn.close()
        self.proc.join(self._STEP)
        if self.proc.is_alive():  # pragma: no cover - a stuck actor
            self.proc.kill()
            self.proc.join()
        self.proc.close()  # its sentinel descriptor now, not when collected


@contextmanager
def _mailbox_scene(
    labels: tuple[str, ...], **options: Any
) -> Iterator[tuple[dict[str, _Actor], Callable[[int], str]]]:
    """Actors named ``labels`` sharing a fresh mailbox; yields them and pid -> label."""
    import buzon

    name = f"docgen-{os.getpid()}-{secrets.token_hex(4)}"
    owner = buzon.mailbox(name, create=True, **options)
    actors: dict[str, _Actor] = {}
    try:
        for label in labels:
            actors[label] = _Actor(label, name, {})
        by_pid = {a.pid: a.label for a in actors.values()}
        yield actors, lambda pid: by_pid.get(pid, f"pid {pid}?")
    finally:
        for actor in actors.values():
            actor.stop()
        owner.remove()
        owner.close()


def _took(d: _Diagram, who: _Actor, got: Any, sender: Callable[[int], str]) -> int:
    mid, body, pid = got
    d.arrow("box", who.label, f"#{mid} {body!r} (from {sender(pid)})")
    return int(mid)


def _scenario_any() -> str:
    d = _Diagram(("S", "S (sender)"), ("box", 'mailbox, policy="any"'), ("R1", "R1"), ("R2", "R2"))
    with _mailbox_scene(("S", "R1", "R2"), capacity=4, policy="any") as (a, who):
        ids = []
        for job in ("job 1", "job 2", "job 3"):
            ids.append(a["S"].do("send_async", job))
            d.arrow("S", "box", f"send_async({job!r}) → receipt #{ids[-1]}")
        takers = [a["R1"], a["R2"], a["R1"]]
        for actor in takers:
            d.note(actor.label, "recv_message()")
            _took(d, actor, actor.do("recv_message", 5.0), who)
        for mid, actor in zip(ids, takers, strict=True):
            pids = a["S"].do("receipt", mid, 5.0)
            _expect(pids == [actor.pid], f"receipt #{mid} named {pids}, not {actor.label}")
            d.arrow(actor.label, "S", f"receipt #{mid}: taken by {who(pids[0])}", reply=True)
    d.note("S,R2", "each message went to exactly one receiver: the one that asked first")
    return d.render()


def _scenario_exclusive() -> str:
    d = _Diagram(
        ("S", "S (sender)"), ("box", 'mailbox, policy="exclusive"'), ("R1", "R1"), ("R2", "R2")
    )
    with _mailbox_scene(("S", "R1", "R2"), capacity=4, policy="exclusive") as (a, who):
        s, r1, r2 = a["S"], a["R1"], a["R2"]
        s.do("send", "job 1", 5.0)
        d.arrow("S", "box", "send('job 1')")
        d.note("R1", "recv_message(): R1 now holds the mailbox")
        _took(d, r1, r1.do("recv_message", 5.0), who)
        r2.start("recv_message", 10.0)
        _expect(r2.waiting(), "R2 took a message while R1 held the mailbox")
        d.note("R2", "recv_message() waits: R1 holds the mailbox")
        for job in ("job 2", "job 3"):
            s.do("send", job, 5.0)
            d.arrow("S", "box", f"send({job!r})")
        _took(d, r1, r1.do("recv_message", 5.0), who)
        _expect(r2.waiting(), "R2 took a message while R1 held the mailbox")
        r1.do("close")
        d.note("R1", "close(): the hold passes to the next waiter")
        kind, got = r2.finish()
        _expect(kind == "ok", f"R2 got {got} after the hand-over")
        _took(d, r2, got, who)
        d.note("R2", "R2 holds the mailbox now, and got what R1 had not taken")
    closed = d.render()

    d = _Diagram(
        ("S", "S (sender)"), ("box", 'mailbox, policy="exclusive"'), ("R1", "R1"), ("R2", "R2")
    )
    with _mailbox_scene(("S", "R1", "R2"), capacity=4, policy="exclusive") as (a, who):
        s, r1, r2 = a["S"], a["R1"], a["R2"]
        s.do("send", "job 1", 5.0)
        d.arrow("S", "box", "send('job 1')")
        _took(d, r1, r1.do("recv_message", 5.0), who)
        d.note("R1", "R1 holds the mailbox")
        r2.start("recv_message", 10.0)
        _expect(r2.waiting(), "R2 took a message while R1 held the mailbox")
        d.note("R2", "recv_message() waits")
        s.do("send", "job 2", 5.0)
        d.arrow("S", "box", "send('job 2')")
        _expect(r2.waiting(), "R2 took a message while R1 held the mailbox")
        r1.proc.kill()
        r1.proc.join(_Actor._STEP)
        d.note("R1", "killed (SIGKILL): the kernel drops its lock on the hold")
        kind, got = r2.finish()
        _expect(kind == "ok", f"R2 got {got} after the holder died")
        _took(d, r2, got, who)
        d.note("R2", "R2 took over: nothing the dead holder had not taken is lost")
    return "\n\n".join(["The holder closes:", closed, "The holder is killed:", d.render()])


def _scenario_round_robin() -> str:
    d = _Diagram(
        ("S", "S (sender)"), ("box", 'mailbox, policy="round_robin"'), ("R1", "R1"), ("R2", "R2")
    )
    with _mailbox_scene(("S", "R1", "R2"), capacity=4, policy="round_robin") as (a, who):
        s, r1, r2 = a["S"], a["R1"], a["R2"]
        for r in (r1, r2):
            _expect(r.fails("recv_nowait") == "Empty", f"{r.label}: a message before any send")
            d.note(r.label, "recv_nowait() → Empty, it attached (a backlog of its own)")
        for job in ("job 1", "job 2", "job 3", "job 4"):
            s.do("send", job, 5.0)
            d.arrow("S", "box", f"send({job!r})")
        got = {r.label: [r.do("recv_message", 5.0), r.do("recv_message", 5.0)] for r in (r1, r2)}
        for r in (r1, r2):
            for m in got[r.label]:
                _took(d, r, m, who)
        _expect(
            [m[1] for m in got["R1"]] + [m[1] for m in got["R2"]]
            in (
                ["job 1", "job 3", "job 2", "job 4"],
                ["job 2", "job 4", "job 1", "job 3"],
            ),
            f"receivers did not take turns: {got}",
        )
        d.note("R1,R2", "the receivers took turns")
    return d.render()


def _scenario_broadcast() -> str:
    d = _Diagram(
        ("S", "S (sender)"),
        ("box", 'mailbox, policy="broadcast", capacity=2'),
        ("R1", "R1"),
        ("R2", "R2 (slow)"),
    )
    with _mailbox_scene(("S", "R1", "R2"), capacity=2, policy="broadcast") as (a, who):
        s, r1, r2 = a["S"], a["R1"], a["R2"]
        for r in (r1, r2):
            _expect(r.fails("recv_nowait") == "Empty", f"{r.label}: a message before any send")
            d.note(r.label, "recv_nowait() → Empty, it attached (a backlog of 2)")
        s.do("send", "frame 1", 5.0)
        d.arrow("S", "box", "send('frame 1')")
        _took(d, r1, r1.do("recv_message", 5.0), who)
        for frame in ("frame 2", "frame 3"):
            s.do("send", frame, 5.0)
            d.arrow("S", "box", f"send({frame!r})")
        dropped = s.do("statistics")["dropped"]
        _expect(dropped == 1, f"the sender counted {dropped} dropped, not 1")
        d.note("box", "R2's backlog is full: its oldest ('frame 1') is dropped")
        d.note("S", f"statistics()['dropped'] == {dropped}, send never waited")
        for _ in range(2):
            _took(d, r1, r1.do("recv_message", 5.0), who)
        got = [r2.do("recv_message", 5.0) for _ in range(2)]
        _expect([m[1] for m in got] == ["frame 2", "frame 3"], f"R2 got {got}")
        for m in got:
            _took(d, r2, m, who)
        _expect(r2.fails("recv_nowait") == "Empty", "R2 got more than its backlog held")
        d.note("R2", "recv_nowait() → Empty")
    return d.render()


def _scenario_capacity() -> str:
    d = _Diagram(("S", "S (sender)"), ("box", "mailbox, capacity=0"), ("R", "R"))
    with _mailbox_scene(("S", "R"), capacity=0) as (a, who):
        s, r = a["S"], a["R"]
        s.start("send", "a", 10.0)
        _expect(s.waiting(), "send on a rendezvous mailbox returned before anybody took it")
        d.arrow("S", "box", "send('a')")
        d.note("S", "send waits: nobody took it yet")
        _took(d, r, r.do("recv_message", 5.0), who)
        kind, value = s.finish()
        _expect(kind == "ok", f"the rendezvous send raised {value}")
        d.arrow("box", "S", "send('a') returns: R took it", reply=True)
        s.do("send_nowait", "b")
        d.arrow("S", "box", "send_nowait('b'): into the free hand-over place, returns")
        _expect(s.fails("send_nowait", "c") == "Full", "two messages in a rendezvous mailbox")
        d.arrow("S", "box", "send_nowait('c') → Full (the hand-over place is taken)", lost=True)
        _took(d, r, r.do("recv_message", 5.0), who)
    capacity_0 = d.render()

    d = _Diagram(("S", "S (sender)"), ("box", "mailbox, capacity=2"), ("R", "R"))
    with _mailbox_scene(("S", "R"), capacity=2) as (a, who):
        s, r = a["S"], a["R"]
        for item in ("a", "b"):
            s.do("send", item, 5.0)
            d.arrow("S", "box", f"send({item!r}) returns at once")
        _expect(s.fails("send_nowait", "c") == "Full", "a third message fit in capacity 2")
        d.arrow("S", "box", "send_nowait('c') → Full (2 wait)", lost=True)
        _took(d, r, r.do("recv_message", 5.0), who)
        s.do("send_nowait", "c")
        d.arrow("S", "box", "send_nowait('c'): room again")
        for _ in range(2):
            _took(d, r, r.do("recv_message", 5.0), who)
    return "\n\n".join(["`capacity=0` (rendezvous):", capacity_0, "`capacity=2`:", d.render()])


def render_mailbox_sequences() -> str:
    """Each policy, and capacity 0 against N, as sequence diagrams of a real run."""
    parts = [
        ('`policy="any"`, three messages, two receivers, receipts', _scenario_any),
        (
            '`policy="exclusive"`, with the hand-over when the holder closes or dies',
            _scenario_exclusive,
        ),
        ('`policy="round_robin"`', _scenario_round_robin),
        ('`policy="broadcast"`, a slow receiver and drop-oldest', _scenario_broadcast),
        ("Capacity 0 against N", _scenario_capacity),
    ]
    out = []
    for title, scenario in parts:
        out += [f"**{title}**", "", scenario(), ""]
    return "\n".join(out).rstrip("\n")


# =============================================================================== RPC


@contextmanager
def _rpc_scene() -> Iterator[tuple[Any, Any, list[int], threading.Event]]:
    """A server counting the runs of ``incr``, behind a chaos relay; yields (server,
    relay, runs, release: lets ``slow`` return). Every file and thread goes with it."""
    from . import rpc
    from .testing.chaos import ChaosRelay, Faults

    tag = f"docgen-{os.getpid()}-{secrets.token_hex(4)}"
    runs: list[int] = []
    release = threading.Event()
    relay_box: list[Any] = []
    svc = rpc.Service("effects")

    @svc.method
    def incr(key: str) -> int:
        runs.append(len(runs) + 1)
        relay_box[0].faults = Faults()  # the connections after this one are clean
        return len(runs)

    @svc.method
    def slow() -> str:
        import time

        ctx = rpc.context()
        runs.append(1)
        runs.append(2 if ctx.wait_cancelled(_Actor._STEP) else -2)  # the deadline passed
        release.wait(_Actor._STEP)  # the caller has raised DeadlineExceeded
        end = time.monotonic() + _Actor._STEP
        while not ctx._gave_up and time.monotonic() < end:  # the cancel message
            time.sleep(0.002)
        runs.append(3 if ctx._gave_up else -3)
        return "stopped"

    srv = rpc.Server(f"unix:{tag}-srv", svc)
    thread = threading.Thread(target=srv.serve_forever, name="docgen-rpc", daemon=True)
    thread.start()
    try:
        with ChaosRelay(f"unix:{tag}-front", srv.address, profile=Faults()) as relay:
            relay_box.append(relay)
            yield srv, relay, runs, release
    finally:
        release.set()
        srv.shutdown()
        thread.join(_Actor._STEP)


def _lose_next_reply(relay: Any) -> None:
    """Make the relay reset the next connection right after the first byte of its
    first reply (the handshake's reply bytes are measured on a probe connection)."""
    import time

    from . import rpc
    from .testing.chaos import Faults

    probe = rpc.connect(relay.address)
    probe.close()
    end = time.monotonic() + _Actor._STEP
    while not any(e.action == "close" for e in relay.events()):
        _expect(time.monotonic() < end, "the relay never saw the probe connection end")
        time.sleep(0.005)
    handshake = relay.statistics("reply")["forwarded_bytes"]
    _expect(handshake > 0, "the probe connection had no handshake")
    relay.faults = Faults(reply=Faults(reset_after=handshake + 1))


def _rpc_diagram() -> _Diagram:
    return _Diagram(("C", "client"), ("X", "chaos relay"), ("S", "server"))


def _scenario_semantics(semantics: str) -> str:
    from . import rpc
    from .errors import EndOfChannel

    d = _rpc_diagram()
    with _rpc_scene() as (srv, relay, runs, _release):
        _lose_next_reply(relay)
        c = rpc.connect(relay.address, semantics=semantics, timeout=_Actor._STEP)
        try:
            try:
                result: Any = c.call("incr", "k")
                outcome = f"returns {result}"
            except EndOfChannel as exc:
                result = None
                outcome = f"EndOfChannel: {'may or may not have run' in str(exc)}"
            retries = c.retries
        finally:
            c.close()
        replayed = srv.table.replayed
        resets = relay.statistics()["resets"]
    _expect(resets == 1, f"the relay reset {resets} connections, not 1")
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        again = " again" if attempt > 1 else ""
        if attempt > 1:
            d.note("C", "reconnect (backoff), send the same call again")
        key = " + (client id, seq)" if semantics == "exactly_once" else ""
        d.arrow("C", "X", f"incr('k'){key}{again}")
        d.arrow("X", "S", f"incr('k'){again}")
        if attempt <= len(runs):
            d.note("S", f"incr runs: side effect number {runs[attempt - 1]}")
            reply = runs[attempt - 1]
        else:
            _expect(replayed == attempt - len(runs), "a retry neither ran nor was replayed")
            d.note("S", "completed in the table: nothing runs, the recorded reply")
            reply = runs[-1]
        d.arrow("S", "X", f"reply {reply}", reply=True)
        if attempt == 1:
            d.arrow("X", "C", "connection reset: the reply is lost", lost=True)
        else:
            d.arrow("X", "C", f"reply {reply}", reply=True)
    if semantics == "at_most_once":
        _expect(
            (retries, runs, outcome) == (0, [1], "EndOfChannel: True"),
            f"at_most_once: {retries} retries, runs {runs}, {outcome}",
        )
        d.note("C", "raises EndOfChannel: the call may or may not have run")
    elif semantics == "at_least_once":
        _expect(
            (retries, runs, result) == (1, [1, 2], 2),
            f"at_least_once: {retries} retries, runs {runs}, {outcome}",
        )
        d.note("C", "returns 2: the side effect ran twice")
    else:
        _expect(
            (retries, runs, result, replayed) == (1, [1], 1, 1),
            f"exactly_once: {retries} retries, runs {runs}, {outcome}, replayed {replayed}",
        )
        d.note("C", "returns 1: the side effect ran once")
    return d.render()


def _scenario_deadline() -> str:
    import time

    from . import rpc

    d = _Diagram(("C", "client"), ("S", "server"))
    with _rpc_scene() as (srv, _relay, runs, release):
        c = rpc.connect(srv.address, timeout=_Actor._STEP)
        try:
            try:
                with rpc.deadline(0.2):
                    c.call("slow")
                outcome = "returned"
            except rpc.DeadlineExceeded:
                outcome = "DeadlineExceeded"
            release.set()
            end = time.monotonic() + _Actor._STEP
            while len(runs) < 3 and time.monotonic() < end:
                time.sleep(0.005)
        finally:
            c.close()
    _expect(outcome == "DeadlineExceeded", f"the call {outcome} instead of DeadlineExceeded")
    _expect(runs == [1, 2, 3], f"the handler did not see the deadline and the cancel: {runs}")
    d.arrow("C", "S", "slow() in deadline(0.2): the budget travels with the request")
    d.note("S", "slow runs, in context().wait_cancelled()")
    d.note("C,S", "0.2 s pass: the handler's context().cancelled is True (its deadline)")
    d.note("C", "the call raises DeadlineExceeded")
    d.arrow("C", "S", "cancel, naming the call")
    d.note("S", "the call is marked given up by its caller: the handler stops")
    return d.render()


def render_rpc_sequences() -> str:
    """The three call semantics through a reply lost on the wire, and a deadline."""
    parts: list[tuple[str, Callable[[], str]]] = [
        (
            '`semantics="at_most_once"`: the reply is lost',
            lambda: _scenario_semantics("at_most_once"),
        ),
        (
            '`semantics="at_least_once"`: the retry runs the call again',
            lambda: _scenario_semantics("at_least_once"),
        ),
        (
            '`semantics="exactly_once"`: the retry is answered from the table',
            lambda: _scenario_semantics("exactly_once"),
        ),
        ("A deadline, and the cancel message", _scenario_deadline),
    ]
    out = []
    for title, scenario in parts:
        out += [f"**{title}**", "", scenario(), ""]
    return "\n".join(out).rstrip("\n")
