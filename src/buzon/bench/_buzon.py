"""buzon's own channels, measured by the same harness and loops as the baselines.

Only the public API is used (``buzon.pipe``, ``buzon.listen``, ``buzon.connect`` and
the channel's ``send_bytes``/``recv_bytes``/``recv_bytes_into``): framed bytes, no
codec, the way a user moves bytes. Each transport is measured twice:

* ``buzon-spin0``: ``spin=0``, a receiver that blocks at once, like the raw baselines;
  this is the row that shows buzon's own overhead (target: within 1.15x of raw);
* ``buzon``: the default ``spin``, a receiver that busy-polls briefly before blocking,
  which is what a user gets without asking.

Links mirror the raw ones. ``pipe`` is a ``buzon.pipe()`` pair made before the fork.
Stream and datagram sockets listen in the parent (``tcp``/``udp`` on port 0, the
child connects to ``str(listener.address)``); a datagram listener's channel replies
to the last sender, so the child speaks first (the hello). ``fifo`` and ``mq`` are
simplex: a round trip uses two endpoints, both created by the parent before the fork
(so a killed child leaves nothing named behind); the child accepts on the inherited
"down" listener and connects to "up".
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from ._harness import (
    Case,
    Ctx,
    LinkMaker,
    NotApplicable,
    Opener,
    RecvWindow,
    SendWindow,
    Side,
    Skipped,
    Values,
    drain_into,
    handshake_child,
    handshake_parent,
)
from ._raw import cases_for, posixmq

__all__ = ["BUZON_TRANSPORTS", "buzon_cases"]

BUZON_TRANSPORTS = ("pipe", "fifo", "unix", "unixgram", "tcp", "udp", "mq", "shm")
RELAY_PROFILES = ("clean", "wifi")  # the reliable UDP rows through a ChaosRelay
_TIMEOUT = 10.0
_BIG = 1 << 16


class _Channel(Protocol):
    def send_bytes(self, data: bytes, /) -> object: ...
    def recv_bytes(self) -> bytes: ...
    def recv_bytes_into(self, buf: bytearray, /) -> int: ...
    def send_bytes_many(self, items: list[bytes], /) -> object: ...
    def close(self) -> object: ...


class _Listener(Protocol):
    @property
    def address(self) -> object: ...
    def accept(self, timeout: float | None = ...) -> _Channel: ...
    def close(self) -> object: ...


class _Api(Protocol):
    def pipe(self, **options: Any) -> tuple[_Channel, _Channel]: ...
    def listen(self, url: str, **options: Any) -> _Listener: ...
    def connect(self, url: str, **options: Any) -> _Channel: ...


def api() -> _Api:
    """The public buzon API, or :class:`Skipped` while it does not exist yet."""
    try:
        module = importlib.import_module("buzon")
    except ImportError as exc:  # pragma: no cover - we are inside the package
        raise Skipped(f"import buzon failed: {exc}") from None
    missing = [name for name in ("pipe", "listen", "connect") if not hasattr(module, name)]
    if missing:
        raise Skipped(f"the buzon API is not available yet (no buzon.{', buzon.'.join(missing)})")
    return cast(_Api, module)


class _BuzonSide(Side):
    """A channel pair (the same channel twice when it is duplex)."""

    def __init__(
        self,
        r: _Channel,
        w: _Channel,
        *,
        lossy: bool = False,
        batch: bool = False,
        receipts: bool = False,
        await_end: bool = False,
        fresh: bool = False,
    ):
        self._r = r
        self._w = w
        self.lossy = lossy
        self.batch = batch
        self.receipts = receipts  # every message sent with send_bytes_async
        self.await_end = await_end
        self.fresh = fresh  # 1 MiB drained with recv_bytes (a new bytes each), not _into

    def _await_peer_end(self) -> None:
        """reliable=True, parent side: after the data, read on until the peer's end.
        The peer's close lingers until its end is acknowledged, and a reliable link's
        protocol runs only while its process is inside a buzon call: without this the
        child would wait out ``close_timeout`` while the parent sits in ``join``."""
        from ..errors import BuzonError

        try:
            while True:
                self._r.recv_bytes(timeout=_TIMEOUT)  # type: ignore[call-arg]
        except BuzonError:  # EndOfChannel (or a timeout: the child's problem to report)
            pass

    def end_of_data(self) -> None:
        super().end_of_data()
        if self.await_end:
            self._await_peer_end()

    def blast(self, msg: bytes, window: SendWindow) -> int:
        """With ``batch``: the same stream of messages, 64 per ``send_bytes_many`` call
        (one vectored write), instead of one ``send_bytes`` call each."""
        if not self.batch or len(msg) > 4096:
            return super().blast(msg, window)
        send_many = self._w.send_bytes_many
        group = [msg] * 64
        perf = time.perf_counter_ns
        deadline = perf() + window.min_ns
        stopped = window.stopped
        sent = 0
        while True:
            send_many(group)
            sent += 64
            if perf() >= deadline and stopped():
                return sent

    def sender(self) -> Callable[[bytes], object]:
        if self.receipts:
            return self._w.send_bytes_async  # type: ignore[attr-defined, no-any-return]
        return self._w.send_bytes

    def receiver(self, size: int) -> Callable[[], bytes]:
        return self._r.recv_bytes

    def close(self) -> None:
        self._r.close()
        if self._w is not self._r:
            self._w.close()

    def drain(self, size: int, window: RecvWindow) -> tuple[float, int]:
        if size >= _BIG and not self.fresh:
            result = drain_into(self._r.recv_bytes_into, size, window)
        else:
            result = super().drain(size, window)
        if self.await_end:
            self._await_peer_end()
        return result


def _checked(create: Callable[[], Any], options: dict[str, Any]) -> Any:
    """Call a constructor; a refused ``spin=`` keyword becomes ``n/a``."""
    try:
        return create()
    except TypeError as exc:
        if "spin" in options and "spin" in str(exc):
            raise NotApplicable(f"spin= is not accepted yet ({exc})") from None
        raise


def _link(
    transport: str,
    options: dict[str, Any],
    batch: bool = False,
    receipts: bool = False,
    relay: str | None = None,
    fresh: bool = False,
) -> LinkMaker:
    """``relay``: the child reaches the parent's listener through a chaos relay (in the
    parent) with this profile; ``fresh``: the parent drains 1 MiB messages with
    ``recv_bytes`` (a new bytes object each) instead of ``recv_bytes_into``."""
    reliable = bool(options.get("reliable"))
    lossy = transport == "udp" and not reliable

    def make(ctx: Ctx, size: int) -> tuple[Opener, Opener]:
        bz = api()
        if transport == "mq":
            posixmq()  # skip with the extension's reason rather than a buzon error

        if transport == "pipe":
            a, b = _checked(lambda: bz.pipe(**options), options)
            ctx.close_later(a)
            ctx.close_later(b)

            def parent_pipe() -> Side:
                return handshake_parent(_BuzonSide(a, a, batch=batch, receipts=receipts))

            def child_pipe() -> Side:
                return handshake_child(_BuzonSide(b, b, batch=batch, receipts=receipts))

            return parent_pipe, child_pipe

        if transport in ("fifo", "mq"):
            up = _checked(lambda: bz.listen(f"{transport}:{ctx.name('-up')}", **options), options)
            ctx.close_later(up)
            down = bz.listen(f"{transport}:{ctx.name('-down')}", **options)
            ctx.close_later(down)
            up_url, down_url = str(up.address), str(down.address)

            # Order: the parent accepts "up" then connects "down"; the child connects
            # "up" then accepts "down". Neither waits on something the other does later.
            def parent_simplex() -> Side:
                r = up.accept(timeout=_TIMEOUT)
                ctx.close_later(r)
                w = bz.connect(down_url, timeout=_TIMEOUT, **options)
                ctx.close_later(w)
                return handshake_parent(_BuzonSide(r, w, batch=batch))

            def child_simplex() -> Side:
                w = bz.connect(up_url, timeout=_TIMEOUT, **options)
                r = down.accept(timeout=_TIMEOUT)
                return handshake_child(_BuzonSide(r, w, batch=batch))

            return parent_simplex, child_simplex

        url = {
            "unix": f"unix:{ctx.name()}",
            "unixgram": f"unixgram:{ctx.name()}",
            "shm": f"shm:{ctx.name()}",
            "tcp": "tcp://127.0.0.1:0",
            "udp": "udp://127.0.0.1:0",
        }[transport]
        lst = _checked(lambda: bz.listen(url, **options), options)
        ctx.close_later(lst)
        address = str(lst.address)
        if relay is not None:
            from ..testing.chaos import ChaosRelay

            # a fixed seed: the same faults every run (the handshake's first datagrams
            # meet the same dice; an unlucky burst there only delays the start)
            chaos = ChaosRelay(url, lst.address, profile=relay, seed=1234).start()
            ctx.close_later(chaos)
            address = str(chaos.address)

        def parent() -> Side:
            ch = lst.accept(timeout=_TIMEOUT)
            ctx.close_later(ch)
            side = _BuzonSide(
                ch,
                ch,
                lossy=lossy,
                batch=batch,
                receipts=receipts,
                await_end=reliable,
                fresh=fresh,
            )
            return handshake_parent(side)

        def child() -> Side:
            ch = bz.connect(address, timeout=_TIMEOUT, **options)
            side = _BuzonSide(ch, ch, lossy=lossy, batch=batch, receipts=receipts)
            return handshake_child(side)

        return parent, child

    return make


def _queue_limited(run: Callable[[Ctx], Values]) -> Callable[[Ctx], Values]:
    """1 MiB over a POSIX queue is ``n/a`` when the system's queue limits refuse it."""

    def wrapped(ctx: Ctx) -> Values:
        try:
            return run(ctx)
        except (NotApplicable, Skipped):
            raise
        except Exception as exc:
            raise NotApplicable(f"1 MiB over a POSIX queue failed: {exc}") from None

    return wrapped


def buzon_cases(transport: str) -> list[Case]:
    """buzon's rows for one transport: ``spin=0`` first, then the default spin, then
    (stream transports) 64 B one-way sent in batches with ``send_bytes_many``."""
    cases: list[Case] = []
    for impl, options in (("buzon-spin0", {"spin": 0.0}), ("buzon", {})):
        for case in cases_for(impl, transport, _link(transport, options)):
            if transport == "mq" and case.metric == "oneway1m":
                case = Case(case.impl, case.transport, case.metric, _queue_limited(case.run))
            cases.append(case)
    if transport in ("pipe", "fifo", "unix", "tcp", "shm"):
        batched = cases_for("buzon-batch", transport, _link(transport, {}, batch=True))
        cases.extend(c for c in batched if c.metric == "oneway64")
    if transport == "shm":
        # 1 MiB received the way users receive it: recv_bytes(), a new bytes each
        fresh = cases_for("buzon-bytes", transport, _link(transport, {}, fresh=True))
        cases.extend(c for c in fresh if c.metric == "oneway1m")
    if transport in ("pipe", "unix", "tcp", "shm"):
        # link semantics: rendezvous round trips
        rv = cases_for("buzon-rv", transport, _link(transport, {"capacity": 0}))
        cases.extend(c for c in rv if c.metric == "rt64")
    if transport in ("pipe", "unix", "tcp"):
        # a stream sent with receipts
        rc = cases_for("buzon-receipts", transport, _link(transport, {}, receipts=True))
        cases.extend(c for c in rc if c.metric == "oneway64")
    if transport in ("udp", "unixgram"):
        cases.extend(reliable_cases(transport))
    return cases


def reliable_cases(transport: str) -> list[Case]:
    """``reliable=True`` rows: the direct link, and (UDP) the same through a chaos relay
    with a clean and a lossy profile; the relay runs in the receiving process."""
    reliable = {"reliable": True}
    cases = [
        c
        for c in cases_for("buzon-reliable", transport, _link(transport, reliable))
        if c.metric != "oneway1m"  # over the protocol's max message (and a datagram's)
    ]
    if transport == "udp":
        batched = _link(transport, reliable, batch=True)  # send_bytes_many: fuller datagrams
        batch_cases = cases_for("buzon-reliable-batch", transport, batched)
        cases.extend(c for c in batch_cases if c.metric == "oneway64")
        for profile in RELAY_PROFILES:
            impl = f"buzon-reliable-{profile}"
            link = _link(transport, reliable, relay=profile)
            cases.extend(c for c in cases_for(impl, transport, link) if c.metric == "oneway64")
    return cases
