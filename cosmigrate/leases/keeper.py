"""The lease loops of one worker: renew on its own task, balance on another, handover on exit.

Renewal never waits behind a batch commit (it has its own task and its own
ledger calls; a renewer starved by its own checkpoints is a known way to lose
leases under load). A renew that conflicts means another worker took the
lease: the unit stops at once. A renew the ledger does not answer keeps the
unit until `Held.valid` runs out; its target writes stop then (the applier
asks `Held.write_block` right before each send), and the unit is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from cosmigrate.clock import Mono
from cosmigrate.config import LeasesConfig
from cosmigrate.leases.balance import Observations, plan
from cosmigrate.leases.records import RELEASED, Held, LeaseRecord, LeaseTable, WorkerRecord
from cosmigrate.ledger import LedgerError, ProgressConflict
from cosmigrate.redact import redact
from cosmigrate.timeouts import run_all, within

RENEW_CONCURRENCY = 128
"""Renewals in flight at once. On SQLite they share one group commit (one fsync for all of them); at 16, a
worker of 2,000 units starting more units behind them renewed too slowly and lost every lease after 30 s."""
START_CONCURRENCY = 32
"""Units taken (and started: a ledger claim, a head sample, a first read of the index plan) at once in one
balance round, and lease items created at once by discovery. One at a time, a worker taking 200 units, or a
cluster of 10,000 collections, waits minutes of round trips before its last unit starts."""


class UnitEvents(Protocol):
    """What the keeper tells the worker (the daemon)."""

    async def gained(self, held: Held) -> None:
        """Start the unit; its first target write waits for `held.write_after`."""

    async def lost(self, unit: str, reason: str) -> None:
        """Stop the unit now: another worker holds it, or may."""

    def clean(self, unit: str) -> bool:
        """Whether the stopped unit left no write unanswered (a handover then needs no fence wait)."""


class LeaseKeeper:
    def __init__(self, table: LeaseTable, cfg: LeasesConfig, write_bound_s: float, events: UnitEvents,
                 log: Any, wanted: Callable[[str], bool] = lambda unit: True) -> None:
        self.table = table
        self.cfg = cfg
        self.bound_s = write_bound_s
        self.events = events
        self.log = log
        self.wanted = wanted
        self.me = table.me
        self.held: dict[str, Held] = {}
        self.leases: dict[str, LeaseRecord] = {}
        """Every lease of the cluster as last read (status reads it)."""
        self.workers: dict[str, WorkerRecord] = {}
        self.lease_seen = Observations()
        self.worker_seen = Observations()
        self._hb_version = 0
        self._kick = asyncio.Event()
        self._busy = asyncio.Lock()  # a balance round and a gain/loss never interleave
        self._stopping: set[str] = set()
        """Units being stopped after a loss: not orphans yet (their parts may still be draining)."""
        self.last_read: Mono | None = None
        """When the lease items were last read (status says how old its view of other workers is)."""

    # --- what status and the daemon read ---------------------------------------------------------------------------

    def holds(self, unit: str) -> Held | None:
        return self.held.get(unit)

    def live(self, now: Mono | None = None) -> set[str]:
        """Workers whose heartbeat counter changed within `lease_s`, as this worker saw it (itself included)."""
        now = now or Mono.now()
        return {w for w, rec in self.workers.items() if self.worker_seen.unchanged_for(w, now) < self.cfg.lease_s
                and not self._earlier_self(rec.host, rec.slot)} | {self.me.id}

    def _earlier_self(self, host: str, slot: str) -> bool:
        """An earlier process under this worker's lock file on this host: dead, since this one holds the lock."""
        return bool(self.me.slot) and host == self.me.host and slot == self.me.slot

    def expired(self, unit: str, now: Mono | None = None) -> bool:
        rec = self.leases.get(unit)
        if rec is None or rec.free or rec.owner == self.me.id:
            return False
        return self.lease_seen.unchanged_for(unit, now or Mono.now()) >= self.cfg.lease_s

    def kick(self) -> None:
        """Run a balance round now (discovery created leases, a unit was dropped)."""
        self._kick.set()

    # --- the loops -------------------------------------------------------------------------------------------------

    async def join(self) -> None:
        """Write this worker's first heartbeat and read the cluster once."""
        self._hb_version = await self.table.heartbeat_version()
        await self._heartbeat()
        self.log.info("worker joined the cluster", worker=self.me.id, host=self.me.host, pid=self.me.pid,
                      name=self.me.name)

    async def offer(self, units: Iterable[str], start_at: str) -> None:
        """Create the lease items of units discovery found and the ledger lacks (conditional: never twice)."""
        async def create(unit: str) -> bool:
            try:
                await self.table.create(unit, start_at)
                return True
            except ProgressConflict:
                return False  # another worker created it first

        created = await run_all((create(unit) for unit in units if unit not in self.leases), START_CONCURRENCY)
        if any(created):
            self.kick()

    async def renew_loop(self) -> None:
        while True:
            await self.renew_once()
            await asyncio.sleep(self.cfg.renew_s)

    async def balance_loop(self) -> None:
        """Read the leases every `min(balance_s, renew_s)`: a unit handed over or expired is taken within
        about one renew interval (a rolling restart leaves nothing ownerless for longer), while steals,
        which move a unit that is being served, happen at most once per `balance_s`."""
        last_steal = Mono.now().minus(self.cfg.balance_s)
        while True:
            try:
                steal = last_steal.elapsed() >= self.cfg.balance_s
                await self.balance_once(steal=steal)
                if steal:
                    last_steal = Mono.now()
            except LedgerError as exc:
                self.log.warning("lease balance round failed; will retry", error=redact(str(exc)))
            try:
                await within(self._kick.wait(), min(self.cfg.balance_s, self.cfg.renew_s))
            except TimeoutError:
                pass
            self._kick.clear()

    async def renew_once(self) -> None:
        limit = asyncio.Semaphore(RENEW_CONCURRENCY)

        async def one(held: Held) -> None:
            async with limit:
                await self._renew(held)

        async with asyncio.TaskGroup() as group:
            for held in sorted(self.held.values(), key=lambda h: h.renewed_at):  # the closest to expiry first
                group.create_task(one(held))
        try:
            await self._heartbeat()
        except LedgerError as exc:
            self.log.warning("worker heartbeat failed; will retry", error=redact(str(exc)))

    async def _renew(self, held: Held) -> None:
        if not held.valid():
            await self._lose(held.unit, f"lease not renewed within {self.cfg.lease_s:g}s (ledger unreachable)")
            return
        sent = Mono.now()
        try:
            # As long as the lease is valid (a slow, retried ledger call may still land in time), not one renew
            # interval: cutting it short would lose a lease to a ledger that is only slow.
            rec = await within(self.table.renew(held.record), max(0.1, held.renewed_at + self.cfg.lease_s - sent))
        except ProgressConflict:
            await self._lose(held.unit, "taken by another worker")
            return
        except (LedgerError, TimeoutError) as exc:
            self.log.warning("lease renew failed; will retry", unit=held.unit, error=redact(str(exc)) or "timeout")
            return
        if self.held.get(held.unit) is held:
            held.record = rec
            held.renewed_at = sent
            self.leases[rec.unit] = rec
            self.lease_seen.see(rec.unit, rec.version, sent)

    async def _heartbeat(self) -> None:
        try:
            self._hb_version = await self.table.heartbeat(self._hb_version, sorted(self.held))
        except ProgressConflict:
            self._hb_version = await self.table.heartbeat_version()  # removed as silent by another worker: rewrite
            self._hb_version = await self.table.heartbeat(self._hb_version, sorted(self.held))

    async def balance_once(self, steal: bool = True) -> None:
        async with self._busy:
            now = Mono.now()
            leases = await self.table.leases()
            workers = await self.table.workers()
            self.last_read = now
            for w in workers:
                if w.id not in self.workers and w.id != self.me.id:
                    self.log.info("worker seen in the cluster", worker=w.id, host=w.host, pid=w.pid, name=w.name)
                self.worker_seen.see(w.id, w.version, now)
            self.workers = {w.id: w for w in workers}
            self.worker_seen.forget(set(self.workers))
            for rec in leases:
                self.lease_seen.see(rec.unit, rec.version, now)
            self.leases = {rec.unit: rec for rec in leases}
            self.lease_seen.forget(set(self.leases))
            moved = [u for u in self.held if u in self.leases and self.leases[u].owner != self.me.id]
            for unit in moved:
                await self._lose(unit, f"taken by worker {self.leases[unit].owner or '(released)'}")
            wanted = {u for u in self.leases if self.wanted(u)}
            dead = self._dead(leases)  # an earlier process under this worker's lock: not a live worker either
            orphans = {u for u, rec in self.leases.items()
                       if rec.owner == self.me.id and not rec.free and u not in self.held and u not in self._stopping}
            todo = plan(leases, self.lease_seen, self.live(now) - dead, self.me.id, self.cfg.lease_s, now, wanted,
                        dead, orphans)
            await run_all((self._take(rec, now, stolen=False) for rec in todo.take), START_CONCURRENCY)
            if todo.steal is not None and steal:
                await self._take(todo.steal, now, stolen=True)
            await self._forget_silent(now)

    def _dead(self, leases: list[LeaseRecord]) -> set[str]:
        """Owners that held this worker's lock file on this host before it: dead, since this one holds the
        lock now (a restart after a crash takes its units back without waiting for their leases to expire)."""
        if not self.me.slot:
            return set()
        return {r.owner for r in leases if r.owner and r.owner != self.me.id and not r.free
                and r.host == self.me.host and r.slot == self.me.slot}

    async def _take(self, rec: LeaseRecord, seen_at: Mono, *, stolen: bool) -> None:
        sent = Mono.now()
        try:
            mine = await self.table.take(rec)
        except ProgressConflict:
            return  # another worker moved it first: judged again next round
        obs = self.lease_seen.seen.get(rec.unit)
        since = obs.since if obs is not None else seen_at
        if rec.state == RELEASED:
            write_after = sent + (0.0 if rec.clean else self.bound_s)
        elif not rec.owner:
            write_after = sent  # never owned: no worker ever sent a write for it
        elif rec.owner in self._dead([rec]):  # dead: what it sent before dying is done or aborted within the bound
            write_after = sent + self.bound_s
        else:  # expired or stolen: its holder may send writes until `since + lease_s`, landing within the bound
            write_after = since + self.cfg.lease_s + self.bound_s
        held = Held(mine, renewed_at=sent, write_after=max(write_after, sent), lease_s=self.cfg.lease_s,
                    taken_from=rec.owner or (f"{rec.host}:{rec.pid} (released)" if rec.state == RELEASED else ""))
        self.held[rec.unit] = held
        self.leases[rec.unit] = mine
        self.lease_seen.see(rec.unit, mine.version, sent)
        how = "stolen" if stolen else ("handed over" if rec.state == RELEASED else
                                       ("taken" if not rec.owner else "taken after expiry"))
        self._moved(f"unit {how}", rec.unit, rec.owner or "nobody", self.me.id,
                    fence_wait_s=round(held.write_after - sent, 1))
        try:
            await self.events.gained(held)
        except Exception as exc:  # a unit that cannot start is handed back, never held idle
            self._moved("unit could not start; handing its lease back", rec.unit, self.me.id, "next taker",
                        warn=True, error=redact(str(exc)))
            await self._release_one(held, clean=True)

    async def _lose(self, unit: str, reason: str) -> None:
        held = self.held.pop(unit, None)
        if held is None:
            return
        rec = self.leases.get(unit)
        self._moved("unit lost", unit, self.me.id, (rec.owner if rec and rec.owner != self.me.id else "") or "unknown",
                    warn=True, reason=reason)
        self._stopping.add(unit)
        try:
            await self.events.lost(unit, reason)
        finally:
            self._stopping.discard(unit)

    def _moved(self, event: str, unit: str, frm: str, to: str, *, warn: bool = False, **fields: object) -> None:
        """Every line about a unit's lease names where it goes from and to: operators follow a unit through
        both workers' journals by these two fields (and the kill test asserts them on every such line)."""
        (self.log.warning if warn else self.log.info)(event, unit=unit, **{"from": frm}, to=to, **fields)

    async def release(self, unit: str) -> None:
        """Hand one unit's lease over; the daemon stopped the unit first."""
        held = self.held.pop(unit, None)
        if held is not None:
            await self._release_one(held, clean=self.events.clean(unit))

    async def release_all(self, held: list[str] | None = None) -> None:
        """SIGTERM, after the drain: hand every lease over so others take them at once, not after expiry."""
        for unit in list(self.held) if held is None else held:
            await self.release(unit)
        try:
            await self.table.forget_worker(self.me.id)
        except LedgerError as exc:
            self.log.warning("could not remove this worker's heartbeat item", error=redact(str(exc)))

    async def _release_one(self, held: Held, *, clean: bool) -> None:
        self.held.pop(held.unit, None)
        rec = held.record
        try:
            await self.table.release(rec, clean)
            self._moved("unit handed over", rec.unit, self.me.id, "next taker", clean=clean)
        except (LedgerError, ProgressConflict) as exc:
            self._moved("unit not handed over; it moves when its lease expires", rec.unit, self.me.id,
                        "whoever takes it after expiry", warn=True, error=redact(str(exc)))

    async def _forget_silent(self, now: Mono) -> None:
        """Remove the items of workers silent for 10 leases (killed): the `workers` list shows the live ones."""
        for wid in list(self.workers):
            if wid != self.me.id and self.worker_seen.unchanged_for(wid, now) >= 10 * self.cfg.lease_s:
                try:
                    await self.table.forget_worker(wid)
                except LedgerError:
                    continue
                del self.workers[wid]

