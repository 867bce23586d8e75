"""Narrow unit tests: raw event slicing, collapsing, and the writer gate's stop guarantee."""

from __future__ import annotations

import asyncio
import datetime as dt

import bson
import pytest
from bson import Int64
from bson.datetime_ms import DatetimeMS
from bson.raw_bson import RawBSONDocument

from cosmigrate.apply import Op, WriterGate, collapse
from cosmigrate.batchfile import Batch, BatchHeader
from cosmigrate.mongo import RAW, event_parts
from cosmigrate.sandbox.cosmos import make_token

TOKEN = make_token("rid", 7)


def event(key, doc=None, op: str | None = None, order: str = "cosmos") -> bytes:
    fields: dict = {"_id": TOKEN}
    if order == "cosmos":
        if op:
            fields["operationType"] = op
        if doc is not None:
            fields["fullDocument"] = doc
        fields["ns"] = {"db": "d", "coll": "c"}
        fields["documentKey"] = {"_id": key}
    else:
        fields["documentKey"] = {"_id": key}
        fields["ns"] = {"db": "d", "coll": "c"}
        fields["fullDocument"] = doc
    return bson.encode(fields)


def test_event_parts_slices_without_decoding_and_falls_back_when_needed() -> None:
    doc = {"_id": "a", "n": Int64(1), "when": dt.datetime(2026, 1, 1)}
    for raw in (event("a", doc), event("a", doc, order="other")):
        key, full = event_parts(raw)
        assert key == bson.encode({"_id": "a"})
        assert full == bson.encode(doc)
    key, full = event_parts(event(5, op="delete"))
    assert key == bson.encode({"_id": 5}) and full is None


def _batch(seq: int, events: list[bytes]) -> Batch:
    now = dt.datetime.now(dt.UTC)
    header = BatchHeader("c", "d.c", seq, len(events), now, now, RawBSONDocument(bson.encode(TOKEN)), sum(map(len, events)))
    return Batch(header, events, "")


def test_collapse_keeps_the_last_event_per_document() -> None:
    carried_key = bson.encode({"_id": "kept"})
    overridden = bson.encode({"_id": 1})
    carried = {
        carried_key: Op(carried_key, RawBSONDocument(carried_key), RawBSONDocument(bson.encode({"_id": "kept"})), 0),
        overridden: Op(overridden, RawBSONDocument(overridden), RawBSONDocument(bson.encode({"_id": 1, "v": 0})), 0),
    }
    ops = collapse([_batch(1, [event(1, {"_id": 1, "v": 1}), event(2, {"_id": 2, "v": 1})]),
                    _batch(2, [event(1, {"_id": 1, "v": 2}), event(2, op="delete")])], carried)
    by_key = {op.key: op for op in ops.values()}  # ops are keyed by document identity (see test_identity.py)
    assert len(ops) == 3 and set(by_key) == {carried_key, overridden, bson.encode({"_id": 2})}
    assert bson.decode(by_key[overridden].doc.raw) == {"_id": 1, "v": 2} and by_key[overridden].origin_seq == 2
    assert by_key[bson.encode({"_id": 2})].doc is None  # the delete won
    assert by_key[carried_key].origin_seq == 0  # untouched carried write stays


async def test_writer_gate_stop_waits_for_the_write_in_flight() -> None:
    gate = WriterGate(started=True)
    release = asyncio.Event()
    entered = asyncio.Event()
    order: list[str] = []

    async def write() -> None:
        async with gate.writing():
            order.append("write started")
            entered.set()
            await release.wait()
            order.append("write finished")

    writer = asyncio.create_task(write())
    await asyncio.wait_for(entered.wait(), 5)
    stopper = asyncio.create_task(gate.stop())
    await asyncio.sleep(0)
    assert not stopper.done()  # stop() is still waiting for the bulk write
    release.set()
    await stopper
    order.append("stop returned")
    assert order == ["write started", "write finished", "stop returned"]
    blocked = asyncio.create_task(write())
    for _ in range(20):  # give it every chance to run: it must stay parked at the gate
        await asyncio.sleep(0)
    assert order[-1] == "stop returned" and not blocked.done()  # nothing starts while stopped
    gate.start()
    release.set()
    await asyncio.wait_for(blocked, 5)
    await writer
    assert order[-2:] == ["write started", "write finished"]


# --- datetimes outside years 1-9999 stay raw ----------------------------------------------

FAR = DatetimeMS(253402300800000 + 86_400_000)  # 10000-01-02, valid BSON, no Python datetime
EARLY = DatetimeMS(-62135596800000 - 86_400_000)  # year 0


def test_out_of_range_datetimes_survive_collapse_op_building_and_error_text() -> None:
    raw_doc = bson.encode({"_id": FAR, "when": EARLY, "n": 1})
    key = bson.encode({"_id": FAR})
    doc = RawBSONDocument(raw_doc, RAW)
    for order in ("cosmos", "other"):  # the sliced fast path and the decoding fallback
        assert event_parts(event(FAR, doc, order=order)) == (key, raw_doc)
    ops = collapse([_batch(0, [event(FAR, doc)])], {})
    op = ops[key]
    assert op.filter["_id"] == FAR and op.doc is not None and op.doc["when"] == EARLY
    assert op.doc.raw == raw_doc  # byte for byte
    request = op.request()
    assert request._filter["_id"] == FAR and request._doc.raw == raw_doc  # type: ignore[union-attr]
    shown = op.show_id()
    assert shown == '{"$date": {"$numberLong": "253402387200000"}}'
    assert str(int(EARLY)) not in shown  # only the _id, never a field value


def test_the_data_path_decodes_with_datetime_auto() -> None:
    from bson.codec_options import DatetimeConversion
    from pymongo import AsyncMongoClient

    from cosmigrate.mongo import event_token, raw_collection, source_client, target_client

    assert RAW.datetime_conversion == DatetimeConversion.DATETIME_AUTO
    for make in (source_client, target_client):
        client = make("mongodb://127.0.0.1:1", connect=False)
        assert client.codec_options.datetime_conversion == DatetimeConversion.DATETIME_AUTO
        assert client.codec_options.document_class is RawBSONDocument
    plain: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:1", connect=False)
    assert raw_collection(plain, "d.c").codec_options == RAW
    token_second = bson.encode({"documentKey": {"_id": FAR}, "_id": {"when": FAR}})
    assert event_token(token_second) == bson.encode({"when": FAR})


async def test_all_is_gather_without_orphans() -> None:
    from cosmigrate.apply import ApplyFailed, _all
    from cosmigrate.stores import StoreError

    assert await _all(asyncio.sleep(0, result=i) for i in range(3)) == [0, 1, 2]
    started, finished = asyncio.Event(), []

    async def slow() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            finished.append("slow")  # cancelled and awaited: done before _all raises

    async def fails(exc: Exception) -> None:
        await started.wait()
        raise exc

    # Both failures happen in the same loop iteration; the operator-facing one wins over the retryable one,
    # and it comes out as itself, not as an ExceptionGroup.
    with pytest.raises(ApplyFailed, match="batch 3 is corrupt"):
        await _all([slow(), fails(StoreError("read failed")), fails(ApplyFailed("batch 3 is corrupt"))])
    assert finished == ["slow"]
    with pytest.raises(StoreError):
        await _all([slow(), fails(StoreError("read failed"))])


# --- write outcomes: whole-command refusals, write-concern errors (a narrow fake collection) ----------


class FakeCollection:
    """Answers bulk writes by a rule; records what each command carried and what was acknowledged."""

    def __init__(self, rule) -> None:
        self.rule = rule
        self.commands: list[list] = []
        self.written: list = []

    async def bulk_write(self, requests, ordered=True):
        ids = [r._filter["_id"] for r in requests]
        self.commands.append(ids)
        self.rule(ids, len(self.commands))
        self.written.extend(ids)


def _applier(coll: FakeCollection):
    from cosmigrate.apply import NamespaceApplier
    from cosmigrate.config import Config

    class Target:
        def __getitem__(self, name):
            return self

        def get_collection(self, *args, **kwargs):
            return None

    async def owns() -> bool:
        return True

    app = NamespaceApplier("d.c", Target(), None, None, Config(), WriterGate(True), asyncio.Semaphore(1),  # type: ignore[arg-type]
                           epoch=1, owns=owns)
    app.coll = coll  # type: ignore[assignment]
    return app


def _ops(ids) -> list[Op]:
    return list(collapse([_batch(0, [event(i, {"_id": i, "v": 1}) for i in ids])], {}).values())


async def test_a_whole_command_refusal_is_split_down_to_the_refused_document(monkeypatch) -> None:
    from pymongo.errors import AutoReconnect, OperationFailure

    from cosmigrate import apply

    monkeypatch.setattr(apply.Backoff, "next_delay", lambda self: 0.0)

    def rule(ids, n):
        if n == 1:
            raise AutoReconnect("connection reset")  # transient: the same chunk again, not split
        if "bad" in ids:
            raise OperationFailure("invalid BSON: year 10000 is out of range", 22, {"ok": 0, "code": 22, "errmsg": "invalid BSON: year 10000 is out of range"})

    coll = FakeCollection(rule)
    ids = [0, 1, 2, 3, 4, "bad", 6, 7]
    with pytest.raises(apply.ApplyFailed) as info:
        await _applier(coll)._write_chunk(_ops(ids), {})
    assert coll.commands[0] == coll.commands[1] == ids
    assert '_id="bad"' in str(info.value) and "whole command" in str(info.value) and "code 22" in str(info.value)
    assert coll.written == [0, 1, 2, 3, 4]  # halves before the culprit were written; it stops at the culprit
    assert len(coll.commands) <= 2 + 2 * 3  # log2(8) levels, two halves each


async def test_write_concern_errors_are_written_again_not_counted_as_applied(monkeypatch) -> None:
    from pymongo.errors import BulkWriteError

    from cosmigrate import apply

    monkeypatch.setattr(apply.Backoff, "next_delay", lambda self: 0.0)

    def rule(ids, n):
        if n <= 2:
            raise BulkWriteError({"writeErrors": [], "writeConcernErrors": [
                {"code": 64, "errmsg": "waiting for replication timed out"}], "nUpserted": len(ids)})

    coll = FakeCollection(rule)
    failed: dict = {}
    await _applier(coll)._write_chunk(_ops([1, 2, 3]), failed)
    assert coll.commands == [[1, 2, 3]] * 3 and not failed


async def test_write_concern_error_with_write_errors_retries_only_the_others(monkeypatch) -> None:
    from pymongo.errors import BulkWriteError

    from cosmigrate import apply

    monkeypatch.setattr(apply.Backoff, "next_delay", lambda self: 0.0)

    def rule(ids, n):
        if n == 1:
            raise BulkWriteError({"writeErrors": [{"index": 1, "code": 11000, "errmsg": "E11000 dup key: { e: 'secret@x' }",
                                                   "keyPattern": {"e": 1}, "keyValue": {"e": "secret@x"}}],
                                  "writeConcernErrors": [{"code": 64, "errmsg": "timed out"}]})

    coll = FakeCollection(rule)
    failed: dict = {}
    await _applier(coll)._write_chunk(_ops([1, 2, 3]), failed)
    assert coll.commands == [[1, 2, 3], [1, 3]]
    assert [op.filter["_id"] for op, _ in failed.values()] == [2]  # the duplicate goes to the cycle/defer logic


def test_index_filter_expands_arrays_and_respects_sparse_and_partial_indexes() -> None:
    from cosmigrate.apply import UniqueIndex, _index_filter

    doc = RawBSONDocument(bson.encode({"_id": 1, "tags": ["x", "y"], "a": [{"b": 1}, {"b": [2, 3]}], "k": 5}), RAW)
    assert _index_filter(doc, UniqueIndex(("tags",))) == {"$and": [{"tags": {"$in": ["x", "y"]}}]}
    assert _index_filter(doc, UniqueIndex(("a.b",))) == {"$and": [{"a.b": {"$in": [1, 2, 3]}}]}
    assert _index_filter(doc, UniqueIndex(("k", "missing"))) == {"$and": [{"k": {"$in": [5]}}, {"missing": None}]}
    assert _index_filter(doc, UniqueIndex(("missing",), sparse=True)) is None  # not in a sparse index: no blocker
    assert _index_filter(doc, UniqueIndex(("k",), partial={"k": {"$gt": 1}})) == \
        {"$and": [{"k": {"$in": [5]}}, {"k": {"$gt": 1}}]}  # only documents the partial index covers
