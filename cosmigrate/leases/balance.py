"""Which leases to take or steal, decided from what this worker observed (a pure function, unit-tested).

Expiry is judged the KCL way: an item is expired when its counter has not
changed for `lease_s` since THIS worker first saw its current value, on this
worker's monotonic clock. A worker that has just started has seen nothing
change yet, so it waits a full `lease_s` before it calls anything expired.
Stored wall clocks of other hosts are never compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cosmigrate.clock import Mono
from cosmigrate.leases.records import LeaseRecord


@dataclass
class Observed:
    """One item's counter as this worker last saw it, and since when (its own clock)."""

    version: int
    since: Mono


@dataclass
class Observations:
    """The counters of a kind of item (leases, workers), each with when it was first seen at that value."""

    seen: dict[str, Observed] = field(default_factory=dict)

    def see(self, key: str, version: int, now: Mono) -> Observed:
        old = self.seen.get(key)
        if old is None or old.version != version:
            old = self.seen[key] = Observed(version, now)
        return old

    def unchanged_for(self, key: str, now: Mono) -> float:
        """Seconds since the counter of `key` last changed, as this worker saw it (0 if never seen)."""
        obs = self.seen.get(key)
        return 0.0 if obs is None else now - obs.since

    def forget(self, keep: set[str]) -> None:
        for key in [k for k in self.seen if k not in keep]:
            del self.seen[key]


@dataclass
class Plan:
    take: list[LeaseRecord] = field(default_factory=list)
    """Free or expired leases, expired first."""
    steal: LeaseRecord | None = None
    """At most one lease of the busiest worker, when it holds at least two more than this one."""
    share: int = 0


def plan(leases: list[LeaseRecord], seen: Observations, live: set[str], me: str, lease_s: float, now: Mono,
         wanted: set[str] | None = None, dead: set[str] = frozenset(),  # type: ignore[assignment]
         orphans: set[str] = frozenset()) -> Plan:  # type: ignore[assignment]
    """This round's takes toward an even share `ceil(units / live workers)`.

    Free and expired leases are taken first, up to the share; a lease free for a whole
    `lease_s` that nobody took (the live count was too high: a dead worker not yet
    judged dead) is taken past the share, so no unit stays ownerless. Only when
    nothing is free, one lease is stolen from the busiest worker if it holds at least
    two more than this one: the spread settles with no worker two above another, and
    then nothing moves. `dead`: owners known to be dead without waiting (this worker holds the flock of
    their worker name on this host), whose leases count as expired at once. `orphans`: units whose lease item
    still names this worker but that it no longer runs (it dropped them when a renew went unanswered for a
    whole lease, the ledger only slow): taken again first, like expired ones. Without this, a single worker
    counted them as its own and never ran them again.
    """
    units = [rec for rec in leases if wanted is None or rec.unit in wanted]
    workers = live | {me}
    share = math.ceil(len(units) / len(workers)) if units else 0

    def expired(rec: LeaseRecord) -> bool:
        if rec.unit in orphans:  # the caller's: named this worker, not free, not run here
            return True
        return not rec.free and rec.owner != me and (rec.owner in dead or seen.unchanged_for(rec.unit, now) >= lease_s)

    mine = sum(1 for rec in units if rec.owner == me and not rec.free and rec.unit not in orphans)
    expired_ones = sorted((rec for rec in units if expired(rec)), key=lambda r: r.unit)
    free = sorted((rec for rec in units if rec.free), key=lambda r: r.unit)
    need = max(0, share - mine)
    take = (expired_ones + free)[:need]
    taken = {rec.unit for rec in take}
    take += [rec for rec in expired_ones + free
             if rec.unit not in taken and seen.unchanged_for(rec.unit, now) >= lease_s]
    out = Plan(take=take, share=share)
    if need and not take:
        counts: dict[str, list[LeaseRecord]] = {}
        for rec in units:
            if not rec.free and rec.owner != me and not expired(rec):
                counts.setdefault(rec.owner, []).append(rec)
        if counts:
            busiest = max(counts, key=lambda owner: (len(counts[owner]), owner))
            if len(counts[busiest]) - mine >= 2:
                out.steal = max(counts[busiest], key=lambda r: r.unit)
    return out
