"""Run the README's tour block statement by statement, against real endpoints.

``python tests/_readme_tour.py TOUR_FILE PORT_TCP PORT_UDP`` (run by
``tests/test_docs.py::test_the_readme_tour_runs``, in a fresh interpreter with a private
``BUZON_RUNTIME_DIR``). The tour is a cheat sheet, not a program: its statements assume
peers (a client for ``accept``, a server for ``connect``, a sender for ``recv_view``)
and a few names (``frame``, ``handler``...). Before a statement that needs one, a
*stage* below sets it up; the statement itself runs exactly as the README writes it
(the ports 7000 and 9000 are replaced by free ones). A statement with ``await`` runs on
an event loop. Afterwards each stage checks what the statement did (the message
arrived, the loaned frame came out whole). Prints ``tour ok: N statements``.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

# Block SIGUSR1 before any thread exists, so every thread inherits the mask and the
# signal the tour listens for stays pending for its signalfd (docs: buzon.signals).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

import numpy as np  # noqa: E402

import buzon  # noqa: E402

LIMIT = 10.0
tour_file, tcp_port, udp_port = sys.argv[1], sys.argv[2], sys.argv[3]
TCP = f"tcp://127.0.0.1:{tcp_port}"
UDP = f"udp://127.0.0.1:{udp_port}"

ns: dict[str, Any] = {"__name__": "__tour__"}
peers: dict[str, Any] = {}  # what stages keep: the other ends, to check and close
cleanup: list[Callable[[], None]] = []
errors: list[BaseException] = []


def background(fn: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # reported by the main thread at the end
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def connect_when_there(url: str, **options: Any) -> buzon.Channel:
    """Connect, retrying while the endpoint is not bound yet."""
    deadline = time.monotonic() + LIMIT
    while True:
        try:
            return buzon.connect(url, timeout=LIMIT, **options)
        except (buzon.NoSuchEndpoint, buzon.ConnectionRefused):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def serve_each(lst: buzon.Listener, handle: Callable[[buzon.Channel], None]) -> None:
    """Accept clients until the listener closes, each handled in its own thread."""
    while True:
        try:
            ch = lst.accept()
        except buzon.ChannelClosed:
            return
        background(lambda ch=ch: handle(ch))


def drain(ch: buzon.Channel) -> None:
    with ch:
        while True:
            try:
                peers.setdefault("received", []).append(ch.recv(timeout=LIMIT))
            except buzon.EndOfChannel:
                return


# -- stages: (pattern of the statement's source, before it, after it) ----------------------


def unix_client() -> None:
    def client() -> None:
        with connect_when_there("unix:calc") as ch:
            ch.send({"op": "add", "args": [1, 2]})
            peers["calc_client_done"].wait(LIMIT)

    peers["calc_client_done"] = threading.Event()
    background(client)


def unix_client_after() -> None:
    peers["calc_client_done"].set()
    assert ns["msg"] == {"op": "add", "args": [1, 2]}, ns["msg"]


def tcp_server() -> None:
    lst = buzon.listen(TCP)
    cleanup.append(lst.close)

    def accept_one() -> None:
        ch = lst.accept(timeout=LIMIT)
        lst.close()  # the port is reused by buzon.serve later in the tour
        drain(ch)

    background(accept_one)
    ns["big_numpy_array"] = np.arange(250_000, dtype="f8").reshape(500, 500)
    ns["small_messages"] = [{"i": i} for i in range(100)]


def wait_inputs() -> None:
    ch1, ch2 = buzon.pipe()
    ch2.send("ready")  # so that ch1 is readable
    ns["ch1"], ns["ch2"] = ch1, ch2
    cleanup.extend([ch1.close, ch2.close])


def wait_after() -> None:
    assert ns["ch1"] in ns["ready"], ns["ready"]


def calc_server() -> None:
    lst = buzon.listen("unix:calc")
    cleanup.append(lst.close)
    background(lambda: serve_each(lst, drain))


def receipt_after() -> None:
    receipt = ns["receipt"]
    assert receipt.done() if callable(getattr(receipt, "done", None)) else True
    assert receipt.receiver is not None


def udp_server() -> None:
    lst = buzon.listen(UDP, reliable=True)
    cleanup.append(lst.close)
    background(lambda: serve_each(lst, drain))


def shm_pair() -> None:
    """The loan and recv_view lines are for an shm: channel (their comment says so)."""
    lst = buzon.listen("shm:tour", max_frame=2**24)
    box: list[buzon.Channel] = []
    t = background(lambda: box.append(lst.accept(timeout=LIMIT)))
    ch = buzon.connect("shm:tour", timeout=LIMIT, max_frame=2**24)
    t.join(LIMIT)
    lst.close()
    peer = box[0]
    cleanup.extend([ch.close, peer.close])
    ns["ch"] = ch
    peers["shm"] = peer
    # a 2-D frame, as a camera gives (the shape the README's shared_array has)
    ns["frame"] = np.arange(480 * 640, dtype="u2").reshape(480, 640)


def loan_after() -> None:
    got = peers["shm"].recv_bytes(timeout=LIMIT)
    assert got == ns["frame"].tobytes(), "the loaned message is not the frame"


def recv_view_before() -> None:
    peers["shm"].send_bytes(np.full(1000, 0.5).tobytes())


def recv_view_after() -> None:
    assert ns["total"] == 500.0, ns["total"]


def echo_once(ch: buzon.Channel) -> None:
    ch.send(ch.recv(timeout=LIMIT))


def serve_client() -> None:
    ns["handler"] = echo_once

    def client() -> None:
        with connect_when_there(TCP) as ch:
            ch.send("ping")
            peers["served"] = ch.recv(timeout=LIMIT)
        os.kill(os.getpid(), signal.SIGTERM)  # buzon.serve stops on SIGTERM

    background(client)


def serve_after() -> None:
    assert peers.get("served") == "ping", peers.get("served")


def rpc_service() -> None:
    svc = buzon.rpc.Service("calc")

    @svc.method
    def add(a: int, b: int) -> int:
        peers["rpc_added"] = (a, b)
        return a + b

    ns["svc"] = svc


def rpc_serve() -> None:
    srv = ns["srv"]
    t = background(srv.serve_forever)

    def stop() -> None:
        srv.shutdown()
        t.join(LIMIT)

    cleanup.append(stop)


def rpc_stub() -> None:
    from typing import Protocol

    class Calc(Protocol):
        def add(self, a: int, b: int) -> int: ...

    ns["Calc"] = Calc


def rpc_stub_after() -> None:
    cleanup.append(lambda: buzon.rpc.close(ns["calc"]))


def rpc_called() -> None:
    assert peers.get("rpc_added") == (1, 2), peers.get("rpc_added")


def raise_signal() -> None:
    os.kill(os.getpid(), signal.SIGUSR1)  # blocked in every thread: it waits, pending


STAGES: list[tuple[str, Callable[[], None] | None, Callable[[], None] | None]] = [
    (r'^with buzon\.listen\("unix:calc"\)', unix_client, unix_client_after),
    (r"^ch = buzon\.connect\(\"tcp://", tcp_server, None),
    (r"^ready = buzon\.wait\(", wait_inputs, wait_after),
    (r'^ch = buzon\.connect\("unix:calc"', calc_server, None),
    (r"^receipt\.wait\(", None, receipt_after),
    (r'^ch = buzon\.connect\("udp://', udp_server, None),
    (r"^with ch\.loan\(", shm_pair, loan_after),
    (r"^with ch\.recv_view\(", recv_view_before, recv_view_after),
    (r"^buzon\.serve\(", serve_client, serve_after),
    (r"^srv = buzon\.rpc\.Server\(", rpc_service, rpc_serve),
    (r"^calc = buzon\.rpc\.connect\(", rpc_stub, rpc_stub_after),
    (r"^with buzon\.rpc\.deadline\(", None, rpc_called),
    (r"^with buzon\.signals\.listen\(", raise_signal, None),
]


def main() -> None:
    with open(tour_file, encoding="utf-8") as f:
        source = f.read()
    source = source.replace("127.0.0.1:7000", f"127.0.0.1:{tcp_port}")
    source = source.replace("127.0.0.1:9000", f"127.0.0.1:{udp_port}")
    ns.update(np=np, signal=signal)  # the tour uses them without importing them
    statements = ast.parse(source).body
    used: set[str] = set()
    try:
        for stmt in statements:
            text = ast.get_source_segment(source, stmt) or ""
            stage = next((s for s in STAGES if re.match(s[0], text)), None)
            if stage is not None:
                used.add(stage[0])
                if stage[1] is not None:
                    stage[1]()
            code = compile(
                ast.Module([stmt], []), tour_file, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
            result = eval(code, ns)
            if inspect.iscoroutine(result):
                asyncio.run(result)
            for value in list(ns.values()):  # named shared objects: removed at the end
                shared = peers.setdefault("shared", [])
                if isinstance(
                    value, buzon.BoundedBuffer | buzon.shm.SharedArray | buzon.Mailbox
                ) and all(value is not v for v in shared):
                    shared.append(value)
            if stage is not None and stage[2] is not None:
                stage[2]()
            if errors:
                raise errors[0]
        missing = [s[0] for s in STAGES if s[0] not in used]
        assert not missing, f"stages whose statement is no longer in the tour: {missing}"
        assert len(peers.get("received", [])) >= 100, "the servers got the tour's messages"
        print(f"tour ok: {len(statements)} statements")
    finally:
        for shared in peers.get("shared", []):
            shared.close()
            shared.remove()
        for fn in reversed(cleanup):
            fn()


main()
