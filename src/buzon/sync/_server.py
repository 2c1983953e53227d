"""Concurrent servers: the lecture's "a process (or thread) per client".

``Server(url, handler, mode=...)`` accepts connections on a connection-oriented
address (``unix:``, ``tcp://``, ``shm:``) and runs ``handler(channel)`` for each client:

* ``mode="thread"``: one thread per client;
* ``mode="process"``: ``fork()`` per client, as in the lecture's concurrent server.
  The child runs the handler and exits; the parent closes its copy of the connection
  and reaps the child as soon as it exits (a ``pidfd`` per child in the same ``poll``
  as the listener, so there are no zombies and no ``SIGCHLD`` handler). The parent lets
  go with ``Transport.close_in_parent`` and the child takes over with
  ``adopt_in_child``, so what only the last holder may remove (the rings of ``shm:``,
  which the client may not have attached yet) is the child's to remove.
  Fork only from a process without other threads running (as with any ``fork``).

``serve_forever`` runs in the calling thread until :meth:`Server.shutdown` (from a
handler, another thread or a signal handler: it writes one byte to a wake-up pipe).
Shutdown is graceful: stop accepting, remove the endpoint, wait ``grace`` seconds for
running clients, then SIGTERM (processes) and finally SIGKILL what is left; threads
cannot be killed, so their channels are closed to make their ``recv`` calls fail.
Handshakes run concurrently in the listener's accept engine (``buzon._establish``),
each bounded by ``handshake_timeout``, in the serving thread: a client gets a thread
or a process only once its handshake succeeded, so connections that never finish
theirs take no handler slot (and at most ``max_pending`` of them are kept; the oldest
silent one is evicted first). At most ``max_clients`` handlers run at once; a client
whose handshake completes beyond that is refused with the reason (``max_clients``),
which its ``connect`` raises, and counted in ``refused``.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..address import serve_address
from ..errors import ChannelClosed
from ._channel import Channel
from ._open import Listener, listen

__all__ = ["Server"]


def _log() -> Any:
    """The ``buzon.server`` logger (logging is imported on first use, not with buzon)."""
    import logging

    return logging.getLogger("buzon.server")


Handler = Callable[[Channel], Any]


class Server:
    def __init__(
        self,
        url: str,
        handler: Handler,
        *,
        mode: str = "thread",
        max_clients: int = 256,
        grace: float = 5.0,
        **options: Any,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError("mode is 'thread' or 'process' (use buzon.aio.serve for 'async')")
        addr = serve_address(url, options)  # name:NAME serves unix:NAME
        self.handler = handler
        self.mode = mode
        self.max_clients = max_clients
        self.grace = grace
        self.served = 0
        self.refused = 0
        self.failed = 0
        self._listener: Listener = listen(addr, **options)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._threads: dict[threading.Thread, list[Channel]] = {}
        self._children: dict[int, int] = {}  # pidfd -> pid
        self._lock = threading.Lock()

    @property
    def address(self) -> Any:
        return self._listener.address

    @property
    def active(self) -> int:
        """Clients being served right now."""
        with self._lock:
            self._threads = {t: c for t, c in self._threads.items() if t.is_alive()}
            return len(self._threads) + len(self._children)

    def shutdown(self) -> None:
        """Ask ``serve_forever`` to stop (safe from any thread or a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass  # already closed or the pipe is full: a wake-up is pending anyway

    def serve_forever(self) -> None:
        """Accept and serve clients until :meth:`shutdown`."""
        listener = self._listener
        listener._set_admit(self._admit)
        lfd = listener.fileno()
        try:
            while not self._stopping:
                poller = select.poll()
                poller.register(lfd, select.POLLIN)
                poller.register(self._wake_r, select.POLLIN)
                for pidfd in list(self._children):
                    poller.register(pidfd, select.POLLIN)
                wake = listener._wake_at(None)  # a pending peer's deadline
                if wake is None:
                    events = poller.poll()
                else:
                    events = poller.poll(max(0, int((wake - time.monotonic()) * 1000) + 1))
                for fd, _ in events:
                    if fd in self._children:
                        self._reap(fd)
                if self._stopping:
                    break
                while (core := listener._take()) is not None:
                    self._start(Channel(core))
        finally:
            self._finish()

    def _admit(self) -> str | None:
        """Asked as a handshake is about to succeed: a reason to refuse, or None."""
        if self.active + self._listener._queued < self.max_clients:
            return None
        self.refused += 1
        return f"the server is at capacity (max_clients={self.max_clients}); try again later"

    def _start(self, ch: Channel) -> None:
        self.served += 1
        if self.mode == "thread":
            t = threading.Thread(
                target=self._run_handler, args=(ch,), name="buzon-client", daemon=True
            )
            with self._lock:
                self._threads[t] = [ch]
            t.start()
        else:
            self._fork(ch)

    def _run_handler(self, ch: Channel) -> bool:
        try:
            with ch:
                self.handler(ch)
            return True
        except ChannelClosed:
            return True  # closed by shutdown
        except Exception:
            self.failed += 1
            _log().exception("handler failed for %r", ch)
            return False

    def _fork(self, ch: Channel) -> None:
        transport = ch._core.transport
        pid = os.fork()
        if pid == 0:  # the child: serve this one client, then leave without cleanup
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.close(self._wake_r)
                os.close(self._wake_w)
                for pidfd in self._children:
                    os.close(pidfd)
                self._listener.close_in_child()
                transport.adopt_in_child()
                code = 0 if self._run_handler(ch) else 1
            except BaseException:
                _log().exception("client process failed")
            finally:
                os._exit(code)
        transport.close_in_parent()  # the child has its own copy, and serves it
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # pragma: no cover - kernels before 5.3
            os.waitpid(pid, 0)
            return
        self._children[pidfd] = pid

    def _reap(self, pidfd: int) -> None:
        pid = self._children.pop(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        if os.waitstatus_to_exitcode(status) != 0:
            self.failed += 1

    def _finish(self) -> None:
        self._listener.close()
        deadline = time.monotonic() + self.grace
        # processes: wait, then TERM, then KILL
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if not self._children:
                break
            if sig is not None:
                for pid in self._children.values():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 1.0
            while self._children:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                poller = select.poll()
                for pidfd in self._children:
                    poller.register(pidfd, select.POLLIN)
                for fd, _ in poller.poll(int(remaining * 1000) + 1):
                    self._reap(fd)
        # threads: wait, then close their channels so blocked receives return
        with self._lock:
            threads = dict(self._threads)
        for t, box in threads.items():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                for ch in box:
                    ch.close()
                t.join(1.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
