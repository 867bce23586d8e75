"""Verification in the daemon: the continuous mode, one-off passes (`cosmigrate verify`), and what status says.

- Continuous (`verify.enabled`): one task per namespace resumes or starts a
  pass (under `verify.max_source_share`), then keeps it current: documents
  changed since are re-checked from the batch log as their batches are
  applied, mismatches are compared again, and a new full pass starts every
  `verify.interval_s` (or at once when a batch needed for re-checks expired).
- One pass (`cosmigrate verify`, cutover): every namespace at full speed; a
  pass left unfinished by a kill is continued where its ledger item says.

Readiness: mismatches block it, and with the continuous mode on, so does a
namespace with no completed pass yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from pymongo.errors import PyMongoError

from cosmigrate.backoff import Backoff
from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Wall
from cosmigrate.config import Config
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.idorder import IdDoc
from cosmigrate.ledger import Fenced, Ledger, LedgerError
from cosmigrate.logs import get_logger
from cosmigrate.nslink import ApplierNotReady, NamespaceLink
from cosmigrate.redact import redact
from cosmigrate.stores import BatchStore, StoreError
from cosmigrate.timeouts import cancel_and_wait, check_cancelled
from cosmigrate.verify import report
from cosmigrate.verify.passes import NamespaceVerifier


async def collection_notes(source: Any, namespaces: Iterable[str]) -> dict[str, str]:
    """Collections the target cannot hold the same way (capped, expiring), with the reason."""
    notes: dict[str, str] = {}
    for ns in namespaces:
        db, _, coll = ns.partition(".")
        why: list[str] = []
        try:
            async for info in await source[db].list_collections(filter={"name": coll}):
                if (info.get("options") or {}).get("capped"):
                    why.append("capped at the source: DocumentDB has no capped collections, so the target's copy is "
                               "not capped (documents the source drops by size are removed by the delete sweep)")
            async for ix in await source[db][coll].list_indexes():
                if "expireAfterSeconds" in ix:
                    keys = ",".join(ix["key"].keys())
                    if keys == "_ts":
                        why.append("expires by _ts at the source (TTL): DocumentDB cannot rebuild that index (the "
                                   "[ttl] decision for it is in status and the cutover report); expired documents "
                                   "are removed from the target by the delete sweep")
                    else:
                        why.append(f"TTL index on {keys} at the source: expired documents are removed from the target "
                                   "by the delete sweep until cutover builds the index there")
        except PyMongoError as exc:
            why.append(f"collection options unreadable: {redact(str(exc))[:120]}")
        if why:
            notes[ns] = "; ".join(why)
    return notes


class Verification:
    def __init__(self, cfg: Config, source: Any, target: Any, ledger: Ledger, store: BatchStore,
                 crash: CrashPoints | None = None) -> None:
        self.cfg = cfg
        self.source = source
        self.target = target
        self.ledger = ledger
        self.store = store
        self.crash = crash
        self.verifiers: dict[str, NamespaceVerifier] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.halted = False
        self.log = get_logger(component="verify")

    def attach(self, link: NamespaceLink) -> None:
        v = NamespaceVerifier(link, self.source, self.target, self.ledger, self.store, self.cfg.verify.page_size,
                              SourceBudget(self.cfg.verify.max_source_share),
                              catch_up_s=max(5.0, 3 * self.cfg.capture.head_sample_interval_s), crash=self.crash)
        self.verifiers[link.ns] = v
        self._locks[link.ns] = asyncio.Lock()
        self._tasks[link.ns] = asyncio.create_task(self._start(link.ns), name=f"verify:{link.ns}")

    async def detach(self, ns: str) -> None:
        await cancel_and_wait(self.forget(ns))

    def forget(self, ns: str) -> list[asyncio.Task[None]]:
        """Drop the namespace's parts at once (no await: a new incarnation attached while the old task is being
        cancelled keeps its own) and return the task to cancel."""
        task = self._tasks.pop(ns, None)
        self.verifiers.pop(ns, None)
        self._locks.pop(ns, None)
        return [task] if task is not None else []

    def resume(self) -> None:
        """Restart the tasks stopped by `stop` (a cutover that ended early)."""
        for ns in self.verifiers:
            if ns not in self._tasks and not self.halted:
                self._tasks[ns] = asyncio.create_task(self._start(ns), name=f"verify:{ns}")

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    async def _retrying(self, ns: str, what: str, fn: Any) -> bool:
        """Run `fn` until it succeeds; False when the namespace was taken over."""
        backoff = Backoff(base=1.0, cap=60.0)
        while True:
            check_cancelled()
            try:
                await fn()
                return True
            except Fenced:
                return False
            except (PyMongoError, LedgerError, StoreError, ApplierNotReady) as exc:
                self.log.warning(f"verification {what} failed; will retry", namespace=ns, error=redact(str(exc))[:300])
            except Exception as exc:  # a bug must not kill the daemon silently
                self.log.exception(f"verification {what} crashed; will retry", namespace=ns, error=redact(repr(exc))[:300])
            await asyncio.sleep(backoff.next_delay())

    async def _load(self, ns: str) -> None:
        v = self.verifiers[ns]
        async with self._locks[ns]:
            if not v.loaded:
                await v.load()

    async def _start(self, ns: str) -> None:
        v = self.verifiers[ns]
        if not await self._retrying(ns, "load", lambda: self._load(ns)) or not self.cfg.verify.enabled:
            return
        while not self.halted:
            async def step() -> None:
                async with self._locks[ns]:
                    s = v.state
                    if s.running or s.needs_full_pass or not s.number or \
                            s.started_at is None or Wall.now() - s.started_at >= self.cfg.verify.interval_s:
                        await v.run_pass(max_ranges=8)  # in slices, so a one-off pass can take the lock between
                    else:
                        await v.recheck_log()
                        if v.mismatches:
                            await v.recheck(list(v.mismatches)[:500])

            if not await self._retrying(ns, "pass", step):
                return
            await asyncio.sleep(0.5)

    async def one_pass(self, namespaces: Iterable[str] | None = None, frozen: bool = False) -> None:
        """Bring every namespace to a completed pass at full speed (continuing one left unfinished, else a new one)."""
        names = list(namespaces) if namespaces is not None else list(self.verifiers)
        limit = asyncio.Semaphore(self.cfg.apply.pool_size)  # namespaces read at once

        async def one(ns: str) -> None:
            await self._load(ns)
            v = self.verifiers[ns]
            async with limit, self._locks[ns]:
                v.budget.share, v.frozen = 1.0, frozen
                try:
                    await v.run_pass()
                    await v.recheck_log()
                    await v.recheck_mismatches()
                finally:
                    v.budget.share, v.frozen = self.cfg.verify.max_source_share, False

        async with asyncio.TaskGroup() as group:
            for ns in names:
                group.create_task(one(ns))

    async def recheck_until_clean(self, namespaces: Iterable[str], rounds: int) -> int:
        """Cutover: re-check what changed since each pass and every mismatch, until none is left (or `rounds`).

        A namespace without a completed pass (or whose re-check log lost an expired batch) gets a full pass
        first: with the source quiet, that pass is exact.
        """
        names = list(namespaces)
        left = 0
        for _ in range(rounds):
            left = 0
            for ns in names:
                await self._load(ns)
                v = self.verifiers[ns]
                async with self._locks[ns]:
                    v.frozen, v.budget.share = True, 1.0
                    try:
                        if v.state.needs_full_pass or v.state.finished_at is None:
                            await v.run_pass()
                        await v.recheck_log()
                        left += await v.recheck_mismatches()
                    finally:
                        v.frozen, v.budget.share = False, self.cfg.verify.max_source_share
            if not left:
                break
        return left

    async def suspect(self, ns: str, ids: list[IdDoc]) -> int:
        """Compare these documents now and record what differs; returns how many do.

        The cutover's final delete sweep hands over the `_id`s the target lacks: a verifier whose full pass
        completed earlier would otherwise never look at them again (nothing in the batch log names them).
        """
        await self._load(ns)
        async with self._locks[ns]:
            return await self.verifiers[ns].recheck(ids)

    async def report(self, started_at: Wall, limit: int, namespaces: Iterable[str] | None = None) -> dict[str, Any]:
        names = sorted(namespaces if namespaces is not None else self.verifiers)
        notes = await collection_notes(self.source, names)
        return report.build(self.cfg.cluster_name, {ns: self.verifiers[ns] for ns in names}, limit, started_at,
                            Wall.now(), notes)

    # --- status ----------------------------------------------------------------------------

    def fields(self, ns: str) -> dict[str, Any]:
        v = self.verifiers.get(ns)
        if v is None:
            return {"documents_verified": 0, "mismatches": 0, "last_verify_pass": None}
        return v.fields()

    def reasons(self, namespaces: list[str]) -> list[str]:
        out = []
        bad = [f"{ns} ({self.verifiers[ns].mismatch_count})" for ns in namespaces
               if ns in self.verifiers and self.verifiers[ns].mismatch_count]
        if bad:
            out.append(f"verification found documents that differ: {', '.join(bad)}")
        if self.cfg.verify.enabled:
            unverified = [ns for ns in namespaces if ns in self.verifiers
                          and self.verifiers[ns].state.finished_at is None
                          and self.verifiers[ns].state.last_finished_at is None]
            if unverified:
                out.append(f"no verification pass has completed yet: {', '.join(unverified)}")
        return out
