"""The shared command surface of both emulators, and their robustness to bad input."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
import signal
import ssl
import struct
import sys
import uuid
from decimal import Decimal

import bson
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, ReplaceOne
from pymongo.errors import BulkWriteError, OperationFailure

from cosmigrate.sandbox import Sandbox

RAW = CodecOptions(document_class=RawBSONDocument)


def every_type_doc(i: int) -> dict:
    return {
        "_id": i,
        "small_int64": Int64(3),
        "int32": 7,
        "double": 1.5,
        "dec": Decimal128(Decimal("1.10")),
        "str": "héllo",
        "bin_generic": Binary(b"\x00\x01", 0),
        "bin_uuid": Binary(uuid.UUID(int=i).bytes, 4),
        "bin_user": Binary(b"x", 0x80),
        "oid": ObjectId(),
        "bool": True,
        "date": dt.datetime(2024, 5, 1, 12, 30, 0, 123000),
        "null": None,
        "regex": Regex("^a.*b$", "i"),
        "ts": Timestamp(1700000000, 5),
        "min": MinKey(),
        "max": MaxKey(),
        "code": Code("function(){}"),
        "nested": {"z": 1, "a": [1, [2, [3, {"deep": Int64(4)}]]]},
    }


async def test_documents_round_trip_byte_for_byte(source: AsyncMongoClient) -> None:
    coll = source.db.get_collection("c", codec_options=RAW)
    docs = [RawBSONDocument(bson.encode(every_type_doc(i))) for i in range(3)]
    await coll.insert_many(docs)
    got = [d async for d in coll.find().sort("_id", 1)]
    assert [d.raw for d in got] == [d.raw for d in docs]
    await coll.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs])
    again = await coll.find_one({"_id": 1})
    assert again.raw == docs[1].raw


async def test_ids_scan_in_bson_type_order(target: AsyncMongoClient) -> None:
    ids = [MaxKey(), "b", 2.5, ObjectId("0" * 24), {"k": 1}, None, True, 1, "a", Int64(2), MinKey(),
           dt.datetime(2020, 1, 1), Binary(b"z", 0)]
    await target.db.c.insert_many([{"_id": v} for v in ids])
    got = [d["_id"] async for d in target.db.c.find().sort("_id", 1)]
    names = [type(v).__name__ for v in got]
    assert names == ["MinKey", "NoneType", "int", "Int64", "float", "str", "str", "dict", "bytes",
                     "ObjectId", "bool", "datetime", "MaxKey"]
    assert got[5:7] == ["a", "b"]
    assert [d["_id"] async for d in target.db.c.find().sort("_id", -1)] == got[::-1]


async def test_numeric_ids_compare_across_types(target: AsyncMongoClient) -> None:
    await target.db.c.insert_one({"_id": 1, "v": "int"})
    with pytest.raises(OperationFailure):
        await target.db.c.insert_one({"_id": 1.0})
    assert await target.db.c.find_one({"_id": Int64(1)}) == {"_id": 1, "v": "int"}
    assert await target.db.c.find_one({"_id": True}) is None


async def test_range_scan_with_batches_and_getmore(target: AsyncMongoClient) -> None:
    await target.db.c.insert_many([{"_id": i, "v": i % 3} for i in range(1000)][::-1])
    cursor = target.db.c.find({"_id": {"$gte": 250, "$lt": 750}}).sort("_id", 1).batch_size(64)
    ids = [d["_id"] async for d in cursor]
    assert ids == list(range(250, 750))
    page = [d async for d in target.db.c.find({"_id": {"$gt": 990}}).sort("_id", 1).limit(5)]
    assert [d["_id"] for d in page] == [991, 992, 993, 994, 995]
    skipped = [d["_id"] async for d in target.db.c.find({"v": 1}).sort("_id", 1).skip(2).limit(3)]
    assert skipped == [7, 10, 13]


async def test_filters_and_projections(target: AsyncMongoClient) -> None:
    coll = target.db.c
    await coll.insert_many([
        {"_id": 1, "a": 5, "tags": ["x", "y"], "sub": {"k": "v"}, "s": "apple"},
        {"_id": 2, "a": 10, "tags": ["y"], "sub": {"k": "w"}, "s": "banana"},
        {"_id": 3, "a": "5", "s": "cherry"},
    ])

    async def ids(flt):
        return sorted([d["_id"] async for d in coll.find(flt)])

    assert await ids({"a": 5}) == [1]
    assert await ids({"a": {"$gt": 4}}) == [1, 2]
    assert await ids({"a": {"$in": [10, "5"]}}) == [2, 3]
    assert await ids({"a": {"$nin": [10]}}) == [1, 3]
    assert await ids({"tags": "y"}) == [1, 2]
    assert await ids({"tags": {"$size": 2}}) == [1]
    assert await ids({"sub.k": "w"}) == [2]
    assert await ids({"tags": {"$exists": False}}) == [3]
    assert await ids({"$or": [{"a": 10}, {"s": {"$regex": "^ch"}}]}) == [2, 3]
    assert await ids({"s": re.compile("AN", re.I)}) == [2]
    assert await ids({"$and": [{"a": {"$ne": 5}}, {"a": {"$type": "number"}}]}) == [2]
    assert await ids({"a": {"$not": {"$gt": 6}}}) == [1, 3]
    assert await coll.find_one({"_id": 1}, {"a": 1}) == {"_id": 1, "a": 5}
    assert await coll.find_one({"_id": 1}, {"a": 1, "_id": 0}) == {"a": 5}
    assert await coll.find_one({"_id": 1}, {"tags": 0, "sub": 0, "s": 0}) == {"_id": 1, "a": 5}
    assert await coll.find_one({"_id": 2}, {"sub.k": 1}) == {"_id": 2, "sub": {"k": "w"}}
    with pytest.raises(OperationFailure):
        await coll.find_one({"a": {"$bogus": 1}})


async def test_updates_upserts_and_deletes(target: AsyncMongoClient) -> None:
    coll = target.db.c
    r = await coll.update_one({"_id": 1}, {"$set": {"a.b": 1}, "$inc": {"n": 2}}, upsert=True)
    assert r.upserted_id == 1
    await coll.update_one({"_id": 1}, {"$push": {"l": 1}, "$unset": {"n": ""}})
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "a": {"b": 1}, "l": [1]}
    r = await coll.replace_one({"_id": 1}, {"x": 1})
    assert r.modified_count == 1
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "x": 1}
    r = await coll.update_one({"k": "new"}, {"$setOnInsert": {"s": 1}}, upsert=True)
    new = await coll.find_one({"_id": r.upserted_id})
    assert new["k"] == "new" and new["s"] == 1
    r = await coll.update_many({}, {"$set": {"all": True}})
    assert r.matched_count == 2
    with pytest.raises(OperationFailure) as info:
        await coll.replace_one({"_id": 1}, {"_id": 2})
    assert info.value.code == 66
    assert (await coll.delete_many({"all": True})).deleted_count == 2
    assert await coll.count_documents({}) == 0


async def test_count_and_aggregate_stages(target: AsyncMongoClient) -> None:
    coll = target.db.c
    await coll.insert_many([{"_id": i, "g": i % 2} for i in range(20)])
    assert await coll.count_documents({"g": 1}) == 10
    assert await coll.count_documents({}, skip=5, limit=3) == 3
    assert await coll.estimated_document_count() == 20
    agg = [d async for d in await coll.aggregate([{"$match": {"g": 0}}, {"$sort": {"_id": -1}}, {"$limit": 2}, {"$project": {"g": 0}}])]
    assert agg == [{"_id": 18}, {"_id": 16}]
    sample = [d async for d in await coll.aggregate([{"$sample": {"size": 5}}])]
    assert len({d["_id"] for d in sample}) == 5
    total = [d async for d in await coll.aggregate([{"$group": {"_id": None, "n": {"$sum": 1}}}])]
    assert total == [{"_id": None, "n": 20}]


async def test_databases_collections_and_indexes(target: AsyncMongoClient) -> None:
    await target.db1.create_collection("a")
    await target.db1.b.insert_one({"_id": 1})
    await target.db2.c.insert_one({"_id": 1})
    assert await target.list_database_names() == ["db1", "db2"]
    assert sorted(await target.db1.list_collection_names()) == ["a", "b"]
    with pytest.raises(OperationFailure) as info:
        await target.db1.command("create", "a")
    assert info.value.code == 48
    name = await target.db1.b.create_index([("x", 1), ("y", -1)], unique=True)
    info = await target.db1.b.index_information()
    assert info[name]["key"] == [("x", 1), ("y", -1)] and info[name]["unique"]
    await target.db1.b.drop_index(name)
    assert list(await target.db1.b.index_information()) == ["_id_"]
    await target.db1.drop_collection("a")
    await target.drop_database("db2")
    assert await target.list_database_names() == ["db1"]
    assert sorted(await target.db1.list_collection_names()) == ["b"]


async def test_unknown_command_is_command_not_found(source: AsyncMongoClient) -> None:
    with pytest.raises(OperationFailure) as info:
        await source.admin.command("frobnicate")
    assert info.value.code == 59


async def test_kill_cursors(target: AsyncMongoClient) -> None:
    await target.db.c.insert_many([{"_id": i} for i in range(300)])
    cursor = target.db.c.find().batch_size(10)
    await cursor.next()
    await cursor.close()
    reply = await target.db.command({"find": "c", "batchSize": 5})
    cid = reply["cursor"]["id"]
    killed = await target.db.command({"killCursors": "c", "cursors": [cid]})
    assert killed["cursorsKilled"] == [cid]
    with pytest.raises(OperationFailure) as info:
        await target.db.command({"getMore": cid, "collection": "c"})
    assert info.value.code == 43


# --- bad input --------------------------------------------------------------------


async def _roundtrip(host: str, port: int, payload: bytes, read: bool = True, ca_file: str = "") -> bytes:
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else None  # the target serves TLS
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(payload)
        await writer.drain()
        if not read:
            return b""
        return await asyncio.wait_for(reader.read(1 << 16), 5)
    finally:
        writer.close()


def _op_msg(body: bytes, request_id: int = 1) -> bytes:
    payload = b"\x00\x00\x00\x00\x00" + body
    return struct.pack("<iiii", 16 + len(payload), request_id, 0, 2013) + payload


@pytest.mark.parametrize(
    "payload,expect_reply",
    [
        (b"\xff" * 16, False),  # impossible length
        (struct.pack("<iiii", 100, 1, 0, 9999) + b"\x00" * 84, False),  # unknown opcode
        (_op_msg(b"\x05\x00\x00\x00\x01"), True),  # bad BSON terminator
        (_op_msg(struct.pack("<i", 200) + b"\x10a\x00" + b"\x00" * 4), True),  # lying length
        (_op_msg(struct.pack("<i", 12) + b"\x7a" + b"x\x00" + b"\x00" * 5), True),  # unknown element type
        (struct.pack("<iiii", 22, 1, 0, 2013) + b"\x00\x00\x00\x00\x09\x00", True),  # unknown section kind
        # a well-framed OP_MSG whose body is random garbage
        (struct.pack("<iiii", 16 + 4096, 1, 0, 2013) + random.Random(3).randbytes(4096), None),
    ],
)
async def test_malformed_messages_never_stop_the_server(
    sandbox: Sandbox, target: AsyncMongoClient, payload: bytes, expect_reply: bool | None
) -> None:
    reply = await _roundtrip(sandbox.target.host, sandbox.target.port, payload, ca_file=sandbox.target_ca_file)
    if expect_reply is None:
        assert reply == b"" or bson.decode(reply[21:])["ok"] == 0
    elif expect_reply:
        assert len(reply) > 21
        doc = bson.decode(reply[21:])
        assert doc["ok"] == 0 and doc["code"] == 22, doc
    # Either way, other clients are still served.
    await target.db.c.insert_one({"_id": 1})
    assert await target.db.c.find_one() == {"_id": 1}


async def test_legacy_op_query_hello_is_answered(sandbox: Sandbox) -> None:
    q = bson.encode({"isMaster": 1})
    payload = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + q
    msg = struct.pack("<iiii", 16 + len(payload), 5, 0, 2004) + payload
    reply = await _roundtrip(sandbox.source.host, sandbox.source.port, msg)
    length, _, response_to, op_code = struct.unpack_from("<iiii", reply)
    assert (op_code, response_to, length) == (1, 5, len(reply))
    doc = bson.decode(reply[36:])
    assert doc["ismaster"] is True and doc["setName"] == "globaldb" and doc["maxWireVersion"] >= 9


async def test_sandbox_command_prints_uris_and_stops_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "sandbox", "--faults", "retry_after_ms=5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        source_uri = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        target_uri = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        ca_file = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
        assert source_uri.startswith("mongodb://127.0.0.1:") and "replicaSet=globaldb" in source_uri
        assert target_uri.startswith("mongodb://127.0.0.1:") and "replicaSet=rs0" in target_uri
        assert "tls=true" in target_uri and ca_file.endswith("-ca.pem")
        client: AsyncMongoClient = AsyncMongoClient(target_uri, tlsCAFile=ca_file)
        await client.db.c.insert_one({"_id": 1})
        assert await client.db.c.count_documents({}) == 1
        await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sandbox_command_refuses_a_bad_fault_spec() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "sandbox", "--faults", "nonsense=1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "unknown fault 'nonsense'" in lines[0]
    assert "Traceback" not in err.decode()


# --- document sizes -----------------------------------------------------------------

MAX_BSON = 16 * 1024 * 1024


@pytest.fixture(params=["source", "target"])
def either(request: pytest.FixtureRequest) -> AsyncMongoClient:
    """Each emulator in turn: both share storage and CRUD, and must agree."""
    return request.getfixturevalue(request.param)


def doc_of_size(doc_id: int, size: int, salt: int = 0) -> RawBSONDocument:
    """A raw document of exactly `size` BSON bytes.

    Its fields hold the type bytes DocumentDB's unsupported-type scan looks for
    (0x06, 0x0c-0x0f) as plain values, so that scan walks the whole document.
    """
    base = {"_id": doc_id, "n": Int64(13), "sub": {"k": 14, "s": "\x0c\x0e"}, "pad": Binary(b"")}
    empty = len(bson.encode(base))
    pattern = bytes((i * 7 + salt) % 256 for i in range(256))
    pad = (pattern * (size // 256 + 1))[: size - empty]
    raw = bson.encode({**base, "pad": Binary(pad)})
    assert len(raw) == size
    return RawBSONDocument(raw)


@pytest.mark.parametrize("size", [3 * 1024, 5 * 1024, 100 * 1024, 2 * 1024 * 1024, MAX_BSON])
async def test_documents_of_any_valid_size_round_trip_byte_for_byte(either: AsyncMongoClient, size: int) -> None:
    # PyMongo hands a nested raw document of 4 KiB or more over as a memoryview;
    # the server must still store and return exactly the bytes that were sent.
    coll = either.db.get_collection("big", codec_options=RAW)
    first, second = doc_of_size(1, size), doc_of_size(1, size, salt=1)
    result = await coll.bulk_write([ReplaceOne({"_id": 1}, first, upsert=True)])
    assert result.upserted_count == 1
    assert (await coll.find_one({"_id": 1})).raw == first.raw
    result = await coll.bulk_write([ReplaceOne({"_id": 1}, second, upsert=True)])
    assert result.modified_count == 1
    assert (await coll.find_one({"_id": 1})).raw == second.raw
    third = doc_of_size(2, size, salt=2)
    await coll.insert_many([third])
    assert [d.raw async for d in coll.find().sort("_id", 1)] == [second.raw, third.raw]


async def test_documents_over_16_mib_are_refused_like_mongod(either: AsyncMongoClient) -> None:
    coll = either.db.get_collection("big", codec_options=RAW)
    await coll.insert_one({"_id": 1})
    too_big = MAX_BSON + 1
    cases = [
        (coll.insert_many([doc_of_size(2, too_big)]), 2, "object to insert too large"),
        (coll.bulk_write([ReplaceOne({"_id": 3}, doc_of_size(3, too_big), upsert=True)]),
         17420, "Document to upsert is larger than 16777216"),
        (coll.bulk_write([ReplaceOne({"_id": 1}, doc_of_size(1, too_big), upsert=True)]),
         17419, "Resulting document after update is larger than 16777216"),
    ]
    for write, code, message in cases:
        with pytest.raises(BulkWriteError) as info:
            await write
        (error,) = info.value.details["writeErrors"]
        assert (error["index"], error["code"]) == (0, code)
        assert message in error["errmsg"]
    assert [d.raw async for d in coll.find()] == [bson.encode({"_id": 1})]


async def test_a_reply_batch_stops_before_16_mib_like_mongod(either: AsyncMongoClient) -> None:
    coll = either.db.get_collection("big", codec_options=RAW)
    docs = [doc_of_size(i, 9 * 1024 * 1024, salt=i) for i in range(3)]
    await coll.insert_many(docs)
    reply = await either.db.command("find", "big", batchSize=10, codec_options=RAW)
    assert len(reply["cursor"]["firstBatch"]) == 1 and reply["cursor"]["id"] != 0
    assert [d.raw async for d in coll.find().sort("_id", 1).batch_size(10)] == [d.raw for d in docs]


# --- dates outside Python's years 1-9999 --------------------------------------------------

AUTO_DATES = CodecOptions(document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
YEAR_1_MS = -62_135_596_800_000  # 0001-01-01T00:00:00Z
YEAR_10000_MS = 253_402_300_800_000  # 10000-01-01T00:00:00Z
EDGE_DATES_MS = [-(2**62), YEAR_1_MS - 1, YEAR_1_MS, 0, YEAR_10000_MS - 1, YEAR_10000_MS, 2**62]


async def test_dates_outside_years_1_to_9999_are_kept_raw(either: AsyncMongoClient) -> None:
    # BSON dates are any int64 of milliseconds; a server must store, match, sort
    # and return them unchanged however far they are from year 1-9999.
    coll = either.db.get_collection("dates", codec_options=AUTO_DATES)
    docs = {
        ms: RawBSONDocument(
            bson.encode({"_id": DatetimeMS(ms), "at": DatetimeMS(ms), "in": {"l": [DatetimeMS(ms)]}}), AUTO_DATES
        )
        for ms in EDGE_DATES_MS
    }
    await coll.insert_many(list(docs.values())[::-1])
    for ms, doc in docs.items():
        assert (await coll.find_one({"_id": DatetimeMS(ms)})).raw == doc.raw
        assert (await coll.find_one({"at": DatetimeMS(ms)})).raw == doc.raw
        assert (await coll.find_one({"in.l": DatetimeMS(ms)})).raw == doc.raw
    in_order = [d.raw for d in docs.values()]
    assert [d.raw async for d in coll.find().sort("_id", 1)] == in_order
    assert [d.raw async for d in coll.find().sort("at", -1)] == in_order[::-1]
    before_year_1 = [d.raw async for d in coll.find({"at": {"$lt": DatetimeMS(YEAR_1_MS)}}).sort("_id", 1)]
    assert before_year_1 == in_order[:2]
    with pytest.raises(BulkWriteError) as info:
        await coll.insert_many([docs[2**62]])
    assert info.value.details["writeErrors"][0]["code"] == 11000

    far = DatetimeMS(-(2**62))
    replacement = RawBSONDocument(bson.encode({"_id": far, "at": DatetimeMS(YEAR_10000_MS), "v": 2}), AUTO_DATES)
    result = await coll.bulk_write([ReplaceOne({"_id": far}, replacement, upsert=True)])
    assert result.modified_count == 1
    assert (await coll.find_one({"_id": far})).raw == replacement.raw
    await coll.update_one({"_id": far}, {"$set": {"v": 3}})
    updated = bson.encode({"_id": far, "at": DatetimeMS(YEAR_10000_MS), "v": 3})
    assert (await coll.find_one({"_id": far})).raw == updated
    new = DatetimeMS(YEAR_10000_MS + 1)
    result = await coll.bulk_write([ReplaceOne({"_id": new}, {"_id": new, "v": 1}, upsert=True)])
    assert result.upserted_ids == {0: new}


# --- which values are one _id --------------------------------------------------------------


def _raw(doc: dict) -> bytes:
    return bson.encode(doc)


async def _dup_codes(coll, docs: list[dict]) -> list[int]:
    """The write error codes of an unordered insert of `docs` (one per refused document)."""
    try:
        await coll.insert_many(docs, ordered=False)
    except BulkWriteError as exc:
        return [e["code"] for e in exc.details["writeErrors"]]
    return []


async def test_numerically_equal_ids_are_one_document(either: AsyncMongoClient) -> None:
    coll = either.db.get_collection("ids", codec_options=RAW)
    await coll.insert_one({"_id": 1, "v": "int32"})
    equal_ids = [1.0, Int64(1), Decimal128("1"), Decimal128("1.0"), Decimal128("1E0")]
    assert await _dup_codes(coll, [{"_id": i} for i in equal_ids]) == [11000] * len(equal_ids)
    for i in equal_ids:
        assert (await coll.find_one({"_id": i})).raw == _raw({"_id": 1, "v": "int32"})
        assert (await coll.find_one({"_id": {"$in": [i]}, "v": "int32"})) is not None
    # An upsert under an equal _id replaces that document, and mongod stores the
    # replacement as given: its own _id (checked equal by value) comes along.
    result = await coll.bulk_write([ReplaceOne({"_id": Int64(1)}, {"_id": Int64(1), "v": "int64"}, upsert=True)])
    assert (result.matched_count, result.upserted_count) == (1, 0)
    assert [d.raw async for d in coll.find()] == [_raw({"_id": Int64(1), "v": "int64"})]
    # A replacement without _id keeps the stored one.
    await coll.replace_one({"_id": Decimal128("1.0")}, {"v": "kept"})
    assert [d.raw async for d in coll.find()] == [_raw({"_id": Int64(1), "v": "kept"})]
    # $set of an equal number of another type is a change (mongod's no-op test is binary).
    result = await coll.update_one({"_id": 1}, {"$set": {"v": 2}})
    result = await coll.update_one({"_id": 1}, {"$set": {"v": 2.0}})
    assert result.modified_count == 1
    assert (await coll.find_one({"_id": 1})).raw == _raw({"_id": Int64(1), "v": 2.0})
    assert await coll.count_documents({}) == 1


async def test_equal_and_unequal_ids_beyond_plain_numbers(either: AsyncMongoClient) -> None:
    coll = either.db.ids
    await coll.insert_many([{"_id": -0.0}, {"_id": {"a": 1, "b": [1, 2]}}, {"_id": Int64(2**53 + 1)},
                            {"_id": [float("nan"), -0.0]}])
    equal = [0, Decimal128("-0"), Decimal128("0E+10"), {"a": 1.0, "b": [Int64(1), Decimal128("2.0")]},
             Decimal128("9007199254740993"), [Decimal128("NaN"), 0]]
    assert await _dup_codes(coll, [{"_id": i} for i in equal]) == [11000] * len(equal)
    # Not equal: precision beyond a double, field order, bool vs number, string vs number.
    distinct = [float(2**53), {"b": [1, 2], "a": 1}, {"a": 1}, False, True, "0", Decimal128("0.1"), 0.1]
    assert await _dup_codes(coll, [{"_id": i} for i in distinct]) == []
    assert await coll.count_documents({}) == 4 + len(distinct)
    assert (await coll.find_one({"_id": Int64(2**53)}))["_id"] == float(2**53)
    assert (await coll.find_one({"_id": {"a": Int64(1), "b": [1.0, 2]}}))["_id"] == {"a": 1, "b": [1, 2]}
    assert (await coll.find_one({"_id": 0.0}))["_id"] == 0.0
    assert (await coll.find_one({"_id": Decimal128("0.1")}))["_id"] == Decimal128("0.1")


async def test_nan_id_is_one_document(either: AsyncMongoClient) -> None:
    coll = either.db.get_collection("nan", codec_options=RAW)
    nan = float("nan")
    first = await coll.replace_one({"_id": nan}, {"_id": nan, "v": 1}, upsert=True)
    second = await coll.replace_one({"_id": float("nan")}, {"_id": float("nan"), "v": 2}, upsert=True)
    assert first.upserted_id is not None and second.upserted_id is None and second.matched_count == 1
    assert [d.raw async for d in coll.find()] == [_raw({"_id": nan, "v": 2})]
    assert (await coll.find_one({"_id": Decimal128("NaN")})).raw == _raw({"_id": nan, "v": 2})
    assert await _dup_codes(coll, [{"_id": float("nan")}, {"_id": Decimal128("NaN")}]) == [11000, 11000]
    await coll.delete_one({"_id": Decimal128("-NaN")})
    assert await coll.count_documents({}) == 0


async def test_nan_in_filters_matches_only_nan(either: AsyncMongoClient) -> None:
    coll = either.db.nanq
    await coll.insert_many([{"_id": 1, "x": float("nan")}, {"_id": 2, "x": float("-inf")}, {"_id": 3, "x": 1},
                            {"_id": 4, "x": Decimal128("NaN")}])

    async def ids(flt: dict) -> list:
        return [d["_id"] async for d in coll.find(flt).sort("_id", 1)]

    assert await ids({"x": float("nan")}) == [1, 4]
    assert await ids({"x": {"$in": [Decimal128("NaN")]}}) == [1, 4]
    assert await ids({"x": {"$lt": 5}}) == [2, 3]  # NaN sorts first but $lt never matches it
    assert await ids({"x": {"$gt": float("nan")}}) == []
    assert await ids({"x": {"$gte": float("nan")}}) == [1, 4]
    assert await ids({"x": {"$ne": float("nan")}}) == [2, 3]
    assert [d["_id"] async for d in coll.find().sort([("x", 1), ("_id", 1)])] == [1, 4, 2, 3]
