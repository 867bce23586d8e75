"""Capture: one watcher per physical partition and one committer per namespace.

Each watcher reads one Cosmos change stream as raw BSON and cuts batches,
each taking the namespace's next seq as it is handed to the committer's queue
(arrival order); the committer puts each in the store, then commits it in the
ledger (docs/design.md, invariant 2), strictly in seq order, with the position of every partition
(`cosmigrate.partitions`). One partition's batches arrive in the order its
watcher read them, and a document lives in one partition, so each document's
changes get increasing seqs: the applier needs nothing more (README, "Capture
and ordering"). A source without `GetChangeStreamTokens` (or
`capture.per_partition = false`) gets one whole-collection stream, one watcher.

A partition split fails the parent's stream; its watcher hands its complete
pages to the committer and then the split itself, so the committer, once
every batch of the parent is committed, creates the children's units from
the parent's committed position and starts their watchers.

Resume tokens and pages. Cosmos gives every event of a page the same token,
the position *after* the page. A batch's resume token must never be ahead of
its last event, so a batch is cut at a page boundary whenever one exists;
only a page larger than a whole batch is cut mid-page, and then the batch
carries the token of the previous boundary (a restart re-reads that page:
duplicates, which upserts make harmless, but never a gap). A page boundary is
known when the token changes, when `try_next()` returns None (the page was
drained and the next getMore found nothing), or when `try_next()` raises
(it only awaits the network once its page is drained).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from cosmigrate.backoff import Backoff, IdlePace, retry_after_s
from cosmigrate.batchfile import BatchCodec, BatchHeader, token_bytes
from cosmigrate.bytebudget import ByteBudget
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import Config
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.freshness import Freshness
from cosmigrate.lasterror import LastError
from cosmigrate.ledger import BatchRecord, Fenced, Ledger, LedgerError, NamespaceMeta, SeqConflict
from cosmigrate.logs import get_logger
from cosmigrate.mongo import (
    beginning_token,
    change_stream_tokens,
    event_token,
    open_change_stream,
    page_bytes,
    page_drained,
    page_events,
    raw_collection,
    take_page,
)
from cosmigrate.partitions import (
    FAILED,
    SPLIT,
    TAILING,
    Unit,
    UnitsError,
    children,
    covered_by,
    from_tokens,
    is_units,
    range_name,
    unit_positions,
)
from cosmigrate.partitions import decode as decode_units
from cosmigrate.partitions import encode as encode_units
from cosmigrate.redact import redact
from cosmigrate.stores import BatchStore, StoreError, batch_key, store_prefix
from cosmigrate.timeouts import Pulse, cancel_and_wait, within
from cosmigrate.tokens import Range, TokenFormatError, positions
from cosmigrate.ttl import read_ttl_indexes

THROTTLED = 16500
# With server-side retry on, Cosmos answers a throttled request with ExceededTimeLimit after a while: retry it too.
EXCEEDED_TIME_LIMIT = 50
TRANSIENT_SOURCE_CODES = {THROTTLED, EXCEEDED_TIME_LIMIT}
# Errors that mean "this position can never be resumed": stop the namespace, never restart from "now".
EXPIRED = 72  # InvalidOptions: "Expired resume token or cursor, reinitialize the change stream cursor"
FATAL_CODES = {280, 286, 26, 73, EXPIRED}
TOKEN_REJECTED = "Change feed token format is invalid"


def is_fatal(exc: OperationFailure) -> bool:
    return exc.code in FATAL_CODES or TOKEN_REJECTED in str(exc)


def fatal_reason(exc: OperationFailure) -> str:
    """What a namespace's failure says: an expired position is gone for good, so only a re-copy helps."""
    msg = exc.details.get("errmsg") if exc.details else str(exc)
    if exc.code == EXPIRED:
        return (f"the source's change-feed position expired ({msg}; code 72): changes after it can no longer be "
                "read; re-copy this collection, then reset its ledger item")
    return f"the source refused to resume the change stream: {msg}"


class StartPositionError(Exception):
    """No start position can be had (e.g. the beginning, on an account that refuses every route to it)."""


@dataclass
class SealedBatch:
    events: list[bytes]
    nbytes: int
    token: bytes
    first_at: Wall
    last_at: Wall
    unit: Range | None = None
    """The partition range it was read from (None: the whole-collection stream)."""
    seq: int = -1
    """The namespace's next seq when it was sealed: arrival order at the committer's queue."""
    held: int = 0
    """Bytes of it still counted in the read budget (given back once it is in the store)."""


@dataclass
class _Split:
    """The partition `unit` split; every batch of it is already handed to the committer."""

    unit: Range
    ranges: list[Range]


@dataclass
class _UnitFailed:
    unit: Range
    reason: str


_Item = SealedBatch | _Split | _UnitFailed | None


@dataclass
class CaptureStatus:
    """What status shows for a namespace's capture side."""

    state: str = "starting"
    last_error_at: Wall | None = None
    last_error: str = LastError()  # type: ignore[assignment]
    """The latest error, cleared when the part that reported it (source side or store/ledger side) works again."""
    last_contact: Wall | None = None
    events_read: int = 0
    committed_seq: int = -1
    committed_events: int = 0
    committed_bytes: int = 0
    """Raw BSON bytes of the events committed by this process (metrics)."""
    stored_bytes: int = 0
    """Bytes put in the store for them, after compression (metrics)."""
    unflushed_bytes: int = 0
    throttled: int = 0
    empty_pages: int = 0
    """Empty pages that came back faster than max_await_ms (a throttled stream); each one backs off."""
    idle_pauses: int = 0
    """Pauses between polls of an idle stream (`capture.idle_poll_max_s`), each ended early by a head sample
    that the namespace has not reached."""
    idle_cuts: int = 0
    """Batches cut because the stream was idle at a page boundary (not full, not `max_batch_age_s` old)."""
    ttl_indexes: list[dict[str, Any]] | None = None
    """The source collection's TTL indexes, read at start (None: not yet); status judges them (`cosmigrate.ttl`)."""
    ttl_unknown: str = ""
    """Why those indexes could not be read ("" when they were)."""
    started_at: Wall = field(default_factory=Wall.now)
    partitions: list[dict[str, str]] = field(default_factory=list)
    """One entry per partition unit (range, state tailing/split/failed, error); empty for a single stream."""

    @property
    def partition_failed(self) -> bool:
        return any(p["state"] == FAILED for p in self.partitions)


@dataclass
class _Page:
    """The watcher's share of the read budget for the driver's current page."""

    reservation: int | None = None
    """Room reserved for the next fetch, until it answered."""
    left: int = 0
    """Bytes of the fetched page that the driver still holds (not yet in the buffer)."""
    last: int | None = None
    """The size of the stream's previous page, what its next fetch reserves (None: none yet)."""


@dataclass
class _Buffer:
    """Events read but not yet sealed, with the page boundaries among them."""

    events: list[bytes] = field(default_factory=list)
    nbytes: int = 0
    first_at: Wall = Wall(0.0)
    last_at: Wall = Wall(0.0)
    boundaries: list[tuple[int, bytes]] = field(default_factory=list)  # (events before it, token there)
    base_token: bytes = b""  # a position at or before events[0]
    page_token: bytes | None = None  # token of the page being read

    def add(self, raw: bytes, token: bytes, now: Wall) -> None:
        if token != self.page_token:
            self.mark_boundary()
            self.page_token = token
        if not self.events:
            self.first_at = now
        self.events.append(raw)
        self.nbytes += len(raw)
        self.last_at = now

    def mark_boundary(self, token: bytes | None = None) -> None:
        """Everything read so far is complete pages; `token` (or the page's) is the position after them."""
        token = token or self.page_token
        if token is None:
            return
        n = len(self.events)
        if n == 0:
            # Every event read so far is sealed: the next batch starts after this boundary. Kept as a boundary
            # at index 0 it could never be used by `cut` (which needs a non-empty prefix), and every batch cut
            # mid-page would carry the old base token: a restart would re-read from there (from zero, in a
            # backfill whose pages are larger than a batch).
            self.base_token = token
            return
        if self.boundaries and self.boundaries[-1][0] == n:
            self.boundaries[-1] = (n, token)
        else:
            self.boundaries.append((n, token))

    def cut(self, max_events: int, max_bytes: int, mid_page_ok: bool) -> tuple[list[bytes], int, bytes] | None:
        """Take a prefix for a batch: up to the last boundary within the limits."""
        limit = 0
        total = 0
        for raw in self.events[:max_events]:
            if limit and total + len(raw) > max_bytes:
                break
            total += len(raw)
            limit += 1
        usable = [b for b in self.boundaries if 0 < b[0] <= limit]
        if usable:
            n, token = usable[-1]
        elif mid_page_ok and limit:
            n, token = limit, self.base_token
        else:
            return None
        events = self.events[:n]
        nbytes = sum(len(e) for e in events)
        self.events = self.events[n:]
        self.nbytes -= nbytes
        self.boundaries = [(i - n, t) for i, t in self.boundaries if i > n]
        self.base_token = token
        return events, nbytes, token


class NamespaceCapture:
    """Watcher + committer for one namespace, owned through `meta.epoch`."""

    def __init__(
        self, ns: str, meta: NamespaceMeta, source: AsyncMongoClient[Any], store: BatchStore, ledger: Ledger,
        cfg: Config, crash: CrashPoints | None = None, *, start_at: str | None = None,
        freshness: Freshness | None = None, budget: ByteBudget | None = None,
    ) -> None:
        self.ns = ns
        self.meta = meta
        self.start_at = start_at or cfg.capture.start_at
        """Where a namespace without a stored position starts; the daemon forces "beginning" for late ones."""
        self.freshness = freshness or Freshness()
        self.epoch = meta.epoch
        self.source = source
        self.store = store
        self.ledger = ledger
        self.cfg = cfg
        self.cap = cfg.capture
        limit, floor = self.cap.max_unflushed_bytes, self.cap.max_batch_bytes  # floor: a page's size, none seen yet
        self.budget = budget.child(limit, floor) if budget else ByteBudget(limit, floor=floor)
        """Bytes this namespace read and does not have in the store yet (under the daemon's, for every namespace)."""
        self.crash = crash or CrashPoints()
        self.codec = BatchCodec()
        self.prefix = store_prefix(cfg.store.url)
        self.status = CaptureStatus(committed_seq=meta.next_seq - 1, committed_events=meta.captured_events)
        self.log = get_logger(namespace=ns)
        self._next_seq = meta.next_seq
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._units: list[Unit] | None = None
        """Per-partition mode: every unit as of the last committed batch (the committer's alone)."""
        self._read: dict[Range, Any] = {}
        """Per-partition mode: each unit's latest position handed to the committer (freshness)."""
        self._tg: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()
        self._wake = Pulse()
        """Ends the idle watchers' pauses: a head sample they have not reached, or a stop."""
        self.freshness.on_behind = self._wake.fire
        self._dead = False  # fenced or failed: never write again
        self.on_commit: Any = None  # called after each commit (wakes the namespace's applier)
        self._error_from = ""  # "source" or "store": which side set status.last_error, so only its recovery clears it

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask for a drain: seal complete pages, commit them, exit."""
        self._stop_reading()

    def _stop_reading(self) -> None:
        self._stopping.set()
        self.budget.wake()  # a watcher waiting for room sees the stop
        self._wake.fire()

    async def _read_expiry(self) -> None:
        """Read the collection's TTL indexes beside the watchers, never before them.

        A listIndexes is not routed to one partition, so while a full load keeps the partitions' request
        units in use it is throttled until every partition has units at once; a watcher that waited for it
        left its partition unread (measured: a 4-partition backfill took 5x its RU budget's time,
        bench/plan.py). Until they are read (`ttl_indexes` None) status says the expiry is unknown, which
        blocks readiness."""
        if self.status.ttl_indexes is not None:
            return
        try:
            self.status.ttl_indexes, self.status.ttl_unknown = await self._retrying(
                lambda: read_ttl_indexes(self.source, self.ns))
        except (Fenced, _Stopped):
            return

    async def run(self) -> None:
        committer = asyncio.create_task(self._committer(), name=f"commit:{self.ns}")
        expiry = asyncio.create_task(self._read_expiry(), name=f"expiry:{self.ns}")
        try:
            try:
                await self._watch_all()
            finally:
                await cancel_and_wait([expiry])
                await self._queue.put(None)
                await committer
                if self.status.state == "running":
                    self.status.state = "stopped"
        finally:
            self.budget.close()

    async def _watch_all(self) -> None:
        """One watcher per partition unit while the namespace runs, or the single whole-collection watcher."""
        try:
            units = await self._retrying(self._start_units)
        except (Fenced, _Stopped):
            return
        except (OperationFailure, LedgerError, UnitsError) as exc:
            await self._fail(f"cannot establish the start position: {exc}")
            return
        if units is None:
            await self._watcher(None)
            return
        self._units = units
        for unit in units:
            if unit.state == FAILED:  # a restart is the operator's retry
                unit.state, unit.error = TAILING, ""
        self._publish_units()
        for unit in units:
            if unit.state == TAILING:
                self._read[unit.range] = unit.token
        self._mark_units(self._next_seq - 1)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._stopping.wait())  # holds the group open while children may still be started
            for unit in units:
                if unit.state == TAILING:
                    self._spawn(unit)
        self._tg = None

    def _spawn(self, unit: Unit) -> None:
        assert self._tg is not None
        self._tg.create_task(self._watcher(unit), name=f"capture:{self.ns}:{unit.name}")

    async def _start_units(self) -> list[Unit] | None:
        """The namespace's partition units: stored ones, or new ones from GetChangeStreamTokens (at the
        beginning or now); None for the single whole-collection stream (a stored single-stream position, a
        source without the custom command, or `capture.per_partition = false`)."""
        stored = self.meta.resume_token
        if stored is not None:
            return decode_units(stored) if is_units(stored) else None
        if not self.cap.per_partition:
            return None
        start = Timestamp(0, 0) if self.start_at == "beginning" else None
        try:
            units = from_tokens(await change_stream_tokens(self.source, self.ns, start))
            if not units:
                raise UnitsError("GetChangeStreamTokens answered no token")
            raw = encode_units(units)
        except OperationFailure as exc:
            if exc.code in TRANSIENT_SOURCE_CODES:
                raise
            why = redact(str(exc.details.get("errmsg") if exc.details else exc))[:200]
            self.log.warning("per-partition capture unavailable; one change stream for the whole collection",
                             reason=why)
            return None
        except (ValueError, UnitsError) as exc:
            self.log.warning("per-partition capture unavailable; one change stream for the whole collection",
                             reason=str(exc))
            return None
        if not await self.ledger.set_start_token(self.ns, self.epoch, raw):
            again = await self.ledger.get_namespace(self.ns)
            assert again is not None and again.resume_token is not None
            raw = again.resume_token
            if not is_units(raw):
                return None
            units = decode_units(raw)
        self.log.info("capture start position recorded", start_at=self.start_at, partitions=len(units))
        return units

    # --- watcher ----------------------------------------------------------------------

    async def _start_token(self) -> bytes:
        if self.meta.resume_token is not None:
            return self.meta.resume_token
        coll = raw_collection(self.source, self.ns)
        if self.start_at == "beginning":
            token = await self._beginning()
        else:
            async with await open_change_stream(coll, None, deletes_preview=self.cap.deletes_preview,
                                                max_await_ms=self.cap.max_await_ms) as stream:
                rt = stream.resume_token
                if rt is None:
                    raise LedgerError("the source gave no start position for \"now\"; set capture.start_at = \"beginning\"")
                token = token_bytes(rt)
        if not await self.ledger.set_start_token(self.ns, self.epoch, token):
            stored = await self.ledger.get_namespace(self.ns)
            assert stored is not None and stored.resume_token is not None
            token = stored.resume_token
        self.log.info("capture start position recorded", start_at=self.start_at)
        return token

    async def _beginning(self) -> bytes:
        """The position before every change of the collection.

        The documented route is GetChangeStreamTokens at Timestamp(0, 0); one token per physical partition,
        so a single token is a whole-collection position. The old LSN-"0" token is the fallback for accounts
        without the custom command (or with several partitions when `capture.per_partition = false`: the
        single stream then needs a whole-collection position)."""
        why = ""
        try:
            tokens = await change_stream_tokens(self.source, self.ns, Timestamp(0, 0))
        except OperationFailure as exc:
            if exc.code in TRANSIENT_SOURCE_CODES:
                raise
            tokens, why = [], redact(str(exc.details.get("errmsg") if exc.details else exc))[:200]
        except ValueError as exc:
            tokens, why = [], str(exc)
        if len(tokens) == 1:
            return tokens[0]
        why = why or f"{len(tokens)} partitions"
        # The old form is refused by modern accounts: try it now, so the namespace fails here with both reasons
        # instead of recording a start position that can never be opened.
        fallback = beginning_token()
        coll = raw_collection(self.source, self.ns)
        try:
            async with await open_change_stream(coll, RawBSONDocument(token_bytes(fallback)),
                                                deletes_preview=self.cap.deletes_preview, max_await_ms=0,
                                                batch_size=0):
                pass
        except OperationFailure as exc:
            if exc.code in TRANSIENT_SOURCE_CODES or not is_fatal(exc):
                raise
            raise StartPositionError(
                f"the beginning of the change feed is out of reach: GetChangeStreamTokens at Timestamp(0, 0) failed "
                f"({why}) and the source refuses the old beginning token ({exc.details.get('errmsg') if exc.details else exc})"
                "; grant the key the customAction permission or upgrade the account's server version") from None
        self.log.warning("beginning of the feed taken from the old LSN-0 token", reason=why)
        return token_bytes(fallback)

    async def _watcher(self, unit: Unit | None) -> None:
        """Read one change stream: the whole collection (`unit` None) or one partition unit's."""
        buf = _Buffer()
        try:
            await self._watch(unit, buf)
        finally:
            self.budget.release(buf.nbytes)  # events never sealed: dropped, read again after a restart

    async def _watch(self, unit: Unit | None, buf: _Buffer) -> None:
        backoff = Backoff()
        where = unit.range if unit is not None else None
        if unit is None:
            try:
                buf.base_token = await self._retrying(self._start_token)
            except (Fenced, _Stopped):
                return
            except (OperationFailure, LedgerError, StartPositionError) as exc:
                await self._fail(f"cannot establish the start position: {exc}")
                return
        else:
            buf.base_token = unit.token
        self.status.state = "running"
        coll = raw_collection(self.source, self.ns)
        age = self.cap.max_batch_age_s
        if unit is None:
            self.freshness.mark(buf.base_token, self._next_seq - 1)
        empty = Backoff(base=0.05, cap=max(0.05, self.cap.max_await_ms / 1000))
        fast_s = self.cap.max_await_ms / 2000
        idle = IdlePace(self.cap.idle_poll_max_s)
        page = _Page()
        while not self._stopping.is_set() and not self._dead:
            try:
                # Opening answers the first page (the aggregate's): room for it first, as for every getMore.
                if not await self._room_for_a_page(buf, where, page):
                    break
                async with await self._fetching(page, None, lambda: open_change_stream(
                    coll, RawBSONDocument(buf.base_token if not buf.boundaries else buf.boundaries[-1][1]),
                    deletes_preview=self.cap.deletes_preview, max_await_ms=self.cap.max_await_ms,
                )) as stream:
                    buf.page_token = None
                    while not self._stopping.is_set() and not self._dead:
                        asks = not page_events(stream)  # this call may ask for a page (None: cannot tell)
                        if asks and not await self._room_for_a_page(buf, where, page):
                            break
                        asked = Mono.now()
                        change = await self._fetching(page, stream if asks else None, stream.try_next)
                        now = Wall.now()
                        self.status.last_contact = now
                        backoff.reset()
                        if self._error_from == "source":
                            self._error_from = self.status.last_error = ""
                        if change is None:
                            rt = stream.resume_token
                            token = token_bytes(rt) if rt is not None else None
                            buf.mark_boundary(token)
                            if token is not None and not buf.events:
                                # Nothing unsealed: every event up to here is in batches <= the last sealed seq.
                                self._mark(where, token, self._next_seq - 1)
                            if asked.elapsed() < fast_s:
                                # An empty page that came back at once: a throttled stream. Asking again at
                                # once spins and burns request units; back off (capped, reset by an event).
                                self.status.empty_pages += 1
                                await self._sleep(empty.next_delay())
                            elif not buf.events and (pause := idle.next_delay()) > 0:
                                # (A wake during the fetch is not kept: the next unreached sample wakes it again.)
                                # Idle for a while: ask less often (a thousand idle streams asking twice a
                                # second starved the worker), until a head sample shows this namespace
                                # behind (status, the cutover and the sampler all sample), or a stop.
                                self.status.idle_pauses += 1
                                await self._idle_sleep(pause)
                        else:
                            empty.reset()
                            idle.reset()
                            raw = bytes(change.raw)
                            page.left -= len(raw)  # moved from the driver's page to the buffer: still counted
                            buf.add(raw, event_token(raw), now)
                            rest = take_page(stream)  # the page's other events, already read: at once
                            for raw in rest:
                                page.left -= len(raw)
                                buf.add(raw, event_token(raw), now)
                            self.status.events_read += 1 + len(rest)
                            if page_drained(stream):
                                buf.mark_boundary()  # the page is used up: its token is the position after it
                        full = self._full(buf)
                        old = bool(buf.events) and now - buf.first_at >= age
                        if full or old:
                            await self._seal(buf, mid_page_ok=full, unit=where)
                            # A page taken at once may hold several batches: each is cut now, as when the
                            # events came one by one (batch sizes, and so store puts, stay what they were).
                            while self._full(buf) and not self._dead:
                                left = len(buf.events)
                                await self._seal(buf, mid_page_ok=True, unit=where)
                                if len(buf.events) == left:
                                    break
                        elif self._idle_at_boundary(buf):
                            await self._idle_cut(buf, where)
            except OperationFailure as exc:
                self._drop_page(page)
                buf.mark_boundary()
                if exc.code in TRANSIENT_SOURCE_CODES:
                    self.status.throttled += 1
                    await self._sleep(retry_after_s(exc) if exc.code == THROTTLED else backoff.next_delay())
                    continue
                if unit is not None:
                    await self._seal(buf, mid_page_ok=False, everything=True, unit=where)
                    if await self._after_unit_error(unit, exc):
                        return
                    await self._sleep(backoff.next_delay())
                    continue
                if is_fatal(exc):
                    await self._seal(buf, mid_page_ok=False, everything=True)
                    await self._fail(fatal_reason(exc))
                    return
                self._source_error(f"change stream error: {exc}")
                self.log.warning("change stream error; reopening", error=redact(str(exc)), code=exc.code)
                await self._sleep(backoff.next_delay())
            except (ConnectionFailure, PyMongoError) as exc:
                self._drop_page(page)
                buf.mark_boundary()
                self._source_error(f"source connection lost: {exc}")
                self.log.warning("source connection lost; reopening", error=redact(str(exc)))
                await self._sleep(backoff.next_delay())
            finally:
                self._drop_page(page)
        # Drain: commit the complete pages; the rest is re-read after a restart.
        await self._seal(buf, mid_page_ok=False, everything=True, unit=where)

    async def _room_for_a_page(self, buf: _Buffer, unit: Range | None, page: _Page) -> bool:
        """Wait until the read budget has room for the next page (False: stopping instead).

        While it waits, the buffer's complete pages are sealed once it is `max_batch_age_s` old, as they would
        be if it read on: the committer can then give their bytes back, so watchers that all wait on a full
        budget never hold it for ever.
        """
        def stopping() -> bool:
            return self._stopping.is_set() or self._dead

        if buf.events and not self.budget.has_room(page.last):
            try:
                page.reservation = await within(self.budget.reserve(page.last, stopping),
                                                max(0.0, self.cap.max_batch_age_s - (Wall.now() - buf.first_at)))
            except TimeoutError:
                await self._seal(buf, mid_page_ok=False, everything=True, unit=unit)
            else:
                return page.reservation is not None
        page.reservation = await self.budget.reserve(page.last, stopping)
        return page.reservation is not None

    async def _fetching(self, page: _Page, stream: Any, fetch: Any) -> Any:
        """Run `fetch` (open the stream, or a `try_next` that asks for a page) and count what the driver then holds."""
        reservation, page.reservation = page.reservation, None
        if reservation is None:
            return await fetch()  # the page being read: nothing new
        try:
            result = await fetch()
        except BaseException:
            self.budget.cancel(reservation)
            raise
        held = page_bytes(stream if stream is not None else result) or 0
        if stream is not None and result is not None:
            held += len(result.raw)
        self._drop_page(page)
        page.left = page.last = held
        self.budget.fetched(reservation, held)
        return result

    def _drop_page(self, page: _Page) -> None:
        """The stream is closed (or a new page replaces this one): what the driver held of it is gone."""
        if page.reservation is not None:
            self.budget.cancel(page.reservation)
            page.reservation = None
        self.budget.release(page.left)
        page.left = 0

    async def _after_unit_error(self, unit: Unit, exc: OperationFailure) -> bool:
        """A partition stream failed: a split (its range is no longer a partition) hands the split to the
        committer; a position the source refuses fails this partition only. True when the watcher is done."""
        try:
            current = [r for t in await self._retrying(lambda: change_stream_tokens(self.source, self.ns))
                       for r in positions(t)]
            replaced = covered_by(unit.range, current)
        except (Fenced, _Stopped):
            return True
        except UnitsError as why:
            await self._queue.put(_UnitFailed(unit.range, str(why)))
            return True
        except (OperationFailure, ValueError, TokenFormatError) as why:
            replaced = None  # the partition map cannot be read now: judge the stream's error alone
            self.log.warning("partition map unavailable after a stream error", error=redact(str(why)))
        if replaced is not None:
            self.log.info("partition split; its children continue from its last committed position",
                          partition=unit.name, children=[range_name(r) for r in replaced])
            await self._queue.put(_Split(unit.range, replaced))
            return True
        if is_fatal(exc):
            await self._queue.put(_UnitFailed(unit.range, fatal_reason(exc)))
            return True
        self._source_error(f"change stream error on partition {unit.name}: {exc}")
        self.log.warning("change stream error; reopening", partition=unit.name, error=redact(str(exc)), code=exc.code)
        return False

    def _full(self, buf: _Buffer) -> bool:
        return len(buf.events) >= self.cap.max_batch_events or buf.nbytes >= self.cap.max_batch_bytes

    def _idle_at_boundary(self, buf: _Buffer) -> bool:
        """Cut now? The stream is at a page boundary (the page read is used up; Cosmos sends what it has, so a
        page that ends is the head of the feed for now) and the committer has nothing queued or in flight.

        Under load the committer is busy, so batches keep growing until it is free again (or full, or
        `max_batch_age_s` old): batch size adapts to the commit round trip, and an idle stream's last
        events reach the store at once instead of waiting for the batch window.
        """
        return bool(buf.events) and bool(buf.boundaries) and buf.boundaries[-1][0] == len(buf.events) \
            and self.status.unflushed_bytes == 0 and self._queue.empty()

    async def _idle_cut(self, buf: _Buffer, unit: Range | None) -> None:
        """Seal the complete pages once the buffer is `capture.min_batch_age_s` old (a trickle then puts at most
        one batch per that interval in the store; events arriving meanwhile wait at the source for the next)."""
        wait = self.cap.min_batch_age_s - (Wall.now() - buf.first_at)
        if wait > 0:
            await self._sleep(wait)
        self.status.idle_cuts += 1
        await self._seal(buf, mid_page_ok=False, everything=True, unit=unit)

    def _source_error(self, message: str) -> None:
        if not self._dead:
            self.status.last_error = redact(message)
            self._error_from = "source"

    def _store_error(self, message: str) -> None:
        if not self._dead:
            self.status.last_error = redact(message)
            self._error_from = "store"

    async def _seal(self, buf: _Buffer, mid_page_ok: bool, everything: bool = False,
                    unit: Range | None = None) -> None:
        while buf.events and not self._dead:
            taken = buf.cut(self.cap.max_batch_events, self.cap.max_batch_bytes, mid_page_ok)
            if taken is None:
                return
            events, nbytes, token = taken
            # The seq and the hand-over happen with no await between them: the queue's order is the seq order,
            # whichever watcher seals next.
            sealed = SealedBatch(events, nbytes, token, buf.first_at, buf.last_at, unit, self._next_seq, held=nbytes)
            self._next_seq += 1
            self._mark(unit, token, sealed.seq)
            self.status.unflushed_bytes += nbytes
            self._queue.put_nowait(sealed)
            if buf.events:
                buf.first_at = Wall.now()
            if not everything:
                return

    async def _sleep(self, seconds: float) -> None:
        try:
            await within(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _idle_sleep(self, seconds: float) -> None:
        """Sleep until `seconds` pass or the pause is ended (a stop ends it too)."""
        if not self._stopping.is_set():
            await self._wake.wait(seconds)

    async def _retrying(self, fn: Any) -> Any:
        backoff = Backoff()
        while True:
            try:
                return await fn()
            except (ConnectionFailure, StoreError) as exc:
                self.log.warning("retrying", error=redact(str(exc)))
            except OperationFailure as exc:
                if exc.code not in TRANSIENT_SOURCE_CODES:
                    raise
            except LedgerError as exc:
                if isinstance(exc, Fenced):
                    await self._fence(exc)
                    raise
                if "does not exist" in str(exc):
                    raise
                self.log.warning("ledger unavailable; retrying", error=redact(str(exc)))
            if self._stopping.is_set():
                raise _Stopped()
            await self._sleep(backoff.next_delay())

    # --- committer --------------------------------------------------------------------

    async def _committer(self) -> None:
        """Seqs in arrival order, commits in seq order; the partition units change only here."""
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if not isinstance(item, SealedBatch):
                if not self._dead:
                    await self._control(item)
                continue
            sealed = item
            if self._dead:
                self.status.unflushed_bytes -= sealed.nbytes
                self._release(sealed)
                continue
            try:
                await self._commit(sealed)
            except Fenced as exc:
                await self._fence(exc)
            except SeqConflict as exc:
                await self._fail(f"ledger sequence conflict: {exc}")
                self._dead = True  # every later seq would conflict too: write nothing more (one error, not one per batch)
            except UnitsError as exc:
                await self._fail(str(exc))
            finally:
                self.status.unflushed_bytes -= sealed.nbytes
                self._release(sealed)

    async def _control(self, item: _Split | _UnitFailed) -> None:
        """Splits and failed partitions, in their place among the batches (every earlier batch committed)."""
        assert self._units is not None
        by_range = {u.range: u for u in self._units}
        unit = by_range.get(item.unit)
        if unit is None or unit.state != TAILING:
            return
        if isinstance(item, _UnitFailed):
            unit.state, unit.error = FAILED, redact(item.reason)
            self._read.pop(unit.range, None)
            self.status.last_error = f"partition {unit.name} failed: {unit.error}"
            self.status.last_error_at = Wall.now()
            self.log.error("partition capture failed; the other partitions go on; operator action needed",
                           partition=unit.name, error=unit.error)
            self._publish_units()
            if all(u.state != TAILING for u in self._units):
                await self._fail(f"every partition failed; last: partition {unit.name}: {unit.error}")
            return
        # A split: every batch of the parent is committed (the committer is sequential), so the parent's
        # unit token is its last committed position and the children start there: nothing skipped, and
        # nothing the parent committed is read again.
        try:
            kids = children(unit, item.ranges)
        except UnitsError as exc:
            await self._control(_UnitFailed(unit.range, str(exc)))
            return
        unit.state = SPLIT
        self._read.pop(unit.range, None)
        self._units.extend(kids)
        for kid in kids:
            self._read[kid.range] = kid.token
        self._publish_units()
        if not self._stopping.is_set() and self._tg is not None:
            for kid in kids:
                self._spawn(kid)
        # Recorded in the ledger with the next batch; a restart before it meets the split again and
        # derives the same children from the same committed position.

    def _mark(self, unit: Range | None, token: bytes, seq: int) -> None:
        """Freshness: every event the stream of `unit` (None: the whole collection) read up to `token` is in
        batches <= seq."""
        if unit is None:
            self.freshness.mark(token, seq)
        elif unit in self._read:
            self._read[unit] = token
            self._mark_units(seq)

    def _mark_units(self, seq: int) -> None:
        """Freshness: every event up to each partition's latest handed-over position is in batches <= seq."""
        pos: dict[Range, int] = {}
        for token in self._read.values():
            try:
                pos.update(positions(token))
            except TokenFormatError:
                return  # never claims more than it can read
        if self._units is not None:
            tailing = {u.range for u in self._units if u.state == TAILING}
            failed = [u for u in self._units if u.state == FAILED]
            if any(r not in self._read for r in tailing):
                return
            for u in failed:  # a failed partition keeps its last position: its head is never reached
                pos.update(unit_positions([u]))
        self.freshness.mark_positions(pos, seq)

    def _publish_units(self) -> None:
        if self._units is not None:
            self.status.partitions = [u.describe() for u in self._units]

    async def _commit(self, sealed: SealedBatch) -> None:
        position = sealed.token
        if sealed.unit is not None:
            # The batch and the position of every partition, in one fenced ledger write (the batch's header
            # carries the same: the namespace's position after this batch).
            assert self._units is not None
            committed = [Unit(u.lo, u.hi, sealed.token if u.range == sealed.unit else u.token, u.state, u.error,
                              u.parent) for u in self._units]
            position = encode_units(committed)
        header = BatchHeader(
            cluster=self.cfg.cluster_name, ns=self.ns, seq=sealed.seq, count=len(sealed.events),
            first_captured_at=dt.datetime.fromtimestamp(sealed.first_at.s, dt.UTC),
            last_captured_at=dt.datetime.fromtimestamp(sealed.last_at.s, dt.UTC),
            resume_token=RawBSONDocument(position), raw_bytes=sealed.nbytes,
        )
        if sealed.nbytes > 256 * 1024:
            data, checksum = await asyncio.to_thread(self.codec.encode, header, sealed.events)
        else:
            data, checksum = self.codec.encode(header, sealed.events)
        key = batch_key(self.prefix, self.cfg.cluster_name, self.ns, sealed.seq, self.epoch)
        backoff = Backoff()
        while True:
            try:
                await self.store.put(key, data)
                break
            except StoreError as exc:
                self._store_error(str(exc))
                self.log.warning("batch store put failed; retrying", seq=sealed.seq, error=redact(str(exc)))
                await asyncio.sleep(backoff.next_delay())
        self._release(sealed)  # in the store: the events need not be held any more
        self.crash.hit("after_put")
        record = BatchRecord(
            ns=self.ns, seq=sealed.seq, key=key, events=len(sealed.events), bytes=len(data), raw_bytes=sealed.nbytes,
            checksum=checksum, first_captured_at=sealed.first_at.s, captured_at=Wall.now().s,
        )
        backoff.reset()
        while True:
            try:
                await self.ledger.commit_batch(self.ns, self.epoch, record, position)
                break
            except (Fenced, SeqConflict):
                raise
            except LedgerError as exc:
                self._store_error(str(exc))
                self.log.warning("ledger commit failed; retrying", seq=sealed.seq, error=redact(str(exc)))
                await asyncio.sleep(backoff.next_delay())
            except Exception as exc:  # botocore ClientError and friends: transient until proven otherwise
                self._store_error(str(exc))
                self.log.warning("ledger commit failed; retrying", seq=sealed.seq, error=redact(str(exc)))
                await asyncio.sleep(backoff.next_delay())
        if sealed.unit is not None:
            assert self._units is not None
            for u in self._units:
                if u.range == sealed.unit:
                    u.token = sealed.token
        self.crash.hit("after_commit")
        if self.on_commit is not None:
            self.on_commit()
        self.status.committed_seq = sealed.seq
        self.status.committed_events += len(sealed.events)
        self.status.committed_bytes += sealed.nbytes
        self.status.stored_bytes += len(data)
        if self._error_from == "store":
            self._error_from = self.status.last_error = ""
        self.log.debug("batch committed", seq=sealed.seq, events=len(sealed.events), bytes=len(data))

    def _release(self, sealed: SealedBatch) -> None:
        self.budget.release(sealed.held)
        sealed.held = 0

    # --- terminal states ----------------------------------------------------------------

    async def _fence(self, exc: Exception) -> None:
        if self._dead:
            return
        self._dead = True
        self.status.state = "fenced"
        self.status.last_error = str(exc)
        self.log.error("namespace taken over by another process; this watcher stops and writes nothing more",
                       error=str(exc))
        self._stop_reading()

    async def _fail(self, reason: str) -> None:
        if self._dead:
            return
        self.status.state = "failed"
        self.status.last_error = redact(reason)
        self.log.error("namespace capture failed; operator action needed", error=self.status.last_error)
        try:
            await self.ledger.set_state(self.ns, self.epoch, "failed", self.status.last_error)
        except Fenced as exc:
            await self._fence(exc)
        except LedgerError as exc:
            self.log.warning("could not record the failure in the ledger", error=redact(str(exc)))
        self._stop_reading()


class _Stopped(Exception):
    """Raised out of a retry loop when a stop was requested."""
