"""Capture end to end in one process: sandbox source over TCP, real stores and ledgers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.daemon import Daemon
from cosmigrate.mongo import list_namespaces, source_client
from cosmigrate.sandbox import Sandbox
from tests.flakyhttp import FlakyHttpProxy
from tests.helpers import (
    Workload,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
)

BACKENDS = ["file+sqlite", "s3+dynamodb"]
NAMESPACES = ["app.users", "app.orders", "shop.items"]


def _endpoint(request, backend: str) -> str | None:
    return request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None


async def _captured_all(cfg, source: AsyncMongoClient, namespaces: list[str]) -> bool:
    expected = await source_docs(source, namespaces)
    committed = await read_committed(cfg)
    for ns in namespaces:
        assert ns in committed, f"{ns} not captured yet"
        check_committed(committed[ns], expected[ns])
    return True


async def _start(cfg) -> tuple[Daemon, asyncio.Task[None]]:
    daemon = Daemon(cfg)
    return daemon, asyncio.create_task(daemon.serve())


async def _stop(daemon: Daemon, task: asyncio.Task[None]) -> None:
    daemon.request_stop()
    await asyncio.wait_for(task, 60)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_random_writes_become_gap_free_ordered_batches(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient
) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, _endpoint(request, backend),
                      max_batch_events=40)
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=150, seed=11)
    await workload.run(300)  # existing data: start_at = "beginning" replays it
    daemon, task = await _start(cfg)
    try:
        await workload.run(1200)
        # Each poll reads every committed batch back from the store: once a second, or the polls load moto more
        # than capture does.
        await wait_for(lambda: _captured_all(cfg, source, NAMESPACES), 90, interval=1.0, what="every change captured")
    finally:
        await _stop(daemon, task)
    committed = await read_committed(cfg)
    assert sum(len(c.batches) for c in committed.values()) > 3 * len(NAMESPACES)
    # A restart resumes from the ledger: new writes land in new seqs, nothing is re-captured out of order.
    daemon, task = await _start(cfg)
    try:
        await workload.run(200)
        await wait_for(lambda: _captured_all(cfg, source, NAMESPACES), 90, interval=1.0,
                       what="changes after restart captured")
    finally:
        await _stop(daemon, task)


async def test_start_at_now_skips_history_but_keeps_later_changes(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", start_at="now")
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i, "v": 0} for i in range(50)])
    daemon, task = await _start(cfg)
    try:
        async def watching() -> bool:  # "running" is reached once the start position is in the ledger
            unit = daemon.units.get("app.users")
            return unit is not None and unit.capture.status.state == "running"

        await wait_for(watching, 30, what="start position recorded")
        await source.app.users.update_many({"_id": {"$lt": 5}}, {"$set": {"v": 1}})

        async def five() -> bool:
            c = (await read_committed(cfg)).get("app.users")
            return c is not None and sum(len(b.events) for b in c.batches) == 5

        await wait_for(five, 30, what="the five later changes")
    finally:
        await _stop(daemon, task)
    last = check_committed((await read_committed(cfg))["app.users"])
    assert len(last) == 5


async def test_discovery_skips_system_namespaces_and_applies_patterns(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    for db, coll in [("admin", "x"), ("local", "y"), ("config", "z"), ("app", "system.profile"), ("app", "users"),
                     ("app", "tmp_1"), ("shop", "items")]:
        await source[db][coll].insert_one({"_id": 1})
    client = source_client(sandbox.source_uri)
    try:
        assert await list_namespaces(client, ["*"], []) == ["app.tmp_1", "app.users", "shop.items"]
        assert await list_namespaces(client, ["app.*"], ["app.tmp_*"]) == ["app.users"]
    finally:
        await client.close()
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.exclude = ["app.tmp_*"]
    await prepare_backends(cfg)
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _async_true(set(daemon.units) == {"app.users", "shop.items"}), 30, what="discovery")
        await source.late.arrival.insert_one({"_id": 1})  # a collection created while running is picked up
        await wait_for(lambda: _async_true("late.arrival" in daemon.units), 30, what="re-scan")
    finally:
        await _stop(daemon, task)


async def _async_true(value: bool) -> bool:
    return value


async def test_rejected_resume_token_fails_only_that_namespace(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    await source.app.doomed.insert_one({"_id": 1})
    await source.app.healthy.insert_one({"_id": 1})
    daemon, task = await _start(cfg)
    try:
        await wait_for(lambda: _captured_all(cfg, source, ["app.doomed", "app.healthy"]), 30, what="initial capture")
        # Dropping and re-creating the collection gives it a new feed: the stored token is now invalid.
        await source.app.drop_collection("doomed")
        await source.app.doomed.insert_one({"_id": 2})

        async def failed() -> bool:
            meta = await daemon.worker.ledger.get_namespace("app.doomed")  # type: ignore[union-attr]
            return meta is not None and meta.state == "failed"

        await wait_for(failed, 30, what="app.doomed marked failed")
        meta = await daemon.worker.ledger.get_namespace("app.doomed")  # type: ignore[union-attr]
        assert "Change feed token format is invalid" in meta.last_error
        assert daemon.units["app.doomed"].capture.status.state == "failed"
        await source.app.healthy.insert_many([{"_id": i} for i in range(2, 50)])
        await wait_for(lambda: _captured_all(cfg, source, ["app.healthy"]), 30, what="other namespace keeps going")
        assert daemon.units["app.healthy"].capture.status.state == "running"
    finally:
        await _stop(daemon, task)
    # Nothing was silently restarted from "now": the doomed namespace's new document was never captured.
    committed = (await read_committed(cfg))["app.doomed"]
    assert len(check_committed(committed)) == 1


async def test_throttling_dropped_connections_and_aws_errors_lose_nothing(
    tmp_path: Path, moto_endpoint: str, sandbox: Sandbox, source: AsyncMongoClient
) -> None:
    proxy = await FlakyHttpProxy(moto_endpoint, seed=5).start()
    try:
        cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint,
                          max_batch_events=25)
        await prepare_backends(cfg)  # set-up goes straight to moto
        cfg.aws.endpoint_url = proxy.url  # the daemon goes through the failing endpoint
        proxy.fail_rate = 0.25
        sandbox.source.faults.update({"throttle_rate": 0.3, "retry_after_ms": 5, "empty_page_rate": 0.3,
                                      "drop_rate": 0.03})
        workload = Workload(source, NAMESPACES, keys_per_ns=100, seed=3)
        daemon, task = await _start(cfg)
        try:
            writer = source_client(sandbox.source_uri)  # writes go around the faults' effect on the test's client
            wl = Workload(writer, NAMESPACES, keys_per_ns=100, seed=3)
            for _ in range(500):
                try:
                    await wl.write_one()
                except Exception:
                    pass  # a throttled or dropped write: the workload simply moves on
            await writer.close()
            sandbox.source.faults.update({"throttle_rate": 0.0, "drop_rate": 0.0})
            await wait_for(lambda: _captured_all(cfg, source, NAMESPACES), 240, what="capture under faults")
        finally:
            await _stop(daemon, task)
        assert sum(proxy.failures.values()) > 10, proxy.failures
        assert all(n > 0 for n in proxy.failures.values()), proxy.failures
        assert sum(u.capture.status.throttled for u in daemon.units.values()) > 0
        del workload
    finally:
        await proxy.stop()
