"""buzon.signals: sending signals (with values) and receiving them as messages.

Any test that makes a signal arrive runs in a forked, single-threaded process
(:func:`_isolated`). A process-directed signal goes to *any* thread that does not block
it, and the pytest process may have threads we did not start (a BLAS pool once numpy
is imported); a signal delivered there would be lost to the channel or, by default,
terminate pytest. Tests that send no signal run in the pytest process itself.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable

import pytest

import buzon
from buzon import signals
from buzon.signals import SI_QUEUE, SI_USER, SignalMessage

pytestmark = pytest.mark.fd_check

RT = signals.SIGRTMIN + 1


# ------------------------------------------------------------------------ helpers


def _reap(pid: int, timeout: float) -> tuple[int, bool]:
    """Wait for child ``pid`` up to ``timeout``, then SIGKILL it. (status, timed_out)"""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status, False
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1], True
        time.sleep(0.005)


def _fork(body: Callable[[], int]) -> int:
    """Fork a child that runs ``body`` and exits with its result (1 on an exception)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _check_exit(pid: int, timeout: float, what: str) -> None:
    status, timed_out = _reap(pid, timeout)
    assert not timed_out, f"{what} did not finish in {timeout} s (killed)"
    assert os.waitstatus_to_exitcode(status) == 0, f"{what} failed: status {status}"


def _isolated(fn: Callable[[], None], timeout: float = 30.0) -> None:
    """Run ``fn`` in a forked child (single-threaded: every signal reaches its channel)
    and fail with the child's traceback if it fails, dies, or runs out of time."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code, report = 1, b"?"
        try:
            os.close(r)
            fn()
            code, report = 0, b""
        except BaseException:
            report = traceback.format_exc().encode()
        finally:
            try:
                os.write(w, report)
            finally:
                os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if not select.select([r], [], [], remaining)[0]:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        status, timed_out = _reap(pid, max(deadline - time.monotonic(), 0.0) + 2.0)
    report = b"".join(chunks).decode(errors="replace")
    if timed_out:
        pytest.fail(f"the isolated test ran out of time ({timeout} s) and was killed")
    if os.WIFSIGNALED(status):
        pytest.fail(f"the isolated test was killed by {signal.Signals(os.WTERMSIG(status)).name}")
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"the isolated test failed:\n{report}")


def _blocked() -> set[int]:
    return {int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])}


def _dead_pid() -> int:
    pid = _fork(lambda: 0)
    _check_exit(pid, 10, "the short-lived child")
    return pid  # reaped: no process has this pid (until the kernel reuses it)


# ----------------------------------------------------------------- send and receive


def test_send_to_self_and_receive_a_standard_signal() -> None:
    def body() -> None:
        with signals.listen(signal.SIGUSR1) as ch:
            signals.send(os.getpid(), signal.SIGUSR1)
            msg = ch.recv(timeout=5)
            assert msg == SignalMessage(
                signo=signal.SIGUSR1,
                name="SIGUSR1",
                pid=os.getpid(),
                uid=os.getuid(),
                value=None,
                code=SI_USER,
            )
            assert ch.statistics().received == 1
            with pytest.raises(buzon.Empty):
                ch.recv_nowait()

    _isolated(body)


def test_signal_from_a_forked_child_names_the_sender() -> None:
    def body() -> None:
        parent = os.getpid()
        with signals.listen(signal.SIGUSR1, RT) as ch:
            child = _fork(lambda: signals.send(parent, signal.SIGUSR1) or 0)
            msg = ch.recv(timeout=5)
            _check_exit(child, 10, "the sending child")
            assert (msg.signo, msg.pid, msg.uid, msg.code) == (
                signal.SIGUSR1,
                child,
                os.getuid(),
                SI_USER,
            )
            child = _fork(lambda: signals.send(parent, RT, 4242) or 0)
            msg = ch.recv(timeout=5)
            _check_exit(child, 10, "the queueing child")
            assert (msg.signo, msg.pid, msg.value, msg.code) == (RT, child, 4242, SI_QUEUE)

    _isolated(body)


@pytest.mark.parametrize("offset", [0, 1, signals.SIGRTMAX - signals.SIGRTMIN])
def test_sigqueue_value_round_trip(offset: int) -> None:
    sig = signals.SIGRTMIN + offset
    values = [0, 1, -1, 123456789, -(2**31), 2**31 - 1]

    def body() -> None:
        with signals.listen(sig) as ch:
            for v in values:
                signals.send(os.getpid(), sig, v)
            got = []
            for msg in ch:  # iteration ends when the channel is closed
                assert (msg.signo, msg.code, msg.pid) == (sig, SI_QUEUE, os.getpid())
                assert msg.name == ("SIGRTMIN" if offset == 0 else msg.name)
                got.append(msg.value)
                if len(got) == len(values):
                    ch.close()
            assert got == values

    _isolated(body)


def test_real_time_signals_queue_in_order() -> None:
    def body() -> None:
        with signals.listen(RT) as ch:
            for v in range(50):  # all sent before any is read: nothing may merge
                signals.send(os.getpid(), RT, v)
            got = [ch.recv(timeout=5) for _ in range(50)]
            assert [m.value for m in got] == list(range(50))
            assert {m.name for m in got} == {"SIGRTMIN+1"}
            with pytest.raises(buzon.Empty):
                ch.recv_nowait()

    _isolated(body)


def test_standard_signals_coalesce() -> None:
    # the lecture's point: a standard signal is a pending *bit*, not a queue
    def body() -> None:
        with signals.listen(signal.SIGUSR2) as ch:
            for _ in range(3):
                signals.send(os.getpid(), signal.SIGUSR2)
            assert ch.recv(timeout=5).signo == signal.SIGUSR2
            with pytest.raises(buzon.Empty):
                ch.recv_nowait()

    _isolated(body)


def test_a_full_signal_queue_raises_full() -> None:
    def body() -> None:
        # the limit counts the user's signals pending in all its processes
        with open("/proc/self/status") as f:
            sigq = next(line for line in f if line.startswith("SigQ:"))
        in_use = int(sigq.split()[1].split("/")[0])
        _, hard = resource.getrlimit(resource.RLIMIT_SIGPENDING)
        resource.setrlimit(resource.RLIMIT_SIGPENDING, (in_use + 8, hard))
        with signals.listen(RT) as ch:
            sent = 0
            with pytest.raises(buzon.Full):
                for v in range(100):
                    signals.send(os.getpid(), RT, v)
                    sent += 1
            assert sent <= 9
            got = [ch.recv_nowait().value for _ in range(sent)]
            assert got == list(range(sent))
            signals.send(os.getpid(), RT, 99)  # room again once drained
            assert ch.recv(timeout=5).value == 99

    _isolated(body)


# ----------------------------------------------------------- waiting and timeouts


def test_timeout_and_empty() -> None:
    with signals.listen(signal.SIGUSR1) as ch:
        with pytest.raises(buzon.Empty):
            ch.recv_nowait()
        with pytest.raises(buzon.Timeout):
            ch.recv(timeout=0.02)
        with pytest.raises(TimeoutError):
            ch.recv(timeout=0)
        with pytest.raises(ValueError):
            ch.recv(timeout=-1)
        assert ch.statistics() == signals.SignalStatistics(received=0)


def test_buzon_wait_over_a_signal_channel_and_a_pipe() -> None:
    def body() -> None:
        a, b = buzon.pipe()
        with a, b, signals.listen(RT) as ch:
            assert buzon.wait([ch, b], timeout=0.02) == []
            signals.send(os.getpid(), RT, 7)
            assert buzon.wait([ch, b], timeout=5) == [ch]
            assert ch.statistics().buffered == 1  # read ahead by wait, and kept
            assert buzon.wait([b, ch], timeout=5) == [ch]
            assert ch.recv_nowait().value == 7
            assert ch.statistics() == signals.SignalStatistics(received=1)
            a.send("hello")
            assert buzon.wait([ch, b], timeout=5) == [b]
            assert b.recv(timeout=5) == "hello"
            signals.send(os.getpid(), RT, 8)
            a.send("again")
            assert buzon.wait([ch, b], timeout=5) == [ch, b]
            assert ch.recv(timeout=5).value == 8

    _isolated(body)


def test_asyncio_receive_is_cancel_safe() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with signals.listen(RT) as ch:
            with pytest.raises(buzon.Timeout):
                await ch.arecv(timeout=0.02)
            # cancel a receive at every point of its life: it either returned the
            # signal or left it in the channel, never both and never neither
            for value in range(12):
                waiting = value % 2 == 1  # signal sent while the receive already waits
                if not waiting:
                    signals.send(os.getpid(), RT, value)
                task = asyncio.ensure_future(ch.arecv(timeout=5))
                if waiting:
                    await asyncio.sleep(0.005)
                    signals.send(os.getpid(), RT, value)
                for _ in range(value // 2):
                    await asyncio.sleep(0)
                task.cancel()
                try:
                    got = [(await task).value]
                except asyncio.CancelledError:
                    got = []
                while True:
                    try:
                        got.append(ch.recv_nowait().value)
                    except buzon.Empty:
                        break
                assert got == [value]
            loop.call_later(0.01, signals.send, os.getpid(), RT, 100)
            assert (await ch.arecv(timeout=5)).value == 100
            signals.send(os.getpid(), RT, 101)
            assert await buzon.aio.wait([ch], timeout=5) == [ch]
            assert ch.recv_nowait().value == 101

    _isolated(lambda: asyncio.run(scenario()))


# ------------------------------------------------------------------- closing


def test_mask_restored_after_close() -> None:
    before = _blocked()
    assert signal.SIGUSR1 not in before and RT not in before
    ch = signals.listen(signal.SIGUSR1, RT)
    assert {signal.SIGUSR1, RT} <= _blocked()
    ch.close()
    assert _blocked() == before
    ch.close()  # idempotent
    assert _blocked() == before
    # a signal the program blocked itself stays blocked after the channel closes
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
    try:
        with signals.listen(signal.SIGUSR2, signal.SIGUSR1):
            pass
        assert _blocked() == before | {signal.SIGUSR2}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
    assert _blocked() == before


def test_fd_closed_after_close() -> None:
    ch = signals.listen(signal.SIGUSR1)
    fd = ch.fileno()
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[signalfd]"
    assert os.get_inheritable(fd) is False
    assert os.get_blocking(fd) is False
    ch.close()
    assert ch.closed and ch.fileno() == -1
    assert not os.path.exists(f"/proc/self/fd/{fd}")
    ch.close()
    with pytest.raises(buzon.ChannelClosed):
        ch.recv_nowait()
    with pytest.raises(buzon.ChannelClosed):
        ch.recv(timeout=1)
    assert list(ch) == []
    assert buzon.wait([ch], timeout=0) == [ch]  # ready: recv raises at once


def test_close_discards_pending_signals_instead_of_dying() -> None:
    # SIGUSR1's default action terminates the process: closing with one pending must
    # not unblock it into delivery (the isolated process would be killed by it)
    def body() -> None:
        ch = signals.listen(signal.SIGUSR1, RT)
        signals.send(os.getpid(), signal.SIGUSR1)
        signals.send(os.getpid(), RT, 1)
        signals.send(os.getpid(), RT, 2)
        assert buzon.wait([ch], timeout=5) == [ch]  # reads all three ahead
        signals.send(os.getpid(), RT, 3)  # and one still in the kernel
        ch.close()
        assert ch.statistics() == signals.SignalStatistics(discarded=4)
        assert not {signal.SIGUSR1, RT} & _blocked()

    _isolated(body)


def test_one_channel_per_signal() -> None:
    with signals.listen(signal.SIGUSR1, RT):
        with pytest.raises(buzon.EndpointInUse, match="SIGRTMIN\\+1"):
            signals.listen(RT, signal.SIGUSR2)
        assert signal.SIGUSR2 not in _blocked()  # the refused listen changed nothing
    with signals.listen(RT, signal.SIGUSR2):
        pass


# -------------------------------------------------------------------- errors


def test_send_to_a_process_that_does_not_exist() -> None:
    pid = _dead_pid()
    with pytest.raises(buzon.NoSuchEndpoint, match=str(pid)):
        signals.send(pid, signal.SIGUSR1)
    with pytest.raises(buzon.NoSuchEndpoint):
        signals.send(pid, RT, 5)
    with pytest.raises(buzon.NoSuchEndpoint):
        signals.send(pid, 0)


def test_send_to_another_users_process_is_denied() -> None:
    if os.getuid() != 0:
        target = 1  # init belongs to root
        with pytest.raises(buzon.PermissionDenied):
            signals.send(target, 0)
        return
    parent = os.getpid()

    def child() -> int:
        os.setuid(65534)
        for value in (None, 1):
            try:
                signals.send(parent, 0, value)
            except buzon.PermissionDenied:
                continue
            return 2
        return 0

    _check_exit(_fork(child), 10, "the unprivileged child")


@pytest.mark.parametrize(
    ("pid", "sig", "value", "error"),
    [
        (1, signal.SIGUSR1, 2**31, ValueError),
        (1, signal.SIGUSR1, -(2**31) - 1, ValueError),
        (1, signal.SIGUSR1, 1.5, TypeError),
        (1, signal.SIGUSR1, True, TypeError),
        (0, signal.SIGUSR1, None, ValueError),
        (-1, signal.SIGUSR1, None, ValueError),
        ("1", signal.SIGUSR1, None, TypeError),
        (1, signal.NSIG, None, ValueError),
        (1, -1, None, ValueError),
        (1, "SIGUSR1", None, TypeError),
    ],
)
def test_bad_arguments_to_send(pid: object, sig: object, value: object, error: type) -> None:
    with pytest.raises(error):
        signals.send(pid, sig, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "sigs", [(), (signal.SIGKILL,), (signal.SIGSTOP,), (0,), (signal.NSIG,), (32,), (33,)]
)
def test_bad_arguments_to_listen(sigs: tuple[int, ...]) -> None:
    before = _blocked()
    with pytest.raises(ValueError):
        signals.listen(*sigs)
    assert _blocked() == before


def test_reexports() -> None:
    assert signals.SIGRTMIN == signal.SIGRTMIN and signals.SIGRTMAX == signal.SIGRTMAX
    for name in signals.__all__:
        assert hasattr(signals, name), name


# -------------------------------------------------------------------- storms

N_STORM = 2000
RATE = 1000.0  # signals per second
BURST = 10


def _pacer(i: int, t0: float) -> None:
    if i % BURST == 0:
        delay = t0 + i / RATE - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _storm_sender(target: int, sig: int, queued: bool) -> Callable[[], int]:
    def body() -> int:
        t0 = time.monotonic()
        for i in range(N_STORM if queued else N_STORM // 2):
            _pacer(i, t0)
            while True:
                try:
                    signals.send(target, sig, i if queued else None)
                    break
                except buzon.Full:  # the receiver is behind: wait, never drop
                    time.sleep(0.001)
        return 0

    return body


def _echo(chan: buzon.Channel) -> Callable[[], int]:
    def body() -> int:
        while True:
            msg = chan.recv(timeout=30)
            chan.send(msg, timeout=30)
            if msg is None:
                return 0

    return body


def _payload(i: int) -> dict[str, object]:
    size = 200_000 if i % 10 == 9 else (i * 37) % 3000  # some exceed the pipe buffer
    return {"i": i, "blob": bytes((i + k) % 251 for k in range(size % 251)) * (size // 251)}


def _storm(handler_variant: bool) -> None:
    """The parent keeps a request/response exchange going over a buzon pipe with an
    echo child while another child sends the storm; see the two tests below."""
    parent = os.getpid()
    interrupted: list[BaseException] = []
    handled: list[int] = []
    if handler_variant:
        signal.signal(signal.SIGUSR2, lambda signo, frame: handled.append(signo))
        ch = None
    else:
        ch = signals.listen(RT)
    a, b = buzon.pipe()
    echo = _fork(_echo(b))
    b.close()
    sender = -1
    values: list[int] = []
    senders: set[int] = set()
    trips = 0
    try:
        sig = signal.SIGUSR2 if handler_variant else RT
        sender = _fork(_storm_sender(parent, sig, queued=not handler_variant))
        deadline = time.monotonic() + 30
        sender_done = False

        def drain() -> None:
            if ch is None:
                return
            while True:
                try:
                    msg = ch.recv_nowait()
                except buzon.Empty:
                    return
                values.append(msg.value if msg.value is not None else -1)
                senders.add(msg.pid)

        while not sender_done:
            assert time.monotonic() < deadline, "the storm did not end in time"
            done, status = os.waitpid(sender, os.WNOHANG)
            if done:
                sender, sender_done = -1, True
                assert os.waitstatus_to_exitcode(status) == 0, "the storm sender failed"
            payload = _payload(trips)
            try:
                a.send(payload, timeout=10)
                echoed = a.recv(timeout=10)
            except InterruptedError as exc:  # EINTR must never reach the user
                interrupted.append(exc)
                raise
            assert echoed == payload, f"message {trips} damaged"
            trips += 1
            drain()
        drain()  # the sender has exited: every signal it queued is pending by now
        a.send(None, timeout=10)
        assert a.recv(timeout=10) is None
        _check_exit(echo, 10, "the echo child")
        echo = -1
    finally:
        for pid in (sender, echo):
            if pid > 0:
                _reap(pid, 0)
        a.close()
        if ch is not None:
            ch.close()
    assert not interrupted
    assert trips > 0
    if handler_variant:
        assert handled, "no SIGUSR2 handler ran: the storm did not happen"
    else:
        assert len(values) == N_STORM, f"lost {N_STORM - len(set(values))} signals"
        assert values == list(range(N_STORM)), "signals duplicated or out of order"
        assert len(senders) == 1 and parent not in senders


def _sigpending_room() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_SIGPENDING)
    return N_STORM if soft == resource.RLIM_INFINITY else soft


def test_storm_of_queued_signals_during_channel_io_loses_nothing() -> None:
    """2000 real-time signals at about 1 kHz, values 0..1999, blocked and received
    through the signalfd while the process exchanges messages over a pipe: every
    value arrives exactly once and in order, every message intact, no EINTR."""
    if _sigpending_room() < 4 * BURST:
        pytest.skip("RLIMIT_SIGPENDING is too small for a storm")
    _isolated(lambda: _storm(handler_variant=False), timeout=60)


def test_storm_with_a_python_handler_does_not_disturb_channel_io() -> None:
    """1000 SIGUSR2 at about 1 kHz *not* blocked, with a plain Python handler, while
    the process blocks in buzon send/recv (large messages included): the interrupted
    system calls are resumed inside buzon, no exception escapes, no message is lost."""
    _isolated(lambda: _storm(handler_variant=True), timeout=60)
