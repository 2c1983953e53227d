"""Shared pieces of the RPC tests: a served calculator and a running-server helper."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import buzon
from buzon import rpc


class Calc(Protocol):
    """The typed stub the tests call through (mypy checks these calls)."""

    def add(self, a: int, b: int) -> int: ...
    def echo(self, value: str) -> str: ...


class Recorder:
    """What handlers did, for the tests to look at (thread-safe enough for counters)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ran: list[str] = []
        self.cancelled: list[str] = []
        self.events: dict[str, threading.Event] = {}
        self.concurrent = 0
        self.max_concurrent = 0

    def event(self, name: str) -> threading.Event:
        with self.lock:
            return self.events.setdefault(name, threading.Event())


def calc_service(rec: Recorder) -> rpc.Service:
    svc = rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        rec.ran.append("add")
        return a + b

    @svc.method
    def echo(value: str) -> str:
        return value

    @svc.method
    def wrong_result() -> int:
        rec.ran.append("wrong_result")
        return "not an int"  # type: ignore[return-value]

    @svc.method
    def unencodable() -> Any:
        rec.ran.append("unencodable")
        return object()

    @svc.method
    def fails(why: str) -> None:
        raise ValueError(why)

    @svc.method
    def sleep_then(value: int, seconds: float) -> int:
        time.sleep(seconds)
        with rec.lock:
            rec.ran.append(f"done {value}")
        return value

    @svc.method
    def block(name: str) -> str:
        """Wait for the test to set the event ``name`` (or for cancellation)."""
        with rec.lock:
            rec.concurrent += 1
            rec.max_concurrent = max(rec.max_concurrent, rec.concurrent)
        try:
            ctx = rpc.context()
            event = rec.event(name)
            end = time.monotonic() + 30
            while not event.is_set() and time.monotonic() < end:
                if ctx.cancelled:
                    with rec.lock:
                        rec.cancelled.append(name)
                    rec.event(name + ":cancelled").set()
                    time.sleep(0.3)  # answer late: the caller has given up already
                    return "cancelled"
                event.wait(0.01)
            return "released"
        finally:
            with rec.lock:
                rec.concurrent -= 1

    @svc.method
    def log(line: str) -> None:
        with rec.lock:
            rec.ran.append(f"log {line}")
        rec.event("logged").set()

    @svc.method
    def budget() -> float | None:
        """The seconds left of this call's deadline, as the handler sees it."""
        at = rpc.context().deadline
        return None if at is None else at - time.monotonic()

    @svc.method
    def kw(a: int, b: int = 10, *rest: int, scale: int = 1) -> int:
        return (a + b + sum(rest)) * scale

    return svc


@contextmanager
def serving(url: str, service: Any, **options: Any) -> Iterator[rpc.Server]:
    """An RPC server on ``url`` in a thread for the block; shut down after it."""
    options.setdefault("grace", 2.0)
    srv = rpc.Server(url, service, **options)
    t = threading.Thread(target=srv.serve_forever, name="test-rpc-server")
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        t.join(15)
        assert not t.is_alive()


def address_of(srv: rpc.Server) -> Any:
    return srv.address


__all__ = ["Calc", "Recorder", "buzon", "calc_service", "serving"]
