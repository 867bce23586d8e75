"""Issue 23, the delete path: each test makes one side slow (the sandbox's fault switches) so the other wins a race.

A real in-process daemon against the sandbox; the background sweep is stopped where a test drives a pass itself,
so that the pass runs exactly at the moment the race needs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.deletes.sweep import DeleteSweep
from cosmigrate.idorder import encode_id
from cosmigrate.sandbox import Sandbox
from cosmigrate.timeouts import within
from tests.helpers import assert_converged, wait_for
from tests.test_apply import Running
from tests.test_deletes import config

NS = "app.users"


async def _true(value: bool) -> bool:
    return value


async def _settled(run: Running) -> DeleteSweep:
    """Converged, one sweep pass completed at the current head; then the background sweeps stop (the test drives)."""
    source, target = run.daemon.worker.source, run.daemon.worker.target
    await wait_for(lambda: assert_converged(source, target, [NS]), 30, what="the initial copy")
    proof = run.daemon.proof
    assert proof is not None and proof.deletes is not None
    sweep = proof.deletes.sweeps[NS]

    async def reconciled() -> bool:
        return sweep.state.completed and not sweep.state.running \
            and sweep.state.last_head == sweep.link.latest_head()

    await wait_for(reconciled, 30, what="a sweep pass at the current head")
    await proof.deletes.stop()
    return sweep


async def _applied_all(run: Running) -> None:
    cap, app = run.daemon.units[NS].capture, run.daemon.units[NS].applier
    await wait_for(lambda: _true(app.status.written_seq >= cap.status.committed_seq), 30, what="apply to catch up")


async def _captured(run: Running, after: int) -> None:
    cap = run.daemon.units[NS].capture
    await wait_for(lambda: _true(cap.status.committed_seq > after), 15, interval=0.02, what="the write captured")


async def test_a_pass_waits_for_apply_to_reach_the_head_it_started_at(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Issue 23, 1.2. An insert is captured but not yet written (slow target), then the source deletes it.

    A pass started now claims the head sampled after the delete. Before the fix it compared that head's
    monotonic moment with a wall-clock catch-up time, so it swept at once: the target's range did not hold the
    insert yet, the pass completed, and the insert landed afterwards: a document the source deleted, with the
    pass claiming the head past the delete.
    """
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(20)])
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        sweep = await _settled(run)
        sweep.catch_up_s = 1.0  # the count mode's own wait gives up quickly: only the pass's start wait protects
        sandbox.target.faults.slow_write_ms = 3000  # the applier is slow: the insert waits in the pipeline
        committed = run.daemon.units[NS].capture.status.committed_seq
        await source.app.users.insert_one({"_id": 100, "v": 1})
        await _captured(run, committed)
        await source.app.users.delete_one({"_id": 100})
        await sweep.link.sample()  # the head now includes the delete: the pass claims it
        await sweep.run_pass(restart=True)
        sandbox.target.faults.slow_write_ms = 0
        await _applied_all(run)
        assert sweep.state.last_head == sweep.link.latest_head()  # the pass claims the source's current head
        assert await target.app.users.find_one({"_id": 100}) is None, "a document the source deleted came back"
        await assert_converged(source, target, [NS])


async def test_an_ordered_delete_never_overtakes_a_queued_write_of_the_same_id(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Issue 23, 2 (first bullet). An update of 7 is captured while the writer is stopped, then the source deletes 7.

    The ordered delete waits for the applier to write what was committed before its check. Before the fix it
    gave up after `catch_up_s` (30 s; shortened here) and deleted anyway: the queued update landed once the
    writer started and brought 7 back.
    """
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(20)])
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        sweep = await _settled(run)
        sweep.deleter.catch_up_s = 0.5
        await run.writer("stop")
        committed = run.daemon.units[NS].capture.status.committed_seq
        await source.app.users.update_one({"_id": 7}, {"$set": {"v": 2}})
        await _captured(run, committed)  # queued: the applier does not write it while the writer is stopped
        await source.app.users.delete_one({"_id": 7})
        delete = asyncio.create_task(sweep.deleter.delete_absent([encode_id(7)]))
        # Three times the old give-up: the delete must still be waiting for the queued update.
        done, _ = await asyncio.wait({delete}, timeout=6 * sweep.deleter.catch_up_s)
        assert not done, "the delete went ahead of the queued update of the same _id"
        await run.writer("start")
        assert await within(delete, 30) == 1
        await _applied_all(run)
        assert await target.app.users.find_one({"_id": 7}) is None, "the queued update brought 7 back"
        await assert_converged(source, target, [NS])


async def test_a_delete_since_the_last_pass_means_deletes_are_not_reconciled(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Issue 23, 2 (second bullet). Before the fix, deletes counted as reconciled for cutover_threshold_seconds
    after a pass started, whatever the source did since: status said ready while the target held a document the
    source had just deleted."""
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(20)])
    cfg = config(tmp_path, sandbox)
    cfg.apply.cutover_threshold_seconds = 120.0  # the old allowance covers the whole test
    async with Running(cfg) as run:
        await run.writer("start")
        sweep = await _settled(run)
        status = await run.status()
        assert status["ready_for_cutover"], status["not_ready_reasons"]
        await source.app.users.delete_one({"_id": 7})
        moved = sweep.state.last_head

        async def head_moved_and_caught_up() -> bool:
            await sweep.link.sample()
            status = await run.status()
            return sweep.link.latest_head() != moved and run.ns_status(status, NS)["lag_seconds"] == 0

        await wait_for(head_moved_and_caught_up, 30, what="a head sample after the delete, caught up")
        assert await target.app.users.find_one({"_id": 7}) is not None  # no pass ran since: the target differs
        status = await run.status()
        assert not status["ready_for_cutover"], "ready while the target holds a document the source deleted"
        reasons = status["not_ready_reasons"]
        assert len(reasons) == 1 and reasons[0].startswith("deletes not reconciled since the last change: app.users")
        await sweep.run_pass()
        await assert_converged(source, target, [NS])
        status = await run.status()
        assert status["ready_for_cutover"], status["not_ready_reasons"]


async def test_the_final_sweep_compares_ids_so_a_stale_and_a_missing_document_do_not_cancel_out(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Issue 23, 2 (third bullet). After a verification pass and a sweep, the target gains a document the source
    does not hold (stale) and loses one it does (missing), in the same range: the counts stay equal.

    Before the fix the final sweep counted (equal) and deleted nothing, and the recheck had nothing in the batch
    log to compare: the report said equal: true with a stale document on the target and a missing one. Now the
    final sweep merges `_id`s: the stale one is deleted, the missing one is handed to verification, and the
    cutover ends with exit 6.
    """
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(20)])
    cfg = config(tmp_path, sandbox)
    cfg.verify.enabled = True
    async with Running(cfg) as run:
        await run.writer("start")
        proof = run.daemon.proof
        assert proof is not None and proof.verification is not None
        verification = proof.verification
        await wait_for(lambda: _true(NS in verification.verifiers), 60, what="discovery to start the namespace")
        verifier = verification.verifiers[NS]
        await wait_for(lambda: _true(bool(verifier.state.finished_at or verifier.state.last_finished_at)), 30,
                       what="a verification pass")
        await _settled(run)
        committed = run.daemon.units[NS].capture.status.committed_seq
        await wait_for(lambda: _true(verifier.state.recheck_seq >= committed), 30,
                       what="every batch re-checked (the batch log names none of the documents changed below)")
        await target.app.users.insert_one({"_id": 5.5, "v": 1})  # stale: the source does not hold it
        await target.app.users.delete_one({"_id": 6})  # missing: the source holds it
        result = await proof.run_cutover()
        assert await target.app.users.find_one({"_id": 5.5}) is None, "the final sweep left a stale document"
        assert result.code == 6, result.message
        machine = proof.machine
        assert machine is not None and machine.state["deleted"][NS] == 1
        verification = machine.state["verification"]  # the recheck's report (the cutover stopped there)
        assert not verification["equal"], verification
        assert [(m["_id"], m["kind"]) for m in verification["mismatches"]] == [(6, "missing")], verification
