"""`cosmigrate plan` against the sandbox, in real processes: its estimate next to a measured full load, its
probes within their stated bounds (checked from the sandbox's counters), its scratch collection always gone,
and its one-line reasons for what it cannot know."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path

from pymongo import AsyncMongoClient

from bench.plan import NS_COLL, NS_DB, counters, load, measure, run_plan
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import SCRATCH_DB
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, wait_for, write_config

DOCS = int(os.environ.get("COSMIGRATE_PLAN_DOCS", "20000"))
RU_PER_S = float(os.environ.get("COSMIGRATE_PLAN_RU_PER_S", "2000"))


async def test_the_plan_estimates_a_throttled_full_load_and_its_request_units(sandbox: Sandbox) -> None:
    m = await measure(sandbox, DOCS, RU_PER_S, partitions=4)
    shutil.rmtree(m["workdir"], ignore_errors=True)  # bench's own temporary directory (config, ledger, batches)
    assert m["copied"] == DOCS
    assert m["exit_code"] == 0, m["plan"]["lacks"]
    assert m["limit"] == "source RU budget"
    assert 0.75 <= m["time_ratio"] <= 1.25, (m["estimated_s"], m["measured_s"])
    assert 0.8 <= m["ru_ratio"] <= 1.2, (m["estimated_ru"], m["charged_ru"])
    assert m["leftover_scratch"] == []
    # Plan vs actual: status and the journal line at the end of the backfill, from the plan it started with.
    status, line = m["status_plan"], m["journal_line"]
    assert status["made_by"] == "cosmigrate plan" and status["estimated_full_load_s"] == round(m["estimated_s"], 1)
    assert status["elapsed_full_load_s"] is not None and abs(status["elapsed_full_load_s"] - m["measured_s"]) < 1.5
    assert status["estimated_ru"] == round(m["estimated_ru"]) and status["ru_spent"] is None
    assert line["estimated_s"] == status["estimated_full_load_s"] and line["elapsed_s"] is not None


async def _plan_text(config: Path, *args: str) -> tuple[int, list[str], str]:
    """`cosmigrate plan` (text) in its own process: (exit code, stdout lines, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "plan", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env())
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode().splitlines(), err.decode()


def _config(tmp_path: Path, sandbox: Sandbox, **target: str) -> Path:
    cfg = make_config(tmp_path, sandbox.source_uri, target.get("uri", sandbox.target_uri), "file+sqlite")
    cfg.capture.include = [f"{NS_DB}.{NS_COLL}"]
    return write_config(cfg, tmp_path / "cosmigrate.toml")


async def test_the_probes_stay_within_their_stated_bounds(tmp_path: Path, sandbox: Sandbox,
                                                         source: AsyncMongoClient) -> None:
    await load(source, 5000, 4)
    sandbox.source.faults.ru_per_s = 1000  # throttled: the probe must wait inside its time bound, not beyond
    config = _config(tmp_path, sandbox)
    before = await counters(source)
    code, plan, err, seconds = await run_plan(config, "--probe-docs", "600", "--probe-ru", "500",
                                              "--probe-seconds", "4", "--target-probe-docs", "3000")
    after = await counters(source)
    probe = plan["collections"][0]["probe"]
    # From the sandbox's own counters: every change event it served and every feed RU it charged.
    assert 0 < after["events"] - before["events"] <= 600
    assert 0 < after["feed"] - before["feed"] <= 500
    assert abs((after["feed"] - before["feed"]) - probe["ru"]) < 1.0, "the probe's RU is what the sandbox charged"
    assert probe["seconds"] <= 4 + 0.5
    assert seconds < 4 + 4 + 10, "the source probe (4 s) and the target probe (4 s) bound the plan's time"
    assert plan["target"]["docs"] <= 3000 and plan["target"]["seconds"] <= 4 + 0.5
    assert _scratch(sandbox) == []
    assert code == 0, (plan.get("lacks"), err[-500:])


def _scratch(sandbox: Sandbox) -> list[str]:
    """The scratch collections on the sandbox's target, read from its storage."""
    return sorted(sandbox.target.store.databases.get(SCRATCH_DB, {}))


async def test_a_plan_killed_during_its_target_probe_leaves_a_scratch_collection_the_next_plan_removes(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    await load(source, 500, 4)
    config = _config(tmp_path, sandbox)
    sandbox.target.faults.slow_write_ms = 400  # every probe write waits: the kill lands inside the probe
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "plan", "--config", str(config), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, env=child_env())
    try:
        left = await wait_for(lambda: _async(_scratch(sandbox)), 30, interval=0.02, what="the scratch collection")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert _scratch(sandbox) == left, "SIGKILL leaves the scratch collection behind (the case under test)"
    # Discovery never takes it for a collection to migrate, even on a cluster that is read as a source.
    from cosmigrate.mongo import list_namespaces, target_client

    client = target_client(sandbox.target_uri, sandbox.target_ca_file)
    try:
        assert not [ns for ns in await list_namespaces(client, ["*"], []) if ns.startswith(SCRATCH_DB)]
    finally:
        await client.close()
    sandbox.target.faults.slow_write_ms = 0
    code, plan, err, _ = await run_plan(config)
    assert plan["scratch_leftovers_removed"] == left, err[-500:]
    assert _scratch(sandbox) == []


async def _async(value: object) -> object:
    return value


async def test_what_the_plan_cannot_know_is_one_line_each_and_the_rest_is_still_printed(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    await load(source, 300, 4)
    sandbox.source.faults.ru_per_s = 100_000
    # An unreachable target: its rate is unknown, the source's part is still there.
    closed = make_config(tmp_path, sandbox.source_uri, "mongodb://127.0.0.1:9/?tls=false", "file+sqlite")
    closed.target.allow_insecure_tls = True
    closed.capture.include = [f"{NS_DB}.{NS_COLL}"]
    code, lines, err = await _plan_text(write_config(closed, tmp_path / "closed.toml"))
    assert code == 1 and "Traceback" not in err
    assert [line for line in lines if line.startswith("unknown: target: unreachable")], lines
    assert any(line.startswith(f"{NS_DB}.{NS_COLL}: 300 documents") for line in lines), lines
    assert any("RU probe: 300 documents" in line for line in lines), lines
    # collStats and GetChangeStreamTokens refused: one line each; the probe cannot run without the custom action.
    sandbox.source.faults.refuse_collstats = True
    sandbox.source.faults.refuse_head_tokens = True
    config = _config(tmp_path, sandbox)
    code, lines, err = await _plan_text(config)
    unknown = [line for line in lines if line.startswith("unknown: ")]
    assert code == 1 and "Traceback" not in err
    assert any("documents and bytes unknown: collStats failed (Unauthorized" in line and "grant" in line
               for line in unknown), unknown
    assert any("RU per document unknown" in line and "GetChangeStreamTokens" in line for line in unknown), unknown
    assert any("physical partitions unknown" in line for line in unknown), unknown
    assert any(line.startswith("estimated full-load time: unknown") for line in lines), lines
    assert any(line.startswith("target write rate:") for line in lines), "the target's part is still measured"
    # A throttled source: the probe reads nothing within its time bound and says so; nothing is guessed.
    sandbox.source.faults.refuse_collstats = sandbox.source.faults.refuse_head_tokens = False
    sandbox.source.faults.ru_per_s = 5
    await source[NS_DB][NS_COLL].find({}, batch_size=1000).to_list()  # every document read: the partitions in debt
    code, plan, err, _ = await run_plan(config, "--probe-seconds", "2")
    assert code == 1
    coll = plan["collections"][0]
    assert coll["probe"]["docs"] == 0 and coll["probe"]["ru_per_doc"] is None and coll["ru_full_load"] is None
    assert any("throttled" in line for line in plan["lacks"]), plan["lacks"]
    assert plan["estimate"]["ru_total"] is None and "source RU budget" in plan["estimate"]["unknown"]
    # Bad input: one line, exit 2, never a traceback.
    for args in (["--workers", "0"], ["nodot"], ["--probe-seconds", "-1"]):
        code, lines, err = await _plan_text(config, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


async def test_a_first_start_without_a_recorded_plan_records_the_estimate_without_probes(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    from cosmigrate.control import ControlError, request
    from cosmigrate.planrecord import KEY, KIND
    from tests.helpers import prepare_backends
    from tests.test_capture_processes import Child

    await load(source, 300, 4)
    config = _config(tmp_path, sandbox)
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        async def planned() -> dict | None:
            try:
                reply = await request(str(tmp_path / "control.sock"), {"cmd": "status"})
            except ControlError:
                return None  # not listening yet
            plan = reply["status"]["plan"]
            return plan if plan["made_by"] else None

        plan = await wait_for(planned, 60, what="the first start's plan in status")
    finally:
        await child.finish(signal.SIGTERM)
    assert plan["made_by"] == "daemon first start (no probes)"
    # Without the probes the RU per document and the target's rate are unknown: a lower bound, never a guess.
    assert plan["estimate_complete"] is False and plan["estimated_ru"] is None and plan["ru_at_plan_rate"] is None
    assert set(plan["unknown"]) == {"source RU budget", "target write rate"} and plan["limit"] == "workers' CPU"
    assert _scratch(sandbox) == [], "no target probe at a daemon's start"
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress("", KIND, KEY)
    finally:
        await ledger.close()
    assert item is not None and item.doc()["made_by"] == plan["made_by"]


def test_the_status_table_shows_the_plan_next_to_the_elapsed_load() -> None:
    from cosmigrate.statusview import plan_line

    assert plan_line({}) is None
    full = {"made_by": "cosmigrate plan", "estimated_full_load_s": 600.0, "estimate_complete": True,
            "limit": "source RU budget", "elapsed_full_load_s": 130.0, "estimated_ru": 1_200_000}
    line = plan_line(full)
    assert line is not None and line.plain == ("plan: full load 10m (source RU budget), elapsed 2m; "
                                               "source RU 1,200,000")
    bound = plan_line({**full, "estimate_complete": False, "limit": "workers' CPU", "estimated_ru": None})
    assert bound is not None and "at least 10m" in bound.plain and "source RU unknown" in bound.plain
