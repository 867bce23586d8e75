"""The Cosmos emulator as hard as real Cosmos DB (issue 15), switch by switch, through the real PyMongo client.

Each test shows what the emulator does; what the tool does under the same
switch is in tests/test_hard_cosmos.py.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import time

import bson
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient, InsertOne, ReplaceOne
from pymongo.errors import BulkWriteError, ConfigurationError, DuplicateKeyError, OperationFailure

from cosmigrate.mongo import change_stream_tokens
from cosmigrate.sandbox import Sandbox, beginning_token
from cosmigrate.tokens import positions
from tests.test_sandbox_cosmos import PIPELINE, drain, quiet, watch

RAW = CodecOptions(document_class=RawBSONDocument)


def _kind_and_json(token) -> tuple[int | None, dict | list]:
    data = bytes(token["_data"])
    kind = token.get("_kind")
    return kind, json.loads(gzip.decompress(data) if kind == 4 else data)


# --- token forms -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 4])
async def test_tokens_of_one_kind_resume_and_carry_their_lsn(source: AsyncMongoClient, sandbox: Sandbox, kind: int) -> None:
    sandbox.source.faults.token_kind = kind
    sandbox.source.faults.partitions = 1  # the LSN of the one full-range partition
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": i} for i in range(1, 4)])
        events = await drain(stream, 3)
    token = events[-1]["_id"]
    got_kind, data = _kind_and_json(token)
    assert got_kind == kind and data["V"] == 2
    await coll.insert_one({"_id": 9})
    async with await watch(coll, resume_after=token) as stream:
        assert [e["documentKey"]["_id"] for e in await drain(stream, 1)] == [9]
    assert positions(bson.encode(token)) == {("", "FF"): sandbox.source.store.get("db", "c").feed.lsn - 1}


async def test_by_default_both_token_kinds_are_mixed(source: AsyncMongoClient) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    kinds = set()
    async with await watch(coll) as stream:
        for i in range(1, 7):  # one page per write: the page-end LSN alternates
            await coll.insert_one({"_id": i})
            (event,) = await drain(stream, 1)
            kinds.add(event["_id"]["_kind"])
    assert kinds == {1, 4}


async def test_head_tokens_carry_start_at_operation_time(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    sandbox.source.faults.partitions = 1  # one token (tests/test_sandbox_partitions.py: one per partition)
    await source.db.c.insert_many([{"_id": i} for i in range(3)])
    (head,) = await change_stream_tokens(source, "db.c")
    (start,) = await change_stream_tokens(source, "db.c", Timestamp(0, 0))
    head_doc, start_doc = bson.decode(head), bson.decode(start)
    assert isinstance(head_doc["_startAtOperationTime"], Timestamp) and head_doc["_startAtOperationTime"].time > 0
    assert start_doc["_startAtOperationTime"] == Timestamp(0, 0)
    assert positions(start) == {("", "FF"): 0} and positions(head) == {("", "FF"): 3}


async def test_a_gzip_token_whose_data_is_not_gzip_is_refused(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    await source.db.c.insert_one({"_id": 1})
    rid = sandbox.source.store.get("db", "c").feed.rid
    plain = json.dumps({"V": 2, "Rid": rid, "Continuation": []}).encode()
    with pytest.raises(OperationFailure, match="Change feed token format is invalid"):
        await watch(source.db.c, resume_after={"_data": plain, "_kind": 4})


# --- the beginning ---------------------------------------------------------------------------


async def test_refused_beginning_token_leaves_only_get_change_stream_tokens(source: AsyncMongoClient,
                                                                            sandbox: Sandbox) -> None:
    sandbox.source.faults.partitions = 1  # one beginning token for the whole collection
    await source.db.c.insert_many([{"_id": i, "v": 0} for i in range(5)])
    await source.db.c.update_one({"_id": 0}, {"$set": {"v": 1}})
    sandbox.source.faults.refuse_beginning_token = True
    with pytest.raises(OperationFailure, match="Change feed token format is invalid"):
        await watch(source.db.c, resume_after=beginning_token())
    (start,) = await change_stream_tokens(source, "db.c", Timestamp(0, 0))
    async with await watch(source.db.c, resume_after=RawBSONDocument(start)) as stream:
        events = await drain(stream, 5)
        assert await quiet(stream) == []
    assert sorted(e["documentKey"]["_id"] for e in events) == list(range(5))


# --- expired positions -------------------------------------------------------------------------


async def test_expired_positions_answer_invalid_options(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_one({"_id": 1})
        (event,) = await drain(stream, 1)
        sandbox.source.faults.expire_tokens = True
        with pytest.raises(OperationFailure) as info:  # the open stream's next getMore
            await stream.try_next()
        assert info.value.code == 72
    with pytest.raises(OperationFailure) as info:  # and any resume
        await watch(coll, resume_after=event["_id"])
    assert info.value.code == 72
    assert "Expired resume token or cursor, reinitialize the change stream cursor" in str(info.value)


# --- server-side retry and request units --------------------------------------------------------


async def test_server_side_retry_turns_throttling_into_a_delayed_50(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    await source.db.c.insert_one({"_id": 1})
    sandbox.source.faults.update({"throttle_rate": 1.0, "server_side_retry_ms": 300})
    t0 = time.monotonic()
    with pytest.raises(OperationFailure) as info:
        await source.db.c.find_one({"_id": 1})
    assert info.value.code == 50 and time.monotonic() - t0 >= 0.3
    sandbox.source.faults.server_side_retry_ms = 0
    with pytest.raises(OperationFailure) as info:
        await source.db.c.find_one({"_id": 1})
    assert info.value.code == 16500


async def test_request_units_throttle_by_load(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    sandbox.source.faults.ru_per_s = 40  # eight 1 KiB writes per second at 5 RU each
    pad = "x" * 900
    with pytest.raises(OperationFailure) as info:
        for i in range(100):
            await coll.insert_one({"_id": i, "pad": pad})
    assert info.value.code == 16500 and "RetryAfterMs=" in str(info.value)
    reply = await source.admin.command("cosmigrateSandbox")
    assert reply["requestUnits"]["write"] >= 40 and int(reply["throttled"]["16500"]) >= 1
    # With server-side retry a short wait is absorbed: the write is slow, but it succeeds.
    sandbox.source.faults.server_side_retry_ms = 5000
    await coll.insert_one({"_id": "late", "pad": pad})
    assert await coll.find_one({"_id": "late"}) is not None


async def test_a_bulk_write_partly_succeeds_before_a_16500(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    pad = "x" * 900
    for ordered in (True, False):
        sandbox.source.faults.ru_per_s = 20  # four 1 KiB writes, then the budget is spent
        coll = source.db[f"c{ordered}"]
        with pytest.raises(BulkWriteError) as info:
            await coll.bulk_write([InsertOne({"_id": i, "pad": pad}) for i in range(20)], ordered=ordered)
        details = info.value.details
        done = details["nInserted"]
        assert 0 < done < 20
        assert {e["code"] for e in details["writeErrors"]} == {16500}
        assert len(details["writeErrors"]) == (1 if ordered else 20 - done)
        sandbox.source.faults.ru_per_s = 0
        assert await coll.count_documents({}) == done


async def test_a_throttled_change_stream_answers_empty_pages_at_once(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    coll = source.db.c
    await coll.insert_one({"_id": 0})
    async with await watch(coll, max_await_time_ms=2000) as stream:
        await coll.insert_many([{"_id": i} for i in range(1, 4)])
        sandbox.source.faults.ru_per_s = 10
        await coll.insert_one({"_id": 4, "pad": "x" * 3000})  # 20 RU out of a budget of 10: spent for a second
        t0 = time.monotonic()
        assert await stream.try_next() is None  # four changes wait, yet the page is empty ...
        assert time.monotonic() - t0 < 1.0  # ... and came back without waiting maxAwaitTimeMS
        sandbox.source.faults.ru_per_s = 0
        assert len(await drain(stream, 4)) == 4
    assert (await source.admin.command("cosmigrateSandbox"))["requestUnits"]["feed"] > 3


@pytest.mark.parametrize("immediate", [False, True])
async def test_idle_get_mores_may_return_at_once(source: AsyncMongoClient, sandbox: Sandbox, immediate: bool) -> None:
    sandbox.source.faults.idle_getmore_immediate = immediate
    await source.db.c.insert_one({"_id": 0})
    async with await watch(source.db.c, max_await_time_ms=1500) as stream:
        t0 = time.monotonic()
        assert await stream.try_next() is None
        took = time.monotonic() - t0
    assert (took < 0.5) if immediate else (took >= 1.4)


# --- sharded collections --------------------------------------------------------------------------


async def test_a_sharded_collection_holds_one_id_per_shard_key_value(source: AsyncMongoClient) -> None:
    await source.admin.command("shardCollection", "db.s", key={"tenant": "hashed"})
    coll = source.db.s
    await coll.insert_one({"_id": 0})
    async with await watch(coll) as stream:
        await coll.insert_many([{"_id": 1, "tenant": "a", "v": 1}, {"_id": 1, "tenant": "b", "v": 2}])
        events = await drain(stream, 2)
    assert [list(e["documentKey"].items()) for e in events] == [[("tenant", "a"), ("_id", 1)],
                                                               [("tenant", "b"), ("_id", 1)]]
    assert sorted(d["v"] for d in await coll.find({"_id": 1}).to_list()) == [1, 2]
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"_id": 1, "tenant": "a"})
    with pytest.raises(OperationFailure) as info:  # the shard key value of a document never changes
        await coll.update_one({"_id": 1, "tenant": "a"}, {"$set": {"tenant": "c"}})
    assert info.value.code == 66
    await coll.update_one({"_id": 1, "tenant": "b"}, {"$set": {"v": 3}})
    assert await coll.find_one({"_id": 1, "tenant": "b"}) == {"_id": 1, "tenant": "b", "v": 3}
    await source.db.command({"customAction": "CreateCollection", "collection": "s2", "shardKey": "k"})
    await source.db.s2.insert_many([{"_id": 7, "k": 1}, {"_id": 7, "k": 2}])
    assert await source.db.s2.count_documents({"_id": 7}) == 2


# --- unique indexes, TTL and index kinds ----------------------------------------------------------


async def test_unique_indexes_only_on_empty_collections_and_blind_to_arrays(source: AsyncMongoClient,
                                                                           sandbox: Sandbox) -> None:
    await source.db.full.insert_one({"_id": 1, "e": "x"})
    with pytest.raises(OperationFailure, match="unique index cannot be modified"):
        await source.db.full.create_index("e", unique=True)
    await source.db.u.create_index("a.b", unique=True)
    await source.db.u.insert_one({"_id": 1, "a": {"b": 1}})
    with pytest.raises(DuplicateKeyError):  # outside arrays the index holds
        await source.db.u.insert_one({"_id": 2, "a": {"b": 1}})
    # Under an array Cosmos does not hold the value unique: both documents are accepted.
    await source.db.u.insert_many([{"_id": 3, "a": [{"b": 1}]}, {"_id": 4, "a": [{"b": 1}]}])
    assert await source.db.u.count_documents({}) == 3
    sandbox.source.faults.unique_nested_docs = True  # an account with EnableUniqueCompoundNestedDocs
    await source.db.n.create_index("a.b", unique=True)
    await source.db.n.insert_one({"_id": 1, "a": [{"b": 1}]})
    with pytest.raises(DuplicateKeyError):
        await source.db.n.insert_one({"_id": 2, "a": [{"b": 1}]})
    await source.admin.command("shardCollection", "db.sh", key={"k": "hashed"})
    with pytest.raises(OperationFailure, match="must include the shard key"):
        await source.db.sh.create_index("e", unique=True)
    await source.db.sh.create_index([("k", 1), ("e", 1)], unique=True)


@pytest.mark.parametrize("kind", ["sparse", "text", "2d", "hashed"])
async def test_index_kinds_cosmos_does_not_have_are_refused(source: AsyncMongoClient, kind: str) -> None:
    with pytest.raises(OperationFailure) as info:
        if kind == "sparse":
            await source.db.c.create_index("a", sparse=True)
        else:
            await source.db.c.create_index([("a", kind)])
    assert info.value.code == 67
    await source.db.c.create_index([("$**", 1)])  # wildcard indexes exist on Cosmos


async def test_ttl_on_ts_expires_documents_without_a_feed_event(source: AsyncMongoClient, sandbox: Sandbox) -> None:
    sandbox.source.faults.deletes_preview = True  # not even the delete preview shows an expiry
    coll = source.db.t
    await coll.create_index("_ts", expireAfterSeconds=3600)
    await coll.insert_many([{"_id": 1}, {"_id": 2, "ttl": -1}, {"_id": 3, "ttl": 7200}])
    delete_pipeline = [{"$match": {"operationType": {"$in": ["insert", "update", "replace", "delete"]}}},
                       {"$project": {"_id": 1, "fullDocument": 1, "ns": 1, "documentKey": 1, "operationType": 1}}]
    async with await watch(coll, delete_pipeline) as stream:
        sandbox.source.faults.ttl_clock_advance_s = 5000  # past the collection's hour, before document 3's two
        assert sorted(d["_id"] for d in await coll.find().to_list()) == [2, 3]
        assert await quiet(stream) == []
        sandbox.source.faults.ttl_clock_advance_s = 0
        await coll.insert_one({"_id": 4})
        assert [e["operationType"] for e in await drain(stream, 1)] == ["insert"]
    with pytest.raises(OperationFailure, match="EnableTtlOnCustomPath"):
        await source.db.u.create_index("expires", expireAfterSeconds=0)
    sandbox.source.faults.ttl_custom_path = True
    await source.db.u.create_index("expires", expireAfterSeconds=0)
    now = dt.datetime.now(dt.UTC)
    await source.db.u.insert_many([{"_id": 1, "expires": now + dt.timedelta(hours=1)},
                                   {"_id": 2, "expires": now + dt.timedelta(hours=3)}, {"_id": 3}])
    sandbox.source.faults.ttl_clock_advance_s = 7200
    assert sorted(d["_id"] for d in await source.db.u.find().to_list()) == [2, 3]


# --- smaller differences ------------------------------------------------------------------------


async def test_sessions_are_not_advertised(source: AsyncMongoClient) -> None:
    hello = await source.admin.command("hello")
    assert "logicalSessionTimeoutMinutes" not in hello
    await source.db.c.insert_one({"_id": 1})  # implicit sessions: the driver simply sends none
    with pytest.raises(ConfigurationError, match="Sessions are not supported"):
        async with source.start_session() as session:
            await source.db.c.find_one({"_id": 1}, session=session)


async def test_duplicate_field_names_survive_byte_for_byte(source: AsyncMongoClient) -> None:
    raw = _with_duplicate_fields({"_id": 1, "a": 1, "b": "x"}, "a", 2)
    coll = source.db.get_collection("d", codec_options=RAW)
    await coll.insert_one({"_id": 0})
    async with await coll.watch(PIPELINE, full_document="updateLookup", max_await_time_ms=200) as stream:
        await coll.insert_one(RawBSONDocument(raw))
        (event,) = await drain(stream, 1)
    assert bytes((await coll.find_one({"_id": 1})).raw) == raw
    assert bytes(event["fullDocument"].raw) == raw


def _with_duplicate_fields(doc: dict, name: str, value: object) -> bytes:
    """`doc` with a second `name` element appended (PyMongo never builds such documents itself)."""
    body = bson.encode(doc)[4:-1] + bson.encode({name: value})[4:-1]
    return (len(body) + 5).to_bytes(4, "little") + body + b"\x00"


# --- the DocumentDB target's part -------------------------------------------------------------


async def test_target_upsert_with_a_missing_filter_field_breaks_the_id_index(target: AsyncMongoClient) -> None:
    await target.db.c.insert_one({"_id": 1, "tenant": "a"})
    with pytest.raises(BulkWriteError) as info:
        await target.db.c.bulk_write([ReplaceOne({"tenant": "b", "_id": 1}, {"_id": 1, "tenant": "b"}, upsert=True)])
    (err,) = info.value.details["writeErrors"]
    assert err["code"] == 11000 and err["keyPattern"] == {"_id": 1}
    assert await target.db.c.find_one({"_id": 1}) == {"_id": 1, "tenant": "a"}


async def test_target_unique_indexes_are_multikey(target: AsyncMongoClient) -> None:
    await target.db.m.create_index("tags", unique=True)
    await target.db.m.insert_one({"_id": 1, "tags": ["x", "y"]})
    with pytest.raises(DuplicateKeyError) as info:
        await target.db.m.insert_one({"_id": 2, "tags": ["y", "z"]})
    assert info.value.details["keyValue"] == {"tags": "y"}
    await target.db.m.insert_one({"_id": 3, "tags": ["z", "z"]})  # one document may repeat its own entry
