"""The engine: the waiting part of every channel operation, written once.

Each operation is a generator of :class:`Step` s. Between steps it calls the channel
core (:class:`~buzon._channel.ChannelCore`), which never blocks; each step says what the
operation waits for before it can go on:

========  ===========================================================================
INPUT     the channel's input: its read fd readable (the driver writes what the
          channel owes meanwhile, so two ends never wait for each other); ``stall``:
          part of a frame is in, and the peer may not stall longer than that (the
          driver raises ``Timeout`` naming the stall); ``spin``: the driver may spin
          its spin budget before it sleeps
READ      ``fd`` readable (a token or acknowledgement fd, a reliable link's room)
WRITE     ``fd`` writable (kernel room for a write)
CREDIT    ``done()`` true: a condition on CREDIT frames arriving on the read side; the
          driver reads them its own way (a thread that is not receiving reads them
          itself, a receiving thread or task wakes the waiter)
LOCKED    run ``call()`` now, under the read side's lock if the driver can take it at
          once (the sync driver skips the call if another thread is receiving)
EXTEND    the operation's deadline becomes ``budget`` seconds from now
SLEEP     nothing to watch: ``budget`` seconds pass (a connect's back-off before it
          tries an endpoint that is not there yet), never past the deadline
SPIN      the input may be about to become readable: the driver spins its spin
          budget for it, or until it is (it never sleeps; an asyncio driver yields to
          the loop once)
========  ===========================================================================

A driver (:mod:`buzon.sync`, :mod:`buzon.aio`) runs a generator: it performs each wait
by the operation's deadline and resumes the generator. When the deadline passes it
throws :class:`~buzon.errors.Timeout` into the generator; a cancellation
(``asyncio.CancelledError``) or an interrupt (``KeyboardInterrupt``) is thrown in as
it is. So every decision an operation makes on the way out (abandon a half-written
frame, give a rendezvous token up, withdraw an offer) is made here, the same for both
drivers. Nothing in this module waits, sleeps, reads the clock or knows about threads
or event loops; the sync driver holds its write lock while it resumes a generator.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

from ._channel import ChannelCore
from .errors import ChannelClosed, EndOfChannel, Timeout
from .transport.base import Buffer

__all__ = [
    "CREDIT",
    "EXTEND",
    "INPUT",
    "LOCKED",
    "READ",
    "SLEEP",
    "SPIN",
    "WRITE",
    "Step",
    "Steps",
    "flush_steps",
    "linger_steps",
    "loan_steps",
    "recv_steps",
    "room",
    "receipt_poll_steps",
    "receipt_steps",
    "send_steps",
    "withdraw_steps",
]

READ, WRITE, CREDIT, LOCKED, EXTEND, INPUT, SPIN, SLEEP = range(8)


def _true() -> bool:
    return True


def _nothing() -> None:
    return None


class Step(NamedTuple):
    """What an operation waits for (see the module docstring)."""

    kind: int
    fd: int = -1
    done: Callable[[], bool] = _true
    call: Callable[[], None] = _nothing
    budget: float | None = None
    what: str = "send"
    stall: float | None = None
    spin: bool = False


Steps = Generator[Step, None, Any]

_INPUT = Step(INPUT, what="recv")
_INPUT_SPIN = Step(INPUT, what="recv", spin=True)

_ABORTED = (
    "send timed out with the message half-written; it was aborted (the receiver drops "
    "it whole), so nothing of it is delivered"
)
_WITHDRAWN = (
    "send timed out before the receiver took the message (capacity=0); it was "
    "withdrawn, so nothing of it is delivered"
)
_UNSETTLED = (
    "send gave up after handing the message over (capacity=0) and the receiver "
    "neither took it nor answered its withdrawal within frame_timeout; it drops the "
    "message unless it took it before reading the withdrawal"
)

_CLOSED_WITHDRAWN = (
    "the channel was closed by another thread before the receiver took the message "
    "(capacity=0); it was withdrawn, so nothing of it is delivered"
)
_CLOSED_WITHDRAWING = (
    "the channel was closed by another thread before the receiver was known to take "
    "the message (capacity=0); its withdrawal was written, so the receiver drops it "
    "unless it took it before the channel closed"
)


def room(core: ChannelCore, what: str = "send") -> Step:
    """What a send that cannot go now waits for: a token (simplex links with a
    capacity), a CREDIT (duplex links with a capacity), an acknowledgement (reliable
    datagrams: their write fd becomes readable) or kernel room."""
    if core.credit_blocked and core.tokens is not None:
        return Step(READ, core.tokens.credit_fd, what=what)
    if core.credit_blocked:
        sflow = core.sflow
        assert sflow is not None
        return Step(CREDIT, done=lambda: sflow.sent < sflow.limit, what=what)
    if core.acked:
        return Step(READ, core.write_fileno(), what=what)
    return Step(WRITE, core.write_fileno(), what=what)


def send_steps(
    core: ChannelCore,
    bufs: list[Buffer],
    priority: int = 0,
    *,
    accepted: bool = False,
    number: int = 0,
    serial: int = 0,
    count: int = 1,
    rendezvous: bool = False,
) -> Generator[Step, None, int]:
    """The rest of a send whose first attempt did not complete: wait for room until
    the message is accepted (unless ``accepted``: then ``number``/``serial`` name it),
    write it whole (:func:`finish_write`), and with ``capacity=0`` wait until the
    receiver took it. ``count`` > 1: ``bufs`` is a batch of that many joined frames.
    Returns the message's number in its flow (receipts), 0 where none is kept."""
    while not accepted:
        yield room(core)
        if core.try_send(bufs, priority, single=count == 1):
            accepted = True
            core.stats.messages_sent += count - 1
            flow = core.sflow
            number = flow.sent if flow is not None else 0
            serial = core.serial if count == 1 else 0
    if core.pending:
        yield from finish_write(core, serial if count == 1 else 0)
    if not rendezvous:
        return number
    tokens = core.tokens
    if tokens is not None:  # a simplex rendezvous: the receiver acknowledges our token
        core.rv_waiting = number or -1  # a close() meanwhile takes the stake back for us
        try:
            while not tokens.acked():
                yield Step(READ, tokens.ack_fd)
            core.rv_waiting = 0
        except BaseException as exc:
            core.rv_waiting = 0
            if isinstance(exc, ChannelClosed) or core.closed:  # closed: no more waits
                if core.stake_taken_back() or tokens.withdraw_message():
                    core.count_withdrawn()
                    raise ChannelClosed(_CLOSED_WITHDRAWN) from None
                tokens.give_up()  # the receiver claimed it: it takes it
                return number
            if not _withdraws(exc):
                tokens.give_up()
                raise
            if tokens.withdraw_message():  # our stake back: the receiver drops the message
                core.count_withdrawn()
                if isinstance(exc, Timeout):
                    raise Timeout(_WITHDRAWN) from None
                raise
            yield Step(EXTEND, budget=core.options.frame_timeout)
            try:  # the receiver claimed it: it is being taken
                while not tokens.acked():
                    yield Step(READ, tokens.ack_fd)
            except Timeout:
                tokens.give_up()
                raise Timeout(_UNSETTLED) from None
            if isinstance(exc, KeyboardInterrupt):
                raise
        return number
    failed: BaseException | None = None
    if number > 0:
        core.rv_waiting = number  # a close() meanwhile withdraws it for us
        try:
            yield Step(CREDIT, done=lambda: core.delivered(number))
        except BaseException as exc:
            failed = exc
        core.rv_waiting = 0
        if isinstance(failed, ChannelClosed) and not core.delivered(number):
            if withdraw_on_close(core, number):
                raise ChannelClosed(_CLOSED_WITHDRAWN) from None
            if not core.delivered(number):
                raise ChannelClosed(_CLOSED_WITHDRAWING) from None
            return number  # the receiver took it: the send succeeded
        if failed is not None and _withdraws(failed) and not core.delivered(number):
            if (yield from withdraw_steps(core, number)):
                yield Step(LOCKED, call=core.send_finished)
                if isinstance(failed, Timeout):
                    raise Timeout(_WITHDRAWN) from None
                raise failed
            if not isinstance(failed, KeyboardInterrupt):
                failed = None  # the receiver took it: the send succeeded after all
    if failed is None and core.reply_expected():
        # request/response: the reply is usually microseconds behind the take; spin
        # for it (the spin budget), so our offer stands for it rather than being
        # withdrawn and made again by the next receive (two CREDITs fewer)
        try:
            yield Step(SPIN)
            yield Step(LOCKED, call=core.finish_with_reply)  # send_finished too
            return number
        except KeyboardInterrupt as exc:
            failed = exc
        except BaseException:  # taken already: a cancellation comes too late
            pass
    yield Step(LOCKED, call=core.send_finished)  # withdraw our offer to receive
    if failed is not None:
        raise failed
    return number


def _withdraws(exc: BaseException) -> bool:
    """A send that gives up this way withdraws its message: its deadline, a
    cancellation or an interrupt (not an error of the link or the channel)."""
    return isinstance(exc, Timeout) or not isinstance(exc, Exception)


def withdraw_steps(core: ChannelCore, number: int) -> Generator[Step, None, bool]:
    """A rendezvous send gives up after its message ``number`` was handed over: write
    a WITHDRAW and learn its fate (``protocol/credit.py``). True: the receiver drops
    it, nothing is delivered; False: the receiver took it first. On a local link
    with no offer standing this is known once the WITHDRAW is written; otherwise the
    receiver answers, within ``frame_timeout`` (the send raises :class:`Timeout`
    saying the fate is unknown if it does not)."""
    yield Step(EXTEND, budget=core.options.frame_timeout)
    try:
        serial = core.withdraw(number)
        while not core.acked and not core.flush():
            yield Step(WRITE, core.write_fileno(), what="send")
        yield Step(LOCKED, call=core.drain_peer)
        fate = core.withdrawn(number, serial)
        while fate is None:
            yield Step(CREDIT, done=lambda: core.withdrawn(number, serial) is not None)
            fate = core.withdrawn(number, serial)
        return fate
    except Timeout:
        raise Timeout(_UNSETTLED) from None


def withdraw_on_close(core: ChannelCore, number: int) -> bool:
    """A rendezvous send waiting for the take of its message ``number`` was ended by a
    ``close()`` in another thread: write a WITHDRAW now, with no wait (the driver
    holds the write lock; the close releases the fds only after it), so the receiver's
    next take reads it first and drops the message. True: known withdrawn; False: the
    fate is not known here (the receiver may have taken it before; nothing more is
    read from a closing channel)."""
    if core.closed:
        return False
    serial = core.withdraw(number)
    if core.pending:
        core.flush()  # what the kernel takes now; a closing channel waits no more
    return bool(core.withdrawn(number, serial))


def finish_write(core: ChannelCore, serial: int) -> Steps:
    """Frame ``serial`` is accepted and partly written: write the rest. If the wait
    ends with an exception (the deadline, a cancellation, an interrupt) the frame is
    abandoned (:meth:`ChannelCore.abandon`): withdrawn or aborted, nothing of it is
    delivered, and the exception goes on (a timeout says so). A frame already
    committed (a plain frame of at most ``PLAIN_MAX`` bytes begun, a chunked one
    inside its last four bytes) is delivered instead: after a timeout its few bytes
    get up to ``frame_timeout`` more (the receiver's own patience with a half-written
    frame), then the send returns and later operations, ``close()`` or the
    interpreter's exit write what is left. ``serial`` 0 (a batch of joined frames):
    never abandoned, and a timeout leaves its tail to those later writes."""
    try:
        yield from _write_pending(core)
    except BaseException as exc:
        gone = serial > 0 and core.abandon(serial)
        if not isinstance(exc, Timeout):
            raise
        if gone:
            raise Timeout(_ABORTED) from None
        if serial > 0:
            try:
                yield Step(EXTEND, budget=core.options.frame_timeout)
                yield from _write_pending(core)
            except Timeout:
                pass


def _write_pending(core: ChannelCore) -> Steps:
    """Write the bytes in ``pending`` (not: wait for a reliable link's acks)."""
    while core.pending:
        core.flush()
        if core.pending:
            yield Step(WRITE, core.write_fileno())


def flush_steps(core: ChannelCore, what: str = "flush") -> Steps:
    """Write every accepted byte (and a CREDIT owed); on a reliable link, until the
    peer acknowledged all of it."""
    while not core.flush():
        yield Step(READ if core.acked else WRITE, core.write_fileno(), what=what)


_LINGER_PAUSE = 0.001  # between two looks at a TCP send queue the peer is draining


def linger_steps(core: ChannelCore) -> Steps:
    """The end of a close on TCP, after :func:`flush_steps`: until the peer's kernel
    has acknowledged every byte written, read input away (CREDITs, replies nobody
    will read) and look again. A TCP socket closed with unread input, or receiving
    input after its close, resets the connection, and the kernel then drops what it
    had not sent yet: the tail of messages whose send returned. The driver bounds
    this by ``close_timeout`` (and so does the count of pauses here)."""
    pauses = int(core.options.close_timeout / _LINGER_PAUSE) + 1
    transport = core.transport
    while core.lingers() and pauses > 0:
        if not transport.drop_input():
            return  # the peer closed: it takes nothing more
        pauses -= 1
        yield Step(SLEEP, budget=_LINGER_PAUSE, what="close")


def loan_steps(core: ChannelCore, nbytes: int) -> Steps:
    """Wait for room (or credit) until ``nbytes`` of message space can be lent."""
    while (lent := core.loan_begin(nbytes)) is None:
        yield room(core)
    return lent


def recv_steps(
    core: ChannelCore,
    flow: bool,
    poll: Callable[[], Any] | None = None,
    *,
    spin: bool = True,
    polled: bool = False,
) -> Steps:
    """Wait for the next message and return what ``poll`` (``core.poll`` by default;
    ``core.poll_view`` for views) gives for it. ``flow``: the channel reports its
    takes (capacity, receipts): first announce the wait (a rendezvous offer, credit
    owed, receipts due), and withdraw an offer if the wait ends without a message
    (timeout, cancellation, interrupt), so no sender hands a message to nobody.
    ``spin``: the first wait may spin (False: the driver spun already); ``polled``: the
    driver found nothing an instant ago, so the first step is a wait (only where the
    read fd alone tells readiness: ``ChannelCore.plain_readiness``)."""
    take = core.poll if poll is None else poll
    if flow:
        return _announced(core, take, spin, polled)
    return _recv_wait(core, take, spin, polled)


def _recv_wait(core: ChannelCore, take: Callable[[], Any], spin: bool, polled: bool) -> Steps:
    """:func:`recv_steps`' loop: take, else wait for input (a plain receive is just
    this generator: it is the path of every blocking ``recv``)."""
    got = None if polled else take()
    # while part of a frame is in (a big one), the rest is usually right behind it, a
    # kernel buffer's worth at a time: spin before each sleep, as a receive's first
    # wait does, rather than sleep and be woken once per buffer (16 times per MiB on a
    # pipe); where the transport says so (spins_inside_frames: not TCP)
    spin = spin or (got is None and core.spin_partial and core.partial())
    while got is None:
        if core.partial() and core.options.frame_timeout is not None:
            yield Step(INPUT, stall=core.options.frame_timeout, spin=spin, what="recv")
        else:
            yield _INPUT_SPIN if spin else _INPUT  # made once: this is the hot path
        got = take()
        spin = got is None and core.spin_partial and core.partial()
    return got


def _announced(core: ChannelCore, take: Callable[[], Any], spin: bool, polled: bool) -> Steps:
    """A receive on a channel that reports its takes: announce the wait first, keep
    it standing while nothing comes (a message the sender withdrew may have used the
    offer up), and withdraw a rendezvous offer if it ends without a message."""
    core.before_wait()
    try:
        got = None if polled else take()
        spin = spin or (got is None and core.spin_partial and core.partial())  # as above
        while got is None:
            frame_timeout = core.options.frame_timeout
            stall = frame_timeout if frame_timeout is not None and core.partial() else None
            yield Step(INPUT, stall=stall, spin=spin, what="recv")
            got = take()
            spin = False
            if got is None:
                spin = core.spin_partial and core.partial()
                core.still_waiting()
        return got
    except BaseException:
        core.wait_ended()
        raise


def receipt_poll_steps(core: ChannelCore) -> Steps:
    """Read the acknowledgements that already arrived (a receipt's ``done``): under
    the read side's lock if the driver can take it at once, never waiting."""
    yield Step(LOCKED, call=core.pump_quietly)


def receipt_steps(core: ChannelCore, settled: Callable[[], bool]) -> Steps:
    """Wait until a receipt is ``settled``: its message taken, or the link broke or
    closed (then the receipt fails: ``Undelivered``). A CREDIT step: the driver reads
    the acknowledgements itself, or is woken by whoever receives."""
    try:
        while not settled():
            yield Step(CREDIT, done=settled, what="receipt wait")
    except EndOfChannel:
        pass  # the receipt failed with it
