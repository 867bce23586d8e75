"""The ledger under AWS failures (moto over HTTP behind tests/flakyhttp.py), and SQLite file details.

Lost answers, throttling, 5xx and dropped connections must never surface as a
raw botocore exception, nor as a SeqConflict for a write that went through.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError

from cosmigrate.config import Config
from cosmigrate.daemon import Daemon
from cosmigrate.ledger import BatchRecord, Ledger, LedgerError, LedgerUnavailable, SeqConflict, open_ledger
from cosmigrate.ledger.dynamodb import RETRY_TRIES, DynamoLedger
from cosmigrate.ledger.sqlite import SqliteLedger
from cosmigrate.sandbox import Sandbox
from cosmigrate.timeouts import within
from tests.flakyhttp import FlakyHttpProxy
from tests.helpers import (
    Workload,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
)

T = TypeVar("T")
NS = "db.c"


def record(seq: int, events: int = 10) -> BatchRecord:
    return BatchRecord(ns=NS, seq=seq, key=f"k/{seq}", events=events, bytes=100, raw_bytes=200,
                       checksum=f"{seq:032x}", first_captured_at=time.time(), captured_at=time.time())


class LoseNext:
    """The proxy's random source, scripted: fail exactly the next `n` requests in the proxy's first mode.

    This makes "the write took effect but its answer was lost" happen on the one
    request under test, deterministically; the proxy, moto and aioboto3 stay real.
    """

    def __init__(self) -> None:
        self.n = 0

    def random(self) -> float:
        if self.n > 0:
            self.n -= 1
            return 0.0
        return 1.0

    def choice(self, modes: tuple[str, ...]) -> str:
        return modes[0]


async def _backends(tmp_path: Path, moto_endpoint: str) -> Config:
    cfg = make_config(tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2", "s3+dynamodb", moto_endpoint)
    await prepare_backends(cfg)  # set-up goes straight to moto
    return cfg


@pytest.fixture
async def proxy(moto_endpoint: str) -> AsyncIterator[FlakyHttpProxy]:
    p = await FlakyHttpProxy(moto_endpoint, seed=11).start()
    try:
        yield p
    finally:
        await p.stop()


async def test_lost_answers_are_recognised_as_done(tmp_path: Path, moto_endpoint: str, proxy: FlakyHttpProxy) -> None:
    cfg = await _backends(tmp_path, moto_endpoint)
    cfg.aws.endpoint_url = proxy.url
    proxy.modes = ("lost",)
    proxy.fail_rate = 0.5  # only the threshold matters with the scripted source
    lose = LoseNext()
    proxy.rng = lose  # type: ignore[assignment]
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.claim(NS, "me")

        async def lost(call: Awaitable[T]) -> T:
            before = proxy.failures["lost"]
            lose.n = 1
            result = await call
            assert proxy.failures["lost"] == before + 1 and lose.n == 0, "the write's answer was not lost"
            return result

        assert await lost(ledger.set_start_token(NS, meta.epoch, b"start"))
        for seq in range(3):
            await lost(ledger.commit_batch(NS, meta.epoch, record(seq), f"t{seq}".encode()))
        await lost(ledger.mark_applied(NS, meta.epoch, -1, 1, 20, time.time()))
        await lost(ledger.mark_applied(NS, meta.epoch, 1, 2, 10, time.time()))
        assert await lost(ledger.set_first_discovery(1700000000.5)) == 1700000000.5
        await lost(ledger.set_state(NS, meta.epoch, "failed", "x"))

        meta2 = await ledger.get_namespace(NS)
        assert meta2 is not None
        assert (meta2.epoch, meta2.next_seq, meta2.resume_token, meta2.captured_events) == (meta.epoch, 3, b"t2", 30)
        assert (meta2.applied_seq, meta2.applied_events, meta2.state) == (2, 30, "failed")
        batches = await ledger.list_batches(NS)
        assert [(b.seq, b.checksum, b.epoch) for b in batches] == [(s, f"{s:032x}", meta.epoch) for s in range(3)]
        assert all(b.applied_at for b in batches)
    finally:
        await ledger.close()


async def _persist(call: Callable[[], Awaitable[T]], unavailable: list[str]) -> T:
    """Call until it succeeds, as capture and apply do; only LedgerUnavailable is retried.

    Anything else (a raw ClientError/BotoCoreError, a SeqConflict) fails the test.
    """
    while True:
        try:
            return await call()
        except LedgerUnavailable as exc:
            unavailable.append(str(exc))


async def test_throttling_5xx_and_dropped_connections_leave_the_ledger_exact(
    tmp_path: Path, moto_endpoint: str, proxy: FlakyHttpProxy
) -> None:
    cfg = await _backends(tmp_path, moto_endpoint)
    cfg.aws.endpoint_url = proxy.url
    proxy.fail_rate = 0.3  # modes: 503, reset and lost
    ledger = open_ledger(cfg)
    unavailable: list[str] = []
    batches, events = 60, 7
    try:
        meta = await _persist(lambda: ledger.claim(NS, "me"), unavailable)
        epoch = meta.epoch
        assert await _persist(lambda: ledger.set_start_token(NS, epoch, b"start"), unavailable)
        assert await _persist(lambda: ledger.set_first_discovery(1700000000.5), unavailable) == 1700000000.5
        applied = -1
        for seq in range(batches):
            await _persist(lambda s=seq: ledger.commit_batch(NS, epoch, record(s, events), f"t{s}".encode()), unavailable)
            if seq % 3 == 2:
                await _persist(lambda s=seq, a=applied: ledger.mark_applied(NS, epoch, a, s, (s - a) * events, time.time()),
                               unavailable)
                applied = seq
                assert [b.seq for b in await _persist(lambda s=seq: ledger.list_batches(NS, s), unavailable)] == [seq]
            assert (await _persist(lambda: ledger.get_namespace(NS), unavailable)) is not None
        await _persist(lambda: ledger.set_writer("started", "ops", 1.0), unavailable)
        await _persist(lambda: ledger.set_state(NS, epoch, "failed", "x"), unavailable)
    finally:
        await ledger.close()
    assert all(n > 10 for n in proxy.failures.values()), proxy.failures

    proxy.fail_rate = 0.0  # read the outcome without faults
    check = open_ledger(cfg)
    try:
        final = await check.get_namespace(NS)
        assert final is not None
        assert (final.epoch, final.next_seq, final.resume_token, final.captured_events) == \
            (epoch, batches, f"t{batches - 1}".encode(), batches * events)
        assert (final.applied_seq, final.applied_events, final.state, final.last_error) == \
            (batches - 1, batches * events, "failed", "x")
        listed = await check.list_batches(NS)
        assert [(b.seq, b.checksum, b.events, b.epoch) for b in listed] == \
            [(s, f"{s:032x}", events, epoch) for s in range(batches)]
        assert (await check.get_control()).writer == "started"
        assert await check.get_first_discovery() == 1700000000.5
    finally:
        await check.close()


def _cancelled(*reasons: str) -> ClientError:
    """A TransactionCanceledException as botocore parses DynamoDB's answer (checked against moto's)."""
    message = f"Transaction cancelled, please refer cancellation reasons for specific reasons [{', '.join(reasons)}]"
    return ClientError(
        {"Error": {"Code": "TransactionCanceledException", "Message": message}, "Message": message,
         "CancellationReasons": [{"Code": r} for r in reasons],
         "ResponseMetadata": {"HTTPStatusCode": 400}},
        "TransactWriteItems",
    )


async def _patched(ledger: Ledger, monkeypatch: pytest.MonkeyPatch, op: str, failures: list[ClientError]) -> list[int]:
    """Make the real client's `op` raise `failures` first, then reach moto; returns a call counter."""
    assert isinstance(ledger, DynamoLedger)
    db = await ledger._db()
    real = getattr(type(db), op).__get__(db)  # the client's own method, even if patched before
    calls: list[int] = []

    async def flaky(**kwargs: Any) -> Any:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return await real(**kwargs)

    monkeypatch.setattr(db, op, flaky)
    return calls


async def test_a_transaction_conflict_is_retried_not_reported_as_seq_conflict(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = await _backends(tmp_path, moto_endpoint)
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.claim(NS, "me")
        calls = await _patched(ledger, monkeypatch, "transact_write_items", [
            _cancelled("None", "TransactionConflict"), _cancelled("ThrottlingError", "None"),
            _cancelled("ProvisionedThroughputExceeded", "None"), _cancelled("None", "None"),
        ])
        await ledger.commit_batch(NS, meta.epoch, record(0), b"t0")
        assert len(calls) == 5
        after = await ledger.get_namespace(NS)
        assert after is not None and (after.next_seq, after.captured_events) == (1, 10)

        # A conflict that never clears: LedgerUnavailable after the bounded retries, still no SeqConflict.
        calls = await _patched(ledger, monkeypatch, "transact_write_items",
                               [_cancelled("None", "TransactionConflict")] * (RETRY_TRIES + 5))
        with pytest.raises(LedgerUnavailable, match="TransactionConflict"):
            await ledger.commit_batch(NS, meta.epoch, record(1), b"t1")
        assert len(calls) == RETRY_TRIES

        # A real condition failure among the reasons is still judged by re-reading.
        calls = await _patched(ledger, monkeypatch, "transact_write_items", [])
        with pytest.raises(SeqConflict):
            await ledger.commit_batch(NS, meta.epoch, record(5), b"t5")
    finally:
        await ledger.close()


async def test_permission_and_missing_table_errors_say_what_to_do(
    tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = await _backends(tmp_path, moto_endpoint)
    ledger = open_ledger(cfg)
    try:
        denied = ClientError({"Error": {"Code": "AccessDeniedException", "Message": "User: arn:aws:iam::1:user/x is not "
                                        "authorized to perform: dynamodb:UpdateItem"},
                              "ResponseMetadata": {"HTTPStatusCode": 400}}, "UpdateItem")
        calls = await _patched(ledger, monkeypatch, "update_item", [denied])
        with pytest.raises(LedgerError, match="needs the IAM permission dynamodb:UpdateItem") as info:
            await ledger.claim(NS, "me")
        assert not isinstance(info.value, LedgerUnavailable) and len(calls) == 1  # not retried
    finally:
        await ledger.close()
    cfg.ledger.url += "-missing"
    missing = open_ledger(cfg)
    try:
        with pytest.raises(LedgerError, match="ledger init") as info2:
            await missing.claim(NS, "me")
        assert not isinstance(info2.value, LedgerUnavailable)
    finally:
        await missing.close()


# --- SQLite ---------------------------------------------------------------------------

OLD_CONTROL_TABLE = """
CREATE TABLE control (
    cluster TEXT PRIMARY KEY, writer TEXT NOT NULL, changed_by TEXT NOT NULL, changed_at REAL NOT NULL
);
"""


async def test_sqlite_ledger_files_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger.db"
    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
    previous = os.umask(0)  # the most permissive umask: the ledger must not rely on the caller's
    try:
        await ledger.init()
        await ledger.claim(NS, "me")  # a write: the -wal and -shm files exist while the ledger is open
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
    finally:
        os.umask(previous)
        await ledger.close()
    assert modes == {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600}


async def test_an_old_sqlite_ledger_gains_the_first_discovery_marker(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    old = SqliteLedger(f"sqlite://{path}", str(path), "test")
    await old.init()
    await old.close()
    with sqlite3.connect(path) as conn:  # as the previous release left it: no first_discovery_at column
        conn.executescript(f"DROP TABLE control; {OLD_CONTROL_TABLE}")
        conn.execute("INSERT INTO control VALUES ('test', 'started', 'ops', 5.0)")
    conn.close()

    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")  # the daemon opens it without `ledger init`
    try:
        await ledger.check()
        assert await ledger.get_first_discovery() == 0.0
        assert await ledger.set_first_discovery(1700000000.5) == 1700000000.5
        assert await ledger.set_first_discovery(1800000000.0) == 1700000000.5
        control = await ledger.get_control()
        assert (control.writer, control.changed_by, control.changed_at) == ("started", "ops", 5.0)
    finally:
        await ledger.close()


# --- lost answers under a running daemon ------------------------------------------------

LOST_ANSWER_ROUNDS = int(os.environ.get("COSMIGRATE_LOST_ANSWER_ROUNDS", "1"))
"""Rounds of the daemon test below (a soak: `COSMIGRATE_LOST_ANSWER_ROUNDS=30`); one round by default."""


async def _captured_without_failure(cfg: Config, daemon: Daemon, source: Any, namespaces: list[str]) -> bool:
    """True once every namespace holds every source document; a failed namespace fails the test at once."""
    for unit in daemon.units.values():
        if unit.capture.status.state in ("failed", "fenced"):
            pytest.fail(f"{unit.ns}: capture {unit.capture.status.state}: {unit.capture.status.last_error}")
    expected = await source_docs(source, namespaces)
    committed = await read_committed(cfg)
    for ns in namespaces:
        assert ns in committed, f"{ns} not captured yet"
        check_committed(committed[ns], expected[ns])
    return True


@pytest.mark.parametrize("round_", range(LOST_ANSWER_ROUNDS))
async def test_lost_dynamodb_answers_never_stop_a_namespace(
    round_: int, tmp_path: Path, moto_endpoint: str, sandbox: Sandbox, source: Any
) -> None:
    """Issue 23, part 6: 10% of DynamoDB answers dropped after the request reached the table.

    Several namespaces commit at once (and their appliers mark batches applied) through the
    proxy; a lost answer makes the ledger re-send the write. No namespace may stop with a
    sequence conflict, and the ledger must end exact (gap-free seqs, next_seq = batches).
    """
    namespaces = ["app.a", "app.b", "app.c", "app.d"]
    proxy = await FlakyHttpProxy(moto_endpoint, fail_rate=0.1, seed=100 + round_, modes=("lost",)).start()
    try:
        cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint,
                          max_batch_events=5)
        await prepare_backends(cfg)  # set-up goes straight to moto
        cfg.aws.endpoint_url = proxy.url
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.serve())
        try:
            workload = Workload(source, namespaces, keys_per_ns=60, seed=round_)
            await workload.run(320, pace_s=0.005)  # paced: the writes spread over many small batches
            await wait_for(lambda: _captured_without_failure(cfg, daemon, source, namespaces), 180,
                           what="capture through lost answers")
        finally:
            daemon.request_stop()
            await within(task, 60)
        assert proxy.failures["lost"] > 10, proxy.failures
    finally:
        await proxy.stop()


@contextlib.contextmanager
def _small_disk(path: Path, size_kib: int) -> Iterator[Path]:
    """A tmpfs of `size_kib` mounted at `path` (root only: the test is skipped elsewhere)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> Path:
    """Write a file until the file system answers ENOSPC; removing it frees the space."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def _big_record(seq: int) -> BatchRecord:
    rec = record(seq)
    rec.key += "/" + "k" * 3000  # a batch row larger than a page: the write needs new space
    return rec


@pytest.mark.parametrize("full", ["disk", "file"])
async def test_a_full_sqlite_ledger_fails_a_commit_cleanly_and_the_next_one_works(tmp_path: Path, full: str) -> None:
    """Issue 23, part 5: a write that meets a full disk (tmpfs) or a full file (`max_page_count`) is rolled
    back and surfaces as a LedgerError that says so; once there is room, the same commit goes through."""
    with contextlib.ExitStack() as stack:
        where = stack.enter_context(_small_disk(tmp_path / "disk", 512)) if full == "disk" else tmp_path
        path = where / "ledger.db"
        ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
        try:
            await ledger.init()
            epoch = (await ledger.claim(NS, "me")).epoch
            await ledger.commit_batch(NS, epoch, _big_record(0), b"t0")
            if full == "disk":
                filler = _fill(where)
            else:
                await ledger._run(lambda c: c.execute(f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"))
            for _ in range(3):  # again and again: each attempt leaves the connection usable
                with pytest.raises(LedgerError, match="database or disk is full") as info:
                    await ledger.commit_batch(NS, epoch, _big_record(1), b"t1")
                assert not isinstance(info.value, LedgerUnavailable)
                assert not await ledger._run(lambda c: c.in_transaction)
                meta = await ledger.get_namespace(NS)  # reads still work, and show nothing of the failed write
                assert meta is not None and (meta.next_seq, meta.resume_token) == (1, b"t0")
            if full == "disk":
                filler.unlink()
            else:
                await ledger._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
            await ledger.commit_batch(NS, epoch, _big_record(1), b"t1")
            await ledger.mark_applied(NS, epoch, -1, 1, 20, time.time())
            meta = await ledger.get_namespace(NS)
            assert meta is not None
            assert (meta.next_seq, meta.resume_token, meta.captured_events, meta.applied_seq) == (2, b"t1", 20, 1)
            assert [b.seq for b in await ledger.list_batches(NS)] == [0, 1]
        finally:
            await ledger.close()


async def test_concurrent_sqlite_writes_share_one_commit_and_a_failing_one_fails_alone(tmp_path: Path) -> None:
    """Group commit: writes sent together run in one transaction (fewer commits than writes), each in its own
    savepoint. A write whose condition fails (a version conflict, a stale epoch) raises to its caller alone and
    leaves no trace; the writes around it are stored. A group that meets a full file fails every write in it,
    and commits none of them."""
    from cosmigrate.ledger import Fenced, ProgressConflict

    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
    groups: list[int] = []
    flush = ledger._flush

    def counting_flush() -> None:
        with ledger._lock:
            n = len(ledger._pending)
        if n:
            groups.append(n)
        flush()

    ledger._flush = counting_flush  # type: ignore[method-assign]
    try:
        await ledger.init()
        epoch = (await ledger.claim(NS, "me")).epoch
        for i in range(40):
            await ledger.put_progress("", "lease", f"u{i}", b"v1", epoch=None, expect_version=0)
        writes: list[Awaitable[Any]] = []
        for i in range(40):  # every fifth is stale (expects version 0 of an item at 1)
            writes.append(ledger.put_progress("", "lease", f"u{i}", b"v2", epoch=None,
                                              expect_version=0 if i % 5 == 0 else 1))
        writes.append(ledger.put_progress(NS, "sweep", "state", b"x", epoch=epoch + 1))  # a stale owner's
        writes.append(ledger.commit_batch(NS, epoch, _big_record(0), b"t0"))
        groups.clear()
        results = await _while_the_thread_is_held(ledger, writes)
        assert groups == [len(writes)], groups  # all of them in one transaction
        for i, result in enumerate(results[:40]):
            assert isinstance(result, ProgressConflict) if i % 5 == 0 else result is None, (i, result)
        assert isinstance(results[40], Fenced) and results[41] is None
        stored = {p.key: (p.data, p.version) for p in await ledger.list_progress("", "lease")}
        assert all(stored[f"u{i}"] == ((b"v1", 1) if i % 5 == 0 else (b"v2", 2)) for i in range(40)), stored
        assert await ledger.get_progress(NS, "sweep", "state") is None
        meta = await ledger.get_namespace(NS)
        assert meta is not None and meta.next_seq == 1
        # A full file: every write of the group fails, none is committed.
        await ledger._run(lambda c: c.execute(f"PRAGMA max_page_count = {c.execute('PRAGMA page_count').fetchone()[0]}"))
        small = [ledger.put_progress("", "lease", f"u{i}", b"v3", epoch=None, expect_version=2) for i in (1, 2, 3)]
        results = await _while_the_thread_is_held(ledger, [ledger.commit_batch(NS, epoch, _big_record(1), b"t1"),
                                                           *small])
        assert all(isinstance(r, LedgerError) for r in results), results
        assert not await ledger._run(lambda c: c.in_transaction)
        await ledger._run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        assert {p.key: p.version for p in await ledger.list_progress("", "lease")}["u1"] == 2
        meta = await ledger.get_namespace(NS)
        assert meta is not None and meta.next_seq == 1
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def _thread_held(ledger: SqliteLedger) -> AsyncIterator[None]:
    """The ledger's thread kept busy for the block: writes sent meanwhile wait for the next group."""
    held, running = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        held.wait(10)

    blocker = asyncio.wrap_future(ledger._pool.submit(hold))
    await asyncio.to_thread(running.wait, 10)
    try:
        yield
    finally:
        held.set()
        await blocker


async def _while_the_thread_is_held(ledger: SqliteLedger, writes: list[Awaitable[Any]]) -> list[Any]:
    """Send `writes` while the ledger's thread is busy, so that they all wait for the same group."""
    async with _thread_held(ledger):
        tasks = [asyncio.ensure_future(w) for w in writes]
        await wait_for(lambda: _pending(ledger, len(tasks)), 10, what="every write queued")
    return await asyncio.gather(*tasks, return_exceptions=True)


async def _pending(ledger: SqliteLedger, n: int) -> bool:
    with ledger._lock:
        return len(ledger._pending) == n


async def test_a_group_whose_connect_fails_acknowledges_writes_it_never_ran(tmp_path: Path) -> None:
    """`_connect` raises LedgerError (not sqlite3.Error/OSError) when the file is missing or cannot be made
    owner-only: every write of the group fails with it, not only the caller whose job ran the group (the
    others were told success for writes never run: a lost batch commit)."""
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
    await ledger.init()
    epoch = (await ledger.claim(NS, "me")).epoch
    # The connection is dropped (as `_leave_transaction` does when a ROLLBACK cannot end the transaction)
    # and the next connect fails with a LedgerError (here: the file was moved away).
    ledger._conn.close()  # type: ignore[union-attr]
    ledger._conn = None
    path.rename(tmp_path / "moved.db")
    try:
        results = await _while_the_thread_is_held(ledger, [
            ledger.put_progress("", "lease", "u1", b"x", epoch=None, expect_version=0),
            ledger.commit_batch(NS, epoch, record(0), b"t0"),
            ledger.claim(NS, "me"),
        ])
        assert all(isinstance(r, LedgerError) for r in results), results
    finally:
        await ledger.close()


async def test_a_write_whose_caller_was_cancelled_before_its_group_is_never_committed_later(tmp_path: Path) -> None:
    """A write whose caller was cancelled (a timeout) before a group took it is taken back: the next unrelated
    write's group must not commit it (a late claim would bump the epoch and fence whoever claimed since)."""
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
    await ledger.init()
    epoch = (await ledger.claim(NS, "me")).epoch
    try:
        async with _thread_held(ledger):
            with pytest.raises(TimeoutError):  # as LeaseKeeper._renew does with `within(...)`
                async with asyncio.timeout(0.2):
                    await ledger.claim(NS, "me")  # the caller is told it did not happen
        assert (await ledger.get_namespace(NS)).epoch == epoch  # type: ignore[union-attr]
        await ledger.put_progress("", "lease", "other", b"x", epoch=None, expect_version=0)  # ... another write
        assert (await ledger.get_namespace(NS)).epoch == epoch, "the cancelled claim was committed later"  # type: ignore[union-attr]
    finally:
        await ledger.close()
