"""The cutover and the two clocks, with real `cosmigrate run` processes (issue 23 part 1, cases 1 and 3).

1. A cutover that stops after its `apply` step (here: exit 6, documents differ) must leave freshness measuring:
   the target falling behind afterwards shows as lag, never as `current` with lag 0.
3. A cutover resumed at `recheck` after a restart must re-check the batches applied since the last pass, even
   when the new applier is still waiting for its unique indexes (its written_seq is -1, "unknown", until then).
And one found in review: a cutover resumed at `apply` must not stamp the heads stored before the kill "now".
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
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


async def _configured(tmp_path: Path, sandbox: Sandbox, threshold_s: float = 10.0,
                      sample_interval_s: float | None = None) -> tuple[Config, Path]:
    cfg = _config(tmp_path, sandbox)
    cfg.apply.cutover_threshold_seconds = threshold_s
    if sample_interval_s is not None:  # samples only when asked (`ctl status`, a wait): no sample in between
        cfg.capture.head_sample_interval_s = sample_interval_s
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    return cfg, config


async def _cutover_killed_before(cfg: Config, config: Path, child: Child, step: str) -> None:
    """Runs the cutover into the daemon's crash point `cutover_before_<step>`: killed there, that step stored."""
    code, _, err = await ctl(config, "cutover")
    assert code != 0, err[-2000:]
    assert await child.finish() == -signal.SIGKILL
    assert f"crash point cutover_before_{step}" in "\n".join(child.stderr)
    assert await _stored_step(cfg) == step, f"stopped at {step}, before its work"


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
        await _cutover_killed_before(cfg, config, child, "recheck")
    finally:
        if child.proc.returncode is None:
            await child.finish(signal.SIGKILL)

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


async def test_a_cutover_resumed_at_apply_claims_no_catch_up_for_its_old_stored_heads(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """The `apply` step records the quiesced heads as a sample. Resumed in a later run, the stored heads are
    the ones sampled before the kill: stamped with the moment of the resumed step, they made freshness caught
    up "now", lag near 0, while the target missed what the source was written since (here 20 documents)."""
    cfg, config = await _configured(tmp_path, sandbox, threshold_s=10.0, sample_interval_s=300.0)
    cfg.deletes.enabled = False  # no background pass: nothing samples the head but this test and the cutover
    write_config(cfg, config)
    await source.app.users.insert_many([{"_id": i, "v": i} for i in range(200)])
    child = await Child.start(config, COSMIGRATE_CRASH_POINTS="cutover_before_apply=1")
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await wait_for(lambda: _settled(config, source, target), 90, interval=0.5, what="convergence")
        await _cutover_killed_before(cfg, config, child, "apply")  # the quiesced heads are stored
    finally:
        if child.proc.returncode is None:
            await child.finish(signal.SIGKILL)

    child = await Child.start(config)
    try:
        async def current() -> dict | None:
            n = await _ns_status(config)
            return n if n and n["freshness"] == "current" and n["lag_seconds"] == 0 else None

        await wait_for(current, 60, interval=0.5, what="caught up after the restart")
        # The cutover was abandoned: the applications write again (20 documents), the target does not get them.
        assert (await ctl(config, "writer", "stop"))[0] == 0
        await source.app.users.insert_many([{"_id": 1000 + i, "v": i} for i in range(20)])
        written = time.monotonic()
        await asyncio.sleep(3.0)  # the scenario, not a wait for a condition: the writes are 3 s old at the cutover
        code, _, err = await ctl(config, "cutover")  # resumes at `apply`, with the heads stored before the kill
        assert code != 0, err[-2000:]
        behind_s = time.monotonic() - written
        n = await _ns_status(config)
        assert n is not None and await target.app.users.count_documents({}) == 200
        assert n["lag_seconds"] >= behind_s, f"the target lacks writes {behind_s:.1f}s old, yet lag says: {n}"
    finally:
        assert await child.finish(signal.SIGTERM) == 0, child.stderr[-5:]
