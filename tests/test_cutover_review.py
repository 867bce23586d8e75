"""Adversarial review of the cutover machine: sequences that must never end in a claim the tool cannot back.

1. A kill right after `complete` is stored must not leave the writer started: the daemon that starts next
   would apply the source's changes over the target the applications now own, without `--force`.
2. A collection the applications create during the cutover (after its precheck, before discovery's next
   round) must stop it as "still being written", never end in `equal: true` without it.
"""

from __future__ import annotations

import asyncio
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
