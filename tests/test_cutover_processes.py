"""Cutover and verification with real processes: SIGKILL at every cutover step, and the whole migration with deletes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.cutover.machine import STEPS
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from tests.helpers import Workload, assert_converged, child_env, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

NAMESPACES = ["app.users", "app.orders", "shop.items"]


async def cli(config: Path, *args: str, env: dict[str, str] | None = None, limit_s: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", *args, "--config", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(env),
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def ctl(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "--config", str(config), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _status(config: Path) -> dict | None:
    code, out, _ = await ctl(config, "status", "--json")
    return json.loads(out) if code in (0, 2, 3, 4) and out.strip() else None  # 2: not ready, 3: failed, 4: cutover complete


def _config(tmp_path: Path, sandbox: Sandbox):
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    cfg.deletes.interval_s = 0.5
    cfg.deletes.page_size = 200
    cfg.verify.page_size = 200
    cfg.cutover.quiesce_s = 0.5
    cfg.cutover.precheck_timeout_s = 60
    return cfg


async def _stored_step(cfg) -> str:
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress("", "cutover", "state")
        return str(item.doc()["step"]) if item else ""
    finally:
        await ledger.close()


async def test_sigkill_at_every_cutover_step_resumes_to_an_equal_target(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = _config(tmp_path, sandbox)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=300, seed=12, delete_share=0.15)
    await workload.run_bulk(2000)
    # The bulk copy holds documents the source then deletes (before capture starts).
    for ns in NAMESPACES:
        db, _, coll = ns.partition(".")
        await target[db][coll].insert_many([d async for d in source[db][coll].find()])
    await workload.run_bulk(500)
    ledger = open_ledger(cfg)
    await ledger.set_writer("started", "test", 0.0)
    await ledger.close()
    kills = []
    for step in STEPS:
        code, _, err = await cli(config, "cutover", env={"COSMIGRATE_CRASH_POINTS": f"cutover_{step.name}=1"})
        assert code == -signal.SIGKILL, (step.name, code, err[-2000:])
        assert f"crash point cutover_{step.name}" in err
        assert await _stored_step(cfg) == step.name, "the step's completion was stored before the kill"
        kills.append(step.name)
    report_file = tmp_path / "cutover.json"
    code, out, err = await cli(config, "cutover", "--report", str(report_file))
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report == json.loads(report_file.read_text())
    assert report["equal"] and report["verdict"].startswith("the target equals the source"), report
    await assert_converged(source, target, NAMESPACES)
    assert await _stored_step(cfg) == "complete"
    assert kills == [s.name for s in STEPS]
    assert workload.deletes > 0
    # Run again: already complete, the same report.
    code, out, err = await cli(config, "cutover")
    assert code == 0 and "already complete" in err and json.loads(out)["equal"]


@pytest.mark.parametrize("backend", ["file+sqlite"])
async def test_workload_with_deletes_then_verify_and_cutover_with_real_processes(
    backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = _config(tmp_path, sandbox)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    workload = Workload(source, NAMESPACES, keys_per_ns=400, seed=21, delete_share=0.1)
    await workload.run_bulk(2000)
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await workload.run(800)
        await workload.run_bulk(1500)
        await wait_for(lambda: assert_converged(source, target, NAMESPACES), 90, interval=0.5, what="convergence")
        assert workload.deletes > 100

        # A target corrupted on purpose is reported exactly (the writer is stopped, so nothing repairs it).
        assert (await ctl(config, "writer", "stop"))[0] == 0
        users = [d async for d in source.app.users.find().sort("_id", 1).limit(4)]
        changed, reordered, removed = users[0], users[1], users[2]
        await target.app.users.update_one({"_id": changed["_id"]}, {"$set": {"v": -1}})
        await target.app.users.replace_one({"_id": reordered["_id"]}, dict(reversed(list(reordered.items()))))
        await target.app.users.delete_one({"_id": removed["_id"]})
        await target.app.users.insert_one({"_id": "extra-doc", "v": 1})
        report_file = tmp_path / "verify.json"
        code, out, err = await cli(config, "verify", "--report", str(report_file), "--max-mismatches", "10")
        assert code == 6, err[-2000:]
        report = json.loads(report_file.read_text())
        found = sorted(((m["_id"], m["kind"], m.get("path", ""), m.get("difference", "")) for m in report["mismatches"]),
                       key=repr)
        assert found == sorted([
            (changed["_id"], "different", "v", "value"),
            (reordered["_id"], "different", "v", "field order"),  # the target keeps _id first
            (removed["_id"], "missing", "", ""),
            ("extra-doc", "extra", "", ""),
        ], key=repr), found
        st = await _status(config)
        assert st is not None and not st["ready_for_cutover"]
        assert next(n for n in st["namespaces"] if n["namespace"] == "app.users")["mismatches"] == 4
        # Repair by hand, then the re-check clears them.
        await target.app.users.delete_many({"_id": {"$in": ["extra-doc", changed["_id"], reordered["_id"]]}})
        await target.app.users.insert_many([changed, reordered, removed])
        assert (await ctl(config, "writer", "start"))[0] == 0
        code, out, err = await cli(config, "verify")
        assert code == 0, err[-2000:]
        assert json.loads(out)["equal"]

        # More writes with deletes, then the applications stop and the cutover runs in the daemon.
        await workload.run(300)
        report_file = tmp_path / "cutover.json"
        code, out, err = await ctl(config, "cutover", "--report", str(report_file))
        assert code == 0, err[-2000:]
        report = json.loads(report_file.read_text())
        assert report["equal"] and report["verdict"].startswith("the target equals the source"), report
        assert sum(n["documents"] for n in report["namespaces"]) == sum(
            [await source[ns.split(".")[0]][ns.split(".")[1]].count_documents({}) for ns in NAMESPACES])
        assert all(n["verified"] == n["documents"] for n in report["namespaces"])
        await assert_converged(source, target, NAMESPACES)
        st = await _status(config)
        assert st is not None and st["cutover"] == "cutover complete" and st["writer"] == "stopped"
        code, _, err = await ctl(config, "writer", "start")
        assert code == 1 and "--force" in err
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]


async def _verify_pass(cfg, ns: str) -> dict:
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress(ns, "verify", "pass")
        return item.doc() if item else {}
    finally:
        await ledger.close()


async def test_a_killed_verify_pass_resumes_where_it_stopped(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg = _config(tmp_path, sandbox)
    cfg.verify.page_size = 50
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    docs = [{"_id": i, "v": i} for i in range(400)]
    await source.app.users.insert_many(docs)
    await target.app.users.insert_many(docs)
    ranges = []
    for _ in range(5):
        code, _, err = await cli(config, "verify", env={"COSMIGRATE_CRASH_POINTS": "verify_range=1"})
        assert code == -signal.SIGKILL, err[-2000:]
        state = await _verify_pass(cfg, "app.users")
        ranges.append((state["number"], state["ranges"], state["docs"]))
    # Each run resumed the same pass one range further (the first three: the MinKey, null and NaN brackets, empty):
    # nothing verified was lost, nothing done twice.
    assert ranges == [(1, 1, 0), (1, 2, 0), (1, 3, 0), (1, 4, 50), (1, 5, 100)], ranges
    code, out, err = await cli(config, "verify")
    assert code == 0, err[-2000:]
    report = json.loads(out)
    assert report["equal"] and report["namespaces"][0]["verified"] == 400 and report["namespaces"][0]["pass"] == 1


async def test_verify_and_cutover_without_a_daemon_or_config_say_what_to_do(tmp_path: Path) -> None:
    for cmd in ("verify", "cutover"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", cmd, "--socket", str(tmp_path / "none.sock"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        lines = err.decode().strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and "give --config" in lines[0], err
        assert "Traceback" not in err.decode()
