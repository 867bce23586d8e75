"""The whole migration with real processes: `cosmigrate run` children, `cosmigrate ctl`, SIGKILL during apply."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.sandbox import Sandbox
from tests.helpers import Workload, assert_converged, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

NAMESPACES = ["app.users", "app.orders", "app.events", "shop.items", "shop.carts"]
CHANGES = int(os.environ.get("COSMIGRATE_E2E_CHANGES", "10000"))  # 50000 for the full size
APPLY_KILLS = int(os.environ.get("COSMIGRATE_APPLY_KILLS", "6"))


async def ctl(config: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    # `status` exits 2 while not ready and 3 when a namespace failed: the daemon answered either way.
    assert proc.returncode in ((0, 2, 3) if args[0] == "status" else (0,)), err.decode()
    return out.decode()


LARGE_SIZES = [5 * 1024, 1024 * 1024, 4 * 1024 * 1024, 16 * 1024 * 1024 - 16 * 1024]


async def _large_documents(source: AsyncMongoClient, tag: str) -> None:
    """Documents from 5 KB to just under 16 MB, inserted then replaced: they must arrive byte for byte."""
    coll = source.app.users
    for i, size in enumerate(LARGE_SIZES):
        _id = f"large-{i}"
        filler = (tag * (size // len(tag) + 1))[: size - 200]
        await coll.replace_one({"_id": _id}, {"_id": _id, "tag": tag, "blob": filler, "n": i}, upsert=True)


async def _ctl_ready(config: Path) -> bool:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), "status", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    await proc.communicate()
    return proc.returncode in (0, 2, 3)  # the daemon answered (ready or not)


@pytest.mark.timeout(900)  # on a loaded 2-core machine moto serves the s3+dynamodb run several times slower
@pytest.mark.parametrize("backend", ["file+sqlite", "s3+dynamodb"])
async def test_full_migration_with_real_processes(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient
) -> None:
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, endpoint)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=2000, seed=77)
    await workload.run_bulk(CHANGES // 5)  # before the daemon starts: replayed from the beginning
    await _large_documents(source, "before")
    child = await Child.start(config)
    try:
        await wait_for(lambda: _ctl_ready(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start")).strip() == "writer started"
        await workload.run_bulk(CHANGES - CHANGES // 5)
        await _large_documents(source, "during")
        assert workload.writes >= CHANGES
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 600, interval=1.0, what="convergence")
        async def ready() -> bool:  # a delete sweep after the last change may still be running on a loaded machine
            status = await ctl(config, "status", "--json")
            assert '"ready_for_cutover": true' in status, status[status.find("not_ready_reasons"):][:800]
            return True

        await wait_for(ready, 120, interval=1.0, what="ready for cutover")
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]


async def test_sigkill_during_apply_still_converges(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
                                                    target: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=100)
    cfg.apply.max_batches_per_round = 2
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=500, seed=8)
    await workload.run_bulk(5000)
    first = await Child.start(config)
    await wait_for(lambda: _ctl_ready(config), 60, what="the daemon's control socket")
    await ctl(config, "writer", "start")
    await first.finish(signal.SIGKILL)
    rng = random.Random(31)
    kills = 0
    stop = asyncio.Event()
    writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.001))
    try:
        while kills < APPLY_KILLS:
            child = await Child.start(config, COSMIGRATE_CRASH_POINTS="after_write=0.05,after_mark=0.05")
            try:
                await asyncio.wait_for(asyncio.shield(child.proc.wait()), rng.uniform(0.8, 2.5))
            except TimeoutError:
                pass
            assert await child.finish(signal.SIGKILL) == -signal.SIGKILL
            kills += 1
    finally:
        stop.set()
        await writer
    final = await Child.start(config)
    try:
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 120, interval=1.0, what="convergence")
    finally:
        assert await final.finish(signal.SIGTERM) == 0
