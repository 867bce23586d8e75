"""Tier 3: the resumable sweep by `_id` range, for accounts whose change feed shows no deletes.

A pass walks the *target*'s `_id`s in pages (`deletes.page_size`, bracket by
bracket: `cosmigrate.idorder`); each page is a range `(after, upto]`. Per
range:

- **count mode**: count the source's documents in the range (t1: when the
  answer came, the budget may have retried the request), wait
  until apply has caught up past t1 (head samples say so), then count the
  target's. The target then holds every source document of t1 plus every
  document deleted at the source and not yet on the target, plus any newer
  insert: equal counts prove that nothing in the range waits to be deleted.
  Inserts and deletes that balance cannot hide each other this way, because
  the target is counted *after* catching up with the source's count.
- **merge mode**: where the counts differ (or apply cannot catch up in
  time), merge the range's sorted `_id` lists of both sides (one page each
  in memory); target-only `_id`s are candidates, re-checked at the source and
  deleted through the applier's ordered path (`cosmigrate.deletes.ordered`).

When most ranges differ anyway (a collection with deletes all over it),
counting first only adds reads: the sweep switches to merging directly and
probes counting again now and then, so a pass over N documents reads about
N `_id`s at the source, never 2N.

Source reads go through a `SourceBudget` (`deletes.max_source_share`, and
16500 waited out). Progress (the pass, its head, where it stands, counts)
goes into the ledger as ranges are done, at most once a second: a kill
loses at most the last second's ranges, swept again by the next run.

A completed pass *reconciles* deletes up to the head sampled when it
started: every document deleted at the source before then is gone from the
target. For that, a pass sweeps nothing before capture and apply have
reached that head: an upsert from before a delete, still on its way through
the pipeline, would otherwise bring the document back after its range was
swept. The wait compares monotonic moments only (`Mono`: the head sample's
and the latest caught-up sample's); the pass's wall times (`Wall`) are for
the ledger and status. A pass resumed from the ledger (another process
started it) waits for a head sampled after it resumed, which covers the
stored one: heads only move forward, and a monotonic moment means nothing
to another process.

The cutover's final sweep (`frozen`, the source quiet) never counts: equal
counts in a range do not prove equal `_id`s (a stale document and a missing
one cancel out), and the report stands on this pass. It merges every range,
deletes what the source lacks and keeps the `_id`s the target lacks
(`missing`) for verification.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import bson

from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Mono, Wall
from cosmigrate.deletes.ordered import OrderedDeletes
from cosmigrate.idorder import BRACKETS, IdDoc, Page, Position, id_doc, id_order, raw_docs, walk
from cosmigrate.ledger import Ledger
from cosmigrate.logs import get_logger
from cosmigrate.nslink import NamespaceLink
from cosmigrate.tokens import Positions

KIND = "deletes"
KEY = "sweep"
WINDOW = 32  # count-mode ranges waiting for apply to catch up, at most
SAVE_EVERY_S = 1.0  # progress goes to the ledger at most this often mid-pass (always at a pass's start and end)
MERGE_RUN = 16  # ranges merged directly once counting stopped paying off (doubled per failed probe)
MAX_MERGE_RUN = 1024
PROBE = 3  # consecutive counted ranges that differed before merging directly
WAIT_SAID_EVERY_S = 60.0  # how often a pass still waiting for apply says so in the log
MAX_MISSING = 10_000  # source-only `_id`s a final sweep keeps for verification (beyond it, only counted)
TIMES = ("started_at", "last_started_at", "last_finished_at")  # Wall in memory, seconds since the epoch in the ledger


def _head_doc(head: Positions | None) -> list[dict[str, Any]] | None:
    if head is None:
        return None
    return [{"min": lo, "max": hi, "lsn": lsn} for (lo, hi), lsn in sorted(head.items())]


def _head_from(doc: Any) -> Positions | None:
    if doc is None:
        return None
    return {(d["min"], d["max"]): int(d["lsn"]) for d in doc}


@dataclass
class SweepState:
    """The `sweep` ledger item of a namespace."""

    number: int = 0
    started_at: Wall = Wall(0.0)
    head: Positions | None = None
    position: Position = field(default_factory=Position)
    running: bool = False
    scanned: int = 0
    estimate: int = 0
    deleted: int = 0
    source_reads: int = 0
    counted_ranges: int = 0
    merged_ranges: int = 0
    deletes_applied: int = 0
    missing: int = 0
    """Source-only `_id`s a frozen (final) pass found: documents the target lacks although the source is quiet."""
    last_started_at: Wall = Wall(0.0)
    last_finished_at: Wall = Wall(0.0)
    last_head: Positions | None = None
    last_deleted: int = 0
    last_source_reads: int = 0
    last_scanned: int = 0

    @property
    def completed(self) -> bool:
        """A pass has completed (at some point; `last_*` describe it)."""
        return self.last_finished_at.s > 0

    def to_bson(self) -> bytes:
        doc = {k: v for k, v in self.__dict__.items() if k not in ("position", "head", "last_head", *TIMES)}
        doc.update(position=self.position.to_doc(), head=_head_doc(self.head), last_head=_head_doc(self.last_head))
        doc.update({k: getattr(self, k).s for k in TIMES})
        return bson.encode(doc)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> SweepState:
        """An item written by this or an older version (whose `head_at`, a monotonic moment, is ignored)."""
        skip = ("position", "head", "last_head", *TIMES)
        state = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__ and k not in skip})
        state.position = Position.from_doc(doc.get("position"))
        state.head, state.last_head = _head_from(doc.get("head")), _head_from(doc.get("last_head"))
        for k in TIMES:
            setattr(state, k, Wall(float(doc.get(k) or 0.0)))
        return state


class DeleteSweep:
    def __init__(self, link: NamespaceLink, source_coll: Any, target_coll: Any, ledger: Ledger | None,
                 deleter: OrderedDeletes, page_size: int, budget: SourceBudget, catch_up_s: float = 10.0) -> None:
        self.link = link
        self.ns = link.ns
        self.source = source_coll
        self.target = target_coll
        self.ledger = ledger
        self.deleter = deleter
        self.page_size = page_size
        self.budget = budget
        self.target_budget = SourceBudget()
        self.catch_up_s = catch_up_s
        self.state = SweepState()
        self.frozen = False
        """True while the source is known not to change (cutover): counts need no catch-up."""
        self._recent: collections.deque[bool] = collections.deque(maxlen=8)
        self._merge_left = 0
        self._merge_run = MERGE_RUN
        self._probing = False
        self._saved_at: Mono | None = None
        self._reach: Mono | None = None
        """The moment of the head the running pass claims, on this process's clock (None: the pass was loaded
        from the ledger, so it waits for a head sampled after it resumed)."""
        self.started_mono: Mono | None = None
        """When the running (or last) pass started, if this process started it: the schedule's interval."""
        self.last_started_mono: Mono | None = None
        """The same for the last completed pass (None: it started in another process)."""
        self.missing: list[IdDoc] = []
        """Source-only `_id`s of the latest frozen pass (at most MAX_MISSING): verification compares them."""
        self.loaded = False
        self.completed = asyncio.Condition()
        """Notified whenever a pass completes."""
        self.log = get_logger(namespace=link.ns, component="deletes")

    async def load(self) -> None:
        if self.ledger is not None:
            item = await self.ledger.get_progress(self.ns, KIND, KEY)
            if item is not None:
                self.state = SweepState.from_doc(item.doc())
        self.loaded = True

    async def _save(self) -> None:
        if self.ledger is not None:
            await self.ledger.put_progress(self.ns, KIND, KEY, self.state.to_bson(), epoch=self.link.epoch)

    async def start(self) -> None:
        """Begin a new pass from the target's first `_id`, reconciling up to the latest sampled head."""
        s = self.state
        s.number += 1
        s.started_at, s.position, s.running = Wall.now(), Position(), True
        s.head = self.link.latest_head()
        # The head and its moment are read together (no await between): the pass claims exactly that sample.
        at = self.link.latest_head_at()
        self._reach = at if s.head is not None and at is not None else Mono.now()
        self.started_mono = Mono.now()
        s.scanned = s.deleted = s.source_reads = s.counted_ranges = s.merged_ranges = s.missing = 0
        self.missing = []
        try:
            s.estimate = int(await self.target_budget.run(self.target.estimated_document_count))
        except Exception:  # an estimate only feeds the progress figure
            s.estimate = 0
        await self._save()

    async def run_pass(self, restart: bool = False) -> None:
        """Continue the pass in progress (or start one); returns once it completed."""
        if restart or not self.state.running:
            await self.start()
        s = self.state
        await self._reach_head()
        pending: collections.deque[tuple[Page, int, Mono, int]] = collections.deque()
        async for page in walk(self.target, s.position, self.page_size, {"_id": 1}, reader=self.target_budget.run):
            if self.frozen:  # the final sweep: `_id`s compared in every range, the empty ones included
                await self._merge(page)
                await self._advance(page)
                continue
            if not page.docs:  # nothing on the target in this range: nothing to delete, no source read needed
                if not pending:
                    await self._advance(page)
                else:
                    pending.append((page, -1, Mono(0.0), 0))
                continue
            if self._merge_left > 0:
                await self._drain(pending, everything=True)
                self._merge_left -= 1
                self._probing = self._merge_left == 0  # the next range is counted: a probe
                await self._merge(page)
                await self._advance(page)
            else:
                feed_deletes = self.link.deletes_applied()
                n_src = await self._count(self.source, page, self.budget)
                # Taken after the answer: a throttled count is retried, and a head sampled before the retry
                # would not cover a write the count saw (an insert that would then balance a stale document).
                counted_at = Mono.now()
                s.source_reads += n_src
                pending.append((page, n_src, counted_at, feed_deletes))
            await self._drain(pending, everything=len(pending) >= WINDOW)
        await self._drain(pending, everything=True)
        s.last_started_at, s.last_finished_at, s.last_head = s.started_at, Wall.now(), s.head
        self.last_started_mono, self._reach = self.started_mono, None
        s.last_deleted, s.last_source_reads, s.last_scanned = s.deleted, s.source_reads, s.scanned
        s.running = False
        await self._save()
        async with self.completed:
            self.completed.notify_all()
        self.log.info("delete sweep pass completed", number=s.number, scanned=s.scanned, deleted=s.deleted,
                      counted_ranges=s.counted_ranges, merged_ranges=s.merged_ranges, source_reads=s.source_reads,
                      **({"missing_on_target": s.missing} if self.frozen else {}))

    async def _reach_head(self) -> None:
        """Wait (as long as it takes) until capture and apply reached the head this pass claims.

        Every change up to that head is applied first: an older upsert still in the pipeline could otherwise
        bring back a document after its range was swept, and the pass would claim too much. A pass loaded from
        the ledger has no moment on this process's clock: it waits for a head sampled now, which covers its own.
        Before the applier is ready (or while the writer is stopped) nothing is caught up, so this keeps waiting.
        """
        if self._reach is None:
            self._reach = Mono.now()
            self.log.info("a resumed delete sweep pass waits for apply to reach a head sampled now",
                          number=self.state.number)
        waited, said = Mono.now(), None
        while not await self.link.wait_caught_up_to(self._reach, self.catch_up_s):
            if said is None or said.elapsed() >= WAIT_SAID_EVERY_S:  # a stopped writer can keep it here for hours
                said = Mono.now()
                self.log.info("delete sweep waits for apply to reach the head it started at",
                              waited_s=round(waited.elapsed(), 1))

    async def _count(self, coll: Any, page: Page, budget: SourceBudget) -> int:
        db = coll.database

        async def count() -> int:
            reply = await db.command({"count": coll.name, "query": page.filter()})
            return int(reply["n"])

        return await budget.run(count)

    async def _drain(self, pending: collections.deque[tuple[Page, int, Mono, int]], everything: bool) -> None:
        """Settle count-mode ranges in order, once apply has caught up past their source count."""
        while pending:
            page, n_src, counted_at, feed_deletes = pending[0]
            if n_src < 0:  # an empty target range queued behind counted ones, to keep the cursor in order
                pending.popleft()
                await self._advance(page)
                continue
            at = self.link.caught_up()
            ready = at is not None and at >= counted_at
            if not ready and not everything:
                return
            if not ready:
                ready = await self.link.wait_caught_up_to(counted_at, self.catch_up_s)
            pending.popleft()
            differs = True
            if ready:
                self.state.counted_ranges += 1
                n_tgt = await self._count(self.target, page, self.target_budget)
                # A delete the applier wrote since the source count (preview event, lookup miss) may have
                # removed one of the counted documents and balanced out a stale one: equal proves nothing then.
                differs = n_tgt != n_src or self.link.deletes_applied() != feed_deletes
            self._recent.append(differs)
            if differs:
                await self._merge(page)
            await self._advance(page)
            if differs and (self._probing or (len(self._recent) >= PROBE and all(list(self._recent)[-PROBE:]))):
                # Counting has not paid off lately: merge directly for a while, then probe one range by counting.
                # Each probe that differs again doubles the run, so probes cost ever less.
                self._merge_left = self._merge_run
                self._merge_run = min(self._merge_run * 2, MAX_MERGE_RUN)
                self._recent.clear()
            elif not differs:
                self._merge_run = MERGE_RUN  # a range that counted equal: counting pays off here again
            self._probing = False

    async def _source_ids(self, page: Page) -> AsyncIterator[list[IdDoc]]:
        """The source's `_id`s in the page's range, a page at a time, each request under the budget."""
        bracket = page.bracket
        after = page.start.after
        while True:
            flt = bracket.filter(after, page.upto)

            async def read(flt: dict[str, Any] = flt) -> list[bytes]:
                return await raw_docs(self.source.find_raw_batches(flt, {"_id": 1}, sort=[("_id", 1)],
                                                                   limit=self.page_size, batch_size=self.page_size))

            docs = await self.budget.run(read)
            self.state.source_reads += len(docs)
            ids = [id_doc(d) for d in docs]
            if ids:
                yield ids
            if len(docs) < self.page_size or not bracket.ranged:
                return
            after = ids[-1]

    async def _merge(self, page: Page) -> None:
        """Target-only `_id`s of the range (merged against the source's) go to the ordered delete path.

        Source-only `_id`s are inserts not applied yet while the source is written; in a frozen pass (source
        quiet, apply caught up) they are documents the target lacks, kept in `missing` for verification.
        """
        self.state.merged_ranges += 1
        targets = [id_doc(d) for d in page.docs]
        orders = [id_order(t) for t in targets]
        candidates: list[IdDoc] = []
        i = 0
        async for chunk in self._source_ids(page):
            for sid in chunk:
                so = id_order(sid)
                while i < len(targets) and orders[i] < so:
                    candidates.append(targets[i])
                    i += 1
                if i < len(targets) and (targets[i] == sid or orders[i] == so):
                    i += 1  # on both sides (MongoDB equality: 1, 1.0 and Int64(1) are one `_id`)
                elif self.frozen:
                    self.state.missing += 1
                    if len(self.missing) < MAX_MISSING:
                        self.missing.append(sid)
        candidates.extend(targets[i:])
        if candidates:
            self.state.source_reads += len(candidates)
            n = await self.deleter.delete_absent(candidates)
            self.state.deleted += n
            self.state.deletes_applied += n
            if n:
                self.log.info("deleted on the target: gone from the source", documents=n)

    async def _advance(self, page: Page) -> None:
        self.state.position = page.end
        self.state.scanned += len(page.docs)
        if self._saved_at is None or self._saved_at.elapsed() >= SAVE_EVERY_S:
            self._saved_at = Mono.now()
            await self._save()

    # --- status -----------------------------------------------------------------------------

    def progress(self) -> float | None:
        """Percent of the current pass (by the target's estimated count), 100 when idle, None before any pass."""
        s = self.state
        if not s.running:
            return 100.0 if s.completed else None
        if s.position.bracket >= len(BRACKETS):
            return 99.9
        return round(min(99.9, 100.0 * s.scanned / s.estimate), 1) if s.estimate else 0.0
