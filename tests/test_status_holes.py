"""Review holes: status must never claim more than the tool knows (issue 9)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.config import to_toml
from cosmigrate.daemon import Daemon
from cosmigrate.sandbox import Sandbox
from tests.helpers import make_config, prepare_backends, wait_for


async def _status(daemon: Daemon) -> dict[str, Any]:
    reply = await daemon.handle_control({"cmd": "status"})  # what `ctl status` asks
    assert reply["ok"], reply
    return reply["status"]


async def _ready(daemon: Daemon) -> bool:
    st = await _status(daemon)
    return st["ready_for_cutover"] and st["gap_in_seconds"] == 0


async def test_a_collection_discovery_has_not_seen_yet_blocks_readiness(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", discovery_interval_s=3600.0)
    cfg.capture.head_sample_interval_s = 0.3
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i} for i in range(10)])
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.serve())
    try:
        await wait_for(lambda: _running(daemon, "app.users"), 30, what="capture running")
        await daemon.handle_control({"cmd": "writer", "action": "start"})
        await wait_for(lambda: _ready(daemon), 30, what="ready")
        # The applications create a collection; the next discovery round is far away.
        await source.app.orders.insert_many([{"_id": i} for i in range(25)])
        st = await _status(daemon)
        assert await target.app.orders.count_documents({}) < 25
        assert not (st["ready_for_cutover"] and st["gap_in_seconds"] == 0), \
            "READY with gap 0 while a whole collection is on the source only"
        assert any("app.orders" in r for r in st["not_ready_reasons"]), st["not_ready_reasons"]
        # ctl status also has discovery look now: the collection is copied without waiting for the next round.
        await wait_for(lambda: _ready(daemon), 30, what="ready once the new collection is copied")
        assert await target.app.orders.count_documents({}) == 25
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


async def _running(daemon: Daemon, ns: str) -> bool:
    unit = daemon.units.get(ns)
    return unit is not None and unit.capture.status.state == "running"


async def test_a_wall_clock_stepped_back_never_shows_lag_zero(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An NTP step or a VM resume moves the wall clock back: the samples from before look like the future."""
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i} for i in range(10)])
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.serve())
    try:
        await wait_for(lambda: _running(daemon, "app.users"), 30, what="capture running")
        await daemon.handle_control({"cmd": "writer", "action": "start"})
        await wait_for(lambda: _ready(daemon), 30, what="ready")
        sandbox.source.faults.empty_page_rate = 1.0  # a throttled stream: capture reads nothing more
        await wait_for(lambda: _empty_pages(daemon, 2), 30, what="the stream throttled")
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 900.0)
        await source.app.users.insert_many([{"_id": i} for i in range(10, 30)])
        st = await _status(daemon)
        assert await target.app.users.count_documents({}) == 10
        # Still "ready" under the threshold is the documented rule; lag 0 would claim the 20 new documents.
        assert st["gap_in_seconds"] > 0 and st["namespaces"][0]["lag_seconds"] > 0, \
            (st["gap_in_seconds"], st["not_ready_reasons"], st["namespaces"][0]["freshness"])
    finally:
        monkeypatch.undo()
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


async def _empty_pages(daemon: Daemon, n: int) -> bool:
    return daemon.units["app.users"].capture.status.empty_pages >= n


async def test_an_exclude_does_not_hang_while_batches_cannot_be_stored(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
) -> None:
    """SIGHUP must not wait for ever on a namespace whose committer retries a put that keeps failing."""
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    cfg.daemon.drain_timeout_s = 2.0
    path = tmp_path / "cosmigrate.toml"
    path.write_text(to_toml(cfg))
    await prepare_backends(cfg)
    await source.app.keep.insert_many([{"_id": i} for i in range(5)])
    await source.app.drop_me.insert_many([{"_id": i} for i in range(5)])
    daemon = Daemon(cfg, config_path=str(path))
    task = asyncio.create_task(daemon.serve())
    try:
        await wait_for(lambda: _running(daemon, "app.drop_me"), 30, what="capture running")
        await daemon.handle_control({"cmd": "writer", "action": "start"})
        await wait_for(lambda: _ready(daemon), 30, what="ready")
        # The namespace's batch directory becomes unwritable (even for root): every put fails, for good.
        ns_dir = tmp_path / "batches" / "test" / "app" / "drop_me"
        ns_dir.rename(ns_dir.with_name("drop_me.moved"))
        ns_dir.write_bytes(b"")
        await source.app.drop_me.insert_many([{"_id": i} for i in range(5, 50)])
        await wait_for(lambda: _put_failing(daemon, "app.drop_me"), 30, what="a batch that cannot be put")
        cfg.capture.exclude = ["app.drop_me"]
        path.write_text(to_toml(cfg))
        daemon._reload.set()  # what SIGHUP does
        await wait_for(lambda: _gone(daemon, "app.drop_me"), 15, what="the reload (must not hang)")
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


async def _put_failing(daemon: Daemon, ns: str) -> bool:
    return "cannot write" in daemon.units[ns].capture.status.last_error


async def _gone(daemon: Daemon, ns: str) -> bool:
    return ns not in daemon.units


async def test_status_judges_young_heads_at_the_moment_it_was_asked(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Issue 19 (the size of a real account). `ctl status` samples every head before it answers; when that takes
    longer than the cutover threshold (thousands of units over a round trip to Azure; here: 4 units, one sample
    at a time, each answered after 0.7 s, threshold 2 s), the first samples were older than the threshold by the
    time the answer was built, and READY never came although every unit reached a head sampled after the
    question. Judged at the question's moment, it comes; and it still never comes while a write is not applied."""
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 60.0  # the periodic sampler stays out of the way: status samples
    cfg.capture.head_sample_concurrency = 1
    cfg.apply.cutover_threshold_seconds = 2.0
    await prepare_backends(cfg)
    names = [f"c{i}" for i in range(4)]
    for name in names:
        await source.app[name].insert_many([{"_id": i} for i in range(5)])
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.serve())
    try:
        for name in names:
            await wait_for(lambda name=name: _running(daemon, f"app.{name}"), 30, what="capture running")
        await daemon.handle_control({"cmd": "writer", "action": "start"})
        await wait_for(lambda: _ready(daemon), 30, what="ready before the heads slow down")
        sandbox.source.faults.slow_head_ms = 700
        asked = time.monotonic()
        st = await _status(daemon)
        took = time.monotonic() - asked
        assert took > cfg.apply.cutover_threshold_seconds, f"status answered in {took:.1f}s: the case is not made"
        assert st["ready_for_cutover"], st["not_ready_reasons"]
        assert st["gap_in_seconds"] == 0
        # A write the target does not hold yet (its writes are slow now): the answer must not be READY.
        sandbox.target.faults.slow_write_ms = 30_000
        await source.app.c0.insert_one({"_id": "late"})
        st = await _status(daemon)
        assert await target.app.c0.find_one({"_id": "late"}) is None
        assert not st["ready_for_cutover"], "READY while the target lacks a write the source holds"
    finally:
        sandbox.source.faults.slow_head_ms = 0
        sandbox.target.faults.slow_write_ms = 0
        daemon.request_stop()
        await asyncio.wait_for(task, 60)

