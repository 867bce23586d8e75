"""Adversarial review of the cutover machine: sequences that must never end in a claim the tool cannot back.

1. A kill right after `complete` is stored must not leave the writer started: the daemon that starts next
   would apply the source's changes over the target the applications now own, without `--force`.
2. A collection the applications create during the cutover (after its precheck, before discovery's next
   round) must stop it as "still being written", never end in `equal: true` without it.
3. A cutover resumed at `sweep` with the writer stopped must end at once, not hang in the writer's gate.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.cutover.machine import EXIT_WRITTEN
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from tests.helpers import prepare_backends, wait_for, write_config
from tests.test_apply import Running
from tests.test_cutover_processes import _config, _stored_step, cli


async def _writer_state(cfg) -> str:
    ledger = open_ledger(cfg)
    try:
        return (await ledger.get_control()).writer
    finally:
        await ledger.close()


async def test_a_kill_right_after_complete_is_stored_leaves_the_writer_stopped(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
) -> None:
    cfg = _config(tmp_path, sandbox)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i, "v": i} for i in range(50)])
    ledger = open_ledger(cfg)
    await ledger.set_writer("started", "test", 0.0)
    await ledger.close()
    code, _, err = await cli(config, "cutover", env={"COSMIGRATE_CRASH_POINTS": "cutover_complete=1"})
    assert code == -signal.SIGKILL, err[-2000:]
    assert await _stored_step(cfg) == "complete"
    assert await _writer_state(cfg) == "stopped", "a completed cutover whose writer a restart would start again"


async def _cutover_job(run: Running, action: str = "status") -> dict:
    reply = await run.daemon.handle_control({"cmd": "cutover", "action": action})
    assert reply["ok"], reply
    return dict(reply["cutover"])


async def test_a_collection_created_during_the_cutover_stops_it_as_still_written(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = _config(tmp_path, sandbox)
    cfg.capture.discovery_interval_s = 300.0  # discovery's next round comes long after this cutover
    cfg.cutover.quiesce_s = 3.0
    await source.app.users.insert_many([{"_id": i, "v": i} for i in range(50)])
    async with Running(cfg) as run:
        await run.writer("start")

        async def ready() -> bool:
            return bool((await run.status())["ready_for_cutover"])

        await wait_for(ready, 60, what="ready for cutover")
        await _cutover_job(run, "start")

        async def quiescing() -> bool:
            return (await _cutover_job(run))["step"] == "quiesce"

        await wait_for(quiescing, 60, interval=0.05, what="the cutover in its quiesce step")
        await source.app.late.insert_many([{"_id": i} for i in range(5)])  # an application still writing

        async def ended() -> dict | None:
            job = await _cutover_job(run)
            return None if job["running"] else job["result"]

        result = await wait_for(ended, 120, what="the cutover's end")
        assert await target.app.late.count_documents({}) == 0
        assert result["exit_code"] == EXIT_WRITTEN, json.dumps(result)[:2000]
        assert "app.late" in result["message"], result["message"]
        assert await _stored_step(cfg) == "precheck", "the new collection needs capture and catch-up first"
        # The applications stopped: run again, its precheck waits for the new collection, and it completes.
        await _cutover_job(run, "start")
        result = await wait_for(ended, 120, what="the second cutover's end")
        assert result["exit_code"] == 0, json.dumps(result)[:2000]
        assert {n["namespace"] for n in result["report"]["namespaces"]} == {"app.users", "app.late"}
        assert await target.app.late.count_documents({}) == 5


async def test_a_cutover_resumed_at_sweep_with_the_writer_stopped_ends_at_once_instead_of_hanging(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """The final sweep deletes through the writer. Resumed at `sweep` (the precheck, which checks the writer, is
    behind it) with the writer stopped, a document to delete held the step for ever, deaf to `--cancel`."""
    from tests.test_capture_processes import Child
    from tests.test_cutover_clocks_processes import _configured, _cutover_killed_before, _settled
    from tests.test_cutover_processes import _status, ctl

    cfg, config = await _configured(tmp_path, sandbox)
    await source.app.users.insert_many([{"_id": i, "v": i} for i in range(100)])
    child = await Child.start(config, COSMIGRATE_CRASH_POINTS="cutover_before_sweep=1")
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await wait_for(lambda: _settled(config, source, target), 90, interval=0.5, what="convergence")
        await _cutover_killed_before(cfg, config, child, "sweep")
    finally:
        if child.proc.returncode is None:
            await child.finish(signal.SIGKILL)
    await target.app.users.insert_one({"_id": "stale", "v": 0})  # the source deleted it: the sweep must delete it
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "stop"))[0] == 0
        code, _, err = await ctl(config, "cutover")  # ctl's own limit: 120 s
        assert code != 0 and "writer" in err, err[-2000:]
        assert await _stored_step(cfg) == "sweep"
        assert await target.app.users.count_documents({"_id": "stale"}) == 1
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
