"""The asking worker's judgement of a unit another worker holds (`cosmigrate.readiness`), on recorded ledger reads:
it never claims more than the ledger and its own head samples prove."""

from __future__ import annotations

from cosmigrate.clock import Mono
from cosmigrate.ledger import NamespaceMeta, Progress
from cosmigrate.readiness import KEY, KIND, Foreign, ForeignUnits, Published
from tests.test_freshness import v2

NS, OWNER = "app.p", "w-b"
HEAD = {("", "FF"): 10}


def _meta(lsn: int, next_seq: int, applied_seq: int) -> NamespaceMeta:
    return NamespaceMeta(NS, epoch=1, next_seq=next_seq, resume_token=v2(lsn), applied_seq=applied_seq)


def _item(version: int, **fields: object) -> Progress:
    rec = Published(OWNER, fence_over=True, deletes_always=True, **fields)  # type: ignore[arg-type]
    return Progress(NS, KIND, KEY, rec.data(), version=version)


def _live(units: ForeignUnits, at: float) -> None:
    """Two reads of the holder's item, the second seeing it rewritten."""
    unit = units.of(NS)
    unit.see_record(_item(1), Mono(at - 1.0))
    unit.see_record(_item(2), Mono(at))


def _caught_up() -> tuple[ForeignUnits, Foreign]:
    """A unit whose head sampled at 100 is captured and applied."""
    units = ForeignUnits()
    unit = units.of(NS)
    unit.add_sample(Mono(100.0), HEAD)
    unit.see_meta(_meta(10, next_seq=3, applied_seq=2))
    return units, unit


def test_a_head_is_current_only_once_captured_and_the_crossing_batch_applied() -> None:
    units = ForeignUnits()
    _live(units, 100.0)
    unit = units.of(NS)
    unit.add_sample(Mono(100.0), HEAD)
    unit.see_meta(_meta(9, next_seq=5, applied_seq=4))  # position short of the head
    assert units.judge(NS, OWNER, 30.0, 3.0, Mono(101.0)).blocks
    unit.see_meta(_meta(10, next_seq=6, applied_seq=4))  # batch 5 crossed the head, not applied
    assert units.judge(NS, OWNER, 30.0, 3.0, Mono(101.0)).freshness == "behind"
    unit.see_meta(_meta(11, next_seq=9, applied_seq=5))  # later batches committed: batch 5 is enough
    judged = units.judge(NS, OWNER, 30.0, 3.0, Mono(101.0))
    assert judged.freshness == "current" and judged.lag == 0.0 and not judged.blocks


def test_the_holders_item_counts_only_once_seen_rewritten_and_only_for_a_few_renew_intervals() -> None:
    units, unit = _caught_up()
    unit.see_record(_item(7), Mono(100.0))
    assert any("not seen rewritten" in b for b in units.judge(NS, OWNER, 30.0, 3.0, Mono(100.5)).blocks)
    unit.see_record(_item(7), Mono(101.0))
    unit.see_record(_item(8), Mono(102.0))  # written after the read at 101
    assert not units.judge(NS, OWNER, 30.0, 3.0, Mono(109.0)).blocks
    unit.see_record(_item(8), Mono(110.0))  # frozen: the same version from now on
    assert any("not seen rewritten" in b for b in units.judge(NS, OWNER, 30.0, 3.0, Mono(110.0)).blocks)
    unit.see_record(_item(7), Mono(111.0))  # an older answer of an overlapping read changes nothing
    assert unit.version == 8


def test_what_the_holder_publishes_blocks_and_is_ignored_from_another_worker() -> None:
    units, unit = _caught_up()
    unit.see_record(_item(1), Mono(100.0))
    unit.see_record(_item(2, blocks=("app.p: 3 writes deferred by unique-index conflicts",)), Mono(101.0))
    assert units.judge(NS, OWNER, 30.0, 3.0, Mono(101.0)).blocks == (
        "app.p: 3 writes deferred by unique-index conflicts (on worker w-b)",)
    stranger = Published("w-c", fence_over=True, deletes_always=True)
    unit.see_record(Progress(NS, KIND, KEY, stranger.data(), version=3), Mono(102.0))
    assert any("not its holder" in b for b in units.judge(NS, OWNER, 30.0, 3.0, Mono(102.0)).blocks)


def test_deletes_are_reconciled_only_when_the_published_pass_covers_this_workers_head() -> None:
    units, unit = _caught_up()
    swept = Published(OWNER, fence_over=True, deletes_head={("", "FF"): 9})
    unit.see_record(Progress(NS, KIND, KEY, swept.data(), version=1), Mono(100.0))
    covering = Published(OWNER, fence_over=True, deletes_head={("", "FF"): 10})
    unit.see_record(Progress(NS, KIND, KEY, swept.data(), version=2), Mono(101.0))
    assert any("deletes not reconciled" in b for b in units.judge(NS, OWNER, 30.0, 3.0, Mono(101.0)).blocks)
    unit.see_record(Progress(NS, KIND, KEY, covering.data(), version=3), Mono(102.0))
    assert not units.judge(NS, OWNER, 30.0, 3.0, Mono(102.0)).blocks
