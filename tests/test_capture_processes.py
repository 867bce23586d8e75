"""Crash safety and fencing with real `cosmigrate run` processes (SIGKILL, two owners)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    Workload,
    check_committed,
    child_env,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
    write_config,
)

NAMESPACES = ["app.users", "app.orders", "shop.items"]
# Quick by default; COSMIGRATE_CRASH_KILLS=200 for a soak.
KILLS = int(os.environ.get("COSMIGRATE_CRASH_KILLS", "20"))


class Child:
    """A `cosmigrate run` child whose output is collected as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [asyncio.create_task(self._pump(proc.stdout, self.stdout)),
                         asyncio.create_task(self._pump(proc.stderr, self.stderr))]

    @classmethod
    async def start(cls, config: Path, **env: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", "run", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env(env),
        )
        return cls(proc)

    @staticmethod
    async def _pump(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for line in stream:
            into.append(line.decode(errors="replace").rstrip())

    def events(self) -> list[dict]:
        out = []
        for line in self.stdout:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    async def finish(self, sig: int | None = None, limit_s: float = 60) -> int:
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        try:
            code = await asyncio.wait_for(self.proc.wait(), limit_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            await asyncio.gather(*self._readers)
            tail = "\n".join((self.stdout + self.stderr)[-40:])
            raise AssertionError(f"cosmigrate run did not exit within {limit_s} s of signal {sig}; last lines:\n{tail}") from None
        await asyncio.gather(*self._readers)
        return code


async def _check_all(cfg, source: AsyncMongoClient | None = None) -> bool:
    committed = await read_committed(cfg)
    expected = await source_docs(source, NAMESPACES) if source is not None else {}
    for ns in NAMESPACES:
        if source is not None:
            assert ns in committed, f"{ns} not captured"
        if ns in committed:
            check_committed(committed[ns], expected.get(ns))
    return True


async def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=30,
                      max_batch_age_s=0.2)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    rng = random.Random(2024)
    workload = Workload(source, NAMESPACES, keys_per_ns=300, seed=9)
    stop = asyncio.Event()
    writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.001))
    external = between_put_and_commit = after_commit = 0
    try:
        # A slow machine starts children slowly, and more of them are killed from outside before a crash point
        # fires: keep going (at most 4x the kills) until one landed between the put and the commit.
        while (kills := external + between_put_and_commit + after_commit) < KILLS or (
                between_put_and_commit == 0 and kills < 4 * KILLS):
            child = await Child.start(config, COSMIGRATE_CRASH_POINTS="after_put=0.012,after_commit=0.008")
            try:
                await asyncio.wait_for(asyncio.shield(child.proc.wait()), rng.uniform(0.6, 2.5))
            except TimeoutError:
                external += 1
                code = await child.finish(signal.SIGKILL)
            else:
                code = await child.finish()
                between_put_and_commit += any("crash point after_put" in ln for ln in child.stderr)
                after_commit += any("crash point after_commit" in ln for ln in child.stderr)
            assert code == -signal.SIGKILL, (code, child.stderr[-5:])
            # After every kill: gap-free seqs, and the stored token is exactly the last committed batch's.
            await _check_all(cfg)
    finally:
        stop.set()
        await writer
    assert between_put_and_commit >= 1, "no kill landed between the store put and the ledger commit"
    final = await Child.start(config)
    try:
        await wait_for(lambda: _check_all(cfg, source), 120, what="every change captured after the kills")
    finally:
        assert await final.finish(signal.SIGTERM) == 0, final.stderr[-5:]
    print(f"kills: {external} external, {between_put_and_commit} between put and commit, {after_commit} after commit; "
          f"{workload.writes} writes")


async def test_two_workers_never_both_commit_for_one_namespace(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=20)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=100, seed=4)
    stop = asyncio.Event()
    writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.002))
    first = await Child.start(config)
    second: Child | None = None
    try:
        async def first_committed() -> bool:
            committed = await read_committed(cfg)
            return all(ns in committed and committed[ns].batches for ns in NAMESPACES)

        await wait_for(first_committed, 60, what="first process commits")
        # Another host would have its own control socket and cluster lock; on one host a second daemon
        # is refused at start-up (tests/test_daemon_lock.py), which is not what this test is about.
        cfg.control.socket = str(tmp_path / "second.sock")
        cfg.daemon.lock_file = str(tmp_path / "other-host.lock")
        second = await Child.start(write_config(cfg, tmp_path / "second.toml"))

        # With leases the second worker shares the namespaces: it steals one per balance round until neither
        # holds two more than the other (3 namespaces: 2 and 1), and the first stops each one it lost.
        def moved() -> set[str]:
            return {e["unit"] for e in second.events() if e.get("event") == "unit stolen"} if second else set()

        async def shared() -> bool:
            lost = {e["unit"] for e in first.events() if e.get("event") == "unit lost"}
            return bool(moved()) and moved() <= lost

        try:
            await wait_for(shared, 90, what="the second worker to take namespaces over from the first")
        except AssertionError:
            for name, child in (("first", first), ("second", second)):
                for e in child.events():
                    if "unit" in e.get("event", "") or e.get("level") in ("warning", "error"):
                        print(name, {k: str(v)[:160] for k, v in e.items() if k not in ("cluster", "timestamp")})
                print(name, child.stderr[-5:])
            raise
        await asyncio.sleep(3 * cfg.leases.balance_s)  # settled: nothing more moves
    finally:
        stop.set()
        await writer
    try:
        await wait_for(lambda: _check_all(cfg, source), 60, what="the two workers to capture everything")
    finally:
        # A worker that lost namespaces stays up with the rest (it is not fenced as a whole).
        assert first.proc.returncode is None
        assert await first.finish(signal.SIGTERM) == 0, first.stderr[-5:]
        assert second is not None and await second.finish(signal.SIGTERM) == 0
    assert len(moved()) == 1, moved()  # 3 namespaces over 2 workers: one steal, then a steady state
    committed = await read_committed(cfg)
    for ns in moved():
        epochs = committed[ns].epochs
        assert set(epochs) == {1, 2}, epochs
        # Once the second owner committed, the first never did again.
        assert epochs == sorted(epochs), f"{ns}: commits interleaved between owners: {epochs}"
