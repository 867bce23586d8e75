"""Catch-up collapse: while the applier is behind, many pages of batches are merged into one write run.

One applier driven directly against the real sandbox target (TCP, PyMongo async), the real store and
ledger; the target's own write counter says how many document writes a backlog cost. The SIGKILL test
runs `cosmigrate run` as a child process that kills itself after a merged run was written, before it
was marked applied.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.apply import WriterGate
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from tests.applyharness import Harness, event
from tests.helpers import Workload, assert_converged, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

NS = "app.c"
KEYS = 10
BATCHES = 24


@pytest.fixture
async def harness(tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[Harness]:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.apply.max_batches_per_round = 2  # a page of two batches: the backlog below is twelve pages
    await prepare_backends(cfg)
    client = target_client(sandbox.target_uri, sandbox.target_ca_file, serverSelectionTimeoutMS=5000)
    h = Harness(cfg, client)
    try:
        yield h
    finally:
        await h.close()
        await client.close()


async def _true(value: bool) -> bool:
    return value


async def _backlog(h: Harness, epoch: int) -> None:
    """BATCHES batches, each rewriting the same KEYS documents (version = batch number)."""
    for b in range(BATCHES):
        await h.commit(NS, epoch, [event(k, {"_id": k, "v": b}) for k in range(KEYS)])


async def _drained(h: Harness, app: Any) -> None:
    gate = app.gate
    gate.start()
    await wait_for(lambda: _true(app.status.applied_seq == BATCHES - 1), 20, what="the backlog applied")
    docs = {d["_id"]: d["v"] async for d in h.target.app.c.find({})}
    assert docs == {k: BATCHES - 1 for k in range(KEYS)}  # every document at its latest version


async def test_a_repetitive_backlog_costs_one_write_per_document(harness: Harness, sandbox: Sandbox) -> None:
    epoch = await harness.claim(NS, "me")
    await _backlog(harness, epoch)
    app = harness.applier(NS, epoch, gate=WriterGate(started=False))
    harness.start(app)
    await wait_for(lambda: _true(app.status.state == "paused"), 10, what="paused")
    before = sandbox.target.store.writes
    await _drained(harness, app)
    # One page at a time would write each document once per page (12 x 10); merged, once in all.
    assert sandbox.target.store.writes - before == KEYS
    assert app.status.events_applied == KEYS * BATCHES
    meta = await harness.ledger.get_namespace(NS)
    assert meta is not None and meta.applied_seq == BATCHES - 1


async def test_the_byte_budget_ends_a_merge(harness: Harness, sandbox: Sandbox) -> None:
    harness.cfg.apply.collapse_max_bytes = 1  # every page is over budget: one page per write run
    epoch = await harness.claim(NS, "me")
    await _backlog(harness, epoch)
    app = harness.applier(NS, epoch, gate=WriterGate(started=False))
    harness.start(app)
    await wait_for(lambda: _true(app.status.state == "paused"), 10, what="paused")
    before = sandbox.target.store.writes
    await _drained(harness, app)
    assert sandbox.target.store.writes - before == KEYS * BATCHES // 2


async def test_a_deferred_write_in_a_merged_run_holds_applied_seq_at_its_batch(harness: Harness, sandbox: Sandbox) -> None:
    await harness.target.app.c.create_index("u", unique=True, sparse=True)
    await harness.target.app.c.insert_one({"_id": "holder", "u": 1})  # not in the feed: a lasting conflict
    epoch = await harness.claim(NS, "me")
    for b in range(BATCHES):
        events = [event(k, {"_id": k, "v": b}) for k in range(KEYS)]
        if b == 5:
            events.append(event("late", {"_id": "late", "u": 1}))
        await harness.commit(NS, epoch, events)
    app = harness.applier(NS, epoch, gate=WriterGate(started=False))
    harness.start(app)
    await wait_for(lambda: _true(app.status.state == "paused"), 10, what="paused")
    app.gate.start()
    await wait_for(lambda: _true(app.status.written_seq == BATCHES - 1), 20, what="the backlog written")
    assert app.status.deferred == 1
    assert app.status.applied_seq == 4  # held just before the deferred write's batch, though 23 were written
    meta = await harness.ledger.get_namespace(NS)
    assert meta is not None and meta.applied_seq == 4
    await harness.target.app.c.delete_one({"_id": "holder"})  # the blocker goes: the deferred write lands
    app.wake.set()
    await wait_for(lambda: _true(app.status.applied_seq == BATCHES - 1), 20, what="the hold released")
    late = await harness.target.app.c.find_one({"_id": "late"})
    assert late is not None and late["u"] == 1


async def _status(config: Path) -> dict[str, Any] | None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), "status", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return json.loads(out) if proc.returncode in (0, 2, 3) and out else None


async def _writer_start(config: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), "writer", "start",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0


async def test_sigkill_after_a_merged_run_is_written_marks_nothing_and_converges(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient) -> None:
    namespaces = ["app.a", "app.b"]
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=100)
    cfg.apply.max_batches_per_round = 2
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, namespaces, keys_per_ns=1000, seed=4)
    await workload.run_bulk(4000)
    # Read from the beginning, the feed holds each document's latest version once.
    documents = sum([await source[ns.split(".")[0]][ns.split(".")[1]].count_documents({}) for ns in namespaces])
    child = await Child.start(config, COSMIGRATE_CRASH_POINTS="after_write=1.0")
    try:
        async def captured_all() -> bool:
            status = await _status(config)
            return status is not None and sum(n["captured_events"] for n in status["namespaces"]) >= documents

        await wait_for(captured_all, 60, what="the backlog captured")
        await _writer_start(config)
        assert await child.finish(limit_s=60) == -signal.SIGKILL  # killed itself after the first write run
    finally:
        await child.finish(signal.SIGKILL)
    assert sum([await target[ns.split(".")[0]][ns.split(".")[1]].count_documents({}) for ns in namespaces]) > 0
    ledger = open_ledger(cfg)
    try:
        for ns in namespaces:
            meta = await ledger.get_namespace(ns)
            assert meta is not None and meta.next_seq > 2 * cfg.apply.max_batches_per_round
            assert meta.applied_seq == -1, "written but not marked: a merged run is marked only once it is whole"
    finally:
        await ledger.close()
    final = await Child.start(config)
    try:
        await wait_for(lambda: assert_converged(source, target, namespaces), 120, interval=1.0, what="convergence")

        async def all_applied() -> bool:
            status = await _status(config)
            return status is not None and all(n["pending_events"] == 0 for n in status["namespaces"])

        await wait_for(all_applied, 60, what="everything marked applied")
    finally:
        assert await final.finish(signal.SIGTERM) == 0
