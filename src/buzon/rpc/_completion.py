"""The exactly-once completion table: ``(client id, sequence number)`` -> its state.

An ``exactly_once`` request carries ``[client id, sequence number, acknowledged]``.
The server runs a key's call once and records its reply; a retry (after a lost reply,
a reconnect, or a server restart when the table persists) gets the recorded reply and
runs nothing; the same key with other arguments is refused. An entry is

- *in progress* while its call runs (a retry waits for it, until the retry's deadline),
- *completed* with its encoded reply,
- *collected* once the client acknowledges it (each request says below which sequence
  number the client has every reply) or ``lease`` seconds after it completed. A late
  copy of an acknowledged call (read from a connection the client gave up) is refused,
  not run again: the acknowledgement says it ran.

Two tables behind one interface (:class:`CompletionTable`):

- :class:`MemoryTable` (the default): entries live in the server process and die with it.
- :class:`SqliteTable` (``buzon.rpc.Server(..., table="calls.db")``): entries are rows of
  an SQLite database, so they survive a server restart. A reply is sent only once its
  completion is durable (committed); completions arriving together are committed in one
  transaction by whichever of their threads comes first (group commit). A handler may do
  its own SQLite work in the same transaction as its completion record
  (``buzon.rpc.context().transaction``): both commit together or not at all.

A call in progress when the server crashed (SQLite table): its row says *in progress*
and nothing else is known. If the method is marked :func:`transactional` (all its
effects go through ``context().transaction``), nothing of it committed, so a retry runs
it again. Otherwise its side effects may or may not have happened: a retry gets the
error ``RemoteError.OUTCOME_UNKNOWN`` (the client raises :class:`ServerRestarted`) and
the call is not run again.
"""

from __future__ import annotations

import abc
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from ..errors import RemoteError, UnsupportedOperation
from . import _wire as w
from ._context import _TXN

__all__ = [
    "CompletionTable",
    "MemoryTable",
    "SqliteTable",
    "Transaction",
    "open_table",
    "transactional",
]

F = TypeVar("F", bound=Callable[..., Any])

Key = tuple[bytes, int, int]

_RUNNING, _DONE = 0, 1
_monotonic = time.monotonic
_SWEEP = 1.0  # seconds between looks for expired leases


def transactional(fn: F) -> F:
    """Mark a handler whose every effect goes through ``buzon.rpc.context().transaction``
    (``@buzon.rpc.transactional``, under or over ``@svc.method`` / ``@expose``).

    With an SQLite completion table, such a call records nothing before it runs: its
    completion commits with its own writes, so after a crash mid-call nothing of it is
    left and a retry runs it again. Unmarked handlers get an *in progress* row first,
    and a retry of one interrupted by a crash gets ``OUTCOME_UNKNOWN`` instead.
    """
    fn.__buzon_transactional__ = True  # type: ignore[attr-defined]
    return fn


def is_transactional(fn: Any) -> bool:
    """True if ``fn`` (or the function of a bound method) is :func:`transactional`."""
    return bool(getattr(fn, "__buzon_transactional__", False))


_encode_args = msgspec.msgpack.Encoder().encode


def _digest(body: list[Any]) -> bytes:
    """What identifies a request's arguments: method, args, kwargs. Their msgpack
    itself when shorter than 32 bytes (most calls: no hashing), else its 32-byte
    BLAKE2b digest (never mistaken for a short encoding: the lengths differ)."""
    return _digest_of(_encode_args(body[1:4]))


def _digest_of(enc: bytes) -> bytes:
    """:func:`_digest` of the msgpack ``enc`` of ``[method, args, kwargs]`` (a request
    taken apart in C comes with it: ``protocol/_rpc.c``, exactly-once block)."""
    return enc if len(enc) < 32 else hashlib.blake2b(enc, digest_size=32).digest()


def _refused(seq: int) -> RemoteError:
    return RemoteError(
        f"exactly-once call {seq} of this client was made with other arguments: refused",
        RemoteError.INVALID_REQUEST,
    )


class _Entry:
    __slots__ = ("digest", "done", "reply", "since", "waiters")

    def __init__(self, digest: bytes, now: float) -> None:
        self.digest = digest
        self.done = False
        self.reply: list[Any] | None = None
        self.since = now
        self.waiters = 0  # retries waiting for the first attempt


class _Entries(dict[int, _Entry]):
    """One client's entries by sequence number; ``low``: every entry below it has
    been collected (the client acknowledged their replies)."""

    __slots__ = ("low",)

    def __init__(self) -> None:
        super().__init__()
        self.low = 0

    def drop_below(self, low: int, acked: int) -> None:
        """Drop the entries from ``low`` to below ``acked`` (under the table's lock)."""
        if acked - low <= len(self):
            pop = self.pop
            for seq in range(low, acked):
                pop(seq, None)
        else:
            for seq in [s for s in self if s < acked]:
                del self[seq]


class Transaction:
    """The handler's side of ``context().transaction``: an SQLite connection on the
    table's database, in a transaction begun on first use, committed together with
    the call's completion record (or rolled back if the handler fails)."""

    __slots__ = ("_conn", "_open", "_table")

    def __init__(self, table: SqliteTable) -> None:
        self._table = table
        self._conn: sqlite3.Connection | None = None
        self._open = False

    @property
    def used(self) -> bool:
        """True once the handler asked for the connection."""
        return self._open

    def connection(self) -> sqlite3.Connection:
        """The connection, inside ``BEGIN IMMEDIATE`` (the write lock is taken now)."""
        if not self._open:
            conn = self._table._conn()
            conn.execute("BEGIN IMMEDIATE")
            self._conn = conn
            self._open = True
        assert self._conn is not None
        return self._conn


class CompletionTable(abc.ABC):
    """What a server's exactly-once memory offers (``Server.table``).

    :meth:`run` is the whole contract: run ``call`` once for a key, answer every retry
    with its recorded reply. ``replayed`` counts replies sent from the table without
    running anything; ``durable`` says whether entries survive the server process.
    """

    durable = False
    _stores = False  # the table keeps entries elsewhere too (acknowledgements to apply)

    def __init__(self, lease: float = 600.0) -> None:
        if not lease > 0:
            raise ValueError(f"lease must be > 0 seconds, not {lease!r}")
        self.lease = lease
        self.replayed = 0
        self._clients: dict[bytes, _Entries] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._last_sweep = 0.0

    @abc.abstractmethod
    def run(
        self,
        key: Key,
        body: list[Any],
        call: Callable[[], list[Any]],
        at: float | None = None,
        transactional: bool = False,
    ) -> list[Any]:
        """Run ``call`` once for ``key`` (``body`` is the request, whose method and
        arguments must match on every retry) and return its reply; a retry gets the
        recorded reply, waiting for a first attempt still running until ``at`` (a
        ``time.monotonic()`` deadline). ``transactional``: the handler's effects all go
        through the shared transaction (see :func:`transactional`)."""

    def __len__(self) -> int:
        with self._cv:
            return sum(len(c) for c in self._clients.values())

    def close(self) -> None:
        """Release what the table holds (memory; an SQLite table's files and thread)."""
        with self._cv:
            self._clients.clear()

    # -- the in-process index, shared by both tables ---------------------------------

    def _claim(
        self, client: bytes, seq: int, acked: int, digest: bytes, at: float | None
    ) -> tuple[_Entry, bool]:
        """Collect what ``acked`` acknowledges; then ``(client, seq)``'s entry in this
        process and True if it is new (made now: the caller runs it), or its entry,
        completed (after waiting for a first attempt still running), and False. Its
        arguments must match ``digest``."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                entries = self._clients[client] = _Entries()
            low = entries.low
            if acked > low:  # the client has these replies: forget them
                entries.low = acked
                if acked - low == 1:  # a client calling in turn
                    entries.pop(low, None)
                else:
                    entries.drop_below(low, acked)
                if self._stores:
                    self._acknowledged(client, acked)
            entry = entries.get(seq)
            if entry is None:
                if seq < entries.low:  # a late copy of a finished call
                    raise RemoteError(
                        f"exactly-once call {seq} of this client is finished (the client "
                        "acknowledged its reply): a late duplicate, not run again",
                        RemoteError.INVALID_REQUEST,
                    )
                now = _monotonic()
                entry = entries[seq] = _Entry(digest, now)
                if now - self._last_sweep >= _SWEEP:
                    self._collect_expired(now)
                return entry, True
            if entry.digest != digest:
                raise _refused(seq)
            self._await(entry, seq, at)
            return entry, False

    def _await(self, entry: _Entry, seq: int, at: float | None) -> None:
        """Under the lock: wait until ``entry``'s first attempt completes (a retry that
        came while it runs), or raise at ``at``; counted as replayed."""
        entry.waiters += 1
        try:
            while not entry.done:  # a retry while the first attempt still runs
                left = None if at is None else at - _monotonic()
                if left is not None and left <= 0:
                    raise RemoteError(
                        f"exactly-once call {seq}: its first attempt still runs",
                        RemoteError.DEADLINE_EXCEEDED,
                    )
                self._cv.wait(left)
        finally:
            entry.waiters -= 1
        self.replayed += 1

    def _settle(
        self, entry: _Entry, reply: list[Any], drop: tuple[bytes, int] | None = None
    ) -> None:
        """Complete ``entry`` with ``reply`` and wake its waiting retries; ``drop``:
        its ``(client, seq)``, to drop it from the index (nothing was recorded for it)."""
        entry.reply = reply
        entry.since = _monotonic()
        entry.done = True  # after the reply: a waiter that sees done reads it
        if entry.waiters or drop:  # else nobody to wake (waiters counts under the lock)
            with self._lock:
                if drop:
                    entries = self._clients.get(drop[0])
                    if entries is not None and entries.get(drop[1]) is entry:
                        del entries[drop[1]]
                self._cv.notify_all()

    @abc.abstractmethod
    def _acknowledged(self, client: bytes, acked: int) -> None:
        """The client has every reply below ``acked`` (called under the lock)."""

    def _collect_expired(self, now: float) -> None:
        self._last_sweep = now
        for client, entries in list(self._clients.items()):
            for seq in [s for s, e in entries.items() if e.done and now - e.since > self.lease]:
                del entries[seq]
            if not entries:
                del self._clients[client]
        self._expire_stored()

    @abc.abstractmethod
    def _expire_stored(self) -> None:
        """Collect stored entries whose lease expired (called under the lock)."""


class MemoryTable(CompletionTable):
    """The completion table in the server's memory (the default): a restart forgets it,
    so an ``exactly_once`` call in flight across a restart raises ``ServerRestarted``."""

    def run(
        self,
        key: Key,
        body: list[Any],
        call: Callable[[], list[Any]],
        at: float | None = None,
        transactional: bool = False,
    ) -> list[Any]:
        client, seq, acked = key
        return self.run_plain(client, seq, acked, _encode_args(body[1:4]), at, call)

    def run_plain(
        self,
        client: bytes,
        seq: int,
        acked: int,
        enc: bytes,
        at: float | None,
        call: Callable[..., list[Any]],
        *args: Any,
    ) -> list[Any]:
        """:meth:`run` for a request the server took apart in C (``protocol/_rpc.c``:
        its key's parts, ``enc`` the msgpack of its method and arguments, of which the
        digest is made without encoding anything again): ``call(*args)`` once for
        ``(client, seq)``, its reply; a retry gets the recorded reply."""
        entry, mine = self._claim(client, seq, acked, enc if len(enc) < 32 else _digest_of(enc), at)
        if not mine:
            assert entry.reply is not None
            return entry.reply
        try:
            reply = call(*args)
        except RemoteError as err:
            reply = w.error_body(err)
        except BaseException:
            self._settle(entry, _internal("the call did not finish"))
            raise
        entry.reply = reply  # self._settle(entry, reply), inline
        entry.since = _monotonic()
        entry.done = True
        if entry.waiters:
            with self._lock:
                self._cv.notify_all()
        return reply

    def _acknowledged(self, client: bytes, acked: int) -> None:
        return None  # the index is all there is: _claim has dropped them

    def _expire_stored(self) -> None:
        return None


def _attempt(call: Callable[[], list[Any]]) -> list[Any]:
    try:
        return call()
    except RemoteError as err:
        return w.error_body(err)


def _internal(why: str) -> list[Any]:
    return w.error_body(RemoteError(why, RemoteError.INTERNAL_ERROR))


class _Op:
    """One statement for the next group commit; ``done`` once it is committed."""

    __slots__ = ("done", "error", "params", "rowcount", "sql")

    def __init__(self, sql: str, params: tuple[Any, ...]) -> None:
        self.sql = sql
        self.params = params
        self.done = False
        self.rowcount = -1
        self.error: BaseException | None = None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS buzon_rpc_calls (
    client BLOB NOT NULL,
    seq INTEGER NOT NULL,
    digest BLOB NOT NULL,
    state INTEGER NOT NULL,
    reply BLOB,
    pid INTEGER NOT NULL,
    boot BLOB NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (client, seq)
) WITHOUT ROWID
"""
_UPSERT = (
    "INSERT INTO buzon_rpc_calls VALUES (?, ?, ?, 1, ?, ?, ?, ?) "
    "ON CONFLICT (client, seq) DO UPDATE SET state = 1, reply = excluded.reply, "
    "since = excluded.since"
)
_INSERT_DONE = "INSERT INTO buzon_rpc_calls VALUES (?, ?, ?, 1, ?, ?, ?, ?)"
_INSERT_RUNNING = "INSERT OR IGNORE INTO buzon_rpc_calls VALUES (?, ?, ?, 0, NULL, ?, ?, ?)"
_SELECT = "SELECT digest, state, reply, pid, boot FROM buzon_rpc_calls WHERE client = ? AND seq = ?"
_ACK = "DELETE FROM buzon_rpc_calls WHERE client = ? AND seq < ?"
_EXPIRE = "DELETE FROM buzon_rpc_calls WHERE since < ?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SqliteTable(CompletionTable):
    """The completion table in an SQLite database (``Server(..., table=PATH)``).

    The file is created if missing (table ``buzon_rpc_calls``; the handler's own tables
    may live beside it). ``synchronous``: SQLite's setting in WAL mode, ``"FULL"`` (a
    completion survives a power loss) or ``"NORMAL"`` (it survives the server process
    being killed; faster). One server (with its ``mode="process"`` children) per file.
    ``replies`` in the table are encoded with msgpack; a result msgpack cannot encode
    is recorded (and answered) as an ``INVALID_RESULT`` error.
    """

    durable = True
    _stores = True

    def __init__(
        self, path: str | os.PathLike[str], *, lease: float = 600.0, synchronous: str = "FULL"
    ) -> None:
        super().__init__(lease)
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous is 'FULL' or 'NORMAL'")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self.boot = os.urandom(8)  # this table's opening: tells our rows from a crash's
        self.commits = 0  # transactions committed (group commit: fewer than the writes)
        self.completions = 0  # completions recorded
        self._local = threading.local()
        self._pid = os.getpid()
        self._group = threading.Condition(threading.Lock())
        self._pending: list[_Op] = []  # statements for the next commit
        self._committing = False  # a thread is committing a batch now
        self._acked: dict[bytes, int] = {}
        self._closed = False
        # opened now, so that a bad path fails the server's start; and closed at once:
        # a connection open across a fork (mode="process") breaks SQLite's locking in
        # the children, so each thread opens its own, lazily, in its own process
        conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
        finally:
            conn.close()

    # -- connections and group commit ------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a fresh one after a fork)."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            # check_same_thread off: an asyncio server's handler uses this thread's
            # connection (context().transaction) on the loop's thread while this one
            # waits for it; a connection is never used by two threads at once
            conn = sqlite3.connect(
                self.path, timeout=60.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            local.conn = conn
            local.pid = os.getpid()
        return conn

    def _submit(self, sql: str, params: tuple[Any, ...], wait: bool = True) -> _Op:
        """Add a statement to the next group commit; ``wait``: until it is committed.

        Group commit without a thread of its own: the first waiting thread that finds
        nobody committing takes every statement queued so far and commits them in one
        transaction on its own connection; the others wait meanwhile (their statements
        go in that batch or the next). A lone caller thus commits at once, with no
        thread switch; under load one commit serves many calls.
        """
        if self._closed:
            raise RemoteError("the completion table is closed", RemoteError.INTERNAL_ERROR)
        op = _Op(sql, params)
        group = self._group
        with group:
            if self._pid != os.getpid():  # a forked child: the parent's queue is not ours
                self._pid = os.getpid()
                self._pending = []
                self._committing = False
            self._pending.append(op)
            if not wait:
                return op  # rides on the next commit
            while not op.done and self._committing:
                group.wait()
            if not op.done:
                self._committing = True  # this thread leads the next commit
                batch, self._pending = self._pending, []
            else:
                batch = []
        if batch:
            try:
                self._commit(batch)
            finally:
                with group:
                    self._committing = False
                    group.notify_all()
        if op.error is not None:
            raise RemoteError(
                f"the completion table could not record the call: {op.error}",
                RemoteError.INTERNAL_ERROR,
            )
        return op

    def _commit(self, batch: list[_Op]) -> None:
        """Run ``batch`` in one transaction on this thread's connection."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                op.rowcount = conn.execute(op.sql, op.params).rowcount
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for op in batch:
                op.error = exc
        finally:
            for op in batch:
                op.done = True

    def close(self) -> None:
        """Commit what is queued and close this thread's connection."""
        if self._closed:
            return
        if self._pending and self._pid == os.getpid():
            self.flush()  # the acknowledgements waiting for a commit
        self._closed = True
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
            self._local.conn = None
        super().close()

    def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        self._submit("SELECT 1", ())

    def __len__(self) -> int:
        """Entries stored now (after the queued acknowledgements are applied)."""
        self.flush()
        row = self._conn().execute("SELECT COUNT(*) FROM buzon_rpc_calls").fetchone()
        return int(row[0])

    # -- collection ------------------------------------------------------------------

    def _acknowledged(self, client: bytes, acked: int) -> None:
        if self._acked.get(client, 0) < acked:
            self._acked[client] = acked
            self._submit(_ACK, (client, acked), wait=False)  # rides on the next commit

    def _expire_stored(self) -> None:
        self._submit(_EXPIRE, (time.time() - self.lease,), wait=False)

    # -- the contract ----------------------------------------------------------------

    def run(
        self,
        key: Key,
        body: list[Any],
        call: Callable[[], list[Any]],
        at: float | None = None,
        transactional: bool = False,
    ) -> list[Any]:
        digest = _digest(body)
        entry, mine = self._claim(*key, digest, at)
        if not mine:
            assert entry.reply is not None
            return entry.reply
        reply = _internal("the call did not finish")
        keep = False
        try:
            keep, reply = self._run_claimed(key, digest, call, at, transactional)
        except RemoteError as err:
            reply = w.error_body(err)
        finally:
            self._settle(entry, reply, None if keep else (key[0], key[1]))
        return reply

    def _stored(self, key: Key, digest: bytes, at: float | None) -> list[Any] | None:
        """The recorded reply of ``key`` in the database (waiting while another live
        process of this server runs it), or None if there is no row. Raises for a
        refused key and for a call a crash interrupted."""
        client, seq, _ = key
        conn = self._conn()
        while True:
            row = conn.execute(_SELECT, (client, seq)).fetchone()
            if row is None:
                return None
            stored_digest, state, reply, pid, boot = row
            if stored_digest != digest:
                raise _refused(seq)
            if state == _DONE:
                self.replayed += 1
                decoded: list[Any] = msgspec.msgpack.decode(reply)
                return decoded
            if (boot == self.boot and pid == os.getpid()) or not (
                boot == self.boot and _alive(pid)
            ):
                # in progress when the process that ran it died (or our own row from
                # a run whose memory entry was dropped): nobody knows what it did
                raise RemoteError(
                    f"exactly-once call {seq}: the server stopped while it ran (a crash or "
                    "a restart); its side effects may or may not have happened, so it is "
                    "not run again: outcome unknown",
                    RemoteError.OUTCOME_UNKNOWN,
                )
            if at is not None and time.monotonic() >= at:  # another child runs it
                raise RemoteError(
                    f"exactly-once call {seq}: its first attempt still runs",
                    RemoteError.DEADLINE_EXCEEDED,
                )
            time.sleep(0.005)

    def _run_claimed(
        self,
        key: Key,
        digest: bytes,
        call: Callable[[], list[Any]],
        at: float | None,
        transactional: bool,
    ) -> tuple[bool, list[Any]]:
        """Run a key this process claimed: (keep the entry in memory, reply)."""
        client, seq, _ = key
        while True:
            stored = self._stored(key, digest, at)
            if stored is not None:
                return True, stored
            if transactional:
                break
            op = self._submit(  # durable before the handler runs
                _INSERT_RUNNING, (client, seq, digest, os.getpid(), self.boot, time.time())
            )
            if op.rowcount == 1:
                break
            # another process of this server inserted it meanwhile: look again
        tx = Transaction(self)
        token = _TXN.set(tx)
        try:
            reply = _attempt(call)
        except BaseException:
            if tx.used:
                _rollback(tx)
            raise
        finally:
            _TXN.reset(token)
        encoded = _encode(reply)
        if encoded is None:
            reply = w.error_body(
                RemoteError(
                    "the result cannot be recorded: msgpack cannot encode it",
                    RemoteError.INVALID_RESULT,
                )
            )
            encoded = msgspec.msgpack.encode(reply)
        params = (client, seq, digest, encoded, os.getpid(), self.boot, time.time())
        if tx.used:
            conn = tx.connection()
            if reply[1] is None:  # success: the handler's writes and the completion, at once
                try:
                    conn.execute(_UPSERT if not transactional else _INSERT_DONE, params)
                    conn.execute("COMMIT")
                except sqlite3.IntegrityError:
                    _rollback(tx)  # someone else completed it first: theirs counts
                    stored = self._stored(key, digest, at)
                    if stored is None:  # pragma: no cover - a row cannot vanish so fast
                        raise RemoteError("the completion vanished", RemoteError.INTERNAL_ERROR)
                    return True, stored
                except sqlite3.Error as exc:
                    _rollback(tx)
                    raise RemoteError(
                        f"the handler's transaction did not commit: {exc}",
                        RemoteError.INTERNAL_ERROR,
                    ) from None
                self.completions += 1
                return True, reply
            _rollback(tx)  # the handler failed: its writes go, its error is recorded
        self._submit(_UPSERT, params)
        self.completions += 1
        return True, reply


def _rollback(tx: Transaction) -> None:
    conn = tx._conn
    if conn is not None and conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:  # pragma: no cover - nothing more to undo
            pass


def _encode(reply: list[Any]) -> bytes | None:
    try:
        return msgspec.msgpack.encode(reply)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        return None


def open_table(table: Any, lease: float = 600.0) -> tuple[CompletionTable, bool]:
    """``Server(table=...)``: None -> a :class:`MemoryTable`; a path -> an
    :class:`SqliteTable` (opened here, so closed with the server); a
    :class:`CompletionTable` -> itself. Returns (table, owned)."""
    if table is None:
        return MemoryTable(lease), True
    if isinstance(table, CompletionTable):
        return table, False
    if isinstance(table, (str, os.PathLike)):
        path = os.fspath(table)
        if not path:
            raise ValueError("table= names an SQLite file; an empty path names none")
        try:
            return SqliteTable(path, lease=lease), True
        except sqlite3.Error as exc:
            raise UnsupportedOperation(
                f"table={path!r}: cannot open it as an SQLite database: {exc}"
            ) from None
    raise TypeError(
        f"table= is None (in memory), a path to an SQLite file or a CompletionTable, "
        f"not {type(table).__name__}"
    )
