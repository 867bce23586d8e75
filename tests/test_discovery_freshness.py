"""Daemon-level freshness holes: late collections, excluded namespaces, empty-page spin, status on restart."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.config import to_toml
from cosmigrate.daemon import Daemon
from cosmigrate.sandbox import Sandbox
from cosmigrate.status import build_status
from tests.helpers import assert_converged, make_config, prepare_backends, wait_for


async def _start(cfg, config_path: str | None = None) -> tuple[Daemon, asyncio.Task[int]]:
    daemon = Daemon(cfg, config_path=config_path)
    return daemon, asyncio.create_task(daemon.serve())


async def _stop(daemon: Daemon, task: asyncio.Task[int]) -> int:
    daemon.request_stop()
    return await asyncio.wait_for(task, 60)


async def _ready(daemon: Daemon) -> bool:
    await daemon.certify()
    st = await build_status(daemon.worker)
    return st["ready_for_cutover"] and st["gap_in_seconds"] == 0


async def test_a_collection_created_after_the_first_start_is_copied_from_its_beginning(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", start_at="now",
                      discovery_interval_s=1.5)
    cfg.capture.head_sample_interval_s = 0.3
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i} for i in range(10)])  # history, skipped by "now" (copied by other means)
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _has_capture(daemon, "app.users"), 30, what="first discovery")
        await daemon.worker.ledger.set_writer("started", "test", 0.0)  # type: ignore[union-attr]
        daemon.worker.gate.start()
        # Created after the first start: every one of its writes must reach the target, even those
        # made before discovery saw the collection.
        await source.app.late.insert_many([{"_id": i, "v": 1} for i in range(105)])
        await wait_for(lambda: _has_capture(daemon, "app.late"), 30, what="the late collection discovered")
        await wait_for(lambda: _ready(daemon), 60, what="ready")
        await assert_converged(source, target, ["app.late"])
    finally:
        await _stop(daemon, task)
    # A collection created while the daemon was down is also new: beginning, not "now".
    await source.app.later.insert_many([{"_id": i} for i in range(7)])
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _ready(daemon), 60, what="ready after restart")
        await assert_converged(source, target, ["app.late", "app.later"])
    finally:
        await _stop(daemon, task)


async def _has_capture(daemon: Daemon, ns: str) -> bool:
    unit = daemon.units.get(ns)
    return unit is not None and unit.capture.status.state == "running"


async def test_an_excluded_namespace_does_not_block_readiness(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    path = tmp_path / "cosmigrate.toml"
    path.write_text(to_toml(cfg))
    await prepare_backends(cfg)
    await source.app.keep.insert_many([{"_id": i} for i in range(20)])
    await source.app.drop_me.insert_many([{"_id": i} for i in range(20)])
    daemon, task = await _start(cfg, str(path))
    try:
        await wait_for(lambda: _has_capture(daemon, "app.keep"), 30, what="capture running")
        await daemon.worker.ledger.set_writer("started", "test", 0.0)  # type: ignore[union-attr]
        daemon.worker.gate.start()
        await wait_for(lambda: _ready(daemon), 60, what="ready")
        # Stop the writer in the middle of a round: small slow chunks, one at a time.
        cfg.apply.max_ops_per_write, cfg.apply.write_concurrency = 5, 1
        sandbox.target.faults.slow_write_ms = 150
        await source.app.drop_me.insert_many([{"_id": i} for i in range(20, 60)])
        await wait_for(lambda: _count_at_least(target, "app", "drop_me", 25), 30, what="the round under way")
        await daemon.worker.ledger.set_writer("stopped", "test", 0.0)  # type: ignore[union-attr]
        await daemon.worker.gate.stop()
        sandbox.target.faults.slow_write_ms = 0
        assert await target.app.drop_me.count_documents({}) < 60  # the round is parked at the gate
        cfg.capture.exclude = ["app.drop_me"]
        path.write_text(to_toml(cfg))
        daemon._reload.set()  # what SIGHUP does
        await wait_for(lambda: _not_capturing(daemon, "app.drop_me"), 30, what="the reload (must not hang)")
        await daemon.worker.ledger.set_writer("started", "test", 0.0)  # type: ignore[union-attr]
        daemon.worker.gate.start()
        await wait_for(lambda: _ready(daemon), 60, what="ready without the excluded namespace")
        st = await build_status(daemon.worker)
        assert [n["namespace"] for n in st["namespaces"]] == ["app.keep"]
    finally:
        await _stop(daemon, task)
    daemon, task = await _start(cfg, str(path))  # and after a restart with the same file
    try:
        await wait_for(lambda: _ready(daemon), 60, what="ready after restart")
    finally:
        await _stop(daemon, task)


async def _count_at_least(client: AsyncMongoClient, db: str, coll: str, n: int) -> bool:
    return await client[db][coll].count_documents({}) >= n


async def _not_capturing(daemon: Daemon, ns: str) -> bool:
    return ns not in daemon.units


async def test_empty_pages_back_off_instead_of_spinning(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_await_ms=500)
    cfg.capture.head_sample_interval_s = 60.0  # keep the sampler's own commands out of the count
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i} for i in range(10)])
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _has_capture(daemon, "app.users"), 30, what="capture running")
        sandbox.source.faults.empty_page_rate = 1.0
        loop = asyncio.get_running_loop()
        await wait_for(lambda: _pages_at_least(daemon, 4), 30, what="the first empty pages")
        before, t0 = sandbox.source.commands, loop.time()
        await wait_for(lambda: _pages_at_least(daemon, 16), 30, what="more empty pages")
        rate = (sandbox.source.commands - before) / (loop.time() - t0)
        # Healthy idle: about 2 getMores/s (each waits max_await_ms). Spinning: thousands per second.
        assert rate < 40, f"{rate:.0f} source commands/s under empty pages"
        st = await build_status(daemon.worker)
        assert st["namespaces"][0]["empty_pages"] >= 12 and not st["ready_for_cutover"]
        sandbox.source.faults.empty_page_rate = 0.0
        await source.app.users.insert_one({"_id": 99})
        await wait_for(lambda: _events_read(daemon, 11), 30, what="the backoff resets on the first event")
    finally:
        await _stop(daemon, task)


async def _pages_at_least(daemon: Daemon, n: int) -> bool:
    return daemon.units["app.users"].capture.status.empty_pages >= n


async def _events_read(daemon: Daemon, n: int) -> bool:
    return daemon.units["app.users"].capture.status.events_read >= n


async def test_a_daemon_that_has_not_sampled_is_never_ready(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i} for i in range(10)])
    sandbox.source.faults.refuse_head_tokens = True
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _has_capture(daemon, "app.users"), 30, what="capture running")
        await daemon.worker.ledger.set_writer("started", "test", 0.0)  # type: ignore[union-attr]
        daemon.worker.gate.start()
        await wait_for(lambda: _applied(daemon, 10), 30, what="history applied")
        await daemon.certify()
        st = await build_status(daemon.worker)
        ns = st["namespaces"][0]
        assert not st["ready_for_cutover"] and ns["freshness"].startswith("unknown") and "grant" in ns["freshness"]
        assert any("grant" in r for r in st["not_ready_reasons"])
        sandbox.source.faults.refuse_head_tokens = False
        await wait_for(lambda: _ready(daemon), 30, what="ready once heads can be sampled")
    finally:
        await _stop(daemon, task)


async def _applied(daemon: Daemon, n: int) -> bool:
    unit = daemon.units.get("app.users")
    return unit is not None and unit.applier.status.events_applied >= n
