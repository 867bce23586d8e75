"""Verification of one namespace: resumable passes over every document, and re-checks from the batch log.

A *pass* walks the source in `_id` order, page by page (`verify.page_size`),
and merge-compares each page with the target's documents between the same
bounds (`ranges.compare_range`). What differs is a *suspect* first: the
target may simply not have applied a recent change yet. Suspects are compared
again once apply has caught up past the moment the range was read; what
still differs is a mismatch.

Resumable: after each range its result goes into the ledger (item
`range#<n>`), then the pass's position (`pass`), so a kill loses at most the
page in hand. Mismatches are ledger items of their own (`m#<hash of _id>`),
added and removed as documents are compared again.

Re-checks: a document that changes after its range was verified is found in
the batch log (every batch after the applied seq the pass started at) and
compared again, by `_id`, once its batch is applied: continuous verification
stays current without re-reading everything, and no extra change stream is
ever opened. A batch that already expired from the store cannot be read; the
namespace then needs a new full pass (said in the log, and done by the
continuous mode and by cutover).

Memory: one source page, one target cursor batch, and at most
`MAX_KEPT_MISMATCHES` mismatch records (beyond that they are counted only).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import bson
from bson.raw_bson import RawBSONDocument

from cosmigrate.batchfile import BatchCodec, CorruptBatch
from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Mono, Wall
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.idorder import IdDoc, Page, Position, id_value, split_batch, walk
from cosmigrate.ledger import Ledger
from cosmigrate.logs import get_logger
from cosmigrate.mongo import RAW, event_parts, raw_collection
from cosmigrate.nslink import NamespaceLink
from cosmigrate.stores import BatchStore, ObjectMissing
from cosmigrate.verify.ranges import Mismatch, RangeResult, compare_range, recheck, target_range

KIND = "verify"
MAX_KEPT_MISMATCHES = 10_000
RECHECK_CHUNK = 500
BATCHES_PER_RECHECK = 16
TIMES = ("started_at", "finished_at", "last_started_at", "last_finished_at")
"""PassState's wall times (Wall | None in memory, seconds in the ledger)."""
POSITION_WAIT_S = 600.0  # how long a cutover's re-check waits for a starting applier (unique index builds)


async def _listed(docs: list[bytes]) -> AsyncIterator[bytes]:
    for doc in docs:
        yield doc


def mismatch_key(doc_id: IdDoc) -> str:
    return "m#" + hashlib.sha1(doc_id, usedforsecurity=False).hexdigest()


@dataclass
class PassState:
    """The `pass` item: where the current pass stands, and the last completed one."""

    number: int = 0
    started_at: Wall | None = None
    start_seq: int = -1
    position: Position = field(default_factory=Position)
    ranges: int = 0
    docs: int = 0
    equal: int = 0
    finished_at: Wall | None = None
    recheck_seq: int = -1
    needs_full_pass: bool = False
    overflow: int = 0
    """Mismatches beyond MAX_KEPT_MISMATCHES: counted, not recorded one by one."""
    last_number: int = 0
    last_started_at: Wall | None = None
    last_finished_at: Wall | None = None
    last_docs: int = 0
    last_equal: int = 0

    @property
    def running(self) -> bool:
        return self.number > 0 and self.finished_at is None

    def to_bson(self) -> bytes:
        """The stored item: wall times as seconds since the epoch (0: not yet)."""
        doc = {k: v for k, v in self.__dict__.items() if k != "position" and k not in TIMES}
        doc.update({k: t.s if (t := getattr(self, k)) is not None else 0.0 for k in TIMES})
        doc["position"] = self.position.to_doc()
        return bson.encode(doc)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> PassState:
        state = cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__ and k != "position"
                       and k not in TIMES})
        for k in TIMES:
            setattr(state, k, Wall(float(doc[k])) if doc.get(k) else None)
        state.position = Position.from_doc(doc.get("position"))
        return state


class NamespaceVerifier:
    """Verification state and work for one namespace, written to the ledger as its owner (epoch-fenced)."""

    def __init__(self, link: NamespaceLink, source: Any, target: Any, ledger: Ledger | None, store: BatchStore | None,
                 page_size: int, budget: SourceBudget | None = None, catch_up_s: float = 10.0,
                 crash: CrashPoints | None = None) -> None:
        self.link = link
        self.ns = link.ns
        self.source = raw_collection(source, link.ns)
        self.target = raw_collection(target, link.ns)
        self.ledger = ledger
        self.store = store
        self.page_size = page_size
        self.budget = budget or SourceBudget()
        self.target_budget = SourceBudget()
        self.catch_up_s = catch_up_s
        self.state = PassState()
        self.mismatches: dict[IdDoc, Mismatch] = {}
        self.frozen = False
        """True while the source is known not to change (cutover): suspects need no catch-up wait."""
        self.loaded = False
        self.codec = BatchCodec()
        self.crash = crash or CrashPoints()
        self.log = get_logger(namespace=link.ns, component="verify")

    @property
    def mismatch_count(self) -> int:
        return len(self.mismatches) + self.state.overflow

    # --- ledger ---------------------------------------------------------------------------

    async def load(self) -> None:
        if self.ledger is None:
            self.loaded = True
            return
        item = await self.ledger.get_progress(self.ns, KIND, "pass")
        if item is not None:
            self.state = PassState.from_doc(item.doc())
        self.mismatches = {}
        for p in await self.ledger.list_progress(self.ns, KIND, "m#", limit=MAX_KEPT_MISMATCHES):
            m = Mismatch.from_doc(p.doc())
            self.mismatches[m.id] = m
        self.loaded = True

    async def _save_state(self) -> None:
        if self.ledger is not None:
            await self.ledger.put_progress(self.ns, KIND, "pass", self.state.to_bson(), epoch=self.link.epoch)

    async def _record(self, found: list[Mismatch], cleared: list[IdDoc]) -> None:
        for m in found:
            if m.id not in self.mismatches and len(self.mismatches) >= MAX_KEPT_MISMATCHES:
                self.state.overflow += 1
                continue
            self.mismatches[m.id] = m
            if self.ledger is not None:
                data = bson.encode({**m.to_doc(), "found_at": Wall.now().s})
                await self.ledger.put_progress(self.ns, KIND, mismatch_key(m.id), data, epoch=self.link.epoch)
        for doc_id in cleared:
            if self.mismatches.pop(doc_id, None) is not None and self.ledger is not None:
                await self.ledger.delete_progress(self.ns, KIND, mismatch_key(doc_id), epoch=self.link.epoch)

    async def _clear_all(self) -> None:
        ids = list(self.mismatches)
        await self._record([], ids)
        self.state.overflow = 0

    # --- passes ---------------------------------------------------------------------------

    async def start_pass(self) -> None:
        """Begin a new pass from the first `_id` (mismatches found by earlier passes are forgotten)."""
        s = self.state
        if s.finished_at is not None:
            s.last_number, s.last_started_at, s.last_finished_at = s.number, s.started_at, s.finished_at
            s.last_docs, s.last_equal = s.docs, s.equal
        applied = await self._written()
        s.number += 1
        s.started_at, s.start_seq, s.position = Wall.now(), applied, Position()
        s.ranges = s.docs = s.equal = 0
        s.finished_at = None
        s.needs_full_pass = False
        s.recheck_seq = applied  # every change applied after this is re-checked from the batch log
        await self._clear_all()
        await self._save_state()
        self.log.info("verification pass started", number=s.number)

    async def run_pass(self, max_ranges: int | None = None) -> bool:
        """Continue (or start) the pass; True once it finished. `max_ranges` bounds the work of one call.

        Pipelined: while range k is compared (and stored), the target's documents of range k+1 and the
        source's page k+2 are already being read; each is a bounded list, so memory stays a few pages.
        """
        if not self.state.running:
            await self.start_pass()
        s = self.state
        done = 0
        pages = walk(self.source, s.position, self.page_size, reader=self.budget.run)
        held: tuple[Page, asyncio.Task[list[bytes] | None]] | None = None
        try:
            async for page in pages:
                ahead = (page, asyncio.ensure_future(self._target_docs(page)))
                if held is not None:
                    await self._range(*held)
                    done += 1
                    if max_ranges is not None and done >= max_ranges:
                        held = ahead
                        ahead[1].cancel()
                        return False
                held = ahead
            if held is not None:
                await self._range(*held)
                held = None
        finally:
            await pages.aclose()
            if held is not None and not held[1].done():
                held[1].cancel()
                await asyncio.gather(held[1], return_exceptions=True)
        s.finished_at = Wall.now()
        await self._save_state()
        self.log.info("verification pass finished", number=s.number, documents=s.docs, equal=s.equal,
                      mismatches=self.mismatch_count)
        return True

    async def _target_docs(self, page: Page) -> list[bytes] | None:
        """The target's documents of the range, or None when there are too many to hold (read them streaming)."""
        out: list[bytes] = []
        cursor = self.target.find_raw_batches(page.filter(), sort=[("_id", 1)], batch_size=self.page_size)
        try:
            async for batch in cursor:
                out.extend(split_batch(cast(bytes, batch)))  # raw batches are bytes (PyMongo types them as documents)
                if len(out) > 2 * self.page_size:
                    return None
        finally:
            await cursor.close()
        return out

    async def _range(self, page: Page, target_docs: asyncio.Task[list[bytes] | None]) -> None:
        """Compare one range, confirm its suspects, store its result and the pass's new position."""
        s = self.state
        docs = await target_docs
        read_at = Mono.now()
        target = _listed(docs) if docs is not None else target_range(self.target, page, self.page_size)
        result = await compare_range(page.docs, target)
        confirmed = await self._confirm(result, read_at)
        equal = result.source_docs - len([m for m in confirmed if m.kind != "extra"])
        if self.ledger is not None:
            await self.ledger.put_progress(self.ns, KIND, f"range#{s.ranges:09d}", bson.encode({
                "pass": s.number, "start": page.start.to_doc(), "end": page.end.to_doc(),
                "source_docs": result.source_docs, "target_docs": result.target_docs, "equal": equal,
                "mismatches": len(confirmed), "verified_at": Wall.now().s,
            }), epoch=self.link.epoch)
        await self._record(confirmed, [])
        s.position = page.end
        s.ranges += 1
        s.docs += result.source_docs
        s.equal += equal
        await self._save_state()
        self.crash.hit("verify_range")

    async def _confirm(self, result: RangeResult, read_at: Mono) -> list[Mismatch]:
        """Suspects compared again once apply has caught up past the read: what remains are mismatches."""
        if not result.mismatches:
            return []
        if not self.frozen:
            await self.link.wait_caught_up_to(read_at, self.catch_up_s)
        return await self._recheck_ids([m.id for m in result.mismatches])

    async def _recheck_ids(self, ids: list[IdDoc]) -> list[Mismatch]:
        out: list[Mismatch] = []
        for i in range(0, len(ids), RECHECK_CHUNK):
            chunk = ids[i:i + RECHECK_CHUNK]

            async def one(chunk: list[IdDoc] = chunk) -> list[Mismatch]:
                return await recheck(self.source, self.target, chunk, id_value)

            out.extend(await self.budget.run(one))
        return out

    async def recheck(self, ids: list[IdDoc]) -> int:
        """Compare these documents again and update the mismatch records; returns how many still differ."""
        still = await self._recheck_ids(ids)
        by_id = {m.id for m in still}
        await self._record(still, [i for i in ids if i not in by_id])
        return len(still)

    async def recheck_mismatches(self) -> int:
        """Compare every recorded mismatch again; returns the count that remains."""
        await self.recheck(list(self.mismatches))
        return self.mismatch_count

    async def recheck_log(self, upto_seq: int | None = None) -> int:
        """Re-check the documents of applied batches after `recheck_seq` (up to `upto_seq`); returns documents re-checked."""
        if self.ledger is None or self.store is None or self.state.number == 0:
            return 0
        upto = await self._written() if upto_seq is None else upto_seq
        checked = 0
        while self.state.recheck_seq < upto:
            records = await self.ledger.list_batches(self.ns, self.state.recheck_seq + 1,
                                                     min(BATCHES_PER_RECHECK, upto - self.state.recheck_seq))
            records = [r for r in records if r.seq <= upto]
            if not records:
                break
            ids: dict[IdDoc, None] = {}
            for r in records:
                try:
                    batch = self.codec.decode(await self.store.get(r.key), expect_checksum=r.checksum)
                except (ObjectMissing, CorruptBatch) as exc:
                    self.log.warning("a batch needed for re-checks cannot be read; the next full pass re-verifies",
                                     seq=r.seq, error=str(exc)[:200])
                    self.state.needs_full_pass = True
                    continue
                for raw in batch.events:
                    key, _ = event_parts(raw)
                    ids[bson.encode({"_id": RawBSONDocument(key, RAW)["_id"]}, codec_options=RAW)] = None
            if not self.frozen:
                await self.link.wait_caught_up_to(Mono.now(), self.catch_up_s)
            id_list = list(ids)
            for i in range(0, len(id_list), RECHECK_CHUNK):
                await self.recheck(id_list[i:i + RECHECK_CHUNK])
            checked += len(id_list)
            self.state.recheck_seq = records[-1].seq
            await self._save_state()
        return checked

    async def _written(self) -> int:
        """The applier's written_seq once it is known: after a restart the applier starts only when the target's
        unique indexes exist, and its -1 until then is "unknown", not "nothing applied" (a resumed cutover took
        it for the latter and re-checked nothing). A cutover (frozen) waits long; background work briefly and
        then retries later (ApplierNotReady)."""
        return await self.link.written_when_positioned(POSITION_WAIT_S if self.frozen else self.catch_up_s)

    # --- status ---------------------------------------------------------------------------

    def fields(self) -> dict[str, Any]:
        s = self.state
        return {"documents_verified": s.equal, "mismatches": self.mismatch_count,
                "last_verify_pass": s.finished_at or s.last_finished_at}
