"""The head-position barrier: token positions, the freshness rules, and GetChangeStreamTokens in the sandbox."""

from __future__ import annotations

import gzip
import json

import bson
import pytest
from bson.binary import Binary
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from cosmigrate.clock import Mono, Wall
from cosmigrate.freshness import Freshness
from cosmigrate.heads import HeadSampler, classify
from cosmigrate.mongo import change_stream_tokens
from cosmigrate.sandbox import Sandbox
from cosmigrate.tokens import TokenFormatError, positions, reached

FULL = {"min": "", "max": "FF"}


def v2(lsn: int, rng: dict[str, str] = FULL, kind: int | None = None) -> bytes:
    data = json.dumps({"V": 2, "Rid": "abc", "Continuation": [
        {"FeedRange": {"type": "Effective Partition Key Range", "value": rng},
         "State": {"type": "continuation", "value": json.dumps(str(lsn))}}]}).encode()
    doc: dict = {"_data": Binary(gzip.compress(data) if kind == 4 else data)}
    if kind is not None:
        doc["_kind"] = kind
    return bson.encode(doc)


def old(lsn: int) -> bytes:
    return bson.encode({"_data": Binary(json.dumps([{"token": json.dumps(str(lsn)), "range": FULL}]).encode())})


def test_positions_read_every_token_form() -> None:
    assert positions(v2(12)) == {("", "FF"): 12}
    assert positions(v2(12, kind=1)) == {("", "FF"): 12}
    assert positions(v2(99, kind=4)) == {("", "FF"): 99}
    assert positions(old(0)) == {("", "FF"): 0}
    with pytest.raises(TokenFormatError):
        positions(bson.encode({"_data": Binary(b"not json")}))
    with pytest.raises(TokenFormatError):
        positions(bson.encode({"_data": Binary(b"\x1f\x8bbroken"), "_kind": 4}))


def test_reached_needs_every_head_range() -> None:
    head = {("", "80"): 10, ("80", "FF"): 5}
    assert reached({("", "FF"): 10}, {("", "FF"): 10})
    assert not reached({("", "FF"): 9}, {("", "FF"): 10})
    assert reached({("", "80"): 11, ("80", "FF"): 5}, head)
    assert not reached({("", "80"): 11}, head)  # a range the position does not cover is never "reached"
    assert not reached({("", "80"): 11, ("80", "FF"): 4}, head)


def test_a_head_sampled_before_a_split_is_reached_by_the_children_together() -> None:
    parent = {("", "FF"): 10}  # e.g. the backfill's head, stored before the partition split
    assert reached({("", "80000000"): 10, ("80000000", "FF"): 12}, parent)
    assert not reached({("", "80000000"): 10, ("80000000", "FF"): 9}, parent)  # one child still behind
    assert not reached({("", "80000000"): 30}, parent)  # half the range has no position
    assert not reached({("", "40000000"): 30, ("80000000", "FF"): 30}, parent)  # a gap between the children
    assert reached({("", "40000000"): 11, ("40000000", "80000000"): 10, ("80000000", "FF"): 10}, parent)
    assert reached({("", "80000000"): 10, ("80000000", "C0000000"): 10, ("C0000000", "FF"): 10},
                   {("", "80000000"): 10, ("80000000", "FF"): 9})


def test_lag_is_zero_only_when_the_latest_fresh_sample_is_captured_and_applied() -> None:
    f = Freshness()
    assert f.lag(now=Mono(100.0), since=Mono(90.0)) == 10.0  # nothing sampled: a lower bound, never 0
    f.mark(v2(5), seq=-1)  # start position: nothing to apply up to LSN 5
    f.add_sample(Mono(100.0), [v2(5)], wall=Wall(1000.0))
    f.update(committed_seq=-1, applied_seq=-1)
    assert f.caught_up_t == Mono(100.0) and f.caught_up_at == Wall(1000.0)
    assert f.lag(now=Mono(101.0), fresh_after=Mono(100.0)) == 0.0
    assert f.lag(now=Mono(101.0), fresh_after=Mono(100.5)) == 1.0  # a sample older than asked proves nothing newer

    f.add_sample(Mono(102.0), [v2(8)], wall=Wall(1002.0))  # the source moved: LSNs 6..8 not yet read
    f.update(committed_seq=-1, applied_seq=-1)
    assert f.lag(now=Mono(103.0)) == 3.0 and f.caught_up_at == Wall(1000.0)
    f.mark(v2(8), seq=0)  # batch 0 holds up to LSN 8 (sealed)
    f.update(committed_seq=-1, applied_seq=-1)
    assert f.captured_at == Wall(1000.0)  # batch 0 is sealed, not committed yet
    f.update(committed_seq=0, applied_seq=-1)
    assert f.captured_at == Wall(1002.0) and f.caught_up_at == Wall(1000.0)  # captured, not applied
    f.update(committed_seq=0, applied_seq=0)
    assert f.caught_up_at == Wall(1002.0) and f.lag(now=Mono(104.0)) == 0.0


def test_marks_after_a_sample_resolve_the_first_batch_that_crossed_it() -> None:
    f = Freshness()
    f.add_sample(Mono(10.0), [v2(7)])
    f.mark(v2(3), seq=0)
    f.mark(v2(7), seq=1)
    f.mark(v2(9), seq=2)
    f.update(committed_seq=2, applied_seq=1)
    assert f.caught_up_t == Mono(10.0)  # batch 1 crossed LSN 7; batch 2 need not be applied


def test_a_sample_is_resolved_against_marks_recorded_before_it() -> None:
    f = Freshness()
    for seq, lsn in enumerate([2, 4, 6, 8, 10]):
        f.mark(v2(lsn), seq=seq)
    f.add_sample(Mono(10.0), [v2(5)])  # batch 2 (LSN 6) is the first at or past LSN 5
    f.update(committed_seq=4, applied_seq=1)
    assert f.caught_up_t is None
    f.update(committed_seq=4, applied_seq=2)
    assert f.caught_up_t == Mono(10.0) and f.latest_is_caught_up


def test_an_unreadable_head_adds_no_sample() -> None:
    f = Freshness()
    f.add_sample(Mono(10.0), [bson.encode({"_data": "[]"})])
    assert not f.sampled and f.last_sample_error


def test_permanent_refusals_are_classified_with_what_to_grant() -> None:
    assert "grant" in (classify(OperationFailure("not authorized", 13)) or "")
    assert "upgrade" in (classify(OperationFailure("no such command", 59)) or "")
    assert classify(OperationFailure("Request rate is large", 16500)) is None


async def test_sandbox_serves_one_head_token_per_partition(sandbox: Sandbox, source: AsyncMongoClient) -> None:
    sandbox.source.faults.partitions = 1  # several: tests/test_sandbox_partitions.py
    await source.app.users.insert_many([{"_id": i} for i in range(3)])
    (now,) = await change_stream_tokens(source, "app.users")
    assert positions(now) == {("", "FF"): 3}
    (start,) = await change_stream_tokens(source, "app.users", Timestamp(0, 0))
    assert positions(start) == {("", "FF"): 0}
    assert bson.decode(start)["_startAtOperationTime"] == Timestamp(0, 0)
    # The beginning token opens a stream that replays every document.
    async with await source.app.users.watch(
        [{"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}},
         {"$project": {"_id": 1, "fullDocument": 1, "ns": 1, "documentKey": 1}}],
        full_document="updateLookup", resume_after=bson.decode(start),
    ) as stream:
        seen = [(await stream.next())["documentKey"]["_id"] for _ in range(3)]
    assert seen == [0, 1, 2]


@pytest.mark.parametrize(("fault", "code"), [("refuse_head_tokens", 13), ("no_head_tokens", 59)])
async def test_sandbox_head_token_faults(sandbox: Sandbox, source: AsyncMongoClient, fault: str, code: int) -> None:
    await source.app.users.insert_one({"_id": 1})
    setattr(sandbox.source.faults, fault, True)
    with pytest.raises(OperationFailure) as err:
        await change_stream_tokens(source, "app.users")
    assert err.value.code == code
    fresh = Freshness()
    await HeadSampler(source, lambda: {"app.users": fresh}, 1.0).sample("app.users", fresh)
    assert fresh.unknown_reason and not fresh.sampled


async def test_sandbox_head_tokens_can_be_throttled(sandbox: Sandbox, source: AsyncMongoClient) -> None:
    await source.app.users.insert_one({"_id": 1})
    sandbox.source.faults.head_throttle_rate = 1.0
    with pytest.raises(OperationFailure) as err:
        await change_stream_tokens(source, "app.users")
    assert err.value.code == 16500
    fresh = Freshness()
    await HeadSampler(source, lambda: {"app.users": fresh}, 1.0).sample("app.users", fresh)
    assert not fresh.unknown_reason and not fresh.sampled and "throttled" in fresh.last_sample_error


async def test_a_throttled_head_sample_is_retried(sandbox: Sandbox, source: AsyncMongoClient) -> None:
    await source.app.users.insert_one({"_id": 1})
    sandbox.source.faults.head_throttle_rate = 0.5
    sampler = HeadSampler(source, dict, 1.0)
    sampled = 0
    for _ in range(10):
        fresh = Freshness()
        await sampler.sample("app.users", fresh)
        sampled += fresh.sampled
    assert sampled >= 8  # one try in two is throttled; three retries make a failed sample rare


def test_a_split_childs_head_is_judged_against_its_parents_position_until_the_child_has_its_own() -> None:
    """Children continue their parent's LSNs: a position on the parent's range reaches a child's head only when
    the child had no write since the split; once capture holds the children, their own positions decide."""
    parent, left, right = ("", "80000000"), ("", "40000000"), ("40000000", "80000000")
    other = ("80000000", "FF")
    head = {left: 50, right: 57, other: 9}
    assert reached({parent: 50, other: 9}, {left: 50, other: 9})  # the split came at 50; left had no write since
    assert not reached({parent: 50, other: 9}, head)  # right was written after the split
    assert not reached({left: 50, right: 56, other: 9}, head)
    assert reached({left: 50, right: 57, other: 9}, head)
    assert not reached({left: 50, right: 57}, head)  # a range capture does not cover is never reached


def test_a_sample_beyond_every_recorded_position_calls_on_behind_and_a_reached_one_does_not() -> None:
    """Capture ends its idle watchers' pauses on `on_behind`: only a head the namespace has not reached calls it."""
    calls: list[int] = []
    fresh = Freshness(on_behind=lambda: calls.append(1))
    fresh.mark(old(5), 0)
    fresh.add_sample(Mono.now(), [old(5)])
    assert calls == []
    fresh.add_sample(Mono.now(), [old(9)])
    assert calls == [1]
    fresh.mark(old(9), 1)
    fresh.add_sample(Mono.now(), [old(9)])
    assert calls == [1]


async def test_the_periodic_sampler_spreads_a_round_at_most_max_per_s_and_lengthens_it() -> None:
    """Ten namespaces at five samples a second: the round takes two seconds, not the 0.1 s interval, and
    the samples are sent one every 0.2 s instead of all at once (the head is stubbed: pacing only)."""
    import asyncio

    fresh = {f"app.c{i}": Freshness() for i in range(10)}
    sampler = HeadSampler(None, lambda: fresh, 0.1, concurrency=16, max_per_s=5.0)
    sent: list[float] = []
    rounds = asyncio.Event()

    async def head(ns: str) -> tuple[Wall, Mono, list[bytes]]:
        sent.append(Mono.now().s)
        if len(sent) == 11:
            rounds.set()
        return Wall.now(), Mono.now(), [old(len(sent))]

    sampler.head = head  # type: ignore[method-assign]
    task = asyncio.create_task(sampler.run())
    try:
        await asyncio.wait_for(rounds.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sampler.round_s == 2.0
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert min(gaps[:9]) >= 0.15, gaps  # one every 0.2 s within the round
    assert sent[10] - sent[0] >= 1.9, gaps  # the next round starts a round after the first
    assert all(f.last_sample_at is not None for f in fresh.values())
