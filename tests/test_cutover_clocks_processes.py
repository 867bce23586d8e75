"""The cutover and the two clocks, with real `cosmigrate run` processes (issue 23 part 1, cases 1 and 3).

1. A cutover that stops after its `apply` step (here: exit 6, documents differ) must leave freshness measuring:
   the target falling behind afterwards shows as lag, never as `current` with lag 0.
3. A cutover resumed at `recheck` after a restart must re-check the batches applied since the last pass, even
   when the new applier is still waiting for its unique indexes (its written_seq is -1, "unknown", until then).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.config import Config
from cosmigrate.control import ControlError, request
from cosmigrate.sandbox import Sandbox
from tests.helpers import assert_converged, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child
from tests.test_cutover_processes import _config, _status, _stored_step, cli, ctl

NS = "app.users"


async def _answers(socket: str) -> bool:
    try:
        return bool((await request(socket, {"cmd": "ping"}, limit_s=1)).get("ok"))
    except ControlError:
        return False


async def _ns_status(config: Path) -> dict | None:
    st = await _status(config)
    if st is None:
        return None
    return next((n for n in st["namespaces"] if n["namespace"] == NS), None)


async def _settled(config: Path, source: AsyncMongoClient, target: AsyncMongoClient) -> bool:
    """Converged, and the ledger's applied_seq at the last committed batch (nothing left to re-apply)."""
    n = await _ns_status(config)
    return bool(n and n["pending_batches"] == 0 and await assert_converged(source, target, [NS]))


async def _configured(tmp_path: Path, sandbox: Sandbox, threshold_s: float = 10.0) -> tuple[Config, Path]:
    cfg = _config(tmp_path, sandbox)
    cfg.apply.cutover_threshold_seconds = threshold_s
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    return cfg, config


async def test_a_cutover_stopped_after_apply_leaves_lag_measuring(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg, config = await _configured(tmp_path, sandbox, threshold_s=2.0)
    await source.app.users.insert_many([{"_id": i, "v": i} for i in range(200)])
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await wait_for(lambda: _settled(config, source, target), 90, interval=0.5, what="convergence")
        # A target document that differs: the cutover gets through `apply`, then its re-check stops it (exit 6).
        await target.app.users.update_one({"_id": 7}, {"$set": {"v": -1}})
        code, _, err = await ctl(config, "cutover")
        assert code == 6, err[-2000:]
        assert await _stored_step(cfg) == "recheck"

        # Afterwards the application writes 20 documents that the target does not get (the writer is stopped).
        assert (await ctl(config, "writer", "stop"))[0] == 0
        await source.app.users.insert_many([{"_id": 1000 + i, "v": i} for i in range(20)])

        async def behind() -> dict | None:
            n = await _ns_status(config)
            return n if n and n["lag_seconds"] > 0 and n["freshness"] == "behind" else None

        n = await wait_for(behind, 30, interval=0.3, what="lag to show the target 20 documents behind")
        assert n["pending_events"] >= 0 and await target.app.users.count_documents({}) == 200
        metrics = (await ctl(config, "metrics"))[1]
        lag_lines = [line for line in metrics.splitlines() if line.startswith("cosmigrate_lag_seconds{")]
        assert lag_lines and all(float(line.rsplit(" ", 1)[1]) > 0 for line in lag_lines), lag_lines
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]


async def test_a_cutover_resumed_at_recheck_rechecks_what_changed_while_the_applier_starts(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    cfg, config = await _configured(tmp_path, sandbox)
    await source.app.users.create_index("u", unique=True, name="u_1")  # Cosmos: unique only on an empty collection
    await source.app.users.insert_many([{"_id": i, "v": i, "u": i} for i in range(300)])
    child = await Child.start(config, COSMIGRATE_CRASH_POINTS="cutover_before_recheck=1")
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await wait_for(lambda: _settled(config, source, target), 90, interval=0.5, what="convergence")
        code, out, err = await cli(config, "verify")  # a completed pass: the re-check log starts here
        assert code == 0 and json.loads(out)["equal"], err[-2000:]
        # Changes after the pass (continuous verification is off: only the cutover's re-check looks at them).
        for i in range(0, 300, 10):
            await source.app.users.update_one({"_id": i}, {"$set": {"v": i + 1000}})
        await wait_for(lambda: _settled(config, source, target), 90, interval=0.5, what="the updates applied")
        code, _, err = await ctl(config, "cutover")
        assert code != 0
        assert await child.finish() == -signal.SIGKILL
        assert "crash point cutover_before_recheck" in "\n".join(child.stderr)
    finally:
        if child.proc.returncode is None:
            await child.finish(signal.SIGKILL)
    assert await _stored_step(cfg) == "recheck", "stopped at recheck, before its work"

    # While the daemon is down the target drifts on a changed document, and the next applier is slow to start:
    # its unique index has to be built again first.
    await target.app.users.update_one({"_id": 20}, {"$set": {"v": -1}})
    await target.app.users.drop_index("u_1")
    sandbox.target.faults.slow_index_ms = 8000
    child = await Child.start(config)
    try:
        # At once, as an operator's retry would: `ctl status` itself waits for catch-up, ping does not.
        await wait_for(lambda: _answers(cfg.control.socket), 60, interval=0.05, what="the daemon's control socket")
        code, _, err = await ctl(config, "cutover")
        assert code == 6, f"the resumed re-check must find the drifted document (exit {code}): {err[-2000:]}"
        assert "still differ" in err
        n = await _ns_status(config)
        assert n is not None and n["mismatches"] == 1, n
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
