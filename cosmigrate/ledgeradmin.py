"""`cosmigrate ledger reset NAMESPACE` and `cosmigrate ledger drop-cluster`: remove ledger items, never while held.

The troubleshooting table and the rollback step say "reset its ledger item": these are the commands that do
it. A reset removes one namespace's meta, batches and progress items, so that the next start claims it anew
and copies it again from the beginning; a drop removes every item of the cluster (a fresh migration). Both
refuse while a daemon may hold what they remove: `holder` is the ONE place that decides it, so that the
scale-out work (leases) extends it there and nowhere else. Each removal is journaled by the caller (a
warning log line with who did it and what went).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from cosmigrate.clock import Mono
from cosmigrate.config import Config
from cosmigrate.control import ControlError, request
from cosmigrate.leases import LeaseTable
from cosmigrate.leases.records import WorkerId
from cosmigrate.ledger import Ledger
from cosmigrate.lock import ClusterLock, LockError, lock_path

HELD_RECENT_S = 600.0
"""A namespace whose owner wrote to its meta less than this long ago may still be held by a daemon elsewhere."""


async def holder(cfg: Config, ledger: Ledger, ns: str | None) -> str:
    """Why a daemon may hold `ns` (None: any part of the cluster), or "" when nothing does.

    The cluster lock (a daemon on this machine), the control socket answering, a unit lease whose counter
    moves (a worker anywhere renewing it: watched for up to `leases.lease_s` on this process's own clock,
    never judged from the item's stored time), and, with a DynamoDB ledger, the namespace's owner with a
    recent update (a daemon on another host).
    """
    path = lock_path(cfg)
    if path is not None and path.exists():
        try:
            probe = ClusterLock(path, cfg.cluster_name)
            probe.acquire()
            probe.release()
        except LockError as exc:
            return f"{exc}: stop it first (systemctl stop cosmigrate)"
    try:
        await request(cfg.control.socket, {"cmd": "ping"}, limit_s=2)
        return f"a cosmigrate daemon answers on {cfg.control.socket}: stop it first (systemctl stop cosmigrate)"
    except ControlError:
        pass
    renewed = await _renewed_lease(cfg, ledger, ns)
    if renewed:
        return renewed
    if urlsplit(cfg.ledger.url).scheme == "sqlite":
        return ""  # a SQLite ledger is only reached from this machine, where the cluster lock settles it
    metas = [await ledger.get_namespace(ns)] if ns is not None else await ledger.list_namespaces()
    now = time.time()
    for meta in metas:
        if meta is not None and meta.owner and now - meta.updated_at < HELD_RECENT_S:
            return (f"{meta.ns} is owned by {meta.owner}, whose last ledger update was {now - meta.updated_at:.0f}s "
                    f"ago: a daemon may still hold it; stop it, and once it is gone retry after "
                    f"{HELD_RECENT_S - (now - meta.updated_at):.0f}s")
    return ""


async def _renewed_lease(cfg: Config, ledger: Ledger, ns: str | None) -> str:
    """A held lease of `ns` (or of any unit) whose counter moves within one lease: its worker is alive."""
    table = LeaseTable(ledger, WorkerId("ledger-admin"))
    first = {rec.unit: rec.version for rec in await table.leases() if not rec.free and ns in (None, rec.unit)}
    if not first:
        return ""  # never held, or handed over by its last worker
    deadline = Mono.now() + cfg.leases.lease_s
    while Mono.now() < deadline:
        await asyncio.sleep(min(1.0, cfg.leases.renew_s / 2))
        for rec in await table.leases():
            if rec.unit in first and rec.version != first[rec.unit] and not rec.free:
                return (f"{rec.unit} is held by worker {rec.owner} ({rec.host}, pid {rec.pid}), which renews its lease: "
                        "stop that worker first")
    return ""


def describe(counts: dict[str, int]) -> str:
    """The items a purge counts, in words ("1 namespace meta, 12 batches, 3 progress items")."""
    words = {"namespaces": "namespace meta", "batches": "batches", "progress": "progress items",
             "control": "writer/control item"}
    return ", ".join(f"{counts[kind]} {word}" for kind, word in words.items() if kind in counts)
