"""READY over the whole cluster: each holder publishes what only it knows; any worker judges the rest itself.

No RPC between workers. The holder of a unit writes, every few seconds and
fenced by the unit's epoch, a small `readiness` progress item: what blocks
the unit on its side (failed, fenced or starting; writes deferred by
unique-index conflicts; an index plan not ready; the full load; expiry (TTL)
without a decision; verification), whether its fence wait is over, and the
head positions that its delete sweep's last COMPLETED pass covers. Its wall
clock is in the item for people only.

The asking worker (`ctl status`, certify) never trusts the holder for
freshness: it samples the unit's source head itself at Mono T, then reads
the unit's ledger meta. T is *captured* once the committed position in the
meta reaches T's head in every range (`tokens.reached`), and *applied* once
the meta's applied_seq is at least the committed seq read at the first moment
the position was seen at or past the head: the batch that crossed the head
has an equal or lower seq, so that bound is conservative. Deletes are
reconciled when the published pass covers the asker's latest head (positions
compared, never clocks).

The holder must be live as the asker sees it on its own monotonic clock: its
lease renewed within lease_s (the lease keeper judges that), and its
readiness item rewritten within a few renew intervals, judged by the item's
version changing between two reads of this worker (the age counts from the
last read that still saw the old version: the write happened after it).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import bson

from cosmigrate import partitions
from cosmigrate.clock import Mono, Wall
from cosmigrate.ledger import Ledger, NamespaceMeta, Progress
from cosmigrate.tokens import Positions, TokenFormatError, positions, reached

KIND, KEY = "readiness", ""
STALE_RENEWS = 3
"""A readiness item not rewritten within this many renew intervals says nothing about its unit any more."""
MAX_SAMPLES = 256


def _encode_positions(pos: Positions | None) -> list[list[Any]] | None:
    return None if pos is None else [[lo, hi, lsn] for (lo, hi), lsn in sorted(pos.items())]


def _decode_positions(raw: Any) -> Positions | None:
    if raw is None:
        return None
    return {(str(lo), str(hi)): int(lsn) for lo, hi, lsn in raw}


@dataclass(frozen=True)
class Published:
    """One unit's readiness item, as its holder wrote it."""

    worker: str
    blocks: tuple[str, ...] = ()
    """What keeps the unit from READY on the holder's side ("" reasons, each naming the unit)."""
    fence_over: bool = False
    deletes_always: bool = False
    """Deletes need no sweep (the feed shows them): reconciled whatever the head."""
    deletes_head: Positions | None = None
    """The head the last completed (counting) sweep pass covers; None when no pass can be judged by a head."""
    deletes_why: str = ""
    """Why deletes are not reconciled, when no head decides it."""
    written_at: Wall = Wall(0.0)
    """The holder's wall clock: shown, never compared with this host's."""

    def data(self) -> bytes:
        return bson.encode({"worker": self.worker, "blocks": list(self.blocks), "fence_over": self.fence_over,
                            "deletes_always": self.deletes_always,
                            "deletes_head": _encode_positions(self.deletes_head), "deletes_why": self.deletes_why,
                            "written_at": self.written_at.s})

    @classmethod
    def parse(cls, item: Progress) -> Published:
        d: dict[str, Any] = item.doc()
        return cls(str(d.get("worker", "")), tuple(str(b) for b in d.get("blocks", ())), bool(d.get("fence_over")),
                   bool(d.get("deletes_always")), _decode_positions(d.get("deletes_head")),
                   str(d.get("deletes_why", "")), Wall(float(d.get("written_at", 0.0))))


async def publish(ledger: Ledger, ns: str, epoch: int, record: Published) -> None:
    """Write the holder's item for `ns`, fenced by its epoch (a lost owner's write raises Fenced)."""
    await ledger.put_progress(ns, KIND, KEY, record.data(), epoch=epoch)


def committed_positions(meta: NamespaceMeta) -> Positions | None:
    """The capture position the meta's last commit recorded (None when it cannot be read: never reached)."""
    raw = meta.resume_token
    if raw is None:
        return None
    try:
        if partitions.is_units(raw):
            return partitions.unit_positions(partitions.decode(raw))
        return positions(raw)
    except (TokenFormatError, partitions.UnitsError):
        return None


@dataclass
class Foreign:
    """What this worker proved about one unit another worker holds (all times on this worker's Mono clock)."""

    waiting: collections.deque[tuple[Mono, Positions]] = field(default_factory=collections.deque)
    """Heads sampled here that the committed position does not reach yet (oldest first)."""
    crossed: collections.deque[tuple[Mono, int]] = field(default_factory=collections.deque)
    """Captured heads: (sampled at, the committed seq when first seen reached), waiting to be applied."""
    caught_up_t: Mono | None = None
    latest_head: Positions | None = None
    last_sample_at: Mono | None = None
    last_sample_error: str = ""
    record: Published | None = None
    version: int = -1
    old_seen_at: Mono | None = None
    """The last read that still saw the version before the current one (the current one was written after)."""
    last_read_at: Mono | None = None

    def add_sample(self, at: Mono, head: Positions) -> None:
        if self.last_sample_at is not None and at < self.last_sample_at:
            return
        self.last_sample_at, self.latest_head, self.last_sample_error = at, head, ""
        self.waiting.append((at, head))
        while len(self.waiting) + len(self.crossed) > MAX_SAMPLES:
            (self.crossed or self.waiting).popleft()  # only ever makes lag larger

    def see_meta(self, meta: NamespaceMeta) -> None:
        pos = committed_positions(meta)
        committed = meta.next_seq - 1
        while pos is not None and self.waiting and reached(pos, self.waiting[0][1]):
            at, _ = self.waiting.popleft()
            self.crossed.append((at, committed))
        while self.crossed and meta.applied_seq >= self.crossed[0][1]:
            at, _ = self.crossed.popleft()
            if self.caught_up_t is None or at > self.caught_up_t:
                self.caught_up_t = at

    def see_record(self, item: Progress | None, now: Mono) -> None:
        version = item.version if item is not None else 0
        if version < self.version and item is not None:
            return  # an older answer of a read that overlapped a newer one: says nothing new
        if version != self.version:
            self.old_seen_at = self.last_read_at if self.version >= 0 else None
            self.version = version
            self.record = Published.parse(item) if item is not None else None
        self.last_read_at = now

    @property
    def caught_up(self) -> bool:
        return not self.waiting and not self.crossed and self.caught_up_t is not None

    def record_age(self, now: Mono) -> float | None:
        """How old the readiness item is at most; None until this worker saw it change once."""
        return None if self.old_seen_at is None or self.record is None else now - self.old_seen_at


@dataclass(frozen=True)
class Judgement:
    """One foreign unit's part of the status."""

    freshness: str
    lag: float
    blocks: tuple[str, ...]
    """Empty when the unit passes: current, reconciled, its holder live and past its fence wait."""


@dataclass
class ForeignUnits:
    """The asking worker's view of the units other workers hold."""

    units: dict[str, Foreign] = field(default_factory=dict)
    watched_since: dict[str, Mono] = field(default_factory=dict)

    def of(self, ns: str) -> Foreign:
        if ns not in self.units:
            self.units[ns] = Foreign()
            self.watched_since[ns] = Mono.now()
        return self.units[ns]

    def keep(self, names: set[str]) -> None:
        """Forget the units no longer held elsewhere (taken here, dropped): their proof starts again if they return."""
        for ns in [n for n in self.units if n not in names]:
            del self.units[ns]
            self.watched_since.pop(ns, None)

    async def read(self, ledger: Ledger, names: list[str]) -> None:
        """One read of each unit's meta and readiness item."""
        for ns in names:
            unit = self.of(ns)
            now = Mono.now()
            meta = await ledger.get_namespace(ns)
            if meta is not None:
                unit.see_meta(meta)
            unit.see_record(await ledger.get_progress(ns, KIND, KEY), now)

    def judge(self, ns: str, owner: str, threshold_s: float, renew_s: float, now: Mono,
              fresh_after: Mono | None = None, judged_at: Mono | None = None) -> Judgement:
        """Whether the unit `owner` holds passes. Its lease is live (the caller asks only about units whose
        lease this worker saw renewed within lease_s); the rest is judged here. Lag is 0 only when the latest
        sample is caught up and was taken at or after `fresh_after` (as for local units). `judged_at`: the
        moment "current" is judged at (`ctl status` passes when it was asked, see `build_status`)."""
        unit = self.of(ns)
        blocks: list[str] = []
        if unit.last_sample_error:
            freshness = f"source head unreachable: {unit.last_sample_error[:160]}"
        elif unit.last_sample_at is None:
            freshness = "not sampled yet"
        elif unit.caught_up_t is not None and (judged_at or now) - unit.caught_up_t < threshold_s:
            freshness = "current"
        else:
            freshness = "behind"
        base = unit.caught_up_t or self.watched_since[ns]
        recent = fresh_after is None or (unit.last_sample_at is not None and unit.last_sample_at >= fresh_after)
        lag = 0.0 if unit.caught_up and freshness == "current" and recent else max(0.0, now - base)
        if freshness != "current":
            blocks.append(f"{ns} on worker {owner}: {freshness}")
        rec, age = unit.record, unit.record_age(now)
        if rec is None:
            blocks.append(f"{ns} on worker {owner}: its holder has published no readiness yet")
        elif rec.worker != owner:
            blocks.append(f"{ns} on worker {owner}: its readiness was published by worker {rec.worker}, not its holder")
        elif age is None or age >= STALE_RENEWS * renew_s:
            blocks.append(f"{ns} on worker {owner}: its readiness was not seen rewritten within "
                          f"{STALE_RENEWS * renew_s:g}s (holder not live)")
        else:
            if not rec.fence_over:
                blocks.append(f"{ns} on worker {owner}: fence wait not over")
            blocks += [f"{b} (on worker {owner})" for b in rec.blocks]
            if not rec.deletes_always:
                if rec.deletes_why:
                    blocks.append(f"{ns} on worker {owner}: deletes not reconciled ({rec.deletes_why})")
                elif (rec.deletes_head is None or unit.latest_head is None
                      or not reached(rec.deletes_head, unit.latest_head)):
                    blocks.append(f"{ns} on worker {owner}: deletes not reconciled (the source changed since the "
                                  "last completed sweep pass)")
        return Judgement(freshness, round(lag, 3), tuple(blocks))
