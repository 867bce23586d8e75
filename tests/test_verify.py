"""Verification: range merge-compare of raw BSON against the sandbox, canonical differences, resumable passes."""

from __future__ import annotations

import bson
import pytest
from bson import Decimal128, Int64, ObjectId
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from cosmigrate.idorder import encode_id, order_key
from cosmigrate.nslink import NamespaceLink
from cosmigrate.sandbox import Sandbox
from cosmigrate.verify.compare import difference
from cosmigrate.verify.passes import NamespaceVerifier

MIXED_IDS = [Int64(50), 4.5, "a", "b", ObjectId(), {"k": 1}, True, None, Decimal128("70"), float("nan")]


def test_canonical_differences_are_named_by_path_and_kind() -> None:
    base = {"_id": 1, "a": 1, "n": {"x": Int64(2), "y": [1, 2]}}
    enc = bson.encode
    assert difference(enc(base), enc(base)) is None
    assert difference(enc(base), enc({"_id": 1, "n": {"x": Int64(2), "y": [1, 2]}, "a": 1})) == \
        type(difference(enc(base), enc(base)) or difference(enc({"a": 1}), enc({"a": 2})))("a", "field order")
    d = difference(enc(base), enc({"_id": 1, "a": 1, "n": {"x": 2, "y": [1, 2]}}))
    assert (d.path, d.kind) == ("n.x", "type")  # Int64 vs Int32
    d = difference(enc(base), enc({"_id": 1, "a": 1, "n": {"x": Int64(2), "y": [1, 3]}}))
    assert (d.path, d.kind) == ("n.y.1", "value")
    d = difference(enc(base), enc({"_id": 1, "a": 1}))
    assert (d.path, d.kind) == ("n", "missing field")
    d = difference(enc(base), enc({**base, "z": 0}))
    assert (d.path, d.kind) == ("z", "extra field")
    d = difference(enc({"_id": 1, "f": 0.0}), enc({"_id": 1, "f": -0.0}))
    assert (d.path, d.kind) == ("f", "value")


def test_order_key_follows_mongodb_across_numeric_types() -> None:
    assert order_key(1) == order_key(1.0) == order_key(Int64(1)) == order_key(Decimal128("1.0"))
    assert order_key(2**53 + 1) != order_key(float(2**53))
    assert order_key(float("nan")) < order_key(float("-inf")) < order_key(0) < order_key("") < order_key({}) \
        < order_key(ObjectId()) < order_key(False)


async def _ids(coll) -> list:
    return [d["_id"] async for d in coll.find({}, {"_id": 1})]


@pytest.mark.parametrize("page_size", [1, 3, 1000])
async def test_a_corrupted_target_is_reported_exactly(sandbox: Sandbox, source: AsyncMongoClient,
                                                     target: AsyncMongoClient, page_size: int) -> None:
    docs = [{"_id": i, "v": i, "name": f"n{i}", "nested": {"a": 1, "b": [1, Int64(2)]}} for i in range(20)]
    docs += [{"_id": k, "v": 0} for k in MIXED_IDS]
    await source.db.c.insert_many(docs)
    await target.db.c.insert_many(docs)
    await target.db.c.update_one({"_id": 7}, {"$set": {"nested.b.1": Int64(3)}})  # a changed value
    await target.db.c.replace_one({"_id": 8}, {"_id": 8, "name": "n8", "v": 8, "nested": {"a": 1, "b": [1, Int64(2)]}})
    await target.db.c.delete_one({"_id": 9})  # a missing document
    await target.db.c.delete_one({"_id": "b"})  # a missing document of another type bracket
    await target.db.c.insert_one({"_id": 100, "v": 1})  # an extra one
    await target.db.c.insert_one({"_id": "zz", "v": 1})  # an extra one after the source's last string
    await target.db.c.update_one({"_id": 3}, {"$set": {"v": Int64(0)}})  # a type difference in a mixed-id bracket
    link = NamespaceLink("db.c", 1)
    v = NamespaceVerifier(link, source, target, None, None, page_size)
    v.frozen = True
    assert await v.run_pass()
    found = sorted((bson.decode(m.id)["_id"].__repr__(), m.kind, m.path, m.difference) for m in v.mismatches.values())
    assert found == sorted([
        ("7", "different", "nested.b.1", "value"),
        ("8", "different", "v", "field order"),
        ("9", "missing", "", ""),
        ("'b'", "missing", "", ""),
        ("100", "extra", "", ""),
        ("'zz'", "extra", "", ""),
        ("3", "different", "v", "type"),
    ]), found
    assert v.state.docs == len(docs) and v.state.equal == len(docs) - 5
    # A fixed target compares clean again (re-check by _id).
    await target.db.c.delete_many({"_id": {"$in": [100, "zz"]}})
    await target.db.c.insert_many([d for d in docs if d["_id"] in (9, "b")])
    for d in docs:
        if d["_id"] in (7, 8, 3):
            await target.db.c.replace_one({"_id": d["_id"]}, d)
    assert await v.recheck_mismatches() == 0
    assert encode_id(3) in {encode_id(3)}  # ids travel as raw {_id: v}
    assert isinstance(RawBSONDocument(encode_id(3)), RawBSONDocument)


async def test_continuous_verification_rechecks_changes_from_the_batch_log(tmp_path, sandbox: Sandbox,
                                                                          source: AsyncMongoClient,
                                                                          target: AsyncMongoClient) -> None:
    """A document that differs because its change is not applied yet is a mismatch until the batch log says
    it changed and the re-check finds it equal; nothing re-reads the whole collection for that."""
    from tests.helpers import assert_converged, make_config, wait_for
    from tests.test_apply import Running

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    cfg.verify.enabled = True
    cfg.verify.page_size = 20
    cfg.verify.interval_s = 3600
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(100)])
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        v = run.daemon.proof.verification.verifiers["app.users"]  # type: ignore[union-attr]
        v.catch_up_s = 0.5

        async def finished() -> bool:
            return bool(v.state.finished_at)

        await wait_for(finished, 30, what="a verification pass")
        first = v.state.number
        await run.writer("stop")
        await source.app.users.update_many({"_id": {"$in": [3, 30, 60]}}, {"$set": {"v": 2}})
        await source.app.users.delete_one({"_id": 90})  # a delete: only the sweep can fix it
        v.state.needs_full_pass = True  # a new pass now, while the writer is stopped

        async def mismatches(n: int) -> bool:
            return v.state.finished_at is not None and v.state.number > first and v.mismatch_count == n

        await wait_for(lambda: mismatches(4), 30, what="the pass to find the unapplied changes")
        status = await run.status()
        users = run.ns_status(status, "app.users")
        assert users["mismatches"] == 4 and not status["ready_for_cutover"]
        assert any("differ" in r for r in status["not_ready_reasons"])
        passes = v.state.number
        await run.writer("start")
        await wait_for(lambda: mismatches(0), 30, what="the re-checks from the batch log and the sweep")
        assert v.state.number == passes, "cleared by re-checks, not by another full pass"


async def test_collections_the_target_cannot_hold_the_same_way_are_listed(sandbox: Sandbox,
                                                                         source: AsyncMongoClient) -> None:
    from cosmigrate.verify.service import collection_notes

    await source.db.create_collection("ring", capped=True, size=4096)
    await source.db.sessions.create_index("_ts", expireAfterSeconds=3600)
    sandbox.source.faults.ttl_custom_path = True  # an account with EnableTtlOnCustomPath
    await source.db.events.create_index("expires", expireAfterSeconds=0)
    await source.db.plain.insert_one({"_id": 1})
    notes = await collection_notes(source, ["db.ring", "db.sessions", "db.events", "db.plain"])
    assert set(notes) == {"db.ring", "db.sessions", "db.events"}
    assert "capped" in notes["db.ring"]
    assert "_ts" in notes["db.sessions"] and "cannot rebuild" in notes["db.sessions"]
    assert "TTL index on expires" in notes["db.events"]
