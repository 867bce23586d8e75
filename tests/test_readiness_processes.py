"""READY means equal: real `cosmigrate run` processes, judged only by what `ctl status` says.

Whenever status says ready_for_cutover with gap 0 and nothing pending, the
target must equal the source at that instant: no grace period, no retry. The
source is quiet whenever status is asked (the test's own writes are done), so
any difference is a false READY. Checked across restarts, SIGKILL, empty
pages, dropped connections, a full store and a deleted batch object.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.sandbox import Sandbox
from tests.helpers import Workload, assert_converged, backends, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

NAMESPACES = ["app.users", "app.orders", "shop.items"]
FAULT_POLLS = int(os.environ.get("COSMIGRATE_READY_FAULT_POLLS", "4"))


async def status(config: Path) -> dict[str, Any] | None:
    """`ctl status --json`, or None while the daemon's socket does not answer."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), "status", "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    # Answered: 0 ready, 2 not ready, 3 a namespace failed (1: no daemon on the socket).
    return json.loads(out) if proc.returncode in (0, 2, 3) and out.strip() else None


async def writer(config: Path, action: str) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config),
                                                "writer", action, stdout=subprocess.DEVNULL)
    assert await proc.wait() == 0


def claims_done(st: dict[str, Any] | None) -> bool:
    return bool(st and st["ready_for_cutover"] and st["gap_in_seconds"] == 0
                and all(n["pending_batches"] == 0 and n["pending_events"] == 0 for n in st["namespaces"]))


class Judge:
    """Asks status and, each time it claims done, compares both sides at once."""

    def __init__(self, config: Path, source: AsyncMongoClient, target: AsyncMongoClient) -> None:
        self.config, self.source, self.target = config, source, target
        self.claims = 0
        self.last: dict[str, Any] | None = None

    async def check(self) -> bool:
        self.last = st = await status(self.config)
        if not claims_done(st):
            return False
        self.claims += 1
        await assert_converged(self.source, self.target, NAMESPACES)  # raises: a false READY
        return True

    async def until_ready(self, limit_s: float = 120) -> None:
        await wait_for(self.check, limit_s, interval=0.25, what="READY with gap 0")  # each poll is a `ctl` process

    async def never_ready(self, polls: int = FAULT_POLLS) -> None:
        """Under a fault that hides writes, status must not claim done (check() would raise)."""
        for _ in range(polls):
            assert not await self.check(), f"READY while the target misses writes: {self.last}"


async def _setup(request, backend: str, tmp_path: Path, sandbox: Sandbox, **capture: Any) -> Path:
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, endpoint, **capture)
    cfg.capture.head_sample_interval_s = 0.5
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    return config


async def _start(config: Path) -> Child:
    child = await Child.start(config)
    await wait_for(lambda: status(config), 60, what="the daemon's control socket")
    return child


@pytest.mark.parametrize("backend", backends("file+sqlite"))
async def test_ready_means_equal_across_restarts_and_kills(
    request, backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    config = await _setup(request, backend, tmp_path, sandbox)
    workload = Workload(source, NAMESPACES, keys_per_ns=300, seed=5)
    await workload.run_bulk(3000)
    judge = Judge(config, source, target)
    child = await _start(config)
    try:
        await writer(config, "start")
        await judge.until_ready()
        # Writes land, then status is asked at once: it must not vouch for a head sampled before them.
        for _ in range(3):
            await workload.run(50)
            await judge.check()
            await judge.until_ready()
        # Graceful restart with writes while the daemon is down.
        assert await child.finish(signal.SIGTERM) == 0
        await workload.run_bulk(1000)
        child = await _start(config)
        await judge.check()
        await judge.until_ready()
        # SIGKILL in the middle of catching up on a backlog.
        await workload.run_bulk(2000)
        assert await child.finish(signal.SIGKILL) == -signal.SIGKILL
        await workload.run(100)
        child = await _start(config)
        await judge.until_ready()
        assert judge.claims >= 5
    finally:
        await child.finish(signal.SIGTERM)


async def test_ready_means_equal_under_empty_pages_and_dropped_connections(
    request, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    config = await _setup(request, "file+sqlite", tmp_path, sandbox)
    workload = Workload(source, NAMESPACES, keys_per_ns=200, seed=6)
    await workload.run_bulk(1000)
    judge = Judge(config, source, target)
    child = await _start(config)
    try:
        await writer(config, "start")
        await judge.until_ready()
        # A throttled stream: every page empty, while the source has new writes.
        sandbox.source.faults.empty_page_rate = 1.0
        await workload.run(200)
        await judge.never_ready()
        st = judge.last
        assert st is not None and sum(n["empty_pages"] for n in st["namespaces"]) > 0
        sandbox.source.faults.empty_page_rate = 0.0
        await judge.until_ready()
        # Every connection to the source drops: nothing can be read or sampled. (The writes land while pages
        # are empty, so the daemon cannot have read them before the drops begin.)
        sandbox.source.faults.empty_page_rate = 1.0
        await workload.run(200)
        sandbox.source.faults.drop_rate = 1.0
        sandbox.source.faults.empty_page_rate = 0.0
        sandbox.source.drop_connections()
        await judge.never_ready()
        assert judge.last is not None and not judge.last["ready_for_cutover"]
        sandbox.source.faults.drop_rate = 0.0
        await judge.until_ready()
    finally:
        assert await child.finish(signal.SIGTERM) == 0


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


async def test_ready_means_equal_with_a_full_store_and_a_lost_batch(
    request, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    store_dir = tmp_path / "batches"
    if not _mount_tmpfs(store_dir, "8m"):
        pytest.skip("needs root to mount a small tmpfs as the store's disk")
    try:
        config = await _setup(request, "file+sqlite", tmp_path, sandbox)
        workload = Workload(source, NAMESPACES, keys_per_ns=200, seed=7)
        await workload.run_bulk(500)
        judge = Judge(config, source, target)
        child = await _start(config)
        try:
            await writer(config, "start")
            await judge.until_ready()
            # Fill the store's disk, then write: batches cannot be put.
            filler = store_dir / "filler"
            await asyncio.to_thread(subprocess.run, ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"],
                                    capture_output=True)
            await workload.run(300)
            await judge.never_ready()
            filler.unlink()
            await judge.until_ready()
            # A committed batch whose object is deleted before it is applied.
            await writer(config, "stop")
            await workload.run(100)
            pending = await wait_for(lambda: _pending_files(store_dir, config), 30, what="a pending batch object")
            for path in pending:
                path.unlink()
            await writer(config, "start")
            await judge.never_ready()
            st = judge.last
            assert st is not None and any(n["state"] == "failed" for n in st["namespaces"]), st
        finally:
            await child.finish(signal.SIGTERM)
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(store_dir)], capture_output=True)


async def _pending_files(store_dir: Path, config: Path) -> list[Path]:
    st = await status(config)
    if not st:
        return []
    return await asyncio.to_thread(_unapplied_files, store_dir, st)


def _unapplied_files(store_dir: Path, st: dict[str, Any]) -> list[Path]:
    out = []
    for n in st["namespaces"]:
        if n["captured_seq"] > n["applied_seq"]:
            db, _, coll = n["namespace"].partition(".")
            for path in store_dir.rglob("*"):
                name = re.fullmatch(r"(\d{12})-e\d+", path.name)  # batch objects only (no temp files, no markers)
                if name and path.parent.name == coll and path.parent.parent.name == db:
                    if int(name.group(1)) > n["applied_seq"]:
                        out.append(path)
    return out
