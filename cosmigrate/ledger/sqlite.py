"""The SQLite ledger: the embedded default, same semantics as DynamoDB in one transaction.

All statements run on one dedicated thread that owns the connection, so the
event loop never blocks on an fsync. WAL mode with synchronous=FULL: a commit
that returned is on disk. `BEGIN IMMEDIATE` takes the write lock up front, so
two processes sharing the file serialize their commits and the epoch check
fences the loser.

Writes are group-committed: the writes that callers sent while the thread was
busy run together in ONE transaction, each inside its own savepoint, with
one COMMIT (one fsync) for all of them. A write that fails its own condition
(Fenced, a version or seq conflict) rolls back to its savepoint alone and
raises to its caller; the others are kept. A caller's write returns only
once the COMMIT that holds it returned, so what returned is on disk, as
before. (A thousand units renewing leases and publishing their state every
few seconds were a thousand fsyncs, one at a time, on one thread.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cosmigrate.ledger.base import (
    BatchRecord,
    Fenced,
    LedgerError,
    LedgerUnavailable,
    NamespaceMeta,
    Progress,
    ProgressConflict,
    SeqConflict,
    WriterControl,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    cluster TEXT NOT NULL, ns TEXT NOT NULL, owner TEXT NOT NULL DEFAULT '',
    epoch INTEGER NOT NULL DEFAULT 0, next_seq INTEGER NOT NULL DEFAULT 0,
    resume_token BLOB, applied_seq INTEGER NOT NULL DEFAULT -1,
    captured_events INTEGER NOT NULL DEFAULT 0, applied_events INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'running', last_error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, ns)
);
CREATE TABLE IF NOT EXISTS batches (
    cluster TEXT NOT NULL, ns TEXT NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL,
    events INTEGER NOT NULL, bytes INTEGER NOT NULL, raw_bytes INTEGER NOT NULL,
    checksum TEXT NOT NULL, first_captured_at REAL NOT NULL, captured_at REAL NOT NULL,
    applied_at REAL, epoch INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, ns, seq)
);
CREATE TABLE IF NOT EXISTS control (
    cluster TEXT PRIMARY KEY, writer TEXT NOT NULL, changed_by TEXT NOT NULL, changed_at REAL NOT NULL,
    first_discovery_at REAL NOT NULL DEFAULT 0
);
"""

# Tables added after the first release: created on open when a ledger file from older code lacks them.
PROGRESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS progress (
    cluster TEXT NOT NULL, ns TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
    data BLOB NOT NULL, version INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (cluster, ns, kind, key)
);
"""

# Columns added after the first release: (table, column, definition). A ledger file
# written by older code gains them on open, so an upgrade needs no manual step.
MIGRATIONS = [
    ("control", "first_discovery_at", "REAL NOT NULL DEFAULT 0"),
]

_META_COLS = "ns, owner, epoch, next_seq, resume_token, applied_seq, captured_events, applied_events, state, last_error, updated_at"
_BATCH_COLS = "ns, seq, key, events, bytes, raw_bytes, checksum, first_captured_at, captured_at, applied_at, epoch"


class _Write:
    """One caller's write waiting for a group commit."""

    __slots__ = ("fn", "result", "error", "done")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


def _owner_only(path: Path) -> None:
    """Make the ledger and its -wal/-shm owner-only (0600) if they are not; SQLite gives new -wal/-shm
    files the mode of the main file, so fixing it once keeps them all private."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if os.stat(file).st_mode & 0o077:
                os.chmod(file, 0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise LedgerError(f"ledger {file} is readable by other users and cannot be made owner-only "
                              f"({exc.strerror}); chmod 600 it") from None


class SqliteLedger:
    def __init__(self, url: str, path: str, cluster: str) -> None:
        self.url = url
        self.path = Path(path)
        self.cluster = cluster
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Write] = []
        """Writes sent and not yet taken by a group (guarded by `_lock`: appended on the loop, taken on the thread)."""
        self._lock = threading.Lock()
        self._grouping = False
        """True on the ledger thread while a group runs: `_tx` then opens a savepoint, not a transaction."""

    # --- plumbing ---------------------------------------------------------------------

    def _connect(self, create: bool) -> sqlite3.Connection:
        if self._conn is None:
            if not create and not self.path.exists():
                raise LedgerError(f"ledger {self.path} does not exist; run `cosmigrate ledger init --config ...`")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The ledger holds resume tokens: create it owner-only whatever the umask (root's is
            # usually 022). SQLite creates -wal and -shm with the main file's mode, so they follow.
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            _owner_only(self.path)  # a file left group- or world-readable (an older release, a manual copy)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=30000")
                if create:
                    conn.executescript(SCHEMA + PROGRESS_SCHEMA)
                self._migrate(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Add the columns that a ledger file from older code lacks (under the write lock: two processes may race)."""

        def missing() -> list[tuple[str, str, str]]:
            out = []
            for table, column, definition in MIGRATIONS:
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if have and column not in have:  # no table at all: `check` tells the operator to run init
                    out.append((table, column, definition))
            return out

        def tables() -> set[str]:
            return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}

        def body() -> None:
            for table, column, definition in missing():
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            if "namespaces" in tables() and "progress" not in tables():
                conn.execute(PROGRESS_SCHEMA)

        existing = tables()
        if missing() or ("namespaces" in existing and "progress" not in existing):
            self._tx(conn, body)

    def _mapped(self, exc: sqlite3.Error | OSError) -> LedgerError:
        """The project's error for a SQLite or file-system failure."""
        if isinstance(exc, sqlite3.OperationalError):
            if "locked" in str(exc) or "busy" in str(exc):
                return LedgerUnavailable(f"ledger {self.path}: {exc}")
            if exc.sqlite_errorcode == sqlite3.SQLITE_FULL:
                return LedgerError(f"ledger {self.path}: {exc} (nothing was written; free space on its file system)")
        return LedgerError(f"ledger {self.path}: {exc}")

    async def _run(self, fn: Callable[[sqlite3.Connection], T], create: bool = False) -> T:
        def call() -> T:
            try:
                return fn(self._connect(create))
            except (sqlite3.Error, OSError) as exc:
                raise self._mapped(exc) from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` (whose writes go through `_tx`) in the next group commit; its result or its own error."""
        write: _Write = _Write(fn)
        with self._lock:
            self._pending.append(write)
        # The thread runs in order: this call's group takes the write, unless an earlier one already did.
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._flush)
        except asyncio.CancelledError:
            # A caller told "not done" must not have its write committed later by someone else's group: taken
            # back unless a group already runs it (as a job already started did before group commit).
            with self._lock:
                if write in self._pending:
                    self._pending.remove(write)
            raise
        if not write.done:
            raise LedgerError(f"ledger {self.path}: a write was not run (internal error; retried)")
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[no-any-return]

    def _flush(self) -> None:
        """On the ledger thread: every pending write in one transaction, one savepoint each, one COMMIT."""
        with self._lock:
            group, self._pending = self._pending, []
        if not group:
            return
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(False)
            conn.execute("BEGIN IMMEDIATE")
            self._grouping = True
            try:
                for write in group:
                    try:
                        write.result = write.fn(conn)
                    except (sqlite3.Error, OSError):
                        raise  # the transaction itself is in doubt: the whole group fails
                    except Exception as exc:  # its own condition (Fenced, a conflict): its savepoint rolled back
                        write.error = exc
                    if not conn.in_transaction:  # never run the rest outside the transaction
                        raise sqlite3.OperationalError("the group's transaction ended early")
            finally:
                self._grouping = False
            conn.execute("COMMIT")
        except Exception as exc:  # every write of the group gets the outcome, not only the caller that ran it
            if conn is not None:
                self._leave_transaction(conn)
            error: BaseException
            if isinstance(exc, sqlite3.Error | OSError):
                error = self._mapped(exc)
            elif isinstance(exc, LedgerError):
                error = exc  # `_connect`: the file is missing, or cannot be made owner-only
            else:
                error = LedgerError(f"ledger {self.path}: {type(exc).__name__}: {exc}")
            for write in group:
                write.result, write.error = None, error
        except BaseException:
            if conn is not None:
                self._leave_transaction(conn)
            for write in group:
                write.result, write.error = None, LedgerError(f"ledger {self.path}: the write was interrupted")
            raise
        finally:
            for write in group:
                write.done = True

    def _tx(self, conn: sqlite3.Connection, body: Callable[[], T]) -> T:
        """`body` and its COMMIT as one write transaction; on any failure the connection leaves it, and the
        first error is the one raised.

        SQLite rolls some failures back by itself (a full disk met by a statement or by the COMMIT) and
        keeps the transaction open after others (a COMMIT that meets SQLITE_BUSY). A connection left inside
        a transaction refuses every later BEGIN, so the namespace would stop for good; and a ROLLBACK sent
        after SQLite's own would fail with "no transaction is active", hiding the real cause (disk full).
        """
        if self._grouping:  # inside a group commit: this body's own savepoint
            conn.execute("SAVEPOINT write")
            try:
                result = body()
            except BaseException as exc:
                if not conn.in_transaction:  # SQLite rolled everything back itself (a full disk): the group fails
                    raise
                try:
                    conn.execute("ROLLBACK TO write")
                    conn.execute("RELEASE write")
                except sqlite3.Error:
                    if isinstance(exc, sqlite3.Error | OSError):
                        raise exc from None  # the first error is the one raised
                    raise  # this body's writes could not be undone: the group fails, nothing is committed
                raise
            conn.execute("RELEASE write")
            return result
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            conn.execute("COMMIT")
        except BaseException:
            self._leave_transaction(conn)
            raise
        return result

    def _leave_transaction(self, conn: sqlite3.Connection) -> None:
        """Roll back if still inside a transaction; a connection that cannot leave it is closed (reopened on use)."""
        if not conn.in_transaction:
            return
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        if conn.in_transaction:
            conn.close()
            if conn is self._conn:
                self._conn = None

    @staticmethod
    def _meta(row: tuple[Any, ...]) -> NamespaceMeta:
        ns, owner, epoch, next_seq, token, applied_seq, captured, applied, state, error, updated = row
        return NamespaceMeta(ns, owner, epoch, next_seq, bytes(token) if token is not None else None,
                             applied_seq, captured, applied, state, error, updated)

    # --- interface --------------------------------------------------------------------

    async def init(self) -> list[str]:
        existed = self.path.exists()

        def describe(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM namespaces WHERE cluster=?", (self.cluster,)).fetchone()[0])

        count = await self._run(describe, create=True)
        if existed:
            return [f"ledger {self.path}: exists, {count} namespaces of cluster {self.cluster}; schema up to date"]
        return [f"ledger {self.path}: created (owner-only, WAL journal)"]

    async def check(self) -> None:
        def probe(conn: sqlite3.Connection) -> None:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            missing = {"namespaces", "batches", "control"} - tables
            if missing:
                raise LedgerError(f"ledger {self.path} lacks tables {sorted(missing)}; run `cosmigrate ledger init`")

        await self._run(probe)

    async def claim(self, ns: str, owner: str) -> NamespaceMeta:
        def claim(conn: sqlite3.Connection) -> NamespaceMeta:
            def body() -> NamespaceMeta:
                now = time.time()
                conn.execute(
                    "INSERT INTO namespaces (cluster, ns, owner, epoch, updated_at) VALUES (?, ?, ?, 1, ?) "
                    "ON CONFLICT (cluster, ns) DO UPDATE SET owner = excluded.owner, epoch = epoch + 1, "
                    "state = 'running', last_error = '', updated_at = excluded.updated_at",
                    (self.cluster, ns, owner, now),
                )
                row = conn.execute(f"SELECT {_META_COLS} FROM namespaces WHERE cluster=? AND ns=?", (self.cluster, ns)).fetchone()
                return self._meta(row)

            return self._tx(conn, body)

        return await self._write(claim)

    def _check_epoch(self, conn: sqlite3.Connection, ns: str, epoch: int) -> tuple[int, int, int, bytes | None]:
        """(epoch, next_seq, applied_seq, resume_token) of `ns`; raises Fenced unless the epoch is `epoch`."""
        row = conn.execute("SELECT epoch, next_seq, applied_seq, resume_token FROM namespaces WHERE cluster=? AND ns=?",
                           (self.cluster, ns)).fetchone()
        if row is None or row[0] != epoch:
            raise Fenced(f"{ns}: taken over by another process (stored epoch {row[0] if row else 'none'}, mine {epoch})")
        return row[0], row[1], row[2], bytes(row[3]) if row[3] is not None else None

    async def set_start_token(self, ns: str, epoch: int, token: bytes) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            def body() -> bool:
                stored = self._check_epoch(conn, ns, epoch)[3]
                if stored is not None:
                    return stored == token  # the same token: a repeated call, as on DynamoDB after a lost answer
                conn.execute("UPDATE namespaces SET resume_token=?, updated_at=? WHERE cluster=? AND ns=?",
                             (token, time.time(), self.cluster, ns))
                return True

            return self._tx(conn, body)

        return await self._write(run)

    async def commit_batch(self, ns: str, epoch: int, record: BatchRecord, resume_token: bytes) -> None:
        def run(conn: sqlite3.Connection) -> None:
            def body() -> None:
                next_seq = self._check_epoch(conn, ns, epoch)[1]
                if next_seq != record.seq:
                    if next_seq > record.seq and self._committed_by(conn, ns, record, epoch):
                        return  # a repeated call: same semantics as DynamoDB after a lost answer
                    raise SeqConflict(f"{ns}: committing seq {record.seq} but next_seq is {next_seq}")
                conn.execute(
                    f"INSERT INTO batches (cluster, {_BATCH_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (self.cluster, ns, record.seq, record.key, record.events, record.bytes, record.raw_bytes,
                     record.checksum, record.first_captured_at, record.captured_at, None, epoch),
                )
                conn.execute(
                    "UPDATE namespaces SET next_seq=?, resume_token=?, captured_events=captured_events+?, updated_at=? "
                    "WHERE cluster=? AND ns=?",
                    (record.seq + 1, resume_token, record.events, time.time(), self.cluster, ns),
                )

            self._tx(conn, body)

        await self._write(run)

    def _committed_by(self, conn: sqlite3.Connection, ns: str, record: BatchRecord, epoch: int) -> bool:
        row = conn.execute("SELECT checksum, epoch FROM batches WHERE cluster=? AND ns=? AND seq=?",
                           (self.cluster, ns, record.seq)).fetchone()
        return row is not None and tuple(row) == (record.checksum, epoch)

    async def set_state(self, ns: str, epoch: int, state: str, error: str = "") -> None:
        def run(conn: sqlite3.Connection) -> None:
            def body() -> None:
                self._check_epoch(conn, ns, epoch)
                conn.execute(
                    "UPDATE namespaces SET state=?, last_error=?, updated_at=? WHERE cluster=? AND ns=?",
                    (state, error, time.time(), self.cluster, ns),
                )

            self._tx(conn, body)

        await self._write(run)

    async def get_namespace(self, ns: str) -> NamespaceMeta | None:
        def run(conn: sqlite3.Connection) -> NamespaceMeta | None:
            row = conn.execute(f"SELECT {_META_COLS} FROM namespaces WHERE cluster=? AND ns=?", (self.cluster, ns)).fetchone()
            return self._meta(row) if row else None

        return await self._run(run)

    async def list_namespaces(self) -> list[NamespaceMeta]:
        def run(conn: sqlite3.Connection) -> list[NamespaceMeta]:
            rows = conn.execute(f"SELECT {_META_COLS} FROM namespaces WHERE cluster=? ORDER BY ns", (self.cluster,))
            return [self._meta(r) for r in rows]

        return await self._run(run)

    async def list_batches(self, ns: str, start_seq: int = 0, limit: int | None = None) -> list[BatchRecord]:
        def run(conn: sqlite3.Connection) -> list[BatchRecord]:
            rows = conn.execute(
                f"SELECT {_BATCH_COLS} FROM batches WHERE cluster=? AND ns=? AND seq>=? ORDER BY seq LIMIT ?",
                (self.cluster, ns, start_seq, -1 if limit is None else limit),
            )
            return [BatchRecord(*r) for r in rows]

        return await self._run(run)

    async def mark_applied(self, ns: str, epoch: int, old_applied_seq: int, new_applied_seq: int, events: int,
                           applied_at: float) -> None:
        def run(conn: sqlite3.Connection) -> None:
            def body() -> None:
                applied_seq = self._check_epoch(conn, ns, epoch)[2]
                if applied_seq != old_applied_seq:
                    if applied_seq == new_applied_seq:
                        return  # a repeated call, already counted: same semantics as DynamoDB after a lost answer
                    raise SeqConflict(f"{ns}: applied_seq is {applied_seq}, neither {old_applied_seq} nor {new_applied_seq}")
                conn.execute(
                    "UPDATE namespaces SET applied_seq=?, applied_events=applied_events+?, updated_at=? "
                    "WHERE cluster=? AND ns=?",
                    (new_applied_seq, events, applied_at, self.cluster, ns),
                )
                conn.execute(
                    "UPDATE batches SET applied_at=? WHERE cluster=? AND ns=? AND seq>? AND seq<=?",
                    (applied_at, self.cluster, ns, old_applied_seq, new_applied_seq),
                )

            self._tx(conn, body)

        await self._write(run)

    async def get_control(self) -> WriterControl:
        def run(conn: sqlite3.Connection) -> WriterControl:
            row = conn.execute("SELECT writer, changed_by, changed_at FROM control WHERE cluster=?", (self.cluster,)).fetchone()
            return WriterControl(*row) if row else WriterControl()

        return await self._run(run)

    async def set_writer(self, writer: str, changed_by: str, changed_at: float) -> WriterControl:
        def run(conn: sqlite3.Connection) -> WriterControl:
            conn.execute(
                "INSERT INTO control (cluster, writer, changed_by, changed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (cluster) DO UPDATE SET writer=excluded.writer, changed_by=excluded.changed_by, "
                "changed_at=excluded.changed_at",
                (self.cluster, writer, changed_by, changed_at),
            )
            return WriterControl(writer, changed_by, changed_at)

        return await self._run(run)

    async def get_first_discovery(self) -> float:
        def run(conn: sqlite3.Connection) -> float:
            row = conn.execute("SELECT first_discovery_at FROM control WHERE cluster=?", (self.cluster,)).fetchone()
            return float(row[0]) if row else 0.0

        return await self._run(run)

    async def set_first_discovery(self, at: float) -> float:
        def run(conn: sqlite3.Connection) -> float:
            def body() -> float:
                conn.execute(
                    "INSERT INTO control (cluster, writer, changed_by, changed_at, first_discovery_at) "
                    "VALUES (?, 'stopped', '', 0, ?) "
                    "ON CONFLICT (cluster) DO UPDATE SET first_discovery_at=excluded.first_discovery_at "
                    "WHERE first_discovery_at = 0",
                    (self.cluster, at),
                )
                return float(conn.execute("SELECT first_discovery_at FROM control WHERE cluster=?",
                                          (self.cluster,)).fetchone()[0])

            return self._tx(conn, body)

        return await self._write(run)

    # --- progress items -------------------------------------------------------------------

    def _fence(self, conn: sqlite3.Connection, ns: str, epoch: int | None) -> None:
        if epoch is not None:
            self._check_epoch(conn, ns, epoch)
        elif ns:
            raise LedgerError(f"{ns}: a namespace's progress is written by its owner (an epoch is required)")

    async def get_progress(self, ns: str, kind: str, key: str) -> Progress | None:
        def run(conn: sqlite3.Connection) -> Progress | None:
            row = conn.execute("SELECT data, version, updated_at FROM progress WHERE cluster=? AND ns=? AND kind=? "
                               "AND key=?", (self.cluster, ns, kind, key)).fetchone()
            return Progress(ns, kind, key, bytes(row[0]), row[1], row[2]) if row else None

        return await self._run(run)

    async def list_progress(self, ns: str, kind: str, prefix: str = "", limit: int | None = None) -> list[Progress]:
        def run(conn: sqlite3.Connection) -> list[Progress]:
            rows = conn.execute(
                "SELECT key, data, version, updated_at FROM progress WHERE cluster=? AND ns=? AND kind=? "
                "AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
                (self.cluster, ns, kind, len(prefix), prefix, -1 if limit is None else limit),
            )
            return [Progress(ns, kind, r[0], bytes(r[1]), r[2], r[3]) for r in rows]

        return await self._run(run)

    async def put_progress(self, ns: str, kind: str, key: str, data: bytes, *, epoch: int | None,
                           expect_version: int | None = None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            def body() -> None:
                self._fence(conn, ns, epoch)
                row = conn.execute("SELECT data, version FROM progress WHERE cluster=? AND ns=? AND kind=? AND key=?",
                                   (self.cluster, ns, kind, key)).fetchone()
                stored = row[1] if row else 0
                if expect_version is not None and stored != expect_version:
                    if row is not None and stored == expect_version + 1 and bytes(row[0]) == data:
                        return  # a repeat of our write whose answer was lost
                    raise ProgressConflict(f"{ns or 'cluster'} {kind}/{key}: version {stored}, expected {expect_version}")
                conn.execute(
                    "INSERT INTO progress (cluster, ns, kind, key, data, version, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (cluster, ns, kind, key) DO UPDATE SET data=excluded.data, version=excluded.version, "
                    "updated_at=excluded.updated_at",
                    (self.cluster, ns, kind, key, data, stored + 1, time.time()),
                )

            self._tx(conn, body)

        await self._write(run)

    async def delete_progress(self, ns: str, kind: str, key: str, *, epoch: int | None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            def body() -> None:
                self._fence(conn, ns, epoch)
                conn.execute("DELETE FROM progress WHERE cluster=? AND ns=? AND kind=? AND key=?",
                             (self.cluster, ns, kind, key))

            self._tx(conn, body)

        await self._write(run)

    async def purge(self, ns: str | None, *, dry_run: bool = False) -> dict[str, int]:
        where, args = ("cluster=? AND ns=?", (self.cluster, ns)) if ns is not None else ("cluster=?", (self.cluster,))
        tables = ("batches", "progress", "namespaces") + (("control",) if ns is None else ())

        def run(conn: sqlite3.Connection) -> dict[str, int]:
            def body() -> dict[str, int]:
                counts: dict[str, int] = {}
                for table in tables:  # one transaction: all or nothing
                    counts[table] = int(conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {where}", args).fetchone()[0])
                    if not dry_run:
                        conn.execute(f"DELETE FROM {table} WHERE {where}", args)
                return counts

            return self._tx(conn, body)

        return await self._run(run)

    async def close(self) -> None:
        def shut(conn: sqlite3.Connection) -> None:
            conn.close()

        if self._conn is not None:
            await self._run(shut)
            self._conn = None
        self._pool.shutdown(wait=False)
