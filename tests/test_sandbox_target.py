"""The DocumentDB emulator's refusals and faults, through the real PyMongo client."""

from __future__ import annotations

import asyncio
import struct

import bson
import pytest
from bson import Decimal128, Int64
from bson.code import Code
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, InsertOne, ReplaceOne
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    NotPrimaryError,
    OperationFailure,
    WriteError,
)

from cosmigrate import versions
from cosmigrate.sandbox import Sandbox


async def test_unique_index_gives_e11000_with_the_usual_shape(target: AsyncMongoClient) -> None:
    coll = target.db.users
    await coll.create_index("email", unique=True)
    await coll.insert_one({"_id": 1, "email": "a@x"})
    with pytest.raises(DuplicateKeyError) as info:
        await coll.insert_one({"_id": 2, "email": "a@x"})
    assert info.value.code == 11000
    assert "E11000 duplicate key error collection: db.users index: email_1" in str(info.value)
    with pytest.raises(BulkWriteError) as bulk:
        await coll.bulk_write(
            [ReplaceOne({"_id": 3}, {"_id": 3, "email": "a@x"}, upsert=True),
             ReplaceOne({"_id": 4}, {"_id": 4, "email": "b@x"}, upsert=True)],
            ordered=False,
        )
    (err,) = bulk.value.details["writeErrors"]
    assert err["index"] == 0 and err["code"] == 11000
    assert err["keyPattern"] == {"email": 1} and err["keyValue"] == {"email": "a@x"}
    assert await coll.count_documents({}) == 2


async def test_unique_index_frees_a_value_when_its_holder_moves_on(target: AsyncMongoClient) -> None:
    coll = target.db.users
    await coll.create_index("email", unique=True)
    await coll.insert_many([{"_id": 1, "email": "a"}, {"_id": 2, "email": "b"}])
    await coll.replace_one({"_id": 1}, {"_id": 1, "email": "c"})
    await coll.replace_one({"_id": 2}, {"_id": 2, "email": "a"})
    await coll.delete_one({"_id": 2})
    await coll.insert_one({"_id": 3, "email": "a"})
    with pytest.raises(OperationFailure) as info:
        await coll.create_index("email2", unique=True)  # all missing -> all null -> duplicates
    assert info.value.code == 11000


async def test_sparse_and_partial_unique_indexes(target: AsyncMongoClient) -> None:
    coll = target.db.s
    await coll.create_index("k", unique=True, sparse=True)
    await coll.insert_many([{"_id": 1}, {"_id": 2}])  # missing keys are not indexed
    await coll.create_index("p", unique=True, partialFilterExpression={"on": True}, name="p_on")
    await coll.insert_many([{"_id": 3, "p": 1}, {"_id": 4, "p": 1}])
    await coll.insert_one({"_id": 5, "p": 1, "on": True})
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"_id": 6, "p": 1, "on": True})


async def test_unique_index_treats_equal_values_as_one_key(target: AsyncMongoClient) -> None:
    # A unique index keys values as mongod compares them: numbers by value across
    # types, every NaN alike, -0.0 as 0, sub-documents field by field.
    coll = target.db.u
    await coll.create_index("e", unique=True)
    held = [5, float("nan"), -0.0, {"a": 1}, Int64(2**53 + 1), float(2**53)]
    await coll.insert_many([{"_id": i, "e": v} for i, v in enumerate(held)])
    clashing = [5.0, Decimal128("5.0"), Int64(5), Decimal128("NaN"), float("nan"), 0, Decimal128("0"),
                {"a": 1.0}, Decimal128("9007199254740993"), Int64(2**53)]
    for i, value in enumerate(clashing, start=100):
        with pytest.raises(DuplicateKeyError) as info:
            await coll.insert_one({"_id": i, "e": value})
        assert info.value.code == 11000
    with pytest.raises(BulkWriteError) as bulk:
        await coll.bulk_write([ReplaceOne({"_id": 200}, {"_id": 200, "e": Decimal128("NaN")}, upsert=True)])
    assert bulk.value.details["writeErrors"][0]["code"] == 11000
    assert await coll.count_documents({}) == len(held)
    # Building a unique index over equal values fails the same way.
    await target.db.v.insert_many([{"_id": 1, "e": float("nan")}, {"_id": 2, "e": Decimal128("-NaN")}])
    with pytest.raises(OperationFailure) as built:
        await target.db.v.create_index("e", unique=True)
    assert built.value.code == 11000


async def test_retryable_write_is_refused(sandbox: Sandbox) -> None:
    uri = sandbox.target_uri.replace("retryWrites=false", "retryWrites=true")
    client: AsyncMongoClient = AsyncMongoClient(uri, tlsCAFile=sandbox.target_ca_file)
    try:
        with pytest.raises(OperationFailure) as info:
            await client.db.c.insert_one({"_id": 1})
        assert info.value.code == 9
        assert "Unrecognized field: 'txnNumber'" in str(info.value)
    finally:
        await client.close()


async def test_more_than_100000_writes_in_one_command_is_refused(target: AsyncMongoClient) -> None:
    hello = await target.admin.command("hello")
    assert hello["maxWriteBatchSize"] == 100_000
    docs = [{"_id": i} for i in range(100_001)]
    with pytest.raises(OperationFailure) as info:
        await target.db.command({"insert": "c", "documents": docs})
    assert "between 1 and 100000" in str(info.value)
    # PyMongo itself splits a larger bulk into commands the server accepts.
    result = await target.db.c.bulk_write([InsertOne(d) for d in docs])
    assert result.inserted_count == 100_001


@pytest.mark.parametrize(
    "keys,kwargs",
    [
        ([("loc", "2d")], {}),
        ([("h", "hashed")], {}),
        ([("$**", 1)], {}),
        ([("a.$**", 1)], {}),
        ([("a", 1)], {"collation": {"locale": "fr"}}),
    ],
)
async def test_unsupported_index_types_are_refused(target: AsyncMongoClient, keys, kwargs) -> None:
    with pytest.raises(OperationFailure) as info:
        await target.db.c.create_index(keys, **kwargs)
    assert info.value.code == 67


async def test_text_and_partial_indexes_depend_on_the_version() -> None:
    # DocumentDB 4.0 reports wire version 7, which the pinned PyMongo refuses: it is asked over a bare socket.
    specs = [{"key": {"t": "text"}, "name": "t_text"}, {"key": {"p": 1}, "name": "p_1", "partialFilterExpression": {"p": {"$gt": 1}}}]
    async with Sandbox(target_version="4.0.0", target_tls=False) as old, \
            Sandbox(target_version="5.0.0", target_tls=False) as new:
        for sb, refused in ((old, True), (new, False)):
            for spec in specs:
                _, reply = await versions.command(sb.target.host, sb.target.port,
                                                  [{"isMaster": 1}, {"createIndexes": "c", "indexes": [spec], "$db": "db"}])
                assert (reply["ok"] == 0) == refused, reply
                if refused:
                    assert reply["code"] == 67 and "5.0" in reply["errmsg"], reply


async def test_capped_collections_are_refused(target: AsyncMongoClient) -> None:
    with pytest.raises(OperationFailure):
        await target.db.create_collection("capped", capped=True, size=4096)


def _raw_doc(elements: bytes) -> RawBSONDocument:
    body = b"\x10_id\x00" + struct.pack("<i", 1) + elements + b"\x00"
    return RawBSONDocument(struct.pack("<i", len(body) + 4) + body)


def _str_value(s: bytes) -> bytes:
    return struct.pack("<i", len(s) + 1) + s + b"\x00"


@pytest.mark.parametrize(
    "element,name",
    [
        (b"\x06undef\x00", "Undefined"),
        (b"\x0esym\x00" + _str_value(b"abc"), "Symbol"),
        (b"\x0dcode\x00" + _str_value(b"function(){}"), "JavaScript"),
        (b"\x0cptr\x00" + _str_value(b"db.c") + b"\x01" * 12, "DBPointer"),
        # nested inside a sub-document
        (b"\x03sub\x00" + struct.pack("<i", 4 + 1 + 6 + 1) + b"\x06inner\x00" + b"\x00", "Undefined"),
    ],
)
async def test_unsupported_bson_types_are_refused(target: AsyncMongoClient, element: bytes, name: str) -> None:
    with pytest.raises(WriteError) as info:
        await target.db.c.insert_one(_raw_doc(element))
    assert name in str(info.value)
    assert await target.db.c.count_documents({}) == 0


async def test_javascript_code_from_pymongo_is_refused(target: AsyncMongoClient) -> None:
    with pytest.raises(WriteError, match="JavaScript"):
        await target.db.c.replace_one({"_id": 1}, {"_id": 1, "f": Code("return 1")}, upsert=True)


async def test_failover_gives_transient_errors_then_recovers(target: AsyncMongoClient, sandbox: Sandbox) -> None:
    await target.db.c.insert_one({"_id": 0})
    sandbox.target.faults.failover(0.6)
    errors = 0
    written = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while written < 5 and loop.time() < deadline:
        try:
            await target.db.c.insert_one({"_id": written + 1})
            written += 1
        except (AutoReconnect, NotPrimaryError, OperationFailure) as exc:
            assert not isinstance(exc, OperationFailure) or exc.code == 10107
            errors += 1
            await asyncio.sleep(0.05)
    assert errors >= 1
    assert written == 5
    assert await target.db.c.count_documents({}) == 6


async def test_slow_writes_delay_writes_but_not_reads(target: AsyncMongoClient, sandbox: Sandbox) -> None:
    await target.db.c.insert_one({"_id": 0})
    sandbox.target.faults.slow_write_ms = 2000
    write = asyncio.ensure_future(target.db.c.insert_one({"_id": 1}))
    # A read on another connection is answered while the write is still held.
    assert await target.db.c.find_one({"_id": 0}) == {"_id": 0}
    assert not write.done()
    sandbox.target.faults.slow_write_ms = 0
    await asyncio.wait_for(write, 10)
    assert await target.db.c.count_documents({}) == 2


async def test_write_counter_counts_documents(target: AsyncMongoClient, sandbox: Sandbox) -> None:
    before = (await target.admin.command("cosmigrateSandbox"))["writes"]
    await target.db.c.insert_many([{"_id": i} for i in range(5)])
    await target.db.c.delete_many({"_id": {"$lt": 2}})
    stats = await target.admin.command("cosmigrateSandbox")
    assert stats["writes"] - before == 7 == sandbox.target.store.writes - before


async def test_faults_can_be_set_over_the_wire(target: AsyncMongoClient, sandbox: Sandbox) -> None:
    await target.admin.command({"cosmigrateSandbox": 1, "faults": {"slow_write_ms": 5}})
    assert sandbox.target.faults.slow_write_ms == 5
    with pytest.raises(OperationFailure, match="unknown fault"):
        await target.admin.command({"cosmigrateSandbox": 1, "faults": {"nope": 1}})


def test_bson_round_trip_sanity() -> None:
    doc = {"_id": 1, "x": bson.Int64(2)}
    assert bson.decode(bson.encode(doc))["x"].__class__ is bson.Int64
