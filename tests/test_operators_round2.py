"""Issue 22's smaller items an operator meets: the index plan of a collection with only `_id`, `batches list`
with a summary and `--limit`, `cosmigrate indexes` without `--config`, and rates that name their window."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

from pymongo import AsyncMongoClient
from rich.console import Console

from cosmigrate.sandbox import Sandbox
from cosmigrate.statusview import render
from tests.helpers import child_env, wait_for, write_config
from tests.test_apply import Running, config


async def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cosmigrate", *args], capture_output=True,
                                   text=True, timeout=120, env=child_env(env))


async def test_only_id_is_not_planning_for_ever_and_batches_list_summarises_with_a_limit(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = config(tmp_path, sandbox, max_batch_events=10)
    await source.app.d.insert_many([{"_id": i} for i in range(35)])
    path = write_config(cfg, tmp_path / "c.toml")
    async with Running(cfg) as run:
        async def planned() -> bool:
            ns = run.ns_status(await run.status(), "app.d")
            return ns.get("indexes") == "none to build (only _id)" and ns.get("captured_events", 0) >= 35

        await wait_for(planned, 60, what="the index plan of a collection with only _id, and the capture")
    result = await _cli("batches", "list", "--limit", "2", "--config", str(path))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("app.d ")]
    assert len(rows) == 2, result.stdout
    summary = [line for line in result.stderr.splitlines() if line.startswith("app.d:")]
    assert len(summary) == 1 and "batches committed (35 events)" in summary[0] and "latest 2 shown" in summary[0], \
        result.stdout
    everything = await _cli("batches", "list", "--config", str(path))
    assert len([line for line in everything.stdout.splitlines() if line.startswith("app.d ")]) >= 4


async def test_indexes_takes_the_config_like_every_command() -> None:
    result = await _cli("indexes")
    assert "Missing option" not in result.stderr, result.stderr
    assert result.returncode == 2 and "/etc/cosmigrate/cosmigrate.toml" in result.stderr, result.stderr


def test_the_watch_screen_names_its_rate_windows() -> None:
    status = {"cluster_name": "c", "writer": "started", "gap_in_seconds": 0.0, "cutover_threshold_seconds": 10.0,
              "ready_for_cutover": False, "current_time": "2026-01-01T00:00:00.000Z", "not_ready_reasons": ["x"],
              "cutover": "not started", "namespaces": [],
              "backfill": {"namespaces_in_backfill": 1, "docs_copied": 5, "docs_estimated": 10, "percent": 50.0,
                           "rate_docs_per_s": 2.0, "eta_s": 3.0}}
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(render(status))
    assert "2/s over 60 s" in out.getvalue(), out.getvalue()
    from cosmigrate.statusview import COLUMNS

    assert any(header == "ev/s 60s" for header, _, _ in COLUMNS)
