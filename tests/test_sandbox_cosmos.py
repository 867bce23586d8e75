"""The Cosmos DB emulator's change-stream rules and faults, through the real PyMongo client."""

from __future__ import annotations

import asyncio
import json

import bson
import pytest
from bson import Decimal128, Int64
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient
from pymongo.errors import AutoReconnect, OperationFailure

from cosmigrate.sandbox import Sandbox, beginning_token, make_token

OPS = ["insert", "update", "replace"]
FIELDS = {"_id": 1, "fullDocument": 1, "ns": 1, "documentKey": 1}
PIPELINE = [{"$match": {"operationType": {"$in": OPS}}}, {"$project": FIELDS}]
DELETE_PIPELINE = [
    {"$match": {"operationType": {"$in": [*OPS, "delete"]}}},
    {"$project": {**FIELDS, "operationType": 1}},
]


async def drain(stream, want: int, limit_s: float = 5.0) -> list:
    """Read `want` events, waiting on the stream itself (bounded by a timeout)."""
    out: list = []

    async def run() -> None:
        while len(out) < want:
            change = await stream.try_next()
            if change is not None:
                out.append(change)

    await asyncio.wait_for(run(), limit_s)
    return out


async def quiet(stream, pages: int = 2) -> list:
    """Events seen over a few empty getMores (each waits up to maxTimeMS)."""
    out = []
    for _ in range(pages):
        change = await stream.try_next()
        if change is not None:
            out.append(change)
    return out


def watch(coll, pipeline=PIPELINE, **kw):
    kw.setdefault("full_document", "updateLookup")
    kw.setdefault("max_await_time_ms", 200)
    return coll.watch(pipeline, **kw)


@pytest.mark.parametrize(
    "pipeline",
    [
        [],
        [{"$match": {"operationType": {"$in": OPS}}}],
        [{"$project": FIELDS}, {"$match": {"operationType": {"$in": OPS}}}],
        [{"$match": {"operationType": {"$in": ["insert", "update"]}}}, {"$project": FIELDS}],
        [{"$match": {"operationType": {"$in": OPS}}}, {"$project": {"_id": 1, "fullDocument": 1}}],
        [{"$match": {"operationType": {"$in": OPS}}}, {"$project": FIELDS}, {"$limit": 1}],
        DELETE_PIPELINE,  # the delete form needs the preview switched on
    ],
)
async def test_invalid_pipeline_is_refused(source: AsyncMongoClient, pipeline) -> None:
    await source.db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        await source.db.c.watch(pipeline, full_document="updateLookup")
    assert info.value.code == 2
    assert "Change stream must be followed by a match and then a project stage" in str(info.value)


async def test_full_document_must_be_update_lookup(source: AsyncMongoClient) -> None:
    await source.db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as info:
        await source.db.c.watch(PIPELINE)
    assert info.value.code == 2


async def test_database_and_cluster_streams_fail_with_bad_value(source: AsyncMongoClient) -> None:
    await source.db.c.insert_one({"_id": 1})
    for target in (source.db, source):
        with pytest.raises(OperationFailure) as info:
            await target.watch(PIPELINE, full_document="updateLookup")
        assert info.value.code == 2


async def test_update_yields_only_the_cosmos_fields_with_the_full_document(source: AsyncMongoClient) -> None:
    coll = source.shop.orders
    await coll.insert_one({"_id": 1, "a": 1, "b": {"c": [1, 2]}})
    async with await watch(coll) as stream:
        await coll.update_one({"_id": 1}, {"$set": {"a": 2}})
        (event,) = await drain(stream, 1)
    assert list(event) == ["_id", "fullDocument", "ns", "documentKey"]
    assert event["fullDocument"] == {"_id": 1, "a": 2, "b": {"c": [1, 2]}}
    assert event["ns"] == {"db": "shop", "coll": "orders"}
    assert event["documentKey"] == {"_id": 1}
    assert "operationType" not in event and "clusterTime" not in event


async def test_events_are_raw_bson_when_asked(source: AsyncMongoClient) -> None:
    from bson.codec_options import CodecOptions

    coll = source.db.get_collection("c", codec_options=CodecOptions(document_class=RawBSONDocument))
    await coll.insert_one({"_id": 1})
    async with await watch(coll) as stream:
        await source.db.c.insert_one({"_id": 2, "x": "y"})
        (event,) = await drain(stream, 1)
    assert isinstance(event, RawBSONDocument)
    assert isinstance(event["fullDocument"], RawBSONDocument)


async def test_delete_is_not_reported(source: AsyncMongoClient) -> None:
    coll = source.db.c
    await coll.insert_many([{"_id": 1}, {"_id": 2}])
    async with await watch(coll) as stream:
        await coll.delete_one({"_id": 1})
        assert await quiet(stream) == []
        await coll.insert_one({"_id": 3})
        (event,) = await drain(stream, 1)
    assert event["documentKey"] == {"_id": 3}


async def test_delete_event_with_the_preview_on(sandbox: Sandbox, source: AsyncMongoClient) -> None:
    sandbox.source.faults.deletes_preview = True
    coll = source.db.c
    await coll.insert_many([{"_id": 1}, {"_id": 2}])
    async with await watch(coll, DELETE_PIPELINE) as stream:
        await coll.delete_one({"_id": 1})
        await coll.update_one({"_id": 2}, {"$set": {"x": 1}})
        events = await drain(stream, 2)
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in events] == [("delete", 1), ("update", 2)]
    assert "fullDocument" not in events[0]
    assert events[1]["fullDocument"] == {"_id": 2, "x": 1}


async def test_every_event_of_a_page_shares_one_token(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    sandbox.source.faults.partitions = 1  # one partition: a whole-collection page carries one range
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(1, 6)])
        events = await drain(stream, 5)
        assert len({json.dumps(str(e["_id"])) for e in events}) == 1
        assert stream.resume_token == events[-1]["_id"]
    data = json.loads(bytes(events[0]["_id"]["_data"]))
    assert data["V"] == 2 and len(data["Continuation"]) == 1


async def test_resume_after_a_page_token_yields_exactly_the_later_events(source: AsyncMongoClient) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": "seed"})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(3)])
        first_page = await drain(stream, 3)
        token = first_page[-1]["_id"]
    await coll.insert_many([{"_id": i} for i in range(3, 6)])
    await coll.update_one({"_id": 0}, {"$set": {"v": 1}})
    async with await watch(coll, resume_after=token) as stream:
        later = await drain(stream, 4)
        assert await quiet(stream) == []
    assert [e["documentKey"]["_id"] for e in later] == [3, 4, 5, 0]
    assert later[-1]["fullDocument"] == {"_id": 0, "v": 1}


async def test_beginning_token_replays_every_live_document_once(source: AsyncMongoClient) -> None:
    coll = source.db.c
    await coll.insert_many([{"_id": i, "v": 0} for i in range(10)])
    for _ in range(3):
        await coll.update_many({"_id": {"$lt": 5}}, {"$inc": {"v": 1}})
    await coll.delete_one({"_id": 9})
    async with await watch(coll, resume_after=beginning_token()) as stream:
        events = await drain(stream, 9)
        assert await quiet(stream) == []
    by_id = {e["documentKey"]["_id"]: e["fullDocument"] for e in events}
    assert len(events) == len(by_id) == 9
    assert by_id == {i: {"_id": i, "v": 3 if i < 5 else 0} for i in range(9)}


async def test_feed_keys_documents_by_mongodb_id_equality(source: AsyncMongoClient) -> None:
    # 1, 1.0 and Decimal128("1") are one document, and every NaN is one _id: the
    # feed holds each once, named by the _id it carries now.
    coll = source.db.get_collection("c", codec_options=CodecOptions(document_class=RawBSONDocument))
    await coll.insert_one({"_id": 1, "v": 0})
    await coll.replace_one({"_id": 1.0}, {"_id": 1.0, "v": 1})
    await coll.update_one({"_id": Int64(1)}, {"$set": {"v": 2}})
    await coll.replace_one({"_id": float("nan")}, {"_id": float("nan"), "v": 1}, upsert=True)
    await coll.replace_one({"_id": Decimal128("NaN")}, {"_id": Decimal128("NaN"), "v": 2}, upsert=True)
    async with await watch(coll, resume_after=beginning_token()) as stream:
        events = await drain(stream, 2)
        assert await quiet(stream) == []
    one, nan = (e["fullDocument"].raw for e in events)
    assert one == bson.encode({"_id": 1.0, "v": 2})
    assert nan == bson.encode({"_id": Decimal128("NaN"), "v": 2})
    keys = [e["documentKey"].raw for e in events]
    assert keys == [bson.encode({"_id": 1.0}), bson.encode({"_id": Decimal128("NaN")})]


async def test_v2_token_at_lsn_zero_also_means_the_beginning(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    await coll.insert_many([{"_id": i} for i in range(4)])
    rid = sandbox.source.store.get("db", "c").feed.rid
    async with await watch(coll, resume_after=make_token(rid, 0)) as stream:
        assert len(await drain(stream, 4)) == 4


@pytest.mark.parametrize("kind", ["garbled", "other_collection", "future", "switch"])
async def test_rejected_resume_tokens(source: AsyncMongoClient, sandbox: Sandbox, kind: str) -> None:
    await source.db.c.insert_one({"_id": 1})
    await source.db.other.insert_one({"_id": 1})
    async with await watch(source.db.other) as stream:
        await source.db.other.insert_one({"_id": 2})
        (event,) = await drain(stream, 1)
    rid = sandbox.source.store.get("db", "c").feed.rid
    token = {
        "garbled": {"_data": b"not json at all"},
        "other_collection": event["_id"],
        "future": make_token(rid, 10_000),
        "switch": make_token(rid, 1),
    }[kind]
    if kind == "switch":
        sandbox.source.faults.reject_tokens = True
    with pytest.raises(OperationFailure) as info:
        await watch(source.db.c, resume_after=token)
    assert "Change feed token format is invalid" in str(info.value)


async def test_replies_carry_no_operation_time(source: AsyncMongoClient) -> None:
    reply = await source.db.command({"aggregate": "c", "pipeline": [], "cursor": {}})
    assert "operationTime" not in reply and "$clusterTime" not in reply
    await source.db.c.insert_one({"_id": 1})
    reply = await source.db.command(
        {"aggregate": "c", "pipeline": [{"$changeStream": {"fullDocument": "updateLookup"}}, *PIPELINE], "cursor": {}}
    )
    assert "operationTime" not in reply
    assert "postBatchResumeToken" in reply["cursor"]


async def test_missing_postbatch_token_reproduces_pymongo_operation_time_failure(
    source: AsyncMongoClient, sandbox: Sandbox
) -> None:
    await source.db.c.insert_one({"_id": 1})
    sandbox.source.faults.no_postbatch_token = True
    with pytest.raises(OperationFailure, match="Expected field 'operationTime' missing"):
        await watch(source.db.c)
    # Starting from a token avoids it, as the README says.
    async with await watch(source.db.c, resume_after=beginning_token()) as stream:
        assert len(await drain(stream, 1)) == 1


async def test_throttling_error_carries_retry_after_ms(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    await source.db.c.insert_one({"_id": 1})
    sandbox.source.faults.update({"throttle_rate": 1.0, "retry_after_ms": 37})
    with pytest.raises(OperationFailure) as info:
        await source.db.c.find_one({"_id": 1})
    assert info.value.code == 16500
    assert "RetryAfterMs=37" in str(info.value)
    sandbox.source.faults.throttle_rate = 0.0
    assert await source.db.c.find_one({"_id": 1}) == {"_id": 1}


async def test_throttled_stream_serves_empty_pages_then_catches_up(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(1, 4)])
        sandbox.source.faults.empty_page_rate = 1.0
        assert await quiet(stream, pages=3) == []
        sandbox.source.faults.empty_page_rate = 0.0
        assert len(await drain(stream, 3)) == 3


async def test_dropped_connections_are_survived_by_resuming(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(1, 4)])
        got = await drain(stream, 3)
        assert sandbox.source.drop_connections() >= 1
        try:  # the writer's pooled connection was reset too (retryWrites=false)
            await coll.insert_many([{"_id": i} for i in range(4, 7)])
        except AutoReconnect:
            await coll.insert_many([{"_id": i} for i in range(4, 7)])
        got += await drain(stream, 3)
    assert [e["documentKey"]["_id"] for e in got] == [1, 2, 3, 4, 5, 6]


async def test_drop_rate_closes_connections(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    await source.db.c.insert_one({"_id": 1})
    sandbox.source.faults.drop_rate = 1.0
    with pytest.raises(AutoReconnect):
        await source.db.command("count", "c")
    sandbox.source.faults.drop_rate = 0.0
    assert (await source.db.command("count", "c"))["n"] == 1


async def test_idle_connections_are_closed(sandbox: Sandbox) -> None:
    sandbox.source.faults.idle_timeout_s = 0.2
    reader, writer = await asyncio.open_connection(sandbox.source.host, sandbox.source.port)
    try:
        # Nothing sent: the server closes the connection once it has been idle too long.
        assert await asyncio.wait_for(reader.read(1), 5) == b""
    finally:
        writer.close()


async def test_watch_of_a_missing_collection_fails(source: AsyncMongoClient) -> None:
    with pytest.raises(OperationFailure) as info:
        await watch(source.db.nothing_here)
    assert info.value.code == 26
