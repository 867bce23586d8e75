"""The full load's phase per namespace: `backfill` until the head sampled at its start is applied, then `tailing`.

A namespace captured from the beginning of its feed replays the latest
version of every live document, then continues as ordinary change capture:
there is no separate copy and no hand-off. What is needed is to know when the
replay is over, and "no events for N seconds" proves nothing (a throttled
Cosmos stream answers empty pages). So when the namespace's unit is first
created, before its watcher records a start position, the source head is
sampled (`GetChangeStreamTokens` "now": one LSN per partition range) and
stored in the ledger with the phase. The backfill is complete when the
*applied* position reaches that head in every range (`tokens.reached`, per
range): the batch that crossed it (`Freshness.add_barrier`) is applied. The
phase then becomes `tailing`, stored too, so a restart or a SIGKILL never
goes back to backfill, and the watcher resumes from the ledger's position,
never from zero.

A collection dropped at the source during its backfill can never reach the
head: it gets phase `dropped` (stored, with the reason), its capture stops
failed, and readiness names it. A namespace started at "now" (the operator
copies by other means) is `tailing` at once.

Progress: `docs_copied` (events applied since the backfill began: one per
live document, plus the changes made meanwhile), `docs_estimated` (the
source's `collStats` count, sampled at start and refreshed every
`ESTIMATE_REFRESH_S`), `percent`, `rate_docs_per_s` (over the last minute) and
`eta_s`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import bson
from pymongo.errors import OperationFailure, PyMongoError

from cosmigrate.clock import Mono, Wall
from cosmigrate.freshness import Freshness, HeadSample
from cosmigrate.ledger import Ledger
from cosmigrate.logs import get_logger
from cosmigrate.mongo import change_stream_tokens
from cosmigrate.redact import redact
from cosmigrate.tokens import Positions, TokenFormatError, positions

if TYPE_CHECKING:
    from cosmigrate.apply import NamespaceApplier
    from cosmigrate.capture import NamespaceCapture
    from cosmigrate.indexplan import IndexBuilder

KIND, KEY = "backfill", "state"
BACKFILL, TAILING, DROPPED = "backfill", "tailing", "dropped"
ESTIMATE_REFRESH_S = 60.0
RATE_WINDOW_S = 60.0
EXISTS_CHECK_S = 5.0
NAMESPACE_NOT_FOUND = 26


class BackfillError(Exception):
    """The head at the start of a backfill could not be sampled (the namespace cannot start yet)."""


def encode_head(head: Positions) -> list[list[Any]]:
    return [[lo, hi, int(lsn)] for (lo, hi), lsn in sorted(head.items())]


def decode_head(stored: Any) -> Positions:
    return {(str(lo), str(hi)): int(lsn) for lo, hi, lsn in stored or []}


async def sample_head(source: Any, ns: str) -> Positions:
    """The source head now: the LSN of every partition range (raises PyMongoError, BackfillError)."""
    head: Positions = {}
    try:
        for token in await change_stream_tokens(source, ns):
            head.update(positions(token))
    except (TokenFormatError, ValueError) as exc:
        raise BackfillError(f"the source head of {ns} cannot be read: {exc}") from None
    if not head:
        raise BackfillError(f"the source returned no head token for {ns}")
    return head


async def estimate_count(source: Any, ns: str) -> int | None:
    """The source's document count from `collStats` (cheap, approximate), else `count`; None if unknown."""
    db, _, coll = ns.partition(".")
    try:
        stats = await source[db].command({"collStats": coll})
        return int(stats.get("count", 0))
    except OperationFailure as exc:
        if exc.code == NAMESPACE_NOT_FOUND:
            raise
    except PyMongoError:
        return None
    try:
        return int(await source[db][coll].estimated_document_count())
    except PyMongoError:
        return None


def _secs(t: Wall | None) -> float:
    """A stored wall time: seconds since the epoch, 0 for none."""
    return t.s if t is not None else 0.0


def _wall(value: object) -> Wall | None:
    return Wall(float(value)) if isinstance(value, int | float) and value else None


@dataclass
class NamespaceBackfill:
    """One namespace's phase and progress; the stored item is the truth, this object its live view."""

    ns: str
    phase: str = TAILING
    head: Positions = field(default_factory=dict)
    started_at: Wall | None = None
    completed_at: Wall | None = None
    estimated: int | None = None
    estimated_at: Wall | None = None
    reason: str = ""
    barrier: HeadSample | None = None
    exists_checked: Mono | None = None
    rate: collections.deque[tuple[Mono, int]] = field(default_factory=lambda: collections.deque(maxlen=256))
    """(when, applied events) over the last RATE_WINDOW_S: the rate and ETA are monotonic-clock durations."""

    def data(self) -> bytes:
        """The stored item: wall times as seconds since the epoch."""
        return bson.encode({"phase": self.phase, "head": encode_head(self.head), "started_at": _secs(self.started_at),
                            "completed_at": _secs(self.completed_at), "estimated": self.estimated,
                            "estimated_at": _secs(self.estimated_at), "reason": self.reason})

    @classmethod
    def from_doc(cls, ns: str, doc: dict[str, Any]) -> NamespaceBackfill:
        est = doc.get("estimated")
        return cls(ns, phase=str(doc.get("phase", TAILING)), head=decode_head(doc.get("head")),
                   started_at=_wall(doc.get("started_at")), completed_at=_wall(doc.get("completed_at")),
                   estimated=int(est) if est is not None else None,
                   estimated_at=_wall(doc.get("estimated_at")),
                   reason=str(doc.get("reason", "")))

    # --- lifecycle --------------------------------------------------------------------------

    @classmethod
    async def prepare(cls, ns: str, ledger: Ledger, source: Any, epoch: int, *, from_beginning: bool,
                      has_position: bool, freshness: Freshness) -> NamespaceBackfill:
        """Load the namespace's phase, or create it: sample the head BEFORE the watcher records its start.

        Only a namespace without a stored position that starts from the beginning is in backfill; one
        with a stored position but no item (a ledger from before this feature, or "now") is tailing.
        The item is written fenced by the owner's epoch. Raises PyMongoError / LedgerError / BackfillError:
        the caller retries the namespace's start.
        """
        item = await ledger.get_progress(ns, KIND, KEY)
        if item is not None:
            state = cls.from_doc(ns, item.doc())
        elif from_beginning and not has_position:
            try:
                head = await sample_head(source, ns)
            except (PyMongoError, BackfillError) as exc:
                # No head now (no permission yet, the source unreachable): the backfill starts anyway and
                # the monitor samples one later. A later head is still a sound barrier: reaching it implies
                # reaching every earlier one, so the phase can only end later, never too early.
                head = {}
                get_logger(namespace=ns).warning("backfill begins without a head; sampled again until one is had",
                                                 error=redact(str(exc))[:200])
            try:
                estimated = await estimate_count(source, ns)
            except PyMongoError:
                estimated = None
            now = Wall.now()
            state = cls(ns, BACKFILL, head, started_at=now, estimated=estimated, estimated_at=now)
            await ledger.put_progress(ns, KIND, KEY, state.data(), epoch=epoch)
            get_logger(namespace=ns).info("backfill begins: the head at its start is stored",
                                          head=str(encode_head(head)), estimated=estimated)
        else:
            state = cls(ns, TAILING, started_at=Wall.now())
            await ledger.put_progress(ns, KIND, KEY, state.data(), epoch=epoch)
        if state.phase == BACKFILL and state.head:
            state.barrier = freshness.add_barrier(state.head)
        return state

    async def sample_late_head(self, source: Any, ledger: Ledger, epoch: int, freshness: Freshness) -> None:
        """A backfill that began without a head gets one now (stored, then used as the barrier)."""
        head = await sample_head(source, self.ns)
        self.head = head
        await ledger.put_progress(self.ns, KIND, KEY, self.data(), epoch=epoch)
        self.barrier = freshness.add_barrier(head)
        get_logger(namespace=self.ns).info("backfill head sampled", head=str(encode_head(head)))

    def reached(self, committed_seq: int, applied_seq: int) -> bool:
        """The head stored at the start is captured and applied (per range; never inferred from silence)."""
        if self.phase != BACKFILL or self.barrier is None or self.barrier.seq is None:
            return False
        return self.barrier.seq <= committed_seq and self.barrier.seq <= applied_seq

    async def finish(self, ledger: Ledger, epoch: int) -> None:
        self.phase, self.completed_at = TAILING, Wall.now()
        await ledger.put_progress(self.ns, KIND, KEY, self.data(), epoch=epoch)
        get_logger(namespace=self.ns).info("backfill complete: the head sampled at its start is applied; tailing",
                                           seconds=round(self.completed_at - self.started_at, 1) if self.started_at else None)

    async def dropped(self, ledger: Ledger, epoch: int) -> None:
        self.phase, self.completed_at = DROPPED, Wall.now()
        self.reason = ("the collection was dropped at the source during its backfill: the copy on the target is "
                       "incomplete; drop it on the target and exclude the namespace (capture.exclude), or recreate "
                       "it at the source and migrate it again under a new cluster name")
        await ledger.put_progress(self.ns, KIND, KEY, self.data(), epoch=epoch)
        get_logger(namespace=self.ns).error("collection dropped at the source during its backfill",
                                            reason=self.reason)

    async def refresh_estimate(self, source: Any, ledger: Ledger, epoch: int) -> bool:
        """Re-read the count every ESTIMATE_REFRESH_S; False when the collection no longer exists."""
        if self.estimated_at is not None and Wall.now() - self.estimated_at < ESTIMATE_REFRESH_S:  # the stored time: the next process goes on
            return True
        try:
            count = await estimate_count(source, self.ns)
        except OperationFailure:
            return False  # NamespaceNotFound
        self.estimated_at = Wall.now()
        if count is not None:
            self.estimated = count
            try:
                await ledger.put_progress(self.ns, KIND, KEY, self.data(), epoch=epoch)
            except Exception as exc:  # the estimate is advisory: never stop the monitor over it
                get_logger(namespace=self.ns).warning("backfill estimate not stored", error=redact(str(exc)))
        return True

    # --- status ---------------------------------------------------------------------------------

    def fields(self, applied_events: int, now: Mono | None = None) -> dict[str, Any]:
        """The status fields: phase, documents copied / estimated, percent, rate and ETA."""
        now = Mono.now() if now is None else now
        self.rate.append((now, applied_events))
        while self.rate and now - self.rate[0][0] > RATE_WINDOW_S:
            self.rate.popleft()
        rate = 0.0
        if len(self.rate) >= 2 and self.rate[-1][0] > self.rate[0][0]:
            rate = max(0.0, (self.rate[-1][1] - self.rate[0][1]) / (self.rate[-1][0] - self.rate[0][0]))
        copied = applied_events
        estimated = self.estimated
        if self.phase == BACKFILL:
            percent = min(99.9, 100.0 * copied / estimated) if estimated else 0.0
            left = max(0, (estimated or 0) - copied)
            eta = round(left / rate, 1) if rate > 0 and estimated is not None else None
        else:
            percent = 100.0 if self.phase == TAILING else (min(99.9, 100.0 * copied / estimated) if estimated else 0.0)
            eta = 0.0 if self.phase == TAILING else None
        return {"load_phase": self.phase, "docs_copied": copied, "docs_estimated": estimated,
                "percent": round(percent, 1), "rate_docs_per_s": round(rate, 1), "eta_s": eta,
                "backfill_reason": self.reason}


def totals(namespaces: list[dict[str, Any]]) -> dict[str, Any]:
    """The same progress summed over every namespace (the status's `backfill` object)."""
    loading = [n for n in namespaces if n.get("load_phase") == BACKFILL]
    copied = sum(int(n.get("docs_copied") or 0) for n in loading)
    estimated = sum(int(n.get("docs_estimated") or 0) for n in loading)
    rate = sum(float(n.get("rate_docs_per_s") or 0.0) for n in loading)
    left = max(0, estimated - copied)
    return {
        "namespaces_in_backfill": len(loading),
        "docs_copied": copied,
        "docs_estimated": estimated,
        "percent": round(min(99.9, 100.0 * copied / estimated), 1) if loading and estimated else (0.0 if loading else 100.0),
        "rate_docs_per_s": round(rate, 1),
        "eta_s": (round(left / rate, 1) if rate > 0 else None) if loading else 0.0,
    }


async def collection_exists(source: Any, ns: str) -> bool:
    db, _, coll = ns.partition(".")
    return coll in await source[db].list_collection_names(filter={"name": coll})


async def check_round(state: NamespaceBackfill, cap: NamespaceCapture, app: NamespaceApplier, fresh: Freshness,
                      builder: IndexBuilder, source: Any, ledger: Ledger) -> None:
    """One round of the full-load check of one unit: move it from backfill to tailing (or dropped), persist
    it, and release its deferred indexes. A failure only means "check again next round": it is logged here,
    and capture and apply never stop for it."""
    if state.phase != BACKFILL:
        return
    try:
        if not state.head:
            try:
                await state.sample_late_head(source, ledger, cap.epoch, fresh)
            except (PyMongoError, BackfillError):
                pass  # still none: the phase stays backfill (status says why freshness is unknown)
        if state.reached(cap.status.committed_seq, app.status.applied_seq):
            await state.finish(ledger, cap.epoch)
            builder.backfill_done.set()
            return
        gone = not await state.refresh_estimate(source, ledger, cap.epoch)
        if not gone and cap.status.state == "failed" and (
                state.exists_checked is None or state.exists_checked.elapsed() > EXISTS_CHECK_S):
            state.exists_checked = Mono.now()  # a listing costs request units: not every round
            gone = not await collection_exists(source, state.ns)
        if gone:
            await state.dropped(ledger, cap.epoch)
    except Exception as exc:  # the ledger or the source did not answer: try again next round
        get_logger(component="backfill").warning("backfill check failed; retrying", namespace=state.ns,
                                                 error=redact(str(exc))[:300])
