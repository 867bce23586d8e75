"""Capture per physical partition: in-process daemons on the sandbox over TCP, real ledger and store.

Every partition count converges byte for byte; a split while tailing and a
split during a replay from the beginning lose and reorder nothing; a
partition token the source refuses fails that partition only. The SIGKILL
run with real processes is in tests/test_capture_partitions_processes.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import bson
import pytest
from pymongo import AsyncMongoClient

from cosmigrate.partitions import decode, encode, is_units
from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    Workload,
    assert_converged,
    check_committed,
    make_config,
    read_committed,
    source_docs,
    wait_for,
)
from tests.test_apply import Running

NAMESPACES = ["app.a", "shop.b"]


def _config(tmp_path: Path, sandbox: Sandbox, **capture):
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", **capture)
    cfg.capture.head_sample_interval_s = 0.3
    return cfg


async def _ns(run: Running, ns: str) -> dict:
    return run.ns_status(await run.status(), ns)


async def _committed_ok(cfg, source: AsyncMongoClient, namespaces: list[str]) -> bool:
    committed = await read_committed(cfg)
    expected = await source_docs(source, namespaces)
    for ns in namespaces:
        check_committed(committed[ns], expected[ns])  # gap-free seqs, per-document order, latest versions
    return True


async def _ready(run: Running) -> bool:
    st = await run.status()
    return bool(st["ready_for_cutover"])


@pytest.mark.parametrize(("n", "backend"), [(n, "file+sqlite") for n in range(1, 9)] + [(4, "s3+dynamodb")])
async def test_every_partition_count_converges_byte_for_byte(request, tmp_path: Path, sandbox: Sandbox, source,
                                                             target, n: int, backend: str) -> None:
    sandbox.source.faults.partitions = n
    workload = Workload(source, NAMESPACES, keys_per_ns=120, seed=n)
    await workload.run(300)  # history, replayed from each partition's beginning
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, endpoint, max_batch_events=40)
    cfg.capture.head_sample_interval_s = 0.3
    async with Running(cfg) as run:
        await run.writer("start")
        await workload.run(400)
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 60, what="convergence")
        await wait_for(lambda: _ready(run), 30, what="ready (the head barrier reads every partition's range)")
        for ns in NAMESPACES:
            parts = (await _ns(run, ns))["partitions"]
            assert len(parts) == n and {p["state"] for p in parts} == {"tailing"}, parts
    await _committed_ok(run.cfg, source, NAMESPACES)
    committed = await read_committed(run.cfg)
    for ns in NAMESPACES:  # the ledger holds one unit per partition, as of the last committed batch
        units = decode(committed[ns].resume_token)
        assert len(units) == n and len({u.range for u in units}) == n


async def test_splits_while_tailing_and_during_the_replay_lose_and_reorder_nothing(
    tmp_path: Path, sandbox: Sandbox, source, target
) -> None:
    sandbox.source.faults.partitions = 2
    ns = "app.a"
    workload = Workload(source, [ns], keys_per_ns=3000, seed=5)
    await workload.run_bulk(5000)
    total = await source.app.a.count_documents({})
    # More than one source page (1,000 events) per partition, and a small RU budget: each page after the first
    # waits for its partition's units, so the split lands in the middle of the replay.
    sandbox.source.faults.ru_per_s = 100
    cfg = _config(tmp_path, sandbox, max_batch_events=200)
    async with Running(cfg) as run:
        async def started() -> bool:
            return (await _ns(run, ns)).get("captured_events", 0) > 0

        await wait_for(started, 30, what="the replay to begin")
        captured_at_split = (await _ns(run, ns))["captured_events"]
        sandbox.source.split_partition("app", "a", 0)
        assert captured_at_split < total, "the replay finished before the split: the test proves nothing"
        sandbox.source.faults.ru_per_s = 0
        await wait_for(lambda: _committed_ok(cfg, source, [ns]), 60, what="the replay, across the split")
        await run.writer("start")
        # While tailing, with writes going on: split a child of the first split.
        await workload.run(200)
        sandbox.source.split_partition("app", "a", 1)
        await workload.run(300)
        await wait_for(lambda: assert_converged(source, target, [ns]), 60, what="convergence across two splits")
        await wait_for(lambda: _ready(run), 30, what="ready against the children's heads")
        parts = (await _ns(run, ns))["partitions"]
        assert sorted(p["state"] for p in parts) == ["split", "split", "tailing", "tailing", "tailing", "tailing"], parts
    await _committed_ok(cfg, source, [ns])
    # The ledger knows the splits; a restart resumes the four partitions and goes on.
    units = decode((await read_committed(cfg))[ns].resume_token)
    assert sorted(u.state for u in units) == ["split", "split", "tailing", "tailing", "tailing", "tailing"]
    async with Running(cfg) as run:
        await run.writer("start")
        await workload.run(100)
        await wait_for(lambda: assert_converged(source, target, [ns]), 60, what="convergence after a restart")
    await _committed_ok(cfg, source, [ns])


async def test_a_refused_partition_token_fails_that_partition_only(tmp_path: Path, sandbox: Sandbox, source,
                                                                   target) -> None:
    sandbox.source.faults.partitions = 3
    ns = "app.a"
    await source.app.a.insert_many([{"_id": i, "v": 0} for i in range(300)])
    cfg = _config(tmp_path, sandbox, max_batch_events=50)
    async with Running(cfg) as run:
        await wait_for(lambda: _committed_ok(cfg, source, [ns]), 30, what="first capture")
    # Garble one partition's stored token (another collection's id): the source refuses it.
    ledger = Path(cfg.ledger.url.removeprefix("sqlite://"))
    with sqlite3.connect(ledger) as db:
        (raw,) = db.execute("SELECT resume_token FROM namespaces WHERE ns = ?", (ns,)).fetchone()
        assert is_units(bytes(raw))
        units = decode(bytes(raw))
        victim = units[1]
        doc = dict(bson.decode(victim.token))
        doc["_data"] = bytes(doc["_data"]).replace(b'"Rid":"', b'"Rid":"x') if doc.get("_kind") != 4 else b"\x1f\x8bgarbled"
        victim.token = bson.encode(doc)
        db.execute("UPDATE namespaces SET resume_token = ? WHERE ns = ?", (encode(units), ns))
    async with Running(cfg) as run:
        await run.writer("start")

        async def failed() -> bool:
            st = await _ns(run, ns)
            return st.get("state") == "failed"

        await wait_for(failed, 30, what="the partition to fail")
        st = await _ns(run, ns)
        assert victim.name in st["last_error"] and "Change feed token format is invalid" in st["last_error"], st
        assert [p["state"] for p in st["partitions"]] == ["tailing", "failed", "tailing"]
        # The other partitions go on: new writes outside the failed range reach the target.
        await source.app.a.update_many({}, {"$set": {"v": 1}})

        async def others_applied() -> bool:
            docs = {d["_id"]: d["v"] async for d in target.app.a.find()}
            return sum(1 for v in docs.values() if v == 1) > 0 and sum(1 for v in docs.values() if v == 0) > 0

        await wait_for(others_applied, 30, what="the other partitions to go on")
        status = await run.status()
        assert not status["ready_for_cutover"]
        assert any(ns in r for r in status["not_ready_reasons"])


async def test_a_split_with_parent_batches_still_queued_keeps_every_documents_order(
    tmp_path: Path, sandbox: Sandbox, source, target, monkeypatch
) -> None:
    """The interleaving that would reorder: the parent's batches wait in the committer's queue (slow store)
    when the split comes, and the children read newer versions of the same documents at once. The children
    must start only after every parent batch is committed, from the parent's committed position."""
    from cosmigrate.stores.local import LocalStore

    real_put = LocalStore.put

    async def slow_put(self, key: str, data: bytes) -> None:
        await asyncio.sleep(0.05)
        await real_put(self, key, data)

    monkeypatch.setattr(LocalStore, "put", slow_put)
    sandbox.source.faults.partitions = 2
    ns = "app.a"
    await source.app.a.insert_many([{"_id": i, "v": 0} for i in range(600)])
    cfg = _config(tmp_path, sandbox, max_batch_events=10)
    async with Running(cfg) as run:
        async def first_commit() -> bool:
            return (await _ns(run, ns)).get("captured_events", 0) > 0

        await wait_for(first_commit, 30, what="the first commit")
        queued = 600 - (await _ns(run, ns))["captured_events"]
        sandbox.source.split_partition("app", "a", 0)
        await source.app.a.update_many({}, {"$set": {"v": 1}})  # newer versions, read by the children
        assert queued > 100, "the replay was committed before the split: the test proves nothing"
        await wait_for(lambda: _committed_ok(cfg, source, [ns]), 60, what="every version, in order")
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, [ns]), 60, what="convergence")


@pytest.mark.parametrize("why", ["no GetChangeStreamTokens", "capture.per_partition = false"])
async def test_without_partition_tokens_one_whole_collection_stream_still_captures_every_partition(
    tmp_path: Path, sandbox: Sandbox, source, target, why: str
) -> None:
    sandbox.source.faults.partitions = 3
    if why == "no GetChangeStreamTokens":
        sandbox.source.faults.no_head_tokens = True  # an old account: the beginning comes from the LSN-0 token
    cfg = _config(tmp_path, sandbox, per_partition=why != "capture.per_partition = false")
    await source.app.a.insert_many([{"_id": i, "v": 0} for i in range(200)])
    async with Running(cfg) as run:
        await run.writer("start")
        await source.app.a.update_many({"_id": {"$lt": 100}}, {"$set": {"v": 1}})
        await wait_for(lambda: assert_converged(source, target, ["app.a"]), 30, what="convergence")
        assert (await _ns(run, "app.a"))["partitions"] == []
    await _committed_ok(cfg, source, ["app.a"])
    assert not is_units((await read_committed(cfg))["app.a"].resume_token)  # one plain token, as before


async def test_ctl_retry_restarts_a_namespace_whose_one_partition_failed(tmp_path: Path, sandbox: Sandbox, source,
                                                                          target) -> None:
    """Status shows the namespace `failed` when one partition failed, and the README's answer to a failed
    namespace is `ctl retry`: it must restart the namespace (the failed partition from its stored position),
    not answer "has not failed"."""
    sandbox.source.faults.partitions = 3
    ns = "app.a"
    await source.app.a.insert_many([{"_id": i, "v": 0} for i in range(300)])
    cfg = _config(tmp_path, sandbox, max_batch_events=50)
    async with Running(cfg) as run:
        await wait_for(lambda: _committed_ok(cfg, source, [ns]), 30, what="first capture")
    ledger = Path(cfg.ledger.url.removeprefix("sqlite://"))
    with sqlite3.connect(ledger) as db:
        (good,) = db.execute("SELECT resume_token FROM namespaces WHERE ns = ?", (ns,)).fetchone()
        units = decode(bytes(good))
        doc = dict(bson.decode(units[1].token))
        doc["_data"] = b"\x1f\x8bgarbled"  # the source refuses it (the cause the operator then fixes)
        units[1].token = bson.encode(doc)
        db.execute("UPDATE namespaces SET resume_token = ? WHERE ns = ?", (encode(units), ns))
    async with Running(cfg) as run:
        await run.writer("start")

        async def failed() -> bool:
            return (await _ns(run, ns)).get("state") == "failed"

        await wait_for(failed, 30, what="the partition to fail")
        with sqlite3.connect(ledger) as db:  # the operator restores the position (nothing committed since)
            db.execute("UPDATE namespaces SET resume_token = ? WHERE ns = ?", (bytes(good), ns))
        reply = await run.daemon.handle_control({"cmd": "retry", "namespace": ns})
        assert reply["ok"], reply

        async def tailing() -> bool:
            st = await _ns(run, ns)
            return st.get("state") == "running" and [p["state"] for p in st["partitions"]] == ["tailing"] * 3

        await wait_for(tailing, 30, what="every partition tailing after the retry")
        await source.app.a.update_many({}, {"$set": {"v": 1}})
        await wait_for(lambda: assert_converged(source, target, [ns]), 30, what="convergence after the retry")
    await _committed_ok(cfg, source, [ns])
