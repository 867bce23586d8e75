"""The Cosmos emulator's physical partitions, through the real PyMongo client over TCP.

Placement by a hash of the shard key (or `_id`), one LSN log and one token per
partition, partition streams, whole-collection streams with one continuation
per range, per-partition request units, and a split while streams are open.
"""

from __future__ import annotations

import bson
import pytest
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from cosmigrate.mongo import change_stream_tokens
from cosmigrate.sandbox import Sandbox
from cosmigrate.tokens import positions, reached, with_range
from tests.test_sandbox_cosmos import drain, watch


def _range_of(token: bytes) -> tuple[str, str]:
    (rng,) = positions(token)
    return rng


async def _until_idle(stream) -> list:
    """Every event the stream has now: read until a getMore comes back empty."""
    out = []
    while (change := await stream.try_next()) is not None:
        out.append(change)
    return out


async def _ids(stream, want: int) -> list:
    return [e["documentKey"]["_id"] for e in await drain(stream, want)]


@pytest.mark.parametrize("n", [1, 3, 8])
async def test_one_token_per_partition_and_each_stream_serves_its_partition_only(
    source: AsyncMongoClient, sandbox: Sandbox, n: int
) -> None:
    sandbox.source.faults.partitions = n
    coll = source.db.c
    await coll.insert_many([{"_id": i, "v": i} for i in range(200)])
    tokens = await change_stream_tokens(source, "db.c", Timestamp(0, 0))
    assert len(tokens) == n
    ranges = sorted((_range_of(t) for t in tokens), key=lambda r: (r[0] != "", r[0]))
    assert ranges[0][0] == "" and ranges[-1][1] == "FF"
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))  # they tile the key space
    seen: list[int] = []
    per_partition = []
    for token in tokens:
        async with await watch(coll, resume_after=RawBSONDocument(token)) as stream:
            got = [e["documentKey"]["_id"] for e in await _until_idle(stream)]
            # everything of the partition comes in the first page(s); a later page brings nothing new
        per_partition.append(got)
        seen += got
    assert sorted(seen) == list(range(200))  # every document in exactly one partition
    if n > 1:
        assert all(0 < len(p) < 200 for p in per_partition)
    # Each partition has its own LSN sequence: heads count the writes of their partition only.
    heads = await change_stream_tokens(source, "db.c")
    assert sorted(positions(h)[_range_of(h)] for h in heads) == sorted(len(p) for p in per_partition)


async def test_placement_is_by_shard_key_when_there_is_one(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    sandbox.source.faults.partitions = 4
    await source.db.command({"customAction": "CreateCollection", "collection": "s", "shardKey": "tenant"})
    coll = source.db.s
    await coll.insert_many([{"_id": i, "tenant": i % 2} for i in range(40)])
    tokens = await change_stream_tokens(source, "db.s", Timestamp(0, 0))
    groups = []
    for token in tokens:
        async with await watch(coll, resume_after=RawBSONDocument(token)) as stream:
            events = await _until_idle(stream)
        if events:
            groups.append({e["fullDocument"]["tenant"] for e in events})
    # all documents of one tenant live in one partition
    assert all(len(g) == 1 for g in groups) and {t for g in groups for t in g} == {0, 1}


async def test_a_whole_collection_stream_interleaves_partitions_with_one_continuation_per_range(
    source: AsyncMongoClient, sandbox: Sandbox
) -> None:
    sandbox.source.faults.partitions = 4
    coll = source.db.c
    await coll.insert_one({"_id": -1})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(50)])
        events = await drain(stream, 50)
        assert [e["documentKey"]["_id"] for e in events] == list(range(50))  # write order across partitions
        token = stream.resume_token
    pos = positions(bson.encode(token))
    assert len(pos) == 4
    await coll.insert_many([{"_id": i} for i in range(50, 60)])
    async with await watch(coll, resume_after=token) as stream:
        assert await _ids(stream, 10) == list(range(50, 60))


async def test_a_split_fails_the_parents_stream_and_the_children_continue_from_its_position(
    source: AsyncMongoClient, sandbox: Sandbox
) -> None:
    sandbox.source.faults.partitions = 2
    coll = source.db.c
    await coll.insert_many([{"_id": i} for i in range(100)])
    tokens = await change_stream_tokens(source, "db.c", Timestamp(0, 0))
    first = min(tokens, key=lambda t: _range_of(t)[0])
    parent_range = _range_of(first)
    async with await watch(coll, resume_after=RawBSONDocument(first)) as parent:
        before = [e["documentKey"]["_id"] for e in await _until_idle(parent)]
        position = bytes(bson.encode(parent.resume_token))
        async with await watch(coll) as whole:  # a whole-collection stream, open across the split
            left, right = sandbox.source.split_partition("db", "c", 0)
            assert (left[0], right[1]) == parent_range and left[1] == right[0]
            await coll.insert_many([{"_id": i} for i in range(100, 200)])
            with pytest.raises(OperationFailure) as err:
                await drain(parent, 1)
            assert "Gone (410)" in str(err.value) and "Substatus: 1002" in str(err.value)
            # the whole-collection stream goes on over the children, nothing lost
            assert sorted(await _ids(whole, 100)) == list(range(100, 200))
    # reopening the parent's token fails the same way
    with pytest.raises(OperationFailure, match="Gone"):
        async with await watch(coll, resume_after=RawBSONDocument(position)) as stream:
            await stream.try_next()
    now = await change_stream_tokens(source, "db.c")
    assert len(now) == 3 and left in {_range_of(t) for t in now} and right in {_range_of(t) for t in now}
    after = []
    for child in (left, right):
        async with await watch(coll, resume_after=RawBSONDocument(with_range(position, child))) as stream:
            after += [e["documentKey"]["_id"] for e in await _until_idle(stream)]
    new_in_parent = [i for i in after if i >= 100]
    assert sorted(set(after)) == sorted(after)  # the two children share nothing
    assert not set(before) & set(after)  # nothing read twice, nothing skipped:
    assert new_in_parent and all(i >= 100 for i in after)
    # the head barrier compares children's heads with a position on the parent range
    heads = {r: lsn for t in now for r, lsn in positions(t).items()}
    assert not reached(positions(position), heads)


async def test_request_units_are_split_per_partition(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    sandbox.source.faults.partitions = 2
    coll = source.db.c
    await coll.insert_many([{"_id": i, "pad": "x" * 3000} for i in range(200)])
    tokens = sorted(await change_stream_tokens(source, "db.c", Timestamp(0, 0)), key=lambda t: _range_of(t)[0])
    sandbox.source.faults.ru_per_s = 200  # 100 per partition: one page of ~100 documents of 3 KB empties it
    async with await watch(coll, resume_after=RawBSONDocument(tokens[0])) as a:
        assert await a.try_next() is not None  # its first page empties partition 0's share
    assert sandbox.source.units.wait_s("db.c#0", 100.0) > 0
    assert sandbox.source.units.wait_s("db.c#1", 100.0) == 0  # partition 1's share is untouched
    with pytest.raises(OperationFailure) as err:  # a whole-collection stream needs every partition
        async with await watch(coll) as whole:
            await whole.try_next()
    assert err.value.code == 16500
    async with await watch(coll, resume_after=RawBSONDocument(tokens[1])) as b:
        assert await b.try_next() is not None  # partition 1's stream is not throttled by partition 0
