"""The full-load estimate: pure arithmetic over what was read and measured (no I/O here).

Full-load time = documents / min(source RU budget / RU per document, the
target's measured write rate, workers x documents per second per core)
(docs/design.md, "The plan"). Each of the three is either known (read from
the account, measured by a probe, or given on the command line) or unknown;
an unknown one is never guessed: the time is then a lower bound made of the
known ones, and says so. The daemon runs the same estimate at its first start
without the probes (`cosmigrate.planrecord`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cosmigrate.backfill import ESTIMATE_REFRESH_S as PROGRESS_REFRESH_S

CPU_US_PER_DOC = 32.0
"""CPU microseconds the daemon spends per document of a full load (capture, batch, store, ledger, apply): the
daemon's user + system time over a 100,000-document backfill, `plan.cpu_us_per_doc` of bench/plan.py (31.2 and
32.6 us on the 2-core development machine, 2026-12-07). Override with `cosmigrate plan --cpu-us-per-doc`."""
SOURCE, TARGET, CPU = "source RU budget", "target write rate", "workers' CPU"
LIMITS = (SOURCE, TARGET, CPU)


@dataclass
class CollectionFigures:
    """What the estimate needs of one collection; None = unknown."""

    ns: str
    documents: int | None
    bytes: int | None
    ru_per_doc: float | None
    ru_per_s: float | None
    event_bytes_per_doc: float | None = None
    """Bytes of one change event (the document plus the feed's fields), from the probe."""


@dataclass
class BatchSettings:
    """The config values the AWS counts follow (capture.* of the config)."""

    max_batch_events: int
    max_batch_bytes: int
    max_batch_age_s: float


@dataclass
class Estimate:
    seconds: float | None
    """The full-load time; a lower bound when `complete` is False, None when nothing is known."""
    limit: str
    """Which of LIMITS sets `seconds` ("" when unknown)."""
    complete: bool
    unknown: list[str]
    """The limits that could not be known (their reason is in the plan's `lacks`)."""
    per_limit_s: dict[str, float | None]
    ru_total: float | None
    docs_per_s: dict[str, float | None]
    per_collection_s: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": _round(self.seconds), "limit": self.limit, "complete": self.complete,
                "unknown": self.unknown, "seconds_by_limit": {k: _round(v) for k, v in self.per_limit_s.items()},
                "docs_per_s_by_limit": {k: _round(v) for k, v in self.docs_per_s.items()},
                "ru_total": _round(self.ru_total), "seconds_by_collection": {
                    k: _round(v) for k, v in self.per_collection_s.items()}}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def ru_seconds(c: CollectionFigures) -> float | None:
    """Seconds the collection's RU budget needs for its documents (the partitions share it evenly)."""
    if c.documents is None or c.ru_per_doc is None or not c.ru_per_s:
        return None
    return c.documents * c.ru_per_doc / c.ru_per_s


def estimate(collections: list[CollectionFigures], target_docs_per_s: float | None, workers: int,
             cpu_us_per_doc: float) -> Estimate:
    """The slowest of the three limits. Collections load at once, each on its own RU budget; the target and the
    workers' CPU are shared by all of them."""
    known_docs = [c.documents for c in collections]
    total = sum(d for d in known_docs if d is not None) if None not in known_docs else None
    per_coll = {c.ns: ru_seconds(c) for c in collections}
    known_s = [v for v in per_coll.values() if v is not None]
    source_s = max(known_s, default=0.0) if len(known_s) == len(per_coll) else None
    cpu_rate = workers * 1e6 / cpu_us_per_doc if cpu_us_per_doc > 0 else None
    target_s = total / target_docs_per_s if total is not None and target_docs_per_s else None
    cpu_s = total / cpu_rate if total is not None and cpu_rate else None
    per_limit = {SOURCE: source_s, TARGET: target_s, CPU: cpu_s}
    known = {k: v for k, v in per_limit.items() if v is not None}
    limit = max(known, key=lambda k: known[k]) if known else ""
    ru_known = [c.documents * c.ru_per_doc for c in collections if c.documents is not None and c.ru_per_doc is not None]
    ru_total = sum(ru_known) if len(ru_known) == len(collections) else None
    source_rate = total / source_s if total is not None and source_s else None
    return Estimate(
        seconds=known[limit] if known else None, limit=limit, complete=len(known) == len(LIMITS),
        unknown=[k for k in LIMITS if k not in known], per_limit_s=per_limit, ru_total=ru_total,
        docs_per_s={SOURCE: source_rate, TARGET: target_docs_per_s, CPU: cpu_rate}, per_collection_s=per_coll)


def aws_counts(collections: list[CollectionFigures], est: Estimate, batches: BatchSettings) -> dict[str, Any]:
    """What the migration's own parts do in AWS during the full load, as counts (prices are the user's).

    A batch is cut at max_batch_events, max_batch_bytes or max_batch_age_s, whichever comes first, so the
    batches are at least the largest of the three counts (an idle cut makes more, never fewer). Each batch is
    one S3 PUT and, in DynamoDB, one commit transaction of two items (batch + namespace), one stamp when applied
    and at most one applied-position update. Leases: one claim per namespace at the first start. Progress: the
    backfill's item, written at its start and end and refreshed every PROGRESS_REFRESH_S (a transaction of
    two items with its fence).
    """
    out: dict[str, Any] = {"per_collection": {}}
    total_batches: int | None = 0
    total_bytes: int | None = 0
    for c in collections:
        if c.documents is None:
            out["per_collection"][c.ns] = None
            total_batches = total_bytes = None
            continue
        ev_bytes = int(c.documents * c.event_bytes_per_doc) if c.event_bytes_per_doc else c.bytes
        load_s = est.per_collection_s.get(c.ns) if est.limit == SOURCE else est.seconds
        by_age = math.ceil(load_s / batches.max_batch_age_s) if load_s and batches.max_batch_age_s > 0 else 0
        n = max(math.ceil(c.documents / batches.max_batch_events),
                math.ceil((ev_bytes or 0) / batches.max_batch_bytes), by_age) if c.documents else 0
        out["per_collection"][c.ns] = {"batches_at_least": n, "s3_puts_at_least": n, "stored_bytes_at_most": ev_bytes}
        if total_batches is not None:
            total_batches += n
        if total_bytes is not None and ev_bytes is not None:
            total_bytes += ev_bytes
        elif ev_bytes is None:
            total_bytes = None
    refreshes = math.ceil(est.seconds / PROGRESS_REFRESH_S) if est.seconds else 0
    ns_count = len(collections)
    out.update({
        "s3_puts_at_least": total_batches,
        "s3_stored_bytes_at_most": total_bytes,
        "dynamodb_batch_item_writes_at_least": None if total_batches is None else 3 * total_batches,
        "dynamodb_batch_item_writes_at_most": None if total_batches is None else 4 * total_batches,
        "dynamodb_lease_writes": ns_count,
        "dynamodb_progress_item_writes": ns_count * 2 * (2 + refreshes),
        "note": ("batches: one commit transaction of 2 items, 1 applied stamp, at most 1 position update each; "
                 "stored bytes are before compression; applied batches expire after the store's retention"),
    })
    return out


def recommend(est: Estimate, collections: list[CollectionFigures], workers: int, cpu_us_per_doc: float) -> list[str]:
    """What to change before the start: workers, RU/s during the load, or nothing the tool can do (the target)."""
    if not est.limit:
        return ["no recommendation: none of the three limits is known (see the lines above)"]
    rates = {k: v for k, v in est.docs_per_s.items() if v}
    out = []
    if est.limit == SOURCE:
        others = [v for k, v in est.per_limit_s.items() if k != SOURCE and v is not None]
        slowest = [c for c in collections if ru_seconds(c) == est.per_limit_s[SOURCE]]
        c = slowest[0] if slowest else None
        if others and c is not None and c.ru_per_doc and c.documents and c.ru_per_s:
            next_s = max(others)
            need = c.documents * c.ru_per_doc / next_s
            out.append(f"the source's RU/s is the limit: raising {c.ns} to about {math.ceil(need):,} RU/s during "
                       f"the load (from {c.ru_per_s:,.0f}) would make it take about {next_s:,.1f} s; lower it again "
                       "after the backfill (10,000 RU/s is the most one physical partition serves)")
        if not out:
            out.append("the source's RU/s is the limit: raise the collection's RU/s during the load")
    elif est.limit == CPU:
        best = min((v for k, v in rates.items() if k != CPU), default=None)
        per_core = 1e6 / cpu_us_per_doc
        if best:
            out.append(f"the workers' CPU is the limit: {math.ceil(best / per_core)} workers would reach the next limit "
                       f"({best:.0f} docs/s; {workers} given)")
        else:
            out.append("the workers' CPU is the limit: add workers")
    else:
        out.append("the target is the limit: more workers or RU/s will not help; a larger DocumentDB writer instance "
                   "(or fewer indexes during the load: cosmigrate builds only unique indexes before it) would")
    if not est.complete:
        out.append(f"unknown: {', '.join(est.unknown)}; the time above is a lower bound")
    return out
