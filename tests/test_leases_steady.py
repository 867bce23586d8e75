"""Steady state of the balance: once the units are spread, no unit changes owner (issue: at most one owner
change per unit per 10 minutes).

A model of a cluster of live workers, each running the real `plan()` on its own observations and its own
clock, in a random order each round, with every holder renewing between rounds (the counter moves, so nothing
is ever judged expired). Takes and steals are applied as the conditional writes would: against the counter
the worker read. Hypothesis picks the sizes and where the units start (all free, one worker holding
everything, any mix). The spread must settle within a bounded number of rounds, with no worker two above
another, and then stay put for 40 balance rounds: 10 minutes at the default `balance_s` of 15 s.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from cosmigrate.clock import Mono
from cosmigrate.leases.balance import Observations, plan
from cosmigrate.leases.records import HELD, LeaseRecord

LEASE_S, BALANCE_S = 30.0, 15.0
TEN_MINUTES = int(600 / BALANCE_S)


def _round(leases: dict[str, LeaseRecord], workers: list[str], seen: dict[str, Observations], t0: Mono,
           r: int, rng: random.Random) -> list[str]:
    """One balance round: every holder renews, then each worker in turn reads, plans and writes. The units that
    changed owner."""
    for unit, rec in leases.items():
        if not rec.free:
            leases[unit] = replace(rec, version=rec.version + 1)  # the renew loop runs more often than balance
    moved = []
    for w in rng.sample(workers, len(workers)):
        now = t0 + r * BALANCE_S + rng.uniform(0.0, 1.0)  # each worker's own clock and its own moment
        read = list(leases.values())
        for rec in read:
            seen[w].see(rec.unit, rec.version, now)
        p = plan(read, seen[w], set(workers), w, LEASE_S, now)
        for rec in p.take + ([p.steal] if p.steal else []):
            if leases[rec.unit].version != rec.version:
                continue  # the condition fails: someone wrote since this worker read
            leases[rec.unit] = replace(rec, version=rec.version + 1, owner=w, state=HELD)
            moved.append(rec.unit)
    return moved


@settings(max_examples=60, deadline=None)
@given(n_workers=st.integers(1, 6), n_units=st.integers(1, 40), start=st.sampled_from(["free", "one", "mixed"]),
       seed=st.integers(0, 2**16))
def test_the_spread_settles_and_then_no_unit_changes_owner_for_ten_minutes(
        n_workers: int, n_units: int, start: str, seed: int) -> None:
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(n_workers)]
    units = [f"db.c{i:02d}" for i in range(n_units)]
    owner = {"free": lambda u: "", "one": lambda u: workers[0],
             "mixed": lambda u: rng.choice(workers + [""])}[start]
    leases = {u: LeaseRecord(u, 1, owner=owner(u)) for u in units}
    seen = {w: Observations() for w in workers}
    t0 = Mono.now()
    # Settling: free units go in the first round; each steal moves one unit toward the even share, and every
    # worker steals at most one per round, so the units a worker is above its share bound the rounds.
    settle = n_units + 2
    for r in range(settle):
        _round(leases, workers, seen, t0, r, rng)
    counts = Counter(rec.owner for rec in leases.values())
    assert all(not rec.free for rec in leases.values()), "a unit left ownerless"
    held = [counts.get(w, 0) for w in workers]
    assert max(held) - min(held) <= 1, held  # settled: no worker two above another
    changes: Counter[str] = Counter()
    for r in range(settle, settle + TEN_MINUTES):
        changes.update(_round(leases, workers, seen, t0, r, rng))
    assert not changes, f"owner changes after the spread settled ({held}): {dict(changes)}"
