"""The lease and worker items, kept as cluster progress items of the ledger.

Each item's `version` is its lease counter; every write is conditional on it
(`Ledger.put_progress(expect_version=...)`): a TransactWrite condition on
DynamoDB, one `BEGIN IMMEDIATE` transaction on SQLite. So a take, a renew, a
steal and a release either happen against the counter the writer saw, or
fail with `ProgressConflict` and change nothing. No wall clock of the item
is ever compared with this host's (expiry is judged on the observer's own
monotonic clock, `cosmigrate.leases.balance`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

import bson

from cosmigrate.clock import Mono, Wall
from cosmigrate.ledger import Ledger, Progress

LEASE = "lease"
WORKER = "worker"
HELD, RELEASED = "held", "released"


@dataclass(frozen=True)
class WorkerId:
    """Who this worker is: `id` is unique per process life (a restart is a new worker)."""

    id: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    name: str = ""
    slot: str = ""
    """The lock file this worker holds ("" without one): a lease held under the same slot on the same host
    belongs to a dead process (the lock dies with its holder)."""


@dataclass(frozen=True)
class LeaseRecord:
    """One unit's lease as read from the ledger."""

    unit: str
    version: int
    owner: str = ""
    """The holding worker's id; "" when never owned or released."""
    host: str = ""
    pid: int = 0
    state: str = HELD
    name: str = ""
    """The holder's worker name on its host (`daemon.worker`)."""
    slot: str = ""
    """The holder's lock file (`WorkerId.slot`)."""
    start_at: str = ""
    """How the unit's capture starts when it has no stored position: "" (the config's) or "beginning"."""
    parent: str = ""
    children: tuple[str, ...] = ()
    clean: bool = False
    """Released after a drain that left no target write unanswered: the next owner needs no fence wait."""

    @property
    def free(self) -> bool:
        """Nobody holds it: never owned, or handed over by its last owner."""
        return not self.owner or self.state == RELEASED

    def data(self) -> bytes:
        return bson.encode({"owner": self.owner, "host": self.host, "pid": self.pid, "state": self.state,
                            "name": self.name, "slot": self.slot, "start_at": self.start_at, "parent": self.parent, "children": list(self.children),
                            "clean": self.clean})

    @classmethod
    def parse(cls, item: Progress) -> LeaseRecord:
        d: dict[str, Any] = item.doc()
        return cls(item.key, item.version, str(d.get("owner", "")), str(d.get("host", "")), int(d.get("pid", 0)),
                   str(d.get("state", HELD)), str(d.get("name", "")), str(d.get("slot", "")),
                   str(d.get("start_at", "")), str(d.get("parent", "")),
                   tuple(str(c) for c in d.get("children", ())), bool(d.get("clean", False)))


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's heartbeat item: what the `workers` list of status shows."""

    id: str
    version: int
    host: str = ""
    pid: int = 0
    name: str = ""
    units: tuple[str, ...] = ()
    heartbeat_at: Wall = Wall(0.0)
    """The worker's own wall clock at its last heartbeat: shown to people, never used to judge liveness."""
    slot: str = ""
    """The worker's lock file (`WorkerId.slot`)."""

    def data(self) -> bytes:
        return bson.encode({"host": self.host, "pid": self.pid, "name": self.name, "units": list(self.units),
                            "heartbeat_at": self.heartbeat_at.s, "slot": self.slot})

    @classmethod
    def parse(cls, item: Progress) -> WorkerRecord:
        d: dict[str, Any] = item.doc()
        return cls(item.key, item.version, str(d.get("host", "")), int(d.get("pid", 0)), str(d.get("name", "")),
                   tuple(str(u) for u in d.get("units", ())), Wall(float(d.get("heartbeat_at", 0.0))),
                   str(d.get("slot", "")))


@dataclass
class Held:
    """A lease this worker holds, and what it may do with it, on its own monotonic clock.

    `renewed_at` is when the last successful renew (or the take) was SENT: an observer
    sees that write no earlier, so it never judges the lease expired before
    `renewed_at + lease_s`, and this worker sends no target write after that
    (`write_block`). `write_after` is the fence wait of a new owner: no write before it.
    """

    record: LeaseRecord
    renewed_at: Mono
    write_after: Mono
    lease_s: float
    taken_from: str = ""

    @property
    def unit(self) -> str:
        return self.record.unit

    def valid(self, now: Mono | None = None) -> bool:
        return (now or Mono.now()) < self.renewed_at + self.lease_s

    def write_block(self, now: Mono | None = None) -> str:
        """Why no target write of this unit may be sent now, or "" (checked right before each send)."""
        now = now or Mono.now()
        if not self.valid(now):
            return f"{self.unit}: this worker's lease was not renewed within {self.lease_s:g}s; another worker may hold it"
        if now < self.write_after:
            return f"{self.unit}: fence wait, {self.write_after - now:.1f}s left (a write of the previous owner may still land)"
        return ""


class LeaseTable:
    """The conditional writes of the lease layer, over either ledger."""

    def __init__(self, ledger: Ledger, me: WorkerId) -> None:
        self.ledger = ledger
        self.me = me

    async def leases(self) -> list[LeaseRecord]:
        return [LeaseRecord.parse(p) for p in await self.ledger.list_progress("", LEASE)]

    async def workers(self) -> list[WorkerRecord]:
        return [WorkerRecord.parse(p) for p in await self.ledger.list_progress("", WORKER)]

    async def create(self, unit: str, start_at: str) -> None:
        """Make a unit's lease item, free, unless one exists (raises ProgressConflict then: harmless)."""
        await self.ledger.put_progress("", LEASE, unit, LeaseRecord(unit, 0, start_at=start_at).data(),
                                       epoch=None, expect_version=0)

    async def take(self, rec: LeaseRecord) -> LeaseRecord:
        """Take `rec` at the counter it was read at (free, expired or stolen); raises ProgressConflict."""
        mine = LeaseRecord(rec.unit, rec.version + 1, self.me.id, self.me.host, self.me.pid, HELD, self.me.name,
                           self.me.slot, rec.start_at, rec.parent, rec.children)
        await self.ledger.put_progress("", LEASE, rec.unit, mine.data(), epoch=None, expect_version=rec.version)
        return mine

    async def renew(self, rec: LeaseRecord) -> LeaseRecord:
        """Move the counter on, only if nobody else moved it since this worker's last write."""
        await self.ledger.put_progress("", LEASE, rec.unit, rec.data(), epoch=None, expect_version=rec.version)
        return LeaseRecord(rec.unit, rec.version + 1, rec.owner, rec.host, rec.pid, rec.state, rec.name,
                           rec.slot, rec.start_at, rec.parent, rec.children)

    async def release(self, rec: LeaseRecord, clean: bool) -> None:
        """Hand the lease over (after the unit drained): the next balance round of any worker takes it."""
        free = LeaseRecord(rec.unit, rec.version + 1, "", rec.host, rec.pid, RELEASED, rec.name, rec.slot, rec.start_at,
                           rec.parent, rec.children, clean)
        await self.ledger.put_progress("", LEASE, rec.unit, free.data(), epoch=None, expect_version=rec.version)

    async def heartbeat(self, version: int, units: list[str]) -> int:
        """Write this worker's heartbeat at `version` (0: create); the new version. Raises ProgressConflict."""
        rec = WorkerRecord(self.me.id, version, self.me.host, self.me.pid, self.me.name, tuple(units), Wall.now(),
                           self.me.slot)
        await self.ledger.put_progress("", WORKER, self.me.id, rec.data(), epoch=None, expect_version=version)
        return version + 1

    async def heartbeat_version(self) -> int:
        item = await self.ledger.get_progress("", WORKER, self.me.id)
        return item.version if item else 0

    async def forget_worker(self, worker_id: str) -> None:
        """Remove a worker item (this worker's own on exit, or one long silent)."""
        await self.ledger.delete_progress("", WORKER, worker_id, epoch=None)
