"""Races of the unit registry: a unit replaced while an older stop or `ctl retry` of it is still in progress."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from cosmigrate.daemon import Daemon
from cosmigrate.sandbox import Sandbox
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.a"


async def _running(daemon: Daemon, ns: str) -> bool:
    unit = daemon.units.get(ns)
    return unit is not None and unit.capture.status.state == "running"


async def _start(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> tuple[Daemon, asyncio.Task[int]]:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", discovery_interval_s=3600.0)
    await prepare_backends(cfg)
    await source.app.a.insert_many([{"_id": i} for i in range(5)])
    daemon = Daemon(cfg)
    task = asyncio.create_task(daemon.serve())
    await wait_for(lambda: _running(daemon, NS), 30, what="capture running")
    return daemon, task


async def _stop(daemon: Daemon, task: asyncio.Task[int], strays: list[Any]) -> None:
    for unit in strays:  # what the daemon no longer knows about: stopped here so the test ends
        unit.stop(fenced=True)
    await asyncio.wait_for(asyncio.gather(*(t for u in strays for t in u.tasks), return_exceptions=True), 30)
    daemon.request_stop()
    await asyncio.wait_for(task, 60)


async def test_a_unit_taken_again_while_its_lost_incarnation_drains_stays_registered(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Worker B steals the unit (A's renew conflicts: `_lose` -> `_stop_units`, which waits for the old capture's
    last commit), B hands it straight back (its start failed), and A's next balance round takes it again while
    the old incarnation still drains. Before 3d80e91 `_stop_units` removed `units[ns]` by name (the NEW unit);
    it still detaches the proof parts (`proof.detach(ns)`) by name: the new unit's."""
    daemon, task = await _start(tmp_path, sandbox, source)
    strays: list[Any] = []
    try:
        keeper = daemon.worker.keeper
        assert keeper is not None
        old = daemon.units[NS]
        loop = asyncio.get_running_loop()
        real_stop = old.capture.stop
        old.capture.stop = lambda: loop.call_later(2.0, real_stop)  # its last commit takes 2 s
        losing = asyncio.create_task(keeper._lose(NS, "taken by another worker"))  # what _renew does on a conflict
        await asyncio.sleep(0.2)
        rec = {r.unit: r for r in await keeper.table.leases()}[NS]
        await keeper.table.release(rec, clean=True)  # B hands it back
        await keeper.balance_once(steal=False)
        new = daemon.units.get(NS)
        assert new is not None and new is not old, "the released lease was taken again and started"
        await asyncio.wait_for(losing, 30)
        strays.append(new)
        assert keeper.holds(NS) is not None
        assert not all(t.done() for t in new.tasks), "the new incarnation runs"
        assert daemon.units.get(NS) is new, (
            "held and running, but gone from the registry: status shows it stopped and the drain never stops, "
            "awaits or cancels its tasks")
        strays.remove(new)
        proof = daemon.proof
        assert proof is not None and proof.deletes is not None and proof.verification is not None
        detached = [what for what, parts in (("link", proof.links), ("delete sweep", proof.deletes.sweeps),
                                             ("verifier", proof.verification.verifiers)) if NS not in parts]
        assert not detached, (f"the running unit lost its {', '.join(detached)}: the stale stop detached the proof "
                              "parts by namespace, after the new incarnation attached its own")
    finally:
        await _stop(daemon, task, strays)


async def test_ctl_retry_while_the_lease_is_lost_leaves_no_unheld_unit_running(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """`ctl retry` awaits the ledger between stopping the old unit and starting the new one; a lease lost in
    that window (a renew conflict, or a renew unanswered for lease_s) stops and removes the old unit, and the
    retry then starts a new one for a lease this worker no longer holds. The next balance round takes the
    lease again (owner still this worker: an orphan) and registers a second unit over it."""
    daemon, task = await _start(tmp_path, sandbox, source)
    strays: list[Any] = []
    try:
        keeper, ledger = daemon.worker.keeper, daemon.worker.ledger
        assert keeper is not None and ledger is not None
        old = daemon.units[NS]
        await ledger.set_state(NS, old.epoch, "failed", "the operator fixed this")
        real = ledger.set_state
        armed = [True]

        async def set_state(ns: str, epoch: int, state: str, error: str = "") -> None:
            if armed and ns == NS and state == "running":
                armed.clear()
                await keeper._lose(NS, "lease not renewed within 12s (ledger unreachable)")  # what _renew does
            await real(ns, epoch, state, error)

        ledger.set_state = set_state  # type: ignore[method-assign]
        reply = await daemon.retry(NS)
        ledger.set_state = real  # type: ignore[method-assign]
        first = daemon.units.get(NS)
        problems = []
        if reply.get("ok") and first is not None and keeper.holds(NS) is None:
            strays.append(first)
            problems.append("retry started a unit whose lease this worker no longer holds")
            if first.index_task is not None and first.index_task.cancelled():
                problems.append("its index plan task was cancelled by the racing stop")
        await keeper.balance_once(steal=False)
        second = daemon.units.get(NS)
        if first is not None and second is not first and not all(t.done() for t in first.tasks):
            problems.append("a second unit of the namespace was registered while the first still runs (orphaned)")
        assert not problems, problems
    finally:
        await _stop(daemon, task, strays)
