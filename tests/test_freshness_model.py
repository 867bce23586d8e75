"""Freshness against a brute-force reference over random histories (the review of issue 23 parts 1 and 5).

The queues of `cosmigrate.freshness` (waiting -> reached -> committed) must never claim more than the simple
rule they replace: a sample is *captured* when some recorded position that reaches its head in every range
was handed over with a seq <= committed_seq, and *applied* likewise with applied_seq. The reference keeps
every sample and every mark and checks that rule by brute force; it forgets only what a capture restart
makes untrue (marks of batches that were sealed and never committed: a retried capture numbers its new
batches from the ledger's next_seq again, so those seqs name other, shorter batches).

Histories are random on purpose where the code assumes order: heads and positions may move backwards
(a stored head, a restart), and heads may name a parent range while positions name its children (a split)
or the other way round. Only soundness is checked here: the reference may know more than Freshness (it
is allowed to be late), never less. `COSMIGRATE_FRESHNESS_MODEL_EXAMPLES` runs more examples (soak).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cosmigrate.clock import Mono, Wall
from cosmigrate.freshness import Freshness
from cosmigrate.tokens import Positions, reached
from tests.test_freshness import v2

EXAMPLES = int(os.environ.get("COSMIGRATE_FRESHNESS_MODEL_EXAMPLES", "300"))
WHOLE = [("", "FF")]
SPLIT = [("", "80"), ("80", "FF")]
LAYOUTS = [WHOLE, SPLIT]


def _positions(layout: int, lsns: list[int]) -> Positions:
    return {r: lsns[i % len(lsns)] for i, r in enumerate(LAYOUTS[layout])}


def _tokens(pos: Positions) -> list[bytes]:
    """One head token per partition range, as GetChangeStreamTokens answers."""
    return [v2(lsn, {"min": lo, "max": hi}) for (lo, hi), lsn in pos.items()]


@dataclass
class Reference:
    """Every sample and every mark that is still true; the rule applied by brute force."""

    samples: list[tuple[Mono, Positions]] = field(default_factory=list)
    marks: list[tuple[Positions, int]] = field(default_factory=list)
    captured: set[Mono] = field(default_factory=set)
    caught_up: set[Mono] = field(default_factory=set)

    def settle(self, committed: int, applied: int) -> None:
        """Once a moment is captured (applied), it stays so: the target does not lose what it was given."""
        for at, head in self.samples:
            reaching = [seq for pos, seq in self.marks if reached(pos, head)]
            if any(seq <= committed for seq in reaching):
                self.captured.add(at)
            if any(seq <= min(committed, applied) for seq in reaching):
                self.caught_up.add(at)


ops = st.lists(st.one_of(
    st.tuples(st.just("sample"), st.integers(0, 1), st.lists(st.integers(0, 3), min_size=1, max_size=2)),
    st.tuples(st.just("mark"), st.integers(0, 1), st.lists(st.integers(0, 3), min_size=1, max_size=2),
              st.booleans()),
    st.tuples(st.just("commit")),
    st.tuples(st.just("apply")),
    st.tuples(st.just("restart")),
), max_size=40)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
@example([("sample", 0, [0]), ("sample", 0, [1]), ("mark", 0, [1], True), ("restart",), ("mark", 0, [0], True),
          ("commit",)])  # the reused-seq hole below, found by this test
def test_freshness_never_claims_more_than_the_brute_force_reference(history: list[tuple]) -> None:
    fresh, ref = Freshness(watched_since=Mono(0.0)), Reference()
    clock = 0.0
    sealed = committed = applied = -1  # the capture's last sealed seq, the ledger's committed and applied seqs
    start = _positions(0, [0])  # the capture's start position: no event before it is ours (batches <= -1)
    fresh.mark_positions(start, -1)
    ref.marks.append((start, -1))
    seq_positions: dict[int, Positions] = {-1: start}  # the latest position handed over with each seq still true
    for op in history:
        clock += 1.0
        if op[0] == "sample":  # heads may go back, or name other ranges than capture's positions
            head = _positions(op[1], op[2])
            fresh.add_sample(Mono(clock), _tokens(head), wall=Wall(clock))
            ref.samples.append((Mono(clock), head))
        elif op[0] == "mark":
            pos = _positions(op[1], op[2])
            if op[3]:
                sealed += 1  # a batch sealed up to here; otherwise a page boundary with nothing unsealed
            if sealed < 0:
                continue
            fresh.mark_positions(pos, sealed)
            ref.marks.append((pos, sealed))
            seq_positions[sealed] = pos
        elif op[0] == "commit" and committed < sealed:
            committed += 1
        elif op[0] == "apply" and applied < committed:
            applied += 1
        elif op[0] == "restart":
            # `ctl retry`: the sealed batches that were never committed are dropped, the seqs are handed out
            # again from the ledger, and the new capture's first mark is its stored (committed) position.
            ref.marks = [(p, s) for p, s in ref.marks if s <= committed]
            seq_positions = {s: p for s, p in seq_positions.items() if s <= committed}
            sealed = committed
            fresh.mark_positions(seq_positions[committed], committed)
            ref.marks.append((seq_positions[committed], committed))
        fresh.update(committed, applied)
        ref.settle(committed, applied)
        if fresh.caught_up_t is not None:
            assert fresh.caught_up_t in ref.caught_up, f"caught up at {fresh.caught_up_t}, which is not applied"
        if fresh.latest_is_caught_up:
            assert fresh.last_sample_at in ref.caught_up, "the latest sample is called caught up, it is not"
        if fresh.lag(Mono(clock + 0.5)) == 0.0:
            assert fresh.last_sample_at in ref.caught_up, "lag 0 while the latest sample is not applied"
        if fresh.captured_at is not None:
            assert Mono(fresh.captured_at.s) in ref.captured, "captured_at names a moment not captured"


def test_a_sample_reached_by_a_batch_never_committed_waits_again_after_a_capture_restart() -> None:
    """`ctl retry` keeps the namespace's samples, and the new capture numbers its batches from the ledger again.

    Batch 1 was sealed up to LSN 50 (reaching the head sampled at LSN 50) and dropped when capture failed. The
    retried capture's batch 1 ends at LSN 20. Once that batch is applied, the head at LSN 50 is not: the
    sample must not be called caught up (it was, with lag 0, on the code before this fix).
    """
    fresh = Freshness(watched_since=Mono(0.0))
    fresh.mark_positions({("", "FF"): 10}, 0)
    fresh.update(0, 0)
    fresh.add_sample(Mono(1.0), [v2(50)], wall=Wall(1.0))
    fresh.mark_positions({("", "FF"): 50}, 1)  # sealed, then dropped: capture failed before committing it
    fresh.update(0, 0)
    fresh.mark_positions({("", "FF"): 10}, 0)  # the retried capture: its stored position, seq = last committed
    fresh.mark_positions({("", "FF"): 20}, 1)  # its own batch 1, shorter
    fresh.update(1, 1)
    assert fresh.caught_up_t is None and not fresh.latest_is_caught_up and fresh.lag(Mono(2.0)) == 2.0
    fresh.mark_positions({("", "FF"): 50}, 2)  # batch 2 reaches the head: caught up once it is applied
    fresh.update(2, 1)
    assert fresh.caught_up_t is None
    fresh.update(2, 2)
    assert fresh.caught_up_t == Mono(1.0) and fresh.latest_is_caught_up
