"""Plan vs actual: the estimate a migration started with, next to what its full load took.

Two entry points, kept out of the daemon's own code:

- `plan_loop(worker)`, a background task of `cosmigrate run`: at the first
  start of a cluster (no plan in the ledger) it makes the same estimate as
  `cosmigrate plan` WITHOUT the probes (sizes, partitions and RU/s from the
  source; the RU per document and the target's rate are then unknown, so the
  time is a lower bound and says so) and stores it. A plan stored by
  `cosmigrate plan --record` before the first start is kept instead. When
  the last backfill of this run ends, it writes one journal line with the
  estimated and the elapsed full-load time and RU.
- `plan_status(worker)`, the status's `plan` object: estimated vs elapsed
  full-load time, and the estimated RU. Cosmos reports request charges only
  per request (`getLastRequestStatistics`), so the RU actually spent is not
  known to the daemon: status shows the plan's RU for the documents copied so
  far, named as such, and says where the real figure is (the account's
  metrics), never a measured-looking number it does not have.

The record is one cluster item of the ledger (`ns` "", kind `plan`), a few
hundred bytes whatever the size of the source.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import bson

from cosmigrate.backfill import BACKFILL
from cosmigrate.clock import Wall
from cosmigrate.config import Config
from cosmigrate.ledger import Ledger, ProgressConflict, open_ledger
from cosmigrate.logs import get_logger
from cosmigrate.redact import redact

if TYPE_CHECKING:
    from cosmigrate.plan.planner import Plan
    from cosmigrate.worker import Worker

KIND, KEY = "plan", "estimate"
RETRY_S = 30.0
CHECK_S = 1.0
RU_NOTE = ("the RU actually spent is not known to cosmigrate (Cosmos reports charges per request): see the account's "
           "Total Request Units metric (Azure Monitor); ru_at_plan_rate is the plan's RU per document x documents "
           "copied")


def summary(plan: Plan, made_by: str, at: Wall) -> dict[str, Any]:
    """What is kept of a plan: the estimate and, per collection, its documents, RU and time (small, bounded)."""
    est = plan.estimate
    out: dict[str, Any] = {"made_by": made_by, "made_at": at.s, "workers": plan.options.workers,
                           "probes": plan.options.probes, "collections": {}}
    if est is not None:
        out.update({"seconds": est.seconds, "limit": est.limit, "complete": est.complete, "unknown": est.unknown,
                    "ru_total": est.ru_total})
    for c in plan.collections:
        f = c.figures()
        out["collections"][c.ns] = {"documents": f.documents, "ru_per_doc": f.ru_per_doc,
                                    "seconds": est.per_collection_s.get(c.ns) if est else None}
    out["documents"] = sum((v["documents"] or 0) for v in out["collections"].values())
    return out


async def store(ledger: Ledger, record: dict[str, Any], *, replace: bool) -> bool:
    """Store the record; without `replace` only if none is stored yet. True when it was written."""
    current = await ledger.get_progress("", KIND, KEY)
    if current is not None and not replace:
        return False
    try:
        await ledger.put_progress("", KIND, KEY, bson.encode(record), epoch=None,
                                  expect_version=current.version if current is not None else 0)
    except ProgressConflict:
        return False  # another writer stored one meanwhile: theirs stands
    return True


async def record_plan(cfg: Config, plan: Plan) -> None:
    """`cosmigrate plan --record`: store this (probed) plan as the one the migration starts with."""
    ledger = open_ledger(cfg)
    try:
        await store(ledger, summary(plan, "cosmigrate plan", Wall.now()), replace=True)
    finally:
        await ledger.close()


async def _first_start_plan(worker: Worker) -> dict[str, Any]:
    """The stored plan, or the estimate without probes stored now (first start of the cluster)."""
    from cosmigrate.plan.planner import PlanOptions, build_plan

    assert worker.ledger is not None
    item = await worker.ledger.get_progress("", KIND, KEY)
    if item is not None:
        return item.doc()
    plan = await build_plan(worker.source, worker.target, worker.cfg, PlanOptions(probes=False, indexes=False))
    record = summary(plan, "daemon first start (no probes)", Wall.now())
    await store(worker.ledger, record, replace=False)
    item = await worker.ledger.get_progress("", KIND, KEY)
    return item.doc() if item is not None else record


async def plan_loop(worker: Worker) -> None:
    """Load (or make) the plan, then write one journal line when this run's last backfill ends."""
    log = get_logger(component="plan")
    while True:
        try:
            worker.plan_record = await _first_start_plan(worker)
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the source or the ledger did not answer: the plan is advisory, try again
            log.warning("the plan for status is not made yet; retrying", error=redact(str(exc))[:300])
            await asyncio.sleep(RETRY_S)
    loading: set[str] = set()
    while True:
        units = worker.units
        for unit in units.values():
            if unit.backfill.phase == BACKFILL:
                loading.add(unit.ns)
        if loading and all(units.get(ns) is None or units[ns].backfill.phase != BACKFILL for ns in loading):
            fields = plan_status(worker, {u.ns: u.applier.status.events_applied for u in units.values()})
            log.info("full load done: the plan vs the run", estimated_s=fields["estimated_full_load_s"],
                     estimate_is_lower_bound=not fields["estimate_complete"], limit=fields["limit"],
                     elapsed_s=fields["elapsed_full_load_s"], estimated_ru=fields["estimated_ru"],
                     ru_at_plan_rate=fields["ru_at_plan_rate"], plan_made_by=fields["made_by"])
            loading.clear()
        await asyncio.sleep(CHECK_S)


def plan_status(worker: Worker, applied: dict[str, int]) -> dict[str, Any]:
    """The status's `plan` object: the estimate next to the elapsed full load (None where unknown).

    `applied`: documents applied per namespace (the ledger's count), for the RU at the plan's rate."""
    record = worker.plan_record
    states = [unit.backfill for unit in worker.units.values()]
    started = [s.started_at for s in states
               if s.started_at is not None and (s.phase == BACKFILL or s.completed_at is not None)]
    loaded = [s for s in states if s.phase == BACKFILL or s.completed_at is not None]
    elapsed = None
    if started:
        done = all(s.phase != BACKFILL for s in loaded)
        end = max((s.completed_at for s in loaded if s.completed_at is not None), default=Wall.now()) \
            if done else Wall.now()
        elapsed = round(end - min(started), 1)
    copied = 0.0
    per_doc_known = True
    for ns, c in (record.get("collections") or {}).items():
        if c.get("ru_per_doc") is None:
            per_doc_known = False
        else:
            copied += c["ru_per_doc"] * applied.get(ns, 0)
    seconds = record.get("seconds")
    return {
        "made_by": record.get("made_by", ""),
        "made_at": Wall(record["made_at"]).iso() if record.get("made_at") else None,
        "estimated_full_load_s": None if seconds is None else round(seconds, 1),
        "estimate_complete": bool(record.get("complete")),
        "limit": record.get("limit", ""),
        "unknown": list(record.get("unknown") or []),
        "elapsed_full_load_s": elapsed,
        "estimated_ru": None if record.get("ru_total") is None else round(record["ru_total"]),
        "ru_at_plan_rate": round(copied) if record and per_doc_known else None,
        "ru_spent": None,
        "ru_note": RU_NOTE,
    }

