"""The cluster as the ledger shows it to any worker: who holds each unit, which workers are alive.

`ctl status` on any worker lists every unit of the cluster; this module turns
the lease keeper's last read (`cosmigrate.leases.LeaseKeeper`) into the
per-namespace `worker`/`lease` fields, the `workers` list and the reasons
that keep readiness false while a unit is held elsewhere, ownerless or still
in its fence wait. Heartbeat ages are this worker's own observation (how long
since it saw the other's counter change), never a difference of two hosts'
clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cosmigrate.clock import Mono
from cosmigrate.leases import LeaseKeeper

HERE, ELSEWHERE, EXPIRED, FREE, FENCE_WAIT = "held here", "held elsewhere", "expired", "free", "fence wait"


@dataclass(frozen=True)
class UnitLease:
    """One unit's lease as this worker sees it."""

    lease: str
    worker: str
    heartbeat_age_s: float | None
    block: str = ""
    """Why the unit is not ready on account of its lease ("" when held here and writable)."""


def unit_lease(keeper: LeaseKeeper | None, ns: str, now: Mono) -> UnitLease:
    if keeper is None:
        return UnitLease(HERE, "", 0.0)
    held = keeper.holds(ns)
    if held is not None:
        blocked = held.write_block(now)
        return UnitLease(FENCE_WAIT if blocked else HERE, keeper.me.id, 0.0, blocked)
    rec = keeper.leases.get(ns)
    if rec is None or rec.free:
        return UnitLease(FREE, "", None, f"{ns}: no worker holds it yet (the next balance round takes it)")
    age = round(keeper.worker_seen.unchanged_for(rec.owner, now), 1) if rec.owner in keeper.workers else None
    if keeper.expired(ns, now):
        return UnitLease(EXPIRED, rec.owner, age,
                         f"{ns}: the lease of worker {rec.owner} expired and no worker took it over yet")
    return UnitLease(ELSEWHERE, rec.owner, age,
                     f"{ns}: held by worker {rec.owner}; its freshness is certified there (ctl status on that worker)")


def workers(keeper: LeaseKeeper | None, now: Mono) -> list[dict[str, Any]]:
    """The `workers` list: every worker with a heartbeat item, as this worker last read them."""
    if keeper is None:
        return []
    live = keeper.live(now)
    out = []
    for w in sorted(keeper.workers.values(), key=lambda w: w.id):
        me = w.id == keeper.me.id
        out.append({
            "worker": w.id, "host": w.host, "pid": w.pid, "name": w.name,
            "units": sorted(keeper.held) if me else list(w.units),
            "heartbeat_age_s": 0.0 if me else round(keeper.worker_seen.unchanged_for(w.id, now), 1),
            "last_heartbeat": w.heartbeat_at.iso() if w.heartbeat_at.s else None,
            "alive": w.id in live,
            "this_worker": me,
        })
    return out
