"""Freshness bookkeeping for a collection with many partitions stays cheap during a long backfill (issue 23 part 5).

A backfill's head runs ahead of capture for hours: no sample is reached, so
nothing is pruned. The work per sealed batch and per sample must not grow with
the number of samples or marks kept. Counted, not timed: every call of
`tokens.reached` and of its range scan (`tokens._contains`) is counted, and the
count is held to a budget linear in the inputs (the budget stops the run early
on code that is quadratic, so the test fails fast rather than slowly).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

import cosmigrate.freshness as freshness_mod
import cosmigrate.tokens as tokens_mod
from cosmigrate.clock import Mono, Wall
from cosmigrate.freshness import Freshness
from cosmigrate.tokens import Positions

PARTITIONS = 100
SAMPLES = int(os.environ.get("COSMIGRATE_FRESHNESS_SAMPLES", "2000"))
MARKS_PER_SAMPLE = 3


class OverBudget(Exception):
    pass


class Counter:
    def __init__(self, budget: int) -> None:
        self.n = 0
        self.budget = budget

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.n += 1
            if self.n > self.budget:
                raise OverBudget(f"over {self.budget} calls")
            return fn(*args)
        return counted


def _ranges() -> list[tuple[str, str]]:
    bounds = [""] + [f"{i * 0xFFFF // PARTITIONS:04X}" for i in range(1, PARTITIONS)] + ["FF"]
    return list(zip(bounds, bounds[1:], strict=False))


def _at(ranges: list[tuple[str, str]], lsn: int) -> Positions:
    return {r: lsn + i for i, r in enumerate(ranges)}


def _head_tokens(ranges: list[tuple[str, str]], lsn: int) -> list[bytes]:
    import json

    import bson
    from bson.binary import Binary
    conts = [{"FeedRange": {"type": "Effective Partition Key Range", "value": {"min": lo, "max": hi}},
              "State": {"type": "continuation", "value": json.dumps(str(lsn + i))}}
             for i, (lo, hi) in enumerate(ranges)]
    return [bson.encode({"_data": Binary(json.dumps({"V": 2, "Rid": "r", "Continuation": conts}).encode())})]


def _backfill(fresh: Freshness, ranges: list[tuple[str, str]], first: int, samples: int) -> int:
    """A backfill whose head runs ahead: every sample's head is far past what capture has read."""
    seq = first * MARKS_PER_SAMPLE
    for s in range(first, first + samples):
        fresh.add_sample(Mono(float(s)), _head_tokens(ranges, 10**6 + s * 10), wall=Wall(1e9 + s))
        for m in range(MARKS_PER_SAMPLE):
            fresh.mark_positions(_at(ranges, s * 3 + m), seq)
            seq += 1
        fresh.update(committed_seq=seq - 2, applied_seq=seq - 5)
    return seq


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[Counter, Counter]:
    events = SAMPLES * (1 + MARKS_PER_SAMPLE)
    calls = Counter(budget=4 * events)  # a few checks per sample and per mark, whatever is kept
    scans = Counter(budget=4 * events * PARTITIONS)  # each check at most linear in the partitions
    monkeypatch.setattr(freshness_mod, "reached", calls.wrap(tokens_mod.reached))
    monkeypatch.setattr(tokens_mod, "_contains", scans.wrap(tokens_mod._contains))
    return calls, scans


def test_an_unreached_backfill_head_costs_a_few_checks_per_batch_and_sample(counted: tuple[Counter, Counter]) -> None:
    calls, scans = counted
    ranges = _ranges()
    fresh = Freshness()
    seq = _backfill(fresh, ranges, 0, SAMPLES // 2)
    assert fresh.caught_up_t is None and fresh.lag(now=Mono(float(SAMPLES)), since=Mono(0.0)) == SAMPLES
    first_half = calls.n
    seq = _backfill(fresh, ranges, SAMPLES // 2, SAMPLES // 2)  # twice the samples and marks: ~2x work, not 4x
    assert calls.n <= 2.2 * first_half + 10, (first_half, calls.n)
    assert len(fresh._marks) <= 2, "a backfill's marks must stay bounded"

    # Correctness: capture finally passes every head in every partition, except one partition still behind.
    late = 10**6 + SAMPLES * 10 + PARTITIONS + 5
    behind = dict(_at(ranges, late))
    behind[ranges[37]] = 0
    fresh.mark_positions(behind, seq)
    fresh.update(committed_seq=seq, applied_seq=seq)
    assert fresh.caught_up_t is None, "a sample is reached only when EVERY partition is at or past its head"
    fresh.mark_positions(_at(ranges, late), seq + 1)
    fresh.update(committed_seq=seq + 1, applied_seq=seq)
    assert fresh.caught_up_t is None and fresh.captured_at == Wall(1e9 + SAMPLES - 1)  # committed, not applied
    fresh.update(committed_seq=seq + 1, applied_seq=seq + 1)
    assert fresh.caught_up_t == Mono(float(SAMPLES - 1)) and fresh.latest_is_caught_up
    assert fresh.lag(now=Mono(float(SAMPLES))) == 0.0


def test_marks_stay_bounded_when_every_sample_is_reached_late() -> None:
    """Capture just behind the head (each sample reached a few batches later): marks and samples stay few."""
    ranges = _ranges()
    fresh = Freshness()
    seq = 0
    for s in range(SAMPLES):
        fresh.add_sample(Mono(float(s)), _head_tokens(ranges, s * 10), wall=Wall(1e9 + s))
        for m in range(MARKS_PER_SAMPLE):
            fresh.mark_positions(_at(ranges, s * 10 - 20 + m * 5), seq)
            seq += 1
        fresh.update(committed_seq=seq - 1, applied_seq=seq - 1)
    assert len(fresh._marks) <= 4 * MARKS_PER_SAMPLE
    assert fresh._pending() <= 4
    assert fresh.caught_up_t is not None and fresh.caught_up_t >= Mono(float(SAMPLES - 4))
