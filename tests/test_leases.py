"""Leases on both ledgers (SQLite, DynamoDB on moto): conditional writes on the counter, expiry judged on the
observer's own monotonic clock, takes toward an even share, at most one steal per round, handover, fence waits."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cosmigrate.clock import Mono
from cosmigrate.config import LeasesConfig
from cosmigrate.leases import Held, LeaseKeeper, LeaseRecord, LeaseTable
from cosmigrate.leases.balance import Observations, plan
from cosmigrate.leases.records import RELEASED, WorkerId
from cosmigrate.ledger import ProgressConflict, open_ledger
from cosmigrate.logs import get_logger
from tests.helpers import make_config, prepare_backends

BACKENDS = ["file+sqlite", "s3+dynamodb"]
SHORT = LeasesConfig(lease_s=1.0, renew_s=0.25, balance_s=0.3)


@pytest.fixture(params=BACKENDS)
async def cfg(request, tmp_path: Path):
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3+dynamodb" else None
    config = make_config(tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2", request.param, endpoint)
    await prepare_backends(config)
    return config


class Units:
    """The daemon's side of a keeper: records what it gained and lost."""

    def __init__(self) -> None:
        self.gained: dict[str, Held] = {}
        self.lost: list[tuple[str, str]] = []
        self.unclean: set[str] = set()

    async def gained_(self, held: Held) -> None:
        self.gained[held.unit] = held

    async def lost_(self, unit: str, reason: str) -> None:
        self.gained.pop(unit, None)
        self.lost.append((unit, reason))

    def clean(self, unit: str) -> bool:
        return unit not in self.unclean


def events(units: Units) -> Any:
    class Events:
        gained = units.gained_
        lost = units.lost_
        clean = units.clean
    return Events()


def keeper(ledger: Any, name: str, units: Units, lease: LeasesConfig = SHORT, bound_s: float = 0.5) -> LeaseKeeper:
    return LeaseKeeper(LeaseTable(ledger, WorkerId(name, "host", 1, name)), lease, bound_s, events(units),
                       get_logger(worker=name))


async def test_every_lease_write_is_conditional_on_the_counter(cfg) -> None:
    a, b = open_ledger(cfg), open_ledger(cfg)
    try:
        ta, tb = LeaseTable(a, WorkerId("A")), LeaseTable(b, WorkerId("B"))
        await ta.create("db.c", "")
        with pytest.raises(ProgressConflict):
            await tb.create("db.c", "beginning")  # created once, by whoever came first
        (free,) = await tb.leases()
        assert free.free and free.version == 1 and free.start_at == ""
        mine = await ta.take(free)
        with pytest.raises(ProgressConflict):
            await tb.take(free)  # the same counter: only one taker wins
        mine = await ta.renew(mine)
        (seen,) = await tb.leases()
        assert (seen.owner, seen.version) == ("A", 3)
        stolen = await tb.take(seen)
        with pytest.raises(ProgressConflict):
            await ta.renew(mine)  # A learns at its next renew that B holds it now
        await tb.release(stolen, clean=True)
        (released,) = await ta.leases()
        assert released.free and released.state == RELEASED and released.clean
    finally:
        await a.close()
        await b.close()


def test_balance_takes_free_first_then_steals_one_toward_an_even_share() -> None:
    now = Mono.now()
    seen = Observations()
    leases = [LeaseRecord(f"db.{i}", 1) for i in range(6)]
    for rec in leases:
        seen.see(rec.unit, rec.version, now)
    first = plan(leases, seen, {"A", "B", "C"}, "A", 30.0, now)
    assert [r.unit for r in first.take] == ["db.0", "db.1"] and first.steal is None and first.share == 2
    # A took all six while it was alone; B and C join: each steals one per round, never more.
    held = [LeaseRecord(f"db.{i}", 2, owner="A") for i in range(6)]
    for rec in held:
        seen.see(rec.unit, rec.version, now)
    b = plan(held, seen, {"A", "B", "C"}, "B", 30.0, now + 1)
    assert b.take == [] and b.steal is not None and b.steal.owner == "A"
    # Settled (2/2/2, or 3/2/1 with 6 units where no one holds two more than another): nothing moves.
    settled = [LeaseRecord(f"db.{i}", 2, owner="ABC"[i % 3]) for i in range(6)]
    assert all(plan(settled, seen, {"A", "B", "C"}, w, 30.0, now + 1).steal is None for w in "ABC")
    # Expiry is judged from when THIS observer saw the counter change: not yet at 29 s, at 30 s yes.
    assert plan(held, seen, {"B"}, "B", 30.0, now + 29).take == []
    assert len(plan(held, seen, {"B"}, "B", 30.0, now + 30).take) == 6


async def test_a_dead_workers_units_are_taken_after_expiry_with_a_fence_wait(cfg) -> None:
    la, lb = open_ledger(cfg), open_ledger(cfg)
    ua, ub = Units(), Units()
    # Leases of 3 s, not SHORT's 1 s: on a loaded machine, moto's answers to the rounds below take that long, and
    # A (alive until it "dies" below) would look dead between two of B's rounds.
    lease = LeasesConfig(lease_s=3.0, renew_s=0.75, balance_s=0.9)
    a, b = keeper(la, "A", ua, lease), keeper(lb, "B", ub, lease, bound_s=3.0)
    try:
        await a.join()
        await a.offer(["db.x", "db.y", "db.z"], "")
        await a.balance_once()
        assert set(ua.gained) == {"db.x", "db.y", "db.z"}
        assert all(h.write_after <= Mono.now() for h in ua.gained.values())  # never owned: no wait
        await b.join()
        await b.balance_once()
        assert list(ub.gained) == ["db.z"]  # one steal per round (A held three more than B)
        assert ub.gained["db.z"].write_block().startswith("db.z: fence wait")  # A may still be writing it
        await a.balance_once()
        assert [u for u, _ in ua.lost] == ["db.z"]  # A sees the move at its next read and stops the unit
        await a.renew_once()  # A is alive: it renews what it holds
        await b.balance_once()
        assert list(ub.gained) == ["db.z"]  # 2 against 1: settled, nothing more moves
        # A dies (stops renewing). B takes the rest once it saw no change for lease_s, then waits lease + bound.
        started = Mono.now()
        while len(ub.gained) < 3:
            assert started.elapsed() < 20, "the dead worker's units were not taken"
            await b.renew_once()
            await b.balance_once()
            await asyncio.sleep(0.1)
        assert started.elapsed() >= lease.lease_s
        held = ub.gained["db.x"]
        assert held.taken_from == "A" and held.write_block()  # still in its fence wait
        while held.write_block():
            assert started.elapsed() < 30, held.write_block()
            await b.renew_once()  # keeps the lease valid while the fence wait runs out
            await asyncio.sleep(0.05)
        # A comes back: its renew conflicts, it stops the unit at once.
        await a.renew_once()
        assert {u for u, _ in ua.lost} == {"db.x", "db.y", "db.z"} and ua.gained == {}
    finally:
        await la.close()
        await lb.close()


async def test_handover_on_stop_and_the_holder_stops_writing_when_renewals_fail(cfg) -> None:
    la, lb = open_ledger(cfg), open_ledger(cfg)
    ua, ub = Units(), Units()
    a, b = keeper(la, "A", ua), keeper(lb, "B", ub)
    try:
        await a.join()
        await b.join()
        await a.offer(["db.x", "db.y"], "beginning")
        await a.balance_once()
        await b.balance_once()
        await a.balance_once()
        assert len(ua.gained) + len(ub.gained) == 2
        ua.unclean = {u for u in ua.gained}
        moved = list(ua.gained)
        await a.release_all()  # after A's drain
        await b.balance_once()
        assert set(ub.gained) == {"db.x", "db.y"}
        for unit in moved:  # a write left unanswered on A: B waits the bound; a clean one: no wait
            assert ub.gained[unit].write_block().startswith(f"{unit}: fence wait")
            assert ub.gained[unit].record.start_at == "beginning"
        # A holder whose renewals are not answered stops sending once its own lease time has run out.
        held = next(iter(ub.gained.values()))
        assert held.write_block(held.renewed_at + SHORT.lease_s).startswith(f"{held.unit}: this worker's lease")
        assert [w.id for w in await b.table.workers()] == ["B"]  # A removed its heartbeat item on exit
    finally:
        await la.close()
        await lb.close()


async def test_a_unit_dropped_after_an_unanswered_renew_is_taken_back_by_its_only_worker(cfg) -> None:
    """A slow ledger (moto under load) left a renew unanswered for a whole lease: the worker dropped the unit,
    but the lease item still named it, so `plan()` counted the unit as its own and never ran it again (the
    target stopped converging with one worker). The next balance round takes it back, with a fence wait."""
    ledger = open_ledger(cfg)
    units = Units()
    a = keeper(ledger, "A", units, bound_s=10.0)  # the fence wait outlasts a slow ledger's rounds below
    try:
        await a.join()
        await a.offer(["db.x"], "beginning")
        await a.balance_once()
        assert set(units.gained) == {"db.x"}
        first = units.gained["db.x"]
        stalled = asyncio.Event()
        real_renew = a.table.renew

        async def unanswered(rec: LeaseRecord) -> LeaseRecord:
            await stalled.wait()  # the ledger never answers this renew
            return await real_renew(rec)

        a.table.renew = unanswered  # type: ignore[method-assign]
        deadline = Mono.now() + 10 * SHORT.lease_s
        while "db.x" in units.gained and Mono.now() < deadline:
            await a.renew_once()
        assert units.lost and units.lost[0][0] == "db.x", "the unit was not dropped when its lease ran out"
        a.table.renew = real_renew  # type: ignore[method-assign]
        await a.balance_once()
        assert "db.x" in units.gained, "the only worker never took its dropped unit back"
        again = units.gained["db.x"]
        assert again.record.version > first.record.version
        assert again.write_block().startswith("db.x: fence wait"), "a write of the dropped unit may still land"
    finally:
        await ledger.close()
