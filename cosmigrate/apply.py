"""Apply: replay committed batches to DocumentDB, per namespace, in seq order.

A round takes up to `apply.max_batches_per_round` consecutive pending batches
(fetched concurrently, checksums verified), collapses them to the last event
per document key (while the applier is behind, page after page of them, up to
`apply.collapse_max_bytes` of surviving versions), and writes unordered `ReplaceOne(upsert=True)` /
`DeleteOne` bulk writes. `applied_seq` advances in the ledger only after the
target acknowledged every write of those batches (docs/design.md, invariant 3).

Duplicate keys on secondary unique indexes (the Cosmos feed orders changes
per document only): failed writes are retried after the rest; a write still
blocked by a document that the same run rewrites is a cycle (A and B swap
values) and is broken by deleting the blockers and writing the final
versions; whatever still conflicts stays *deferred*: carried into the next
round (merged with newer batches, newer events win), retried every round,
shown in status, and holding `applied_seq` back so a restart re-applies it.
Nothing is ever dropped. Any other refused document fails the namespace, named
by its `_id` only (never a field value): a write error names it; a command the
target refuses as a whole is split in halves until the one document is found.
Write-concern errors are written again, never counted as applied.

Only the owner of the namespace's current epoch writes (see NamespaceApplier),
and no write command outlives its round: a round that fails cancels its other
chunks and waits for the commands already sent, so nothing lands after a later
round. Once applied, batch objects are released to the store's expiry
(`BatchStore.mark_applied`); a committed batch whose object is gone fails the
namespace with the steps to restore it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import bson
import pymongo
from bson import json_util
from bson.errors import BSONError, InvalidDocument
from bson.raw_bson import RawBSONDocument
from pymongo import DeleteOne, InsertOne, ReplaceOne
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    ExecutionTimeout,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
)

from cosmigrate.backoff import Backoff, IdlePace
from cosmigrate.batchfile import Batch, BatchCodec, CorruptBatch
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import Config
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.identity import identity
from cosmigrate.indexes import crosses_array
from cosmigrate.lasterror import LastError
from cosmigrate.ledger import BatchRecord, Fenced, Ledger, LedgerError, SeqConflict
from cosmigrate.logs import get_logger
from cosmigrate.mongo import RAW, RawDoc, event_parts, is_delete_event, raw_collection, shared_id_part
from cosmigrate.redact import redact
from cosmigrate.stores import BatchStore, ObjectMissing, StoreError

T = TypeVar("T")
DUPLICATE_KEY = 11000
INFLIGHT_GRACE_S = 60.0  # how long a cancelled round still waits for a write command already sent
IDLE_POLL_MAX_S = 5.0
"""The longest ledger poll interval of an idle applier: its capture's commits wake it at once (`wake`), so the
poll is only the safety net, and a thousand idle units polling every half second kept SQLite busy."""
RELEASE_PER_ROUND = 64  # applied batch objects marked for expiry per round at most
MAX_UNRELEASED = 10_000  # applied batch objects remembered for another marking attempt
# Failover, network, throttling and interruption codes: retry the same writes.
TRANSIENT_CODES = {6, 7, 50, 89, 91, 112, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 16500}


class WriteLease(Protocol):
    """The unit's lease as the applier sees it (`cosmigrate.leases.Held`): the target fence's two rules."""

    @property
    def write_after(self) -> Mono:
        """No write before this moment: a write the previous owner sent may still land until then."""

    def write_block(self, now: Mono | None = None) -> str:
        """Why no write may be sent now ("" when one may)."""


class WriteAborted(Exception):
    """A write that never started: the applier was asked to stop while waiting for the writer."""


class WriterGate:
    """The writer switch as the appliers see it.

    `stop()` returns only once no bulk write is in flight, so nothing reaches
    the target after `ctl writer stop` has answered.
    """

    def __init__(self, started: bool) -> None:
        self._started = asyncio.Event()
        if started:
            self._started.set()
        self._inflight = 0
        self._idle = asyncio.Condition()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def start(self) -> None:
        self._started.set()

    async def stop(self) -> None:
        self._started.clear()
        async with self._idle:
            await self._idle.wait_for(lambda: self._inflight == 0)

    async def wait_started(self) -> None:
        await self._started.wait()

    @asynccontextmanager
    async def writing(self, abort: asyncio.Event | None = None) -> AsyncIterator[None]:
        """Hold the gate open for one bulk write (waits while the writer is stopped).

        `abort` (the applier's stop request) ends that wait with WriteAborted: a
        SIGTERM drain or a SIGHUP exclude must never hang on a stopped writer.
        """
        while not self._started.is_set():
            if abort is None:
                await self._started.wait()
                continue
            waiters = {asyncio.ensure_future(self._started.wait()), asyncio.ensure_future(abort.wait())}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
            if abort.is_set() and not self._started.is_set():
                raise WriteAborted("the applier is stopping while the writer is stopped")
        self._inflight += 1  # same step as the check above: stop() cannot slip in between
        try:
            yield
        finally:
            self._inflight -= 1
            async with self._idle:
                self._idle.notify_all()


class Op:
    """The final write for one document key in a run.

    A plain class with slots, and its filter made only when asked: a full load builds one per document, and
    an insert needs no filter (the other writes and the error paths read it).
    """

    __slots__ = ("key", "_filter", "doc", "origin_seq", "insert")

    def __init__(self, key: bytes, filter: RawBSONDocument | None, doc: RawBSONDocument | None, origin_seq: int,
                 insert: bool = False) -> None:
        self.key = key  # raw documentKey, the identity of the document
        self._filter = filter
        self.doc = doc  # None = delete
        self.origin_seq = origin_seq
        self.insert = insert
        """Sent as an insert (a full load's first sight of the document): cheaper than an upsert on the target,
        and it can never overwrite anything. A duplicate key turns it into this same version's upsert (see
        `_sort_write_errors`): the document is already there, from an earlier life or an earlier run."""

    @property
    def filter(self) -> RawBSONDocument:
        """The documentKey as the write's filter (shard key fields and `_id`)."""
        if self._filter is None:
            self._filter = RawBSONDocument(self.key, RAW)
        return self._filter

    def __repr__(self) -> str:
        return f"Op(_id={self.show_id()}, seq={self.origin_seq}, {'delete' if self.doc is None else 'write'})"

    def request(self) -> ReplaceOne[Any] | DeleteOne | InsertOne[Any]:
        if self.doc is None:
            return DeleteOne(self.filter)
        if self.insert:
            return InsertOne(self.doc)
        return ReplaceOne(self.filter, self.doc, upsert=True)

    def show_id(self) -> str:
        """The document's `_id` for a log line or an error: the only document value that may appear there."""
        return show_id(self.key)


MAX_ID_CHARS = 64
"""How much of an `_id` a log line, status or error shows: enough to find a document, never a whole blob."""


def show_id(key: bytes) -> str:
    """`{"_id": ...}` of a raw documentKey as relaxed Extended JSON, at most MAX_ID_CHARS of it.

    An `_id` is the one document value an operator needs (to find the document), so it is shown; but an
    `_id` can be a long string or a whole sub-document of customer data, so a long one is cut, with its
    BSON type and full length. Never a field value of the document.
    """
    try:
        value = RawBSONDocument(key, RAW)["_id"]
        text = json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)
    except (BSONError, KeyError, TypeError, ValueError):
        return f"<documentKey of {len(key)} bytes that cannot be shown>"
    if len(text) <= MAX_ID_CHARS:
        return text
    kind = "document" if isinstance(value, Mapping) else type(value).__name__
    return f"{text[:MAX_ID_CHARS]}... ({kind}, {len(text)} characters)"


class ApplyFailed(Exception):
    """A batch or document that must stop the namespace until an operator acts."""


@dataclass
class ApplyStatus:
    state: str = "idle"
    applied_seq: int = -1
    written_seq: int = -1
    positioned: bool = False
    """Whether applied_seq/written_seq were read from the ledger (until then -1 means "not known yet")."""
    deferred: int = 0
    deferred_reason: str = ""
    """Why writes are deferred when the cause is known to be lasting (a Cosmos/DocumentDB unique-index mismatch)."""
    last_error_at: Wall | None = None
    last_error: str = LastError()  # type: ignore[assignment]
    """The latest error; cleared by the next round that succeeds."""
    cycles_broken: int = 0
    events_applied: int = 0
    deletes_applied: int = 0
    """Delete events (delete preview) written to the target and acknowledged (metrics)."""
    recent: collections.deque[tuple[Mono, int]] = field(default_factory=lambda: collections.deque(maxlen=600))

    def throughput(self, window_s: float = 60.0) -> float:
        """Events applied per second over the last minute (a rate: the monotonic clock)."""
        now = Mono.now()
        events = sum(n for t, n in self.recent if now - t <= window_s)
        return events / window_s


ENTRY_BYTES = 512
"""What one collapsed document costs beyond its raw key and document bytes, counted against
`apply.collapse_max_bytes`: the dict slot, the tuple, the bytes headers, and later its Op, filter and
driver request (measured at about 450 bytes on CPython 3.11; rounded up)."""


class Collapser:
    """Collapse batches one at a time: last event per document key wins, with a running byte count.

    `nbytes` is what the surviving versions hold (raw key + document + ENTRY_BYTES each), so a caller
    merging many rounds of batches (a backlog) can stop at a byte budget: memory is bounded by the
    survivors, never by the number of events merged. Events are sliced, never decoded (see `collapse`).
    """

    def __init__(self, misses: dict[bytes, int] | None = None) -> None:
        self.latest: dict[bytes, tuple[bytes, bytes | None, int]] = {}
        self.misses = misses
        self._miss_keys: dict[bytes, list[bytes]] = {}  # identity -> raw keys in `misses`
        self.nbytes = 0
        self.events = 0

    def add(self, batch: Batch) -> None:
        seq = batch.header.seq
        latest, misses = self.latest, self.misses
        nbytes = self.nbytes
        for raw in batch.events:
            key, full = event_parts(raw)
            ident = identity(key)  # one entry per target document: `_id` 1 and 1.0 never race
            if misses is not None:
                if full is None and not is_delete_event(raw):
                    misses[key] = seq
                    self._miss_keys.setdefault(ident, []).append(key)
                    continue
                stale = self._miss_keys.pop(ident, None)
                if stale:  # a later event of the same document supersedes the miss
                    for k in stale:
                        misses.pop(k, None)
            old = latest.get(ident)
            if old is None:
                nbytes += len(key) + ENTRY_BYTES
            else:
                nbytes += len(key) - len(old[0]) - (len(old[1]) if old[1] is not None else 0)
            if full is not None:
                nbytes += len(full)
            latest[ident] = (key, full, seq)
        self.nbytes = nbytes
        self.events += len(batch.events)

    def ops(self, carried: dict[bytes, Op]) -> dict[bytes, Op]:
        """The final write per document; carried (deferred) writes are older than any batch added."""
        latest = self.latest
        check_shared_ids(itertools.chain((key for key, _, _ in latest.values()), (op.key for op in carried.values())))
        ops = {ident: op for op in carried.values() if (ident := identity(op.key)) not in latest}
        for ident, (key, full, seq) in latest.items():
            # RawDoc: ReplaceOne's validation asks the document's truthiness, which would decode all of it.
            ops[ident] = Op(key, None, RawDoc(full, RAW) if full is not None else None, seq)
        return ops


def collapse(batches: Iterable[Batch], carried: dict[bytes, Op], misses: dict[bytes, int] | None = None) -> dict[bytes, Op]:
    """Last event per document key wins; carried (deferred) writes are older than any batch.

    Events are sliced, never decoded; driver objects are built only for the
    documents that survive collapsing, with the data path's codec options (RAW):
    a field read later (the `_id` for a filter or an error) must not raise on
    a datetime outside years 1-9999. With `misses`, an event whose document
    lookup found nothing (and is no delete-preview event) is not a delete: its
    key and seq go there, for the source to be asked (cosmigrate.deletes.lookup).
    """
    merged = Collapser(misses)
    for batch in batches:
        merged.add(batch)
    return merged.ops(carried)


def check_shared_ids(keys: Iterable[bytes]) -> None:
    """Fail when two documentKeys of one run share an `_id` (a sharded source: `_id` unique per shard key only).

    DocumentDB holds one document per `_id`: collapsing or upserting both would silently keep one of them.
    The run's keys are checked here; a document written in an earlier run is caught when its `_id` index
    refuses the later one (`NamespaceApplier._check_shared_ids`). One slice comparison per key when unsharded.
    """
    seen: dict[bytes, tuple[bytes, bytes]] = {}
    for key in keys:
        part = shared_id_part(key)
        if part is None:
            continue
        ident = identity(key)  # one document may show its shard key as 1 and as 1.0: not two documents
        other, other_ident = seen.setdefault(identity(part), (key, ident))
        if other_ident != ident:
            raise ApplyFailed(_shared_id_message(other, key))


def _shared_id_message(first: bytes, second: bytes) -> str:
    return (f"source documents {show_key(first)} and {show_key(second)} share an _id under different shard keys: "
            "DocumentDB holds one document per _id and cannot store both. Give one of them a new _id at the source "
            "(or, if the first no longer exists there, delete it from the target), then restart cosmigrate")


def show_key(key: bytes) -> str:
    """A whole documentKey (shard key fields and `_id`) as relaxed Extended JSON, for a shared-`_id` failure."""
    try:
        return json_util.dumps(RawBSONDocument(key, RAW), json_options=json_util.RELAXED_JSON_OPTIONS)
    except (BSONError, TypeError, ValueError):
        return f"<documentKey 0x{key.hex()}>"


def _id_index_conflict(err: Mapping[str, Any]) -> bool:
    """An E11000 on the `_id` index (keyPattern {_id: 1}, or a message naming `_id_` when the pattern is left out)."""
    pattern = err.get("keyPattern")
    if isinstance(pattern, Mapping) and pattern:
        return list(pattern) == ["_id"]
    return "index: _id_ " in str(err.get("errmsg", ""))


# Whole-command refusals that are about the client, not about a document: splitting the chunk would only end
# up blaming an innocent document. They fail the round, which is retried (an operator can fix access).
NOT_ABOUT_DOCUMENTS = {13, 18}  # Unauthorized, AuthenticationFailed


def _refuses_command(exc: BaseException) -> bool:
    """The target (or the driver, for a document too large to send) refused a whole bulk write command."""
    if isinstance(exc, InvalidDocument):
        return True
    return isinstance(exc, OperationFailure) and not isinstance(exc, BulkWriteError) and exc.code not in NOT_ABOUT_DOCUMENTS


def _timed_out(exc: BaseException) -> bool:
    """The write bound ran out: on the server (maxTimeMS, code 50) or on the client's socket."""
    return isinstance(exc, (ExecutionTimeout, NetworkTimeout)) or (isinstance(exc, PyMongoError) and exc.timeout)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionFailure):
        return True
    if isinstance(exc, OperationFailure) and not isinstance(exc, BulkWriteError):
        return exc.code in TRANSIENT_CODES or exc.has_error_label("RetryableWriteError")
    return False


class NamespaceApplier:
    """Replays one namespace's committed batches to the target, as the namespace's owner of `epoch`.

    Fencing: a process that lost the namespace (a newer owner claimed it, so the
    ledger's epoch moved on) must not write again, or its late write could put
    an old version over the new owner's newer one. Before every bulk write
    command, after the writer gate and the pool let it through, the applier
    re-checks ownership (`owns`, by default one strongly consistent read of
    the namespace's ledger record: a local SELECT on SQLite, one GetItem of
    about 1 read unit and a few milliseconds on DynamoDB, per command of up to
    `apply.max_ops_per_write` documents). `mark_applied` carries the epoch too.
    Either way a stale applier ends in state `fenced` and never writes again;
    `fence()` does the same when the daemon learns it first (its capture was
    fenced). What no client-side check can stop is a command already on the
    wire when the takeover happens: that one lands (at most one per chunk in
    flight), and the round waits for its answer so nothing lands later still.
    """

    def __init__(
        self, ns: str, target: Any, store: BatchStore, ledger: Ledger, cfg: Config, gate: WriterGate,
        pool: asyncio.Semaphore, crash: CrashPoints | None = None, *, epoch: int | None = None,
        owns: Callable[[], Awaitable[bool]] | None = None, lease: WriteLease | None = None,
    ) -> None:
        self.ns = ns
        self.target = target
        self.coll = raw_collection(target, ns)
        self.store = store
        self.ledger = ledger
        self.cfg = cfg
        self.acfg = cfg.apply
        self.gate = gate
        self.pool = pool
        self.crash = crash or CrashPoints()
        self.epoch = epoch
        self._owns = owns
        self.lease = lease
        """Held by this worker: writes wait for its fence, and stop once it is no longer valid."""
        self.unanswered_at: Mono | None = None
        """When a write command last went unanswered (connection lost or timed out on the client): it may still
        land within `apply.write_bound_s`, so a handover before then is not clean (the next owner waits)."""
        self.codec = BatchCodec()
        self.status = ApplyStatus()
        self.log = get_logger(namespace=ns)
        self.wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._fenced = False
        self._deferred: dict[bytes, Op] = {}
        self._unmarked: dict[int, tuple[int, str]] = {}  # seq -> (events, key), written but applied_seq held back
        self._unreleased: dict[str, None] = {}  # applied batch objects the store has not yet let expire, oldest first
        self._release_backoff = Backoff(base=5.0, cap=300.0)
        self._release_after: Mono | None = None
        self._unique: list[UniqueIndex] | None = None
        self._mismatch_of: tuple[frozenset[bytes], str] = (frozenset(), "")
        self._round_lock = asyncio.Lock()
        self.deletes_sent = 0
        """Deletes handed to the target, counted BEFORE they are sent: the delete sweep compares it across its two
        counts of a range, and a delete landing in between must show even if its round has not returned yet."""
        self.lookup_misses: Callable[[dict[bytes, int]], Awaitable[dict[bytes, Op]]] | None = None
        """Tier-2 deletes (cosmigrate.deletes.lookup): the op for each event whose document lookup found nothing."""
        self.inserts_first: Callable[[], bool] = lambda: False
        """True while the namespace's full load runs (the daemon sets it from the backfill phase): a round's
        versions are then sent as inserts first (`Op.insert`), the target's cheaper write for a document it does
        not hold yet. Order is unchanged: a run holds one version per document and runs are written in turn;
        an insert never overwrites, and its duplicate-key fallback writes the same version as an upsert."""

    def exclusive(self) -> asyncio.Lock:
        """Held while no apply round runs: the ordered delete path checks the source and deletes under it."""
        return self._round_lock

    async def send(self, requests: list[Any]) -> None:
        """One bulk write through this applier's gate and ownership check (see `_send`)."""
        await self._send(requests)

    def stop(self) -> None:
        self._stopping.set()
        self.wake.set()

    @property
    def _epoch(self) -> int:
        assert self.epoch is not None, "run() sets the epoch before any round"
        return self.epoch

    def fence(self) -> None:
        """Stop for good: this process no longer owns the namespace (e.g. its capture was fenced).

        Synchronous so the daemon can call it from anywhere. No new write command
        is sent after this returns; one already sent is awaited by its round.
        """
        self._fenced = True
        self.stop()

    @property
    def fenced(self) -> bool:
        return self._fenced

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the applier was asked to stop (or fenced): what a wait for its start gives up on."""
        return self._stopping

    async def run(self) -> None:
        backoff = Backoff(cap=10.0)
        while True:  # a ledger hiccup at start must not kill the task
            try:
                meta = await self.ledger.get_namespace(self.ns)
                break
            except LedgerError as exc:
                self.status.last_error = redact(str(exc))
                self.log.warning("cannot read the namespace's ledger record; retrying", error=self.status.last_error)
                await self._sleep(backoff.next_delay())
                if self._stopping.is_set():
                    self.status.state = "fenced" if self._fenced else "stopped"
                    return
        if self.epoch is None:
            # Transitional: a caller that does not pass the claim's epoch gets the ledger's current one, which
            # still fences this applier against any later takeover (but not against one before this read).
            self.epoch = meta.epoch if meta else 0
            self.log.warning("applier started without its owner's epoch; using the ledger's", epoch=self.epoch)
        elif meta is None or meta.epoch != self.epoch:
            self._become_fenced(f"{self.ns}: taken over before apply started (epoch {meta.epoch if meta else '?'}, mine {self.epoch})")
            return
        self.status.applied_seq = self.status.written_seq = meta.applied_seq if meta else -1
        self.status.positioned = True
        self.status.state = "running"
        self.status.last_error = ""
        backoff.reset()
        idle = IdlePace(max(self.acfg.poll_interval_s, IDLE_POLL_MAX_S), first=self.acfg.poll_interval_s)
        while not self._stopping.is_set():
            if not self.gate.started:
                self.status.state = "paused"
                await self._wait(self.gate.wait_started())
                continue
            self.status.state = "running"
            self.wake.clear()  # before the round: a commit during the round must not be missed
            try:
                async with self._round_lock:
                    worked = await self._round()
                backoff.reset()
                if self.status.last_error:
                    self.status.last_error = ""  # recovered
            except Fenced as exc:
                self._become_fenced(str(exc))
                return
            except WriteAborted:
                break  # stopping while the writer is stopped: nothing was sent, a restart re-applies
            except ApplyFailed as exc:
                self.status.state = "failed"
                self.status.last_error = redact(str(exc))
                self.log.error("apply stopped for this namespace; operator action needed", error=self.status.last_error)
                return
            except (StoreError, LedgerError, PyMongoError) as exc:
                self.status.last_error = _server_message(exc) if isinstance(exc, PyMongoError) else redact(str(exc))
                self.log.warning("apply round failed; retrying", error=self.status.last_error)
                await self._sleep(backoff.next_delay())
                continue
            if worked:
                idle.reset()
            elif self._deferred:  # retried at the configured pace, never the idle one
                idle.reset()
                await self._wait(self.wake.wait(), self.acfg.poll_interval_s)
            else:
                await self._wait(self.wake.wait(), idle.next_delay() or self.acfg.poll_interval_s)
        if self._fenced:
            self._become_fenced("fenced by the daemon: this process no longer owns the namespace")
        elif self.status.state != "failed":
            self.status.state = "stopped"

    def _become_fenced(self, reason: str) -> None:
        self._fenced = True
        self.status.state = "fenced"
        self.status.last_error = redact(reason)
        self.log.warning("apply fenced: another process owns this namespace now; this applier never writes again",
                         error=self.status.last_error)

    async def _ensure_owner(self) -> None:
        """Raise Fenced unless this applier still owns the namespace (called right before each write command)."""
        if self._fenced:
            raise Fenced(f"{self.ns}: this applier was fenced")
        if self._owns is not None:
            owner = await self._owns()
            current: Any = "?"
        else:
            meta = await self.ledger.get_namespace(self.ns)
            current = meta.epoch if meta else "?"
            owner = meta is not None and meta.epoch == self.epoch
        if self._fenced or not owner:
            self._fenced = True
            raise Fenced(f"{self.ns}: taken over by another process (epoch {current}, mine {self.epoch})")

    async def _send(self, requests: list[Any]) -> None:
        """One bulk write command, sent only while the writer is started and this applier owns the namespace.

        Once sent, a command is never abandoned: if the caller is cancelled (a sibling chunk failed, the
        daemon stops), this still waits for the target's answer before the cancellation goes on. Cancelling
        the driver's await would only close the socket; the server would apply the write anyway, possibly
        after a later round (or the new owner) wrote a newer version of the same document.
        """
        # The fence wait of a new owner, outside the gate (a writer stop is not held up). A loop, not one sleep:
        # the event loop may wake a sleep a little before its deadline on this clock, and a fence wait that is
        # not quite over is a reason to wait on, never a lost lease (it once fenced the applier for good).
        while self.lease is not None and (wait := self.lease.write_after - Mono.now()) > 0:
            await self._sleep(max(wait, 0.001))
            if self._stopping.is_set():
                raise Fenced(f"{self.ns}: stopped during the fence wait") if self._fenced else WriteAborted()
        async with self.gate.writing(abort=self._stopping):
            await self._ensure_owner()
            blocked = self.lease.write_block() if self.lease is not None else ""
            if blocked:
                self._fenced = True
                raise Fenced(blocked)
            # Bounded on both ends (the target fence): the server aborts the command rather than execute it
            # after maxTimeMS, and the client gives up on its socket after the same bound.
            with pymongo.timeout(self.acfg.write_bound_s):
                write = asyncio.ensure_future(self.coll.bulk_write(requests, ordered=False))
            try:
                await asyncio.shield(write)
            except ConnectionFailure:
                self.unanswered_at = Mono.now()
                raise
            except asyncio.CancelledError:
                # Bounded, so that a target gone silent (a partition, no socket timeout) cannot hang a shutdown.
                # A stop cancels again every second (cosmigrate.timeouts.cancel_and_wait): those cancellations
                # must not cut this wait short, and the CancelledError below is raised anyway.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + INFLIGHT_GRACE_S
                while not write.done() and loop.time() < deadline:
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({write}, timeout=deadline - loop.time())
                done = write.done()
                if not done:
                    self.unanswered_at = Mono.now()
                    write.cancel()
                    self.log.warning("abandoning a write command still unanswered; it may yet land on the target",
                                     waited_s=INFLIGHT_GRACE_S, documents=len(requests))
                elif not write.cancelled():
                    write.exception()  # retrieved: the round is being abandoned, its outcome no longer matters
                raise

    async def _wait(self, aw: Any, limit_s: float | None = None) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({stop, task}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (stop, task):
                t.cancel()

    async def _sleep(self, seconds: float) -> None:
        await self._wait(asyncio.sleep(seconds), seconds)

    async def _fetch(self, record: BatchRecord) -> Batch:
        try:
            data = await self.store.get(record.key)
        except ObjectMissing as exc:
            # Committed but gone (expired by a lifecycle rule, deleted by hand): retrying cannot bring it back.
            raise ApplyFailed(
                f"batch {record.seq} ({record.key}) is missing from the store: it was committed but never applied, "
                f"so nothing from it on can be applied. {_restore_hint(self.store.url, record.key)}"
            ) from exc
        try:
            return self.codec.decode(data, expect_checksum=record.checksum)
        except CorruptBatch as exc:
            raise ApplyFailed(f"batch {record.seq} ({record.key}) is corrupt: {exc}") from exc

    async def _round(self) -> bool:
        """Merge pending batches, write the final versions, then mark applied what the target acknowledged.

        Live, a round is what is pending (up to `apply.max_batches_per_round` batches). Behind (a full page of
        pending batches came back), the round keeps merging page after page, the latest version per key
        only, until nothing is pending or the survivors hold `apply.collapse_max_bytes`: a backlog where
        keys repeat costs one write per key instead of one per event. Nothing is marked before every merged
        batch's writes are acknowledged, and deferred writes hold `applied_seq` back as for one page.
        """
        misses: dict[bytes, int] = {}
        merged = Collapser(misses if self.lookup_misses is not None else None)
        records: list[BatchRecord] = []
        page_size = self.acfg.max_batches_per_round
        while True:
            start = self.status.written_seq + 1 + len(records)
            page = await self.ledger.list_batches(self.ns, start, page_size)
            page = [r for i, r in enumerate(page) if r.seq == start + i]
            if not page:
                break
            for b in await _all(self._fetch(r) for r in page):
                merged.add(b)
            records += page
            if (len(page) < page_size or merged.nbytes >= self.acfg.collapse_max_bytes
                    or self._stopping.is_set() or not self.gate.started):
                break
        if not records and not self._deferred:
            await self._release_objects()
            return False
        ops = merged.ops(self._deferred)
        del merged
        if self.inserts_first():
            for op in ops.values():
                if op.doc is not None and op.origin_seq > self.status.written_seq:  # not a carried (deferred) write
                    op.insert = True
        if misses and self.lookup_misses is not None:
            resolved = await self.lookup_misses(misses)
            ops.update({identity(op.key): op for op in resolved.values()})  # keyed as collapse keys them
        self.deletes_sent += sum(1 for op in ops.values() if op.doc is None)
        async with self.pool:
            deferred = await self._write_run(ops)
        self.crash.hit("after_write")
        for r in records:
            self._unmarked[r.seq] = (r.events, r.key)
        if records:
            self.status.written_seq = records[-1].seq
        self._deferred = deferred
        self.status.deferred = len(deferred)
        if not deferred:
            self.status.deferred_reason = ""
        self.status.deletes_applied += sum(1 for key, op in ops.items() if op.doc is None and key not in deferred)
        hold = min((op.origin_seq for op in deferred.values()), default=self.status.written_seq + 1)
        new_applied = min(self.status.written_seq, hold - 1)
        if new_applied > self.status.applied_seq:
            events = sum(n for s, (n, _) in self._unmarked.items() if s <= new_applied)
            await self._mark_applied(new_applied, events)
            self.crash.hit("after_mark")
            self._unreleased.update((key, None) for s, (_, key) in sorted(self._unmarked.items()) if s <= new_applied)
            self._unmarked = {s: v for s, v in self._unmarked.items() if s > new_applied}
            self.status.applied_seq = new_applied
            self.status.events_applied += events
            self.status.recent.append((Mono.now(), events))
            self._release_after = None  # new objects to release: try now
        await self._release_objects()
        return bool(records)

    async def _mark_applied(self, new_applied: int, events: int) -> None:
        """Advance applied_seq in the ledger, retrying a transient failure with the SAME values.

        The write may have taken effect before its answer was lost; the ledger
        recognises a repeat of the same (old, new) pair as done. Moving on to a
        later round first would send a different pair and read as a conflict.
        """
        backoff = Backoff(base=0.2, cap=10.0)
        while True:
            try:
                await self.ledger.mark_applied(self.ns, self._epoch, self.status.applied_seq, new_applied, events,
                                               Wall.now().s)  # wall seconds in the ledger
                return
            except SeqConflict as exc:
                raise ApplyFailed(f"applied_seq moved under this applier: {exc}") from exc
            except Fenced:
                raise
            except LedgerError as exc:
                self.status.last_error = redact(str(exc))
                self.log.warning("ledger unavailable while marking batches applied; retrying",
                                 error=self.status.last_error)
                if self._stopping.is_set():
                    raise
                await self._sleep(backoff.next_delay())

    async def _release_objects(self) -> None:
        """Tell the store which applied batch objects may expire (S3: tag them; a directory: mark them).

        Only after mark_applied: an unapplied batch must never expire. A failure
        (e.g. a role without s3:PutObjectTagging) is logged and retried with
        backoff, never fails the round; keys kept for retry are lost on a
        restart (and beyond MAX_UNRELEASED): those objects are then kept for
        good, which costs storage, never data.
        """
        if not self._unreleased or (self._release_after is not None and Mono.now() < self._release_after):
            return
        keys = list(self._unreleased)[:RELEASE_PER_ROUND]
        errors: list[str] = []
        limit = asyncio.Semaphore(8)

        async def release(key: str) -> None:
            async with limit:
                try:
                    await self.store.mark_applied(key)
                except ObjectMissing:
                    pass  # already gone: nothing left to expire
                except StoreError as exc:
                    errors.append(str(exc))
                    return
                self._unreleased.pop(key, None)

        await _all(release(k) for k in keys)
        if errors:
            self._release_after = Mono.now() + self._release_backoff.next_delay()
            self.log.warning("could not mark applied batches for expiry; will retry (they are kept meanwhile)",
                             count=len(errors), error=redact(errors[0]))
        else:
            self._release_backoff.reset()
        if len(self._unreleased) > MAX_UNRELEASED:
            dropped = len(self._unreleased) - MAX_UNRELEASED
            for key in list(self._unreleased)[:dropped]:
                del self._unreleased[key]
            self.log.warning("giving up marking old applied batches for expiry; they stay in the store", count=dropped)

    # --- writing ------------------------------------------------------------------------

    def _chunks(self, ops: list[Op]) -> Iterable[list[Op]]:
        chunk: list[Op] = []
        size = 0
        for op in ops:
            n = len(op.doc.raw) if op.doc is not None else 64
            if chunk and (len(chunk) >= self.acfg.max_ops_per_write or size + n > self.acfg.max_bytes_per_write):
                yield chunk
                chunk, size = [], 0
            chunk.append(op)
            size += n
        if chunk:
            yield chunk

    async def _bulk(self, ops: list[Op]) -> dict[bytes, tuple[Op, dict[str, Any]]]:
        """Write ops (unordered, retried on transient errors); return the write errors by key.

        Every document key appears once in a run, so chunks are independent and up to
        `apply.write_concurrency` of them are in flight at once: the target works while
        this process prepares the next chunk. When one chunk fails, its siblings are
        cancelled and awaited (see `_all`, `_send`): a chunk left retrying in the
        background could land after a later round wrote a newer version.
        """
        failed: dict[bytes, tuple[Op, dict[str, Any]]] = {}
        limit = asyncio.Semaphore(self.acfg.write_concurrency)

        async def one(chunk: list[Op]) -> None:
            async with limit:
                await self._write_chunk(chunk, failed)

        await _all(one(chunk) for chunk in self._chunks(ops))
        return failed

    async def _write_chunk(self, chunk: list[Op], failed: dict[bytes, tuple[Op, dict[str, Any]]],
                           splitting: bool = False) -> None:
        """Write one chunk until each op is acknowledged, deferred (duplicate key) or refused.

        Transient errors are retried as they are. A write error names its document;
        a refusal of the whole command (a value the server cannot parse, a statement
        over its size limit) does not: the chunk is split in halves until the one
        refused document is found, and the namespace fails with that `_id`, instead
        of the round being retried for ever with nobody told which document.
        """
        backoff = Backoff(base=0.2, cap=10.0)
        pending = chunk
        while pending:
            try:
                await self._send([op.request() for op in pending])
                return
            except BulkWriteError as exc:
                details = exc.details or {}
                pending = self._sort_write_errors(pending, details, failed)
                if not pending:
                    return
                if not details.get("writeConcernErrors") and all(
                        e.get("code") == DUPLICATE_KEY for e in details.get("writeErrors", [])):
                    continue  # only inserts that found their document: their upserts go now, no backoff
            except (PyMongoError, InvalidDocument) as exc:
                if _timed_out(exc) and len(pending) > 1:
                    # Over the write bound (apply.write_bound_s): smaller commands fit it, the same one may never.
                    self.log.warning("a write command outlasted the write bound; writing it in halves",
                                     documents=len(pending), bound_s=self.acfg.write_bound_s)
                    half = len(pending) // 2
                    for part in (pending[:half], pending[half:]):
                        await self._write_chunk(part, failed, splitting)
                    return
                if _transient(exc):
                    self.log.warning("transient target error; retrying the same writes", error=redact(str(exc)))
                elif _refuses_command(exc):
                    if not splitting:
                        self.log.warning("the target refused a whole write command; splitting it to find the document",
                                         documents=len(pending), error=_server_message(exc))
                    await self._bisect(pending, exc, failed)
                    return
                else:
                    raise
            await asyncio.sleep(backoff.next_delay())

    async def _bisect(self, ops: list[Op], exc: Exception, failed: dict[bytes, tuple[Op, dict[str, Any]]]) -> None:
        """Find the document a refused command carried: halves are written in turn (log2 of the chunk deep)."""
        if len(ops) == 1:
            code = exc.code if isinstance(exc, OperationFailure) else type(exc).__name__
            raise ApplyFailed(
                f"the target refused the write of document _id={ops[0].show_id()} as a whole command: "
                f"{_server_message(exc)} (code {code})"
            ) from None
        mid = len(ops) // 2
        for half in (ops[:mid], ops[mid:]):
            await self._write_chunk(half, failed, splitting=True)

    def _sort_write_errors(self, pending: list[Op], details: Mapping[str, Any],
                           failed: dict[bytes, tuple[Op, dict[str, Any]]]) -> list[Op]:
        """Sort a bulk write's errors: defer duplicates, fail on a refused document, return what to write again.

        A write-concern error means the writes reached the primary but were not
        acknowledged as durable (a failover may roll them back): every write
        without its own error is written again (idempotent: the same final
        versions), never counted as applied on the strength of that answer.
        """
        retry: list[Op] = []
        errored: set[int] = set()
        for err in details.get("writeErrors", []):
            errored.add(err["index"])
            op = pending[err["index"]]
            if err.get("code") == DUPLICATE_KEY and op.insert:
                # The document is there already (a page re-read after a restart, a change during the full load):
                # write this same version as an upsert, now. Never skipped: the target's copy may be older. A
                # conflict on a secondary unique index fails the upsert too and is deferred as any other.
                op.insert = False
                retry.append(op)
            elif err.get("code") == DUPLICATE_KEY:
                failed[op.key] = (op, err)
            elif err.get("code") in TRANSIENT_CODES:
                retry.append(op)
            else:
                raise ApplyFailed(
                    f"the target refused document _id={op.show_id()}: {_server_message(err)} (code {err.get('code')})"
                )
        concern = details.get("writeConcernErrors", [])
        if concern:
            retry.extend(op for i, op in enumerate(pending) if i not in errored)
            self.log.warning("write concern not satisfied; writing the same documents again", documents=len(retry),
                             code=concern[0].get("code"), error=_server_message(concern[0]))
        return retry

    async def _check_shared_ids(self, failed: Mapping[bytes, tuple[Op, Mapping[str, Any]]]) -> None:
        """A sharded document refused by the target's `_id` index: the target's document with that `_id` has
        other shard key values, i.e. another source document (written in an earlier run) shares the `_id`.

        Limit: a document whose shard key value changed at the source (deleted, then inserted again under
        another value: the feed shows no delete) looks the same from here, and fails the namespace too.
        One target read per such refusal, nothing for unsharded collections.
        """
        for op, err in failed.values():
            if op.doc is None or shared_id_part(op.key) is None or not _id_index_conflict(err):
                continue
            fields = [name for name in RawBSONDocument(op.key, RAW) if name != "_id"]
            other = await self.coll.find_one({"_id": op.filter["_id"]}, {name: 1 for name in fields})
            if other is None:
                continue  # gone meanwhile: the write is retried like any other conflict
            # Element by element: the encoder would move a top-level `_id` first, and documentKeys end with it.
            body = bson.encode({name: other.get(name) for name in fields}, codec_options=RAW)[4:-1]
            body += bson.encode({"_id": other["_id"]}, codec_options=RAW)[4:-1]
            theirs = (len(body) + 5).to_bytes(4, "little") + body + b"\x00"
            if theirs != op.key:
                raise ApplyFailed(_shared_id_message(theirs, op.key))

    async def _mismatch(self, failed: Mapping[bytes, tuple[Op, Mapping[str, Any]]], probe: int = 5) -> str:
        """Say so when deferred writes can never land: the blocking target document holds the same entry inside
        an array (in either document), which Cosmos DB does not hold unique and DocumentDB does. The source then
        keeps both documents legally, and no later change of theirs is coming to resolve it.

        Reads at most `probe` target documents (only the index fields), and only while writes stay deferred.
        """
        keys = frozenset(failed)
        if keys == self._mismatch_of[0]:
            return self._mismatch_of[1]  # the same writes deferred again: the same answer, no new reads
        reason = await self._find_mismatch(failed, probe)
        self._mismatch_of = (keys, reason)
        return reason

    async def _find_mismatch(self, failed: Mapping[bytes, tuple[Op, Mapping[str, Any]]], probe: int) -> str:
        for op, err in list(failed.values())[:probe]:
            pattern, value = err.get("keyPattern"), err.get("keyValue")
            if op.doc is None or not (isinstance(pattern, Mapping) and isinstance(value, Mapping) and pattern):
                continue
            paths = list(pattern)
            blocker = await self.coll.find_one({"$and": [dict(value), {"_id": {"$ne": op.filter["_id"]}}]},
                                               {p.split(".")[0]: 1 for p in paths})
            if blocker is not None and (crosses_array(op.doc, paths) or crosses_array(blocker, paths)):
                return (f"unique index on ({', '.join(paths)}): source documents _id={op.show_id()} and "
                        f"_id={show_id(_id_key(blocker['_id']))} both hold one value, inside an array; Cosmos DB "
                        "does not hold values inside arrays unique, DocumentDB does, so the target can never take "
                        "both (change one at the source; `cosmigrate indexes` lists every such document)")
        return ""

    async def _unique_indexes(self, refresh: bool = False) -> list[UniqueIndex]:
        if self._unique is None or refresh:
            found = []
            async for ix in await self.coll.list_indexes():
                if ix.get("unique") and ix.get("name") != "_id_":
                    partial = ix.get("partialFilterExpression")
                    found.append(UniqueIndex(tuple(ix["key"].keys()), bool(ix.get("sparse")),
                                             dict(partial) if isinstance(partial, Mapping) else None))
            self._unique = found
        return self._unique

    async def _blockers(self, op: Op, err: Mapping[str, Any]) -> set[bytes]:
        """Target documents holding a unique value that `op` needs, as `_id` keys (see `_id_key`).

        The E11000 error's keyPattern/keyValue name the very index entry in
        conflict (one element of an array, for a multikey index): that is the
        exact query. A server that leaves them out (DocumentDB may) gets an
        over-approximation from the document itself: every unique index, each
        path's values with arrays expanded as the index expands them (`$in`),
        restricted to what a partial index covers; extra candidates only cost
        a rewrite of documents this run writes anyway.
        """
        if op.doc is None:
            return set()
        indexes = await self._unique_indexes()
        pattern, value = err.get("keyPattern"), err.get("keyValue")
        filters: list[dict[str, Any]] = []
        if isinstance(pattern, Mapping) and isinstance(value, Mapping) and pattern and list(value) == list(pattern):
            ix = next((i for i in indexes if i.key == tuple(pattern)), None)
            filters.append({"$and": [dict(value), *([ix.partial] if ix and ix.partial else [])]})
        else:
            filters.extend(f for ix in indexes if (f := _index_filter(op.doc, ix)) is not None)
        out: set[bytes] = set()
        for flt in filters:
            query = {"$and": [flt, {"_id": {"$ne": op.filter["_id"]}}]}
            async for doc in self.coll.find(query, {"_id": 1}):
                out.add(_id_key(doc["_id"]))
        return out

    async def _write_run(self, ops: dict[bytes, Op]) -> dict[bytes, Op]:
        failed = await self._bulk(list(ops.values()))
        if not failed:
            return {}
        await self._check_shared_ids(failed)
        await self._unique_indexes(refresh=True)
        # 1. Retry after the rest: the blocker may have moved on within this run.
        failed = await self._bulk([op for op, _ in failed.values()])
        by_id = {_id_key(op.filter["_id"]): op for op in ops.values()}  # a documentKey may hold more than _id
        for _ in range(3):
            if not failed:
                return {}
            # 2. Cycles: blockers that this run rewrites are removed, then everyone's final version is written.
            blockers: set[bytes] = set()
            for op, err in failed.values():
                blockers |= {b for b in await self._blockers(op, err) if b in by_id}
            if not blockers:
                break
            await self._send([DeleteOne(by_id[b].filter) for b in blockers])
            self.status.cycles_broken += 1
            self.log.info("unique-index cycle broken", documents=len(blockers) + len(failed))
            again = [op for op, _ in failed.values()] + [by_id[b] for b in blockers if by_id[b].key not in failed]
            failed = await self._bulk(again)
        if failed:
            op, err = next(iter(failed.values()))
            self.status.deferred_reason = await self._mismatch(failed)
            self.log.warning("writes deferred by unique-index conflicts; retried every round",
                             count=len(failed), example_id=op.show_id(), index=_index_name(err),
                             reason=self.status.deferred_reason or "waiting for the blocking documents to change")
        return {identity(op.key): op for op, _ in failed.values()}  # keyed as collapse keys them


@dataclass(frozen=True)
class UniqueIndex:
    """A secondary unique index of the target collection, as far as finding blockers needs it."""

    key: tuple[str, ...]
    sparse: bool = False
    partial: dict[str, Any] | None = None


def _id_key(value: Any) -> bytes:
    """One comparable form for an `_id`, whether it came from a documentKey or from a query result
    (1 and 1.0 are the same document: see `cosmigrate.identity`)."""
    return identity(bson.encode({"_id": value}, codec_options=RAW))


def _index_values(value: Any, parts: list[str]) -> list[Any]:
    """The values a (multikey) index holds for a dotted path: arrays expanded the way MongoDB expands them."""
    if not parts:
        return list(value) if isinstance(value, list) else [value]
    head, rest = parts[0], parts[1:]
    if isinstance(value, Mapping):
        return _index_values(value[head], rest) if head in value else []
    if isinstance(value, list):
        out: list[Any] = []
        if head.isdigit() and int(head) < len(value):
            out.extend(_index_values(value[int(head)], rest))
        for item in value:
            if isinstance(item, Mapping):
                out.extend(_index_values(item, parts))
        return out
    return []


def _index_filter(doc: Mapping[str, Any], ix: UniqueIndex) -> dict[str, Any] | None:
    """A query for documents that may hold one of `doc`'s entries in `ix` (None: `doc` has no entry there)."""
    clauses: list[dict[str, Any]] = []
    present = False
    try:
        for path in ix.key:
            values = _index_values(doc, path.split("."))
            present = present or bool(values)
            clauses.append({path: {"$in": values}} if values else {path: None})  # missing is null to an index
    except BSONError:
        return None  # a value this process cannot decode: no guess, the write stays deferred and visible
    if ix.sparse and not present:
        return None
    if ix.partial:
        clauses.append(ix.partial)
    return {"$and": clauses}


def _restore_hint(store_url: str, key: str) -> str:
    """What an operator does about a missing batch object, per kind of store."""
    if store_url.startswith("s3://"):
        bucket = store_url.removeprefix("s3://").split("/")[0]
        return (
            "The bucket is versioned: find the object's previous version "
            f"(aws s3api list-object-versions --bucket {bucket} --prefix {key}) and restore it (delete the delete "
            "marker, or copy that version back onto the key), then restart cosmigrate to resume this namespace."
        )
    return (f"Restore the file {key} under {store_url} from a backup, then restart cosmigrate to resume this namespace; "
            "without it, this namespace must be migrated again from the beginning.")


async def _all(aws: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently and return their results in order: `gather` without orphans.

    On the first failure the others are cancelled and awaited (a TaskGroup), so
    nothing started here outlives the call. The failure is re-raised as itself,
    not as an ExceptionGroup: Fenced first, then ApplyFailed, then the first other.
    """
    failure: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(aw) for aw in aws]
    except BaseExceptionGroup as eg:
        leaves = list(_leaves(eg))
        failure = next((e for kind in (Fenced, ApplyFailed, Exception) for e in leaves if isinstance(e, kind)), None)
        if failure is None:
            raise
    if failure is not None:
        raise failure  # outside the except block: keeps its own cause, no group as context
    return [t.result() for t in tasks]


def _leaves(eg: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _index_name(err: Mapping[str, Any]) -> str:
    """The unique index of an E11000 write error, by its key fields (never the duplicate value)."""
    pattern = err.get("keyPattern")
    if isinstance(pattern, Mapping) and pattern:
        return ",".join(str(k) for k in pattern)
    return "?"


_DUP_KEY_VALUE = re.compile(r"dup key:.*", re.S)


def _server_message(err: Mapping[str, Any] | BaseException) -> str:
    """A server error message fit for a log line: a duplicate-key value is a document value, so it is cut.

    Never `str()` of a BulkWriteError: it embeds every failed statement, documents included.
    """
    if isinstance(err, Mapping):
        msg = str(err.get("errmsg", ""))
    elif isinstance(err, BulkWriteError):
        errors = (err.details or {}).get("writeErrors", []) + (err.details or {}).get("writeConcernErrors", [])
        msg = f"bulk write errors, codes {sorted({e.get('code') for e in errors}, key=str)}"
    elif isinstance(err, OperationFailure):
        msg = str((err.details or {}).get("errmsg", err))
    else:
        msg = str(err)
    return redact(_DUP_KEY_VALUE.sub("dup key: { ... }", msg))[:500]
