"""What one worker process holds, as the readers of its state see it.

The daemon (`cosmigrate.daemon`) runs a worker's lifecycle: it connects, takes
and loses leases, starts and stops units, and drains on SIGTERM. Everything
that only *reads* the worker (status, metrics, the progress line, the
readiness it publishes and proves, the full-load check, the plan record and
the proof layer) takes a `Worker` instead: the connections, the lease keeper,
the registry of units (`cosmigrate.units`) and what the last discovery round
found. None of them imports the daemon, so imports run one way:
CLI -> daemon -> these readers -> the worker's state -> the pipeline parts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from cosmigrate.apply import WriterGate
from cosmigrate.bytebudget import ByteBudget
from cosmigrate.clock import Wall
from cosmigrate.config import Config
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.leases import LeaseKeeper
from cosmigrate.leases.records import WorkerId
from cosmigrate.logs import get_logger
from cosmigrate.readiness import ForeignUnits
from cosmigrate.tls import connection_tls
from cosmigrate.units import Units

if TYPE_CHECKING:
    from cosmigrate.deletes.service import Deletes
    from cosmigrate.heads import HeadSampler
    from cosmigrate.ledger import Ledger
    from cosmigrate.stores import BatchStore
    from cosmigrate.verify.service import Verification


class ProofView(Protocol):
    """What status reads of the proof layer (`cosmigrate.proof.Proof`): its fields and readiness reasons."""

    deletes: Deletes | None
    verification: Verification | None

    def fields(self, ns: str) -> dict[str, Any]: ...

    def reasons(self, namespaces: list[str]) -> list[str]: ...

    def cutover_status(self) -> str: ...


class Worker:
    """One worker's connections, leases and units: set up by the daemon, read by everything that reports."""

    def __init__(self, cfg: Config, env: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.crash = CrashPoints.from_env(env)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.id = WorkerId(self.owner, name=cfg.daemon.worker)
        self.log = get_logger(cluster=cfg.cluster_name, worker=self.owner)
        self.started_at = Wall.now()
        self.units = Units()
        """The units this worker runs (`cosmigrate.units`)."""
        self.keeper: LeaseKeeper | None = None
        """This worker's leases: which units (namespaces) it runs (`cosmigrate.leases`)."""
        self.foreign = ForeignUnits()
        """What this worker proved about the units other workers hold (`cosmigrate.readiness`)."""
        self.read_budget = ByteBudget(cfg.capture.max_unflushed_bytes_total)
        """Bytes read but not yet in the store, over every unit (each has its own share under it)."""
        self.gate = WriterGate(started=False)
        self.pool = asyncio.Semaphore(cfg.apply.pool_size)
        self.target_tls = connection_tls(cfg.target.uri, cfg.target.tls_ca_file)  # insecure only if allowed
        self.ledger: Ledger | None = None
        self.store: BatchStore | None = None
        self.source: Any = None
        """The source client for everything but the change streams: head samples, discovery, status, the index
        plan, deletes and verification (the driver's default pool of 100)."""
        self.source_streams: Any = None
        """The source client of the partition watchers. Each watcher holds one connection while it waits on its
        stream, so this pool has no limit: it grows with the units held (the open-file limit is raised at
        start), and the watchers of 200 units never starve a head sample or `ctl status` of a connection."""
        self.target: Any = None
        self.sampler: HeadSampler | None = None
        self.proof: ProofView | None = None
        self.not_captured: dict[str, str] = {}
        """Namespaces that exist but cannot be captured, and why (the last discovery round's)."""
        self.unwatched: list[str] = []
        """Source namespaces the last `ctl status` listed that no capture watched yet (they block readiness)."""
        self.unlisted = ""
        """Why the last `ctl status` could not list the source's namespaces (blocks readiness), or ""."""
        self.plan_record: dict[str, Any] = {}
        """The full-load estimate this migration started with (`cosmigrate.planrecord`); {} until loaded."""
