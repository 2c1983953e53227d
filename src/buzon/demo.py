"""``buzon demo``: each IPC mechanism of the lectures, between real processes, narrated.

Every section forks child processes and moves messages between them and this process
over one transport (pipe, FIFO, POSIX queue, Unix stream and datagram sockets, TCP,
UDP), printing the lecture concept, the address, what travelled and the link's
properties as the channel reports them (``channel.properties``). Then a numpy array
travels out of band (if numpy is installed) and ``buzon.wait`` watches four
transports at once. The last sections call a :mod:`buzon.rpc` service in a child (a
typed stub, a deadline the handler sees cancelled, ``exactly_once`` through a relay
that resets replies) and use remote objects through their proxies.

The demo uses a private temporary runtime dir (``BUZON_RUNTIME_DIR``) removed at the
end, names its queues after its pid, bounds every wait with a timeout, and reaps
every child (killing, by pid, one that overstays). It prints what failed and returns
1 if any section failed, else 0.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import buzon

from ._runtime import runtime_dir
from .rpc import expose as rpc_expose
from .rpc import remote as rpc_remote_class

__all__ = ["main"]

TIMEOUT = 5.0  # seconds: the bound on every wait of the demo


class DemoFailure(Exception):
    """A section did not see what it expected."""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _line(label: str, text: str) -> None:
    _say(f"   {label:<9}{text}")


def describe(props: buzon.LinkProperties) -> str:
    """A one-line summary of a link's properties."""
    parts = [
        props.direction,
        f"{props.boundaries} boundaries",
        "connection-oriented" if props.connection_oriented else "connectionless",
        "reliable" if props.reliable else "unreliable",
        "ordered" if props.ordered else "unordered",
        "local" if props.local else "network",
    ]
    if props.max_message:
        parts.append(f"at most {props.max_message} B per message")
    if props.priorities:
        parts.append("priorities")
    if props.credentials:
        parts.append("peer credentials")
    return ", ".join(parts)


class _Children:
    """The children forked by one section: each is reaped, none outlives the section."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def fork(self, body: Callable[[], None]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: run body, never return into the caller's stack
            code = 1
            try:
                body()
                code = 0
            except BaseException as exc:
                with contextlib.suppress(BaseException):
                    print(f"   child {os.getpid()} failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        self.pids.append(pid)
        return pid

    def reap(self, pid: int, timeout: float = TIMEOUT) -> None:
        """Wait for ``pid`` to exit; fail if it exits non-zero or overstays."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.remove(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    raise DemoFailure(f"child {pid} exited with status {code}")
                return
            if time.monotonic() >= deadline:
                self._kill(pid)
                raise DemoFailure(f"child {pid} did not finish within {timeout:g} s")
            time.sleep(0.002)

    def reap_all(self) -> None:
        for pid in list(self.pids):
            self.reap(pid)

    def kill_all(self) -> None:
        for pid in list(self.pids):
            self._kill(pid)

    def _kill(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        self.pids.remove(pid)


def _expect(got: Any, wanted: Any, what: str) -> None:
    if got != wanted:
        raise DemoFailure(f"{what}: expected {wanted!r}, got {got!r}")


# -- sections -------------------------------------------------------------------------


def demo_pipe(kids: _Children) -> None:
    _line("concept", "an ordinary pipe: a kernel buffer with no name, shared across fork()")
    a, b = buzon.pipe()
    _line("address", "none: the child inherits its end from the parent")

    def child() -> None:
        a.close()
        with b:
            request = b.recv(TIMEOUT)
            b.send({"sum": sum(request["args"]), "by": os.getpid()}, TIMEOUT)

    with a:
        pid = kids.fork(child)
        b.close()
        request = {"op": "add", "args": [2, 3]}
        a.send(request, TIMEOUT)
        _line("sent", f"parent {os.getpid()} -> child {pid}: {request}")
        reply = a.recv(TIMEOUT)
        _line("received", f"child {pid} -> parent: {reply}")
        _expect(reply, {"sum": 5, "by": pid}, "the child's reply")
        _line("link", describe(a.properties))
    kids.reap(pid)


def demo_fifo(kids: _Children) -> None:
    _line("concept", "a named pipe (mkfifo): unrelated processes meet at a file-system name")
    with buzon.listen("fifo:jobs") as listener:
        _line("address", f"fifo:jobs -> {listener.address.fs_path()}")

        def writer(n: int) -> Callable[[], None]:
            def body() -> None:
                with buzon.connect("fifo:jobs", timeout=TIMEOUT) as ch:
                    for i in range(2):
                        ch.send({"job": f"w{n}-{i}", "writer": os.getpid()}, TIMEOUT)

            return body

        pids = [kids.fork(writer(n)) for n in (1, 2)]
        with listener.accept(TIMEOUT) as ch:
            got = [ch.recv(TIMEOUT) for _ in range(4)]
            kids.reap_all()
            for msg in got:
                _line("received", f"from writer {msg['writer']}: {msg['job']}")
            _expect(sorted(m["writer"] for m in got), sorted(pids * 2), "writers")
            _line("note", "two writers, one reader; each write of <= 4096 B is atomic")
            _line("", "the FIFO moves bytes: buzon's frames make them messages")
            _line("link", describe(ch.properties))


def demo_mq(kids: _Children) -> None:
    _line("concept", "a message queue: the kernel keeps whole messages, highest priority first")
    url = f"mq:demo-{os.getpid()}"
    with buzon.listen(url, mq_maxmsg=8, mq_msgsize=1024) as listener:
        _line("address", f"{url} -> POSIX queue {listener.address.mq_name()}")
        sent = [("routine", 0), ("urgent", 7), ("normal", 3)]

        def sender() -> None:
            with buzon.connect(url, timeout=TIMEOUT) as ch:
                for text, prio in sent:
                    ch.send(text, TIMEOUT, priority=prio)

        with listener.accept(TIMEOUT) as ch:
            pid = kids.fork(sender)
            kids.reap(pid)  # all three wait in the kernel: the sender is gone already
            _line("sent", f"child {pid}: {', '.join(f'{t} (priority {p})' for t, p in sent)}")
            got: list[tuple[Any, int]] = []
            for _ in sent:
                got.append((ch.recv(TIMEOUT), ch.last_priority))
            _line("received", ", ".join(f"{t} (priority {p})" for t, p in got))
            _expect(got, sorted(sent, key=lambda s: -s[1]), "priority order")
            _line("link", describe(ch.properties))


def demo_unix(kids: _Children) -> None:
    _line("concept", "a Unix stream socket: a connection per client, the kernel names the peer")
    with buzon.listen("unix:calc") as listener:
        _line("address", f"unix:calc -> {listener.address.fs_path()}")

        def client() -> None:
            with buzon.connect("unix:calc", timeout=TIMEOUT) as ch:
                ch.send({"op": "mul", "args": [6, 7]}, TIMEOUT)
                _expect(ch.recv(TIMEOUT), 42, "the server's answer")

        pid = kids.fork(client)
        with listener.accept(TIMEOUT) as ch:
            request = ch.recv(TIMEOUT)
            peer = ch.peer
            _line("received", f"{request} from pid {peer.pid} uid {peer.uid} (SO_PEERCRED)")
            _expect(peer.pid, pid, "the peer's pid")
            ch.send(request["args"][0] * request["args"][1], TIMEOUT)
            _line("sent", "42 back over the same connection")
            _line("note", "a byte stream underneath: buzon's frames delimit the messages")
            _line("link", describe(ch.properties))
        kids.reap(pid)


def demo_unixgram(kids: _Children) -> None:
    _line("concept", "a Unix datagram socket: whole messages, no connection to set up")
    with buzon.listen("unixgram:log") as listener:
        _line("address", f"unixgram:log -> {listener.address.fs_path()}")

        def client() -> None:
            with buzon.connect("unixgram:log", timeout=TIMEOUT) as ch:
                ch.send("disk almost full", TIMEOUT)
                ch.send("disk full", TIMEOUT)
                _expect(ch.recv(TIMEOUT), "logged 2", "the reply")

        pid = kids.fork(client)
        with listener.accept(TIMEOUT) as ch:
            got = [ch.recv(TIMEOUT), ch.recv(TIMEOUT)]
            _line("received", f"datagrams from child {pid}: {got}")
            ch.send(f"logged {len(got)}", TIMEOUT)
            _line("sent", "'logged 2' back to the last sender")
            _line("link", describe(ch.properties))
        kids.reap(pid)


def demo_tcp(kids: _Children) -> None:
    _line("concept", "a TCP socket: the same stream API across machines (loopback here)")
    with buzon.listen("tcp://127.0.0.1:0") as listener:
        address = listener.address
        _line("address", f"{address} (port 0: the kernel picked a free port)")

        def client() -> None:
            with buzon.connect(address, timeout=TIMEOUT) as ch:
                ch.send(["ping", 1], TIMEOUT)
                _expect(ch.recv(TIMEOUT), ["pong", 1], "the reply")

        pid = kids.fork(client)
        with listener.accept(TIMEOUT) as ch:
            request = ch.recv(TIMEOUT)
            host, port = ch.peer.address[:2]
            _line("received", f"{request} from {host}:{port} (child {pid})")
            ch.send(["pong", request[1]], TIMEOUT)
            _line("sent", "['pong', 1]")
            _line("link", describe(ch.properties))
        kids.reap(pid)


def demo_udp(kids: _Children) -> None:
    _line("concept", "a UDP socket: datagrams that may be lost, duplicated or reordered")
    with buzon.listen("udp://127.0.0.1:0") as listener:
        address = listener.address
        _line("address", str(address))

        def client() -> None:
            with buzon.connect(address, timeout=TIMEOUT) as ch:
                for i in range(3):
                    ch.send({"reading": i}, TIMEOUT)
                with contextlib.suppress(buzon.Timeout):  # UDP may lose the reply
                    ch.recv(TIMEOUT)

        pid = kids.fork(client)
        with listener.accept(TIMEOUT) as ch:
            got: list[Any] = []
            with contextlib.suppress(buzon.Timeout):
                while len(got) < 3:
                    got.append(ch.recv(1.0 if got else TIMEOUT))
            _line("received", f"{len(got)} of 3 datagrams: {got}")
            if not got:
                raise DemoFailure("no datagram arrived")
            ch.send(f"got {len(got)}", TIMEOUT)
            _line("sent", f"'got {len(got)}' back to the sender")
            _line("link", describe(ch.properties))
        kids.reap(pid)


def demo_numpy(kids: _Children) -> None:
    try:
        import numpy as np
    except ImportError:
        _line("skipped", "numpy is not installed")
        return
    _line("concept", "zero-copy marshalling: the array's memory is its own buffer, no pickle")
    array = np.arange(1 << 20, dtype=np.float64)  # 8 MiB
    with buzon.listen("unix:arrays") as listener:

        def child() -> None:
            with buzon.connect("unix:arrays", timeout=TIMEOUT) as ch:
                ch.send("ready", TIMEOUT)
                got = ch.recv(TIMEOUT)
                ch.send([str(got.dtype), list(got.shape), float(got.sum())], TIMEOUT)

        pid = kids.fork(child)
        with listener.accept(TIMEOUT) as ch:
            _expect(ch.recv(TIMEOUT), "ready", "the child's greeting")  # it speaks first
            ch.send(array, TIMEOUT)
            sent = ch.statistics().bytes_sent
            _line("sent", f"ndarray {array.dtype} shape {array.shape}: {array.nbytes} B data")
            _line("", f"{sent} B went on the wire (data plus a small header)")
            reply = ch.recv(TIMEOUT)
            _line("received", f"child {pid} rebuilt it: dtype, shape, sum = {reply}")
            _expect(reply, [str(array.dtype), list(array.shape), float(array.sum())], "reply")
        kids.reap(pid)


def demo_wait(kids: _Children) -> None:
    _line("concept", "waiting on many IPC objects at once, whatever their transports")
    queue = f"mq:mix-{os.getpid()}"
    with contextlib.ExitStack() as stack:
        fifo = stack.enter_context(buzon.listen("fifo:mix"))
        mq = stack.enter_context(buzon.listen(queue))
        udp = stack.enter_context(buzon.listen("udp://127.0.0.1:0"))
        unix = stack.enter_context(buzon.listen("unix:mix"))
        udp_address = udp.address
        names: dict[Any, str] = {unix: "unix listener"}
        for listener, name in ((fifo, "fifo"), (mq, "mq"), (udp, "udp")):
            ch = stack.enter_context(listener.accept(TIMEOUT))
            names[ch] = f"{name} channel"
        _line("watching", ", ".join(names.values()))

        def child() -> None:
            for url in (udp_address, queue, "fifo:mix", "unix:mix"):
                with buzon.connect(url, timeout=TIMEOUT) as ch:
                    ch.send(f"hello over {url}", TIMEOUT)

        pid = kids.fork(child)
        waiting = list(names)
        received = 0
        while received < 4:
            ready = buzon.wait(waiting, timeout=TIMEOUT)
            if not ready:
                raise DemoFailure(f"buzon.wait timed out with {received} of 4 messages")
            for obj in ready:
                if isinstance(obj, buzon.Listener):
                    ch = stack.enter_context(obj.accept(TIMEOUT))
                    names[ch] = "unix connection"
                    waiting.remove(obj)
                    waiting.append(ch)
                    _line("ready", "unix listener: a client connects")
                    continue
                try:
                    msg = obj.recv_nowait()
                except buzon.Empty:
                    continue
                received += 1
                _line("ready", f"{names[obj]}: {msg!r}")
                waiting.remove(obj)
        kids.reap(pid)


def demo_semantics(kids: _Children) -> None:
    _line("concept", "capacity 0 (rendezvous), N (bounded), and receipts for async sends")
    a, b = buzon.pipe(capacity=0)
    go_r, go_w = os.pipe()  # the child receives only once the parent says so

    def child() -> None:
        a.close()
        os.close(go_w)
        with b:
            os.read(go_r, 1)
            os.close(go_r)
            got = b.recv(TIMEOUT)
            b.send({"took": got, "by": os.getpid()}, TIMEOUT)

    with a:
        pid = kids.fork(child)
        b.close()
        os.close(go_r)
        try:
            try:
                a.send_nowait("too early")
                raise DemoFailure("send_nowait succeeded with nobody waiting (capacity=0)")
            except buzon.Full:
                _line("cap=0", "send_nowait with no receiver waiting: buzon.Full")
        finally:
            os.write(go_w, b"!")
            os.close(go_w)
        a.send("ping", TIMEOUT)  # returns only once the child has taken it
        _line("cap=0", f"send('ping') returned: child {pid} has taken it")
        reply = a.recv(TIMEOUT)
        _expect(reply, {"took": "ping", "by": pid}, "the child's reply")
    kids.reap(pid)

    with buzon.listen("unix:semantics", capacity=3) as listener:
        accepted: list[buzon.Channel] = []
        t = threading.Thread(target=lambda: accepted.append(listener.accept(TIMEOUT)))
        t.start()
        try:
            w = buzon.connect("unix:semantics", timeout=TIMEOUT)
        finally:
            t.join(TIMEOUT)
        if not accepted:
            w.close()
            raise DemoFailure("the listener accepted nobody")
        r = accepted[0]
        with w, r:
            for i in range(3):
                w.send_nowait(i)
            try:
                w.send_nowait(3)
                raise DemoFailure("a fourth message fit capacity=3")
            except buzon.Full:
                _line("cap=3", "three messages fit, the fourth raises buzon.Full")
            _expect([r.recv(TIMEOUT) for _ in range(3)], [0, 1, 2], "bounded messages")
            receipts = [w.send_async({"job": i}) for i in range(3)]  # capacity 3: all fit
            _expect([r.recv(TIMEOUT)["job"] for _ in range(3)], list(range(3)), "async sends")
            receipts[-1].wait(TIMEOUT)
            _expect(all(x.done() for x in receipts), True, "receipts")
            _line(
                "receipts",
                f"3 send_async returned at once; all taken, by pid {receipts[-1].receiver}",
            )


def demo_shm(kids: _Children) -> None:
    _line("concept", "shared memory: after setup, messages move with no system call at all")
    ours = {os.getpid()}
    rounds = 2000
    with buzon.listen("shm:demo") as listener:

        def echo() -> None:
            with buzon.connect("shm:demo", timeout=TIMEOUT) as ch:
                for _ in range(rounds + 1):
                    ch.send_bytes(ch.recv_bytes(TIMEOUT), TIMEOUT)

        pid = kids.fork(echo)
        ours.add(pid)
        with listener.accept(TIMEOUT) as ch:
            times = []
            for i in range(rounds + 1):
                t = time.perf_counter()
                ch.send_bytes(b"%063d" % i, TIMEOUT)
                _expect(ch.recv_bytes(TIMEOUT), b"%063d" % i, "the echo")
                times.append(time.perf_counter() - t)
            times.sort()
            _line("channel", f"shm:demo, {rounds} round trips of 64 B with child {pid}")
            _line("", f"median {times[len(times) // 2] * 1e6:.1f} us each (this machine, now)")
        kids.reap(pid)

    slots = 4
    with buzon.BoundedBuffer(f"demo-{os.getpid()}", slots=slots, item_size=16) as buf:
        try:
            for i in range(slots):
                buf.put_nowait(b"item %d" % i)
            try:
                buf.put_nowait(b"one too many")
                raise DemoFailure(f"a BoundedBuffer of {slots} slots took {slots + 1}")
            except buzon.Full:
                _line("bounded", f"BoundedBuffer: all {slots} slots used, the next put is Full")
            producers = [kids.fork(functools.partial(_produce, buf.name, k)) for k in range(2)]
            got = [buf.get(TIMEOUT) for _ in range(slots + 2 * 50)]
            for pid in producers:
                kids.reap(pid)
            _expect(len(set(got)), len(got), "distinct items")
            _line("", f"2 producer processes x 50 items + {slots} waiting: {len(got)} taken once")
        finally:
            buf.remove()

    with buzon.shared_value(f"demo-count-{os.getpid()}", int) as counter:
        try:
            adders = [kids.fork(lambda: _add(counter.name, 500)) for _ in range(3)]
            for pid in adders:
                kids.reap(pid)
            _expect(counter.value, 1500, "the shared counter")
            _line("shared", "shared_value: 3 processes x 500 increments under its lock = 1500")
        finally:
            counter.remove()
    left = [s.name for s in buzon.shm.list_segments() if s.owner_pid in ours]
    _expect(left, [], "segments of this section left in /dev/shm")
    _line("clean", "nothing of this section is left in /dev/shm")


def demo_mailbox(kids: _Children) -> None:
    _line("concept", "indirect communication: senders and receivers name a mailbox, not each other")
    name = f"demo-jobs-{os.getpid()}"
    jobs = 40
    workers: list[int] = []
    listeners: list[int] = []
    with buzon.mailbox(name, capacity=8, create=True) as box:
        try:
            workers += [kids.fork(functools.partial(_work, name)) for _ in range(2)]
            receipts = [box.send_async({"job": i}, TIMEOUT) for i in range(jobs)]
            takers = [r.wait(TIMEOUT).pid for r in receipts]
            for _ in workers:
                box.send(None, TIMEOUT)  # one stop marker each
            for pid in workers:
                kids.reap(pid)
            _expect(set(takers) <= set(workers), True, "receivers named by the receipts")
            counts = ", ".join(f"pid {p} took {takers.count(p)}" for p in workers)
            _line("mailbox", f"mailbox:{name}, policy 'any': P1 sends {jobs} jobs")
            _line("", f"P2 and P3 receive; who got each? the receipts say: {counts}")
        finally:
            box.remove()
    with buzon.mailbox(f"{name}-all", policy="broadcast", create=True) as news:
        try:
            ready = buzon.mailbox(f"{name}-ready", create=True)
            try:
                for _ in range(2):
                    listeners.append(kids.fork(functools.partial(_listen, news.name, ready.name)))
                for _ in listeners:
                    ready.recv(TIMEOUT)  # each has attached to the broadcast
                receipt = news.send_async("frame 1", TIMEOUT)
                receipt.wait(TIMEOUT)  # every attached receiver took it
                got = sorted(p.pid or 0 for p in receipt.receivers)
                for pid in listeners:
                    kids.reap(pid)
                _expect(got, sorted(listeners), "the broadcast's receivers")
                _line("fan-out", f"policy 'broadcast': one send, taken by both pids {got}")
            finally:
                ready.remove()
        finally:
            news.remove()
    ours = {os.getpid(), *workers, *listeners}
    left = [s.name for s in buzon.shm.list_segments() if s.owner_pid in ours]
    left += [f for f in os.listdir(runtime_dir()) if f.startswith(name)]
    _expect(left, [], "names or segments of this section left")
    _line("clean", "mailboxes removed: nothing of them is left (names, segments)")


def demo_direct(kids: _Children) -> None:
    _line("concept", "direct communication: send(P, msg) / receive(Q) name the process itself")
    ready_r, ready_w = os.pipe()  # receiver -> parent: its inbox exists
    order_r, order_w = os.pipe()  # parent -> receiver: the senders' pids
    result_r, result_w = os.pipe()  # receiver -> parent: what recv_from gave
    try:
        receiver = kids.fork(functools.partial(_receive_direct, ready_w, order_r, result_w))
        _expect(os.read(ready_r, 1), b"!", "the receiver's inbox")
        chatty = [kids.fork(functools.partial(_tell, receiver, k)) for k in range(2)]
        os.write(order_w, b"%d %d\n" % (chatty[0], chatty[1]))
        for pid in chatty:
            kids.reap(pid)
        kids.reap(receiver)
        report = os.read(result_r, 4096).decode()
    finally:
        for fd in (ready_r, ready_w, order_r, order_w, result_r, result_w):
            os.close(fd)
    _expect(report, "1:0 1:1 1:2 | 0:0 0:1 0:2", "what recv_from returned")
    _line("direct", f"children {chatty[0]}, {chatty[1]} each send_to({receiver}, ...) 3 messages")
    _line("", f"{receiver}: recv_from({chatty[1]}) x3, then recv_from({chatty[0]}) x3 gives")
    _line("", f"{report} (each sender in its order; the other's held back meanwhile)")
    try:
        buzon.send_to(receiver, "anyone there?", timeout=TIMEOUT)
        raise DemoFailure("send_to a process that has exited went through")
    except buzon.NoSuchEndpoint:
        _line("", f"send_to({receiver}) once it has exited: NoSuchEndpoint")
    ours = {receiver, *chatty}
    left = [s.name for s in buzon.shm.list_segments() if s.owner_pid in ours]
    _expect(left, [], "inbox segments of this section left")


def demo_rpc(kids: _Children) -> None:
    _line("concept", "remote procedure call: a client stub marshals, a server stub runs it")
    url = f"unix:demo-rpc-{os.getpid()}"
    seen_r, seen_w = os.pipe()  # server -> parent: the handler saw its call cancelled
    done_r, done_w = os.pipe()  # parent -> server: the caller gave up, the handler may end
    make = functools.partial(_rpc_service, seen_w, done_r)
    try:
        _rpc_section(kids, url, make, seen_r, done_w)
    finally:
        for fd in (seen_r, seen_w, done_r, done_w):
            os.close(fd)
    left = [f for f in os.listdir(runtime_dir()) if f.startswith(f"demo-rpc-{os.getpid()}")]
    _expect(left, [], "sockets of this section left")
    _line("clean", "the server stopped and reaped; its socket and the relay's removed")


def _rpc_section(kids: _Children, url: str, make: Any, seen_r: int, done_w: int) -> None:
    from . import rpc
    from .testing.chaos import ChaosRelay, Faults

    with _rpc_server(kids, url, make) as server:
        calc = rpc.connect(url, _Calc, timeout=TIMEOUT)
        try:
            total = calc.add(2, 3)
            _expect(total, 5, "add(2, 3)")
            _line("call", f"pid {server} serves {url}; a typed proxy: calc.add(2, 3) -> {total}")
            try:
                calc.add(2, "three")  # type: ignore[arg-type]
                raise DemoFailure("a str for an int went through")
            except rpc.RemoteError as exc:
                _expect(exc.code, rpc.RemoteError.INVALID_PARAMS, "the error's code")
                _line("", f"calc.add(2, 'three') -> RemoteError {exc.code} (nothing ran)")
            try:
                with rpc.deadline(0.3):
                    calc.slow()
                raise DemoFailure("slow() finished within its deadline")
            except rpc.DeadlineExceeded:
                pass
            finally:
                os.write(done_w, b"!")  # (its reply must come after the caller gave up)
            ready, _, _ = select.select([seen_r], [], [], TIMEOUT)
            _expect(bool(ready) and os.read(seen_r, 1), b"c", "the handler's context().cancelled")
            _line("deadline", "with rpc.deadline(0.3): calc.slow() -> DeadlineExceeded;")
            _line("", "the server's handler saw rpc.context().cancelled and stopped")
        finally:
            rpc.close(calc)
        faults = Faults(reply=Faults(reset=0.3))  # replies lose their connection
        with ChaosRelay(f"{url}-lossy", url, profile=faults, seed=3) as relay:
            once = rpc.connect(relay.address, timeout=TIMEOUT, semantics="exactly_once")
            try:
                counts = [once.incr(f"k{i}") for i in range(10)]
            finally:
                once.close()
        _expect(counts, [1] * 10, "each key's count as the server returned it")
        _expect(once.retries > 0, True, "retries after resets")
        _line("once", f"10 x incr(key) via a relay that resets replies: {once.retries} retries,")
        _line("", "yet every count came back 1: exactly_once ran each call once")


class _Calc(Protocol):
    def add(self, a: int, b: int) -> int: ...
    def slow(self) -> None: ...


def _rpc_service(seen: int, done: int) -> Any:
    from . import rpc

    svc = rpc.Service("demo")
    counts: dict[str, int] = {}

    @svc.method
    def add(a: int, b: int) -> int:
        return a + b

    @svc.method
    def slow() -> None:
        ctx = rpc.context()
        end = time.monotonic() + TIMEOUT
        while not ctx.cancelled and time.monotonic() < end:
            time.sleep(0.005)
        if ctx.cancelled:
            os.write(seen, b"c")
            select.select([done], [], [], TIMEOUT)  # answer once the caller has given up

    @svc.method
    def incr(key: str) -> int:
        counts[key] = counts.get(key, 0) + 1
        return counts[key]

    return svc


@contextlib.contextmanager
def _rpc_server(kids: _Children, url: str, make: Callable[[], Any]) -> Iterator[int]:
    """An RPC server of ``make()`` in a forked child for the block; stopped and reaped after."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    try:
        pid = kids.fork(functools.partial(_serve_rpc, url, make, ready_w, stop_r, stop_w))
        os.close(ready_w)
        ready_w = -1
        ready, _, _ = select.select([ready_r], [], [], TIMEOUT)
        _expect(bool(ready) and os.read(ready_r, 1), b"!", "the server's ready signal")
        yield pid
        os.write(stop_w, b"!")
        kids.reap(pid)
    finally:
        for fd in (ready_r, ready_w, stop_r, stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _serve_rpc(url: str, make: Callable[[], Any], ready: int, stop: int, stop_w: int) -> None:
    from . import rpc

    os.close(stop_w)  # so that the parent's end closing is seen
    srv = rpc.Server(url, make(), grace=1.0)
    t = threading.Thread(target=srv.serve_forever)
    t.start()
    try:
        os.write(ready, b"!")
        os.read(stop, 1)  # the parent says stop (or is gone)
    finally:
        srv.shutdown()
        t.join(TIMEOUT)


def demo_remote(kids: _Children) -> None:
    from . import rpc

    _line("concept", "remote objects (RMI): objects go by reference, called through a proxy")
    url = f"unix:demo-reg-{os.getpid()}"
    with _rpc_server(kids, url, _Registry) as server:
        reg = rpc.connect(url, timeout=TIMEOUT)
        try:
            c = reg.make(5)
            _expect(isinstance(c, rpc.RemoteObject), True, "make()'s result is a proxy")
            first, second = c.incr(), c.incr(2)
            _expect((first, second), (6, 8), "incr() on the server's counter")
            _line("proxy", f"reg.make(5) -> {type(c).__name__}; c.incr() -> {first},")
            _line("", f"c.incr(2) -> {second}: each ran on the counter in pid {server}")
            same = reg.owns(c)
            _expect(same, True, "the proxy given back is the server's object")
            _line("identity", "reg.owns(c) -> True: the proxy given back arrived as the object")
            del c
        finally:
            reg.close()


@rpc_remote_class
class _Counter:
    def __init__(self, start: int) -> None:
        self.value = start

    @rpc_expose
    def incr(self, by: int = 1) -> int:
        self.value += by
        return self.value


class _Registry:
    def __init__(self) -> None:
        self.made: list[_Counter] = []

    @rpc_expose
    def make(self, start: int) -> _Counter:
        c = _Counter(start)
        self.made.append(c)
        return c

    @rpc_expose
    def owns(self, c: _Counter) -> bool:
        return any(c is m for m in self.made)


def _receive_direct(ready: int, order: int, result: int) -> None:
    me = buzon.inbox()  # made before anyone looks for it
    try:
        _answer_direct(ready, order, result)
    finally:
        me.remove()  # a forked child leaves with os._exit: no exit hook removes it


def _answer_direct(ready: int, order: int, result: int) -> None:
    os.write(ready, b"!")
    line = b""
    while not line.endswith(b"\n"):
        line += os.read(order, 64)
    first, second = (int(p) for p in line.split())
    later = [buzon.recv_from(second, TIMEOUT) for _ in range(3)]
    earlier = [buzon.recv_from(first, TIMEOUT) for _ in range(3)]
    os.write(result, f"{' '.join(later)} | {' '.join(earlier)}".encode())


def _tell(parent: int, k: int) -> None:
    for i in range(3):
        buzon.send_to(parent, f"{k}:{i}", TIMEOUT)


def _work(name: str) -> None:
    with buzon.mailbox(name) as box:
        while box.recv(TIMEOUT) is not None:
            pass


def _listen(name: str, ready: str) -> None:
    with buzon.mailbox(name) as news, buzon.mailbox(ready) as r:
        with contextlib.suppress(buzon.Empty):
            news.recv_nowait()  # a receiver attaches with its first receive
        r.send("attached", TIMEOUT)
        _expect(news.recv(TIMEOUT), "frame 1", "the broadcast")


def _produce(name: str, k: int) -> None:
    with buzon.BoundedBuffer(name) as buf:
        for i in range(50):
            buf.put(b"p%d-%d" % (k, i), TIMEOUT)


def _add(name: str, n: int) -> None:
    with buzon.shared_value(name) as counter:
        for _ in range(n):
            with counter.lock:
                counter.value += 1


SECTIONS: list[tuple[str, str, Callable[[_Children], None]]] = [
    ("pipe", "ordinary pipe, parent and child", demo_pipe),
    ("fifo", "named pipe", demo_fifo),
    ("mq", "POSIX message queue", demo_mq),
    ("unix", "Unix stream socket", demo_unix),
    ("unixgram", "Unix datagram socket", demo_unixgram),
    ("tcp", "TCP socket", demo_tcp),
    ("udp", "UDP socket", demo_udp),
    ("numpy", "a numpy array out of band", demo_numpy),
    ("wait", "buzon.wait over mixed transports", demo_wait),
    ("semantics", "rendezvous, bounded capacity and receipts", demo_semantics),
    ("shm", "shared memory: channels, a bounded buffer, a shared counter", demo_shm),
    ("mailbox", "mailboxes: who gets the message, and fan-out", demo_mailbox),
    ("direct", "direct addressing: send_to a pid, selective recv_from", demo_direct),
    ("rpc", "remote procedure calls: typed stubs, deadlines, exactly-once", demo_rpc),
    ("remote", "remote objects: a proxy, and the same object passed back", demo_remote),
]


@contextlib.contextmanager
def _private_runtime_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="buzon-demo-")
    previous = os.environ.get("BUZON_RUNTIME_DIR")
    os.environ["BUZON_RUNTIME_DIR"] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("BUZON_RUNTIME_DIR", None)
        else:
            os.environ["BUZON_RUNTIME_DIR"] = previous
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    """Run every section; 0 if all passed, 1 if any failed (each failure is printed)."""
    failed: list[str] = []
    start = time.monotonic()
    with _private_runtime_dir() as rdir:
        _say("buzon demo: every IPC mechanism of the lectures, between real processes")
        _say(f"(this process is pid {os.getpid()}; runtime dir {rdir}, removed at the end)")
        for number, (key, title, section) in enumerate(SECTIONS, 1):
            _say()
            _say(f"{number}. {key}: {title}")
            kids = _Children()
            try:
                section(kids)
                kids.reap_all()
            except Exception as exc:
                failed.append(key)
                _line("FAILED", f"{type(exc).__name__}: {exc}")
            finally:
                kids.kill_all()
    _say()
    elapsed = time.monotonic() - start
    if failed:
        _say(f"buzon demo: {len(failed)} of {len(SECTIONS)} failed: {', '.join(failed)}")
        return 1
    _say(f"buzon demo: all {len(SECTIONS)} sections passed in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
