"""Deletes in the daemon: which tiers run, the sweep's schedule per namespace, and what status says.

- Tier 1, the delete preview: detected on the account when the first
  namespace starts (`deletes.detect_preview`); capture then asks for delete
  events, and the applier applies them in order like any other event.
- Tier 2, events without a document: always on; the applier asks
  `cosmigrate.deletes.lookup` inside its round.
- Tier 3, the sweep (`deletes.enabled`): one task per namespace runs a pass
  when none has completed yet, and afterwards whenever the source head moved
  since the last pass started and `deletes.interval_s` passed. A namespace
  whose source expires documents (TTL, `cosmigrate.ttl`) gets a pass every
  `deletes.interval_s` whether its head moved or not: expiry deletes
  documents without moving the head.

Readiness: deletes are *reconciled* for a namespace when a sweep pass that
started after the tier became active has completed, and since that pass
started either the source head has not moved or less than
`apply.cutover_threshold_seconds` went by (the same allowance as the lag).
With the preview on, deletes after that first pass arrive in the feed. With
neither, deletes are never reconciled and status says so. A namespace that
expires documents is reconciled only by a pass that started less than
`apply.cutover_threshold_seconds` ago (expiry is not in the feed, preview or
not, and moves no head), on top of the rules above.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from pymongo.errors import PyMongoError

from cosmigrate.apply import NamespaceApplier, WriteAborted
from cosmigrate.backoff import Backoff
from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Wall
from cosmigrate.config import Config
from cosmigrate.deletes.lookup import LookupMisses
from cosmigrate.deletes.ordered import OrderedDeletes
from cosmigrate.deletes.sweep import DeleteSweep
from cosmigrate.deletes.tiers import preview_available, tier_name
from cosmigrate.ledger import Fenced, Ledger, LedgerError
from cosmigrate.logs import get_logger
from cosmigrate.mongo import raw_collection
from cosmigrate.nslink import NamespaceLink
from cosmigrate.redact import redact
from cosmigrate.stores import StoreError
from cosmigrate.timeouts import cancel_and_wait, check_cancelled, within


class Deletes:
    def __init__(self, cfg: Config, source: Any, target: Any, ledger: Ledger) -> None:
        self.cfg = cfg
        self.source = source
        self.target = target
        self.ledger = ledger
        self.preview = cfg.capture.deletes_preview
        self.preview_since = time.time() if self.preview else 0.0
        self._detected = not cfg.deletes.detect_preview or self.preview
        self.links: dict[str, NamespaceLink] = {}
        self.sweeps: dict[str, DeleteSweep] = {}
        self.lookups: dict[str, LookupMisses] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._kicked: set[str] = set()
        self.halted = False
        """Set by a completed cutover: the target belongs to the applications now, nothing is deleted any more."""
        self.log = get_logger(component="deletes")

    # --- wiring ----------------------------------------------------------------------------

    async def detect(self, ns: str) -> None:
        """Tier 1: ask the account once (on the first namespace) whether it has the delete preview."""
        if self._detected:
            return
        self._detected = True
        found = await preview_available(self.source, ns)
        if found:
            self.cfg.capture.deletes_preview = self.preview = True
            self.preview_since = time.time()
        self.log.info("delete tier", tier=tier_name(self.preview, self.cfg.deletes.enabled),
                      preview="available" if found else "refused" if found is False else "unknown (could not ask)")

    def attach(self, link: NamespaceLink, applier: NamespaceApplier) -> None:
        ns = link.ns
        self.links[ns] = link
        lookups = self.lookups[ns] = LookupMisses(ns, self.source)
        applier.lookup_misses = lookups.resolve
        if not self.cfg.deletes.enabled:
            return
        budget = SourceBudget(self.cfg.deletes.max_source_share)
        source = raw_collection(self.source, ns)
        deleter = OrderedDeletes(link, source, applier, budget)
        self.sweeps[ns] = DeleteSweep(link, source, raw_collection(self.target, ns), self.ledger, deleter,
                                      self.cfg.deletes.page_size, budget,
                                      catch_up_s=max(5.0, 3 * self.cfg.capture.head_sample_interval_s))
        if not self.halted:
            self._tasks[ns] = asyncio.create_task(self._loop(ns), name=f"deletes:{ns}")

    async def detach(self, ns: str) -> None:
        task = self._tasks.pop(ns, None)
        if task is not None:
            await cancel_and_wait([task])
        self.sweeps.pop(ns, None)
        self.lookups.pop(ns, None)
        self.links.pop(ns, None)

    def resume(self) -> None:
        """Restart the background passes stopped by `stop` (a cutover that ended early)."""
        for ns in self.sweeps:
            if ns not in self._tasks and not self.halted:
                self._tasks[ns] = asyncio.create_task(self._loop(ns), name=f"deletes:{ns}")

    async def stop(self) -> None:
        """Stop every background pass (cutover's final sweep, a drain); progress is in the ledger."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        await cancel_and_wait(tasks)

    # --- the schedule ----------------------------------------------------------------------

    def _due(self, sweep: DeleteSweep) -> bool:
        s = sweep.state
        if s.running:
            return True
        head = sweep.link.latest_head()
        if head is None:
            return False  # no head sampled yet: a pass could not say up to where it reconciles
        if not s.last_finished_at or s.last_started_at < self.preview_since:
            return True
        if head == s.last_head and not sweep.link.expires():
            return False
        if sweep.ns in self._kicked:
            self._kicked.discard(sweep.ns)
            return True
        return time.time() - s.last_started_at >= self.cfg.deletes.interval_s

    async def certify(self, limit_s: float) -> None:
        """`ctl status`: a namespace whose source changed since its last pass gets one now, waited for a moment.

        So that status right after the applications stopped writing can say "reconciled" without waiting
        for `deletes.interval_s`; bounded, a pass that takes longer simply shows as not reconciled yet.
        """
        asked = Wall.now()
        stale = [ns for ns, sw in self.sweeps.items() if ns in self._tasks and not sw.state.running
                 and sw.state.last_finished_at and (sw.link.latest_head() != sw.state.last_head or self._expired(sw, asked))]
        if not stale:
            return
        self._kicked.update(stale)

        def covered(sweep: DeleteSweep) -> bool:
            if sweep.link.expires():
                return Wall(sweep.state.last_started_at) >= asked  # a pass begun after the question
            return sweep.link.latest_head() == sweep.state.last_head

        async def settled(sweep: DeleteSweep) -> None:
            async with sweep.completed:
                await sweep.completed.wait_for(lambda: covered(sweep))

        with contextlib.suppress(TimeoutError):
            await within(asyncio.gather(*(settled(self.sweeps[ns]) for ns in stale)), limit_s)

    def _expired(self, sweep: DeleteSweep, now: Wall) -> bool:
        """The source expires documents and the last pass started too long ago to vouch for the documents that
        expired since (the same allowance as the lag)."""
        age = now - Wall(sweep.state.last_started_at)
        return sweep.link.expires() and age >= self.cfg.apply.cutover_threshold_seconds

    async def _loop(self, ns: str) -> None:
        sweep = self.sweeps[ns]
        backoff = Backoff(base=1.0, cap=60.0)
        while not self.halted:
            check_cancelled()
            try:
                if not sweep.loaded:
                    await sweep.load()
                if self._due(sweep):
                    await sweep.run_pass()
                    backoff.reset()
                else:
                    await asyncio.sleep(0.25)
            except (Fenced, WriteAborted):
                return  # another owner, or the daemon stops: nothing more to do here
            except (PyMongoError, LedgerError, StoreError) as exc:
                self.log.warning("delete sweep failed; will retry", namespace=ns, error=redact(str(exc))[:300])
                await asyncio.sleep(backoff.next_delay())
            except Exception as exc:  # never let a sweep bug kill the daemon silently
                self.log.exception("delete sweep crashed; will retry", namespace=ns, error=redact(repr(exc))[:300])
                await asyncio.sleep(backoff.next_delay())

    async def final_sweep(self, ns: str) -> int:
        """Cutover: a new pass over everything, at full speed, with the source quiet; returns documents deleted."""
        sweep = self.sweeps.get(ns)
        if sweep is None:
            return 0
        if not sweep.loaded:
            await sweep.load()
        sweep.frozen = True
        sweep.budget.share = 1.0
        try:
            await sweep.run_pass(restart=True)
        finally:
            sweep.frozen = False
            sweep.budget.share = self.cfg.deletes.max_source_share
        return sweep.state.last_deleted

    # --- status ----------------------------------------------------------------------------

    def reconciled(self, ns: str, now: float) -> tuple[bool, str]:
        """Whether deletes of `ns` are reconciled (see the module docstring), and why not."""
        sweep = self.sweeps.get(ns)
        if sweep is None:
            link = self.links.get(ns)
            if link is not None and link.expires():
                return False, ("the source expires documents (TTL), which no change event shows, and deletes.enabled "
                               "is false: expired documents stay on the target")
            if self.preview:
                return True, ""
            return False, "no delete tier: the account has no delete preview and deletes.enabled is false"
        s = sweep.state
        if not s.last_finished_at or s.last_started_at < self.preview_since:
            return False, "no delete sweep has completed yet"
        if self._expired(sweep, Wall(now)):
            return False, (f"the source expires documents (TTL) and the last sweep started "
                           f"{now - s.last_started_at:.0f}s ago")
        if self.preview:
            return True, ""
        head = sweep.link.latest_head()
        if head is not None and head == s.last_head:
            return True, ""
        age = now - s.last_started_at
        if age < self.cfg.apply.cutover_threshold_seconds:
            return True, ""
        return False, f"the source changed since the last sweep started {age:.0f}s ago"

    def fields(self, ns: str) -> dict[str, Any]:
        sweep = self.sweeps.get(ns)
        lookups = self.lookups.get(ns)
        applied = (sweep.state.deletes_applied if sweep else 0) + (lookups.deleted if lookups else 0)
        return {
            "deletes_tier": tier_name(self.preview, sweep is not None),
            "deletes_reconciled_at": sweep.state.last_started_at if sweep and sweep.state.last_finished_at else 0.0,
            "deletes_applied": applied,
            "sweep_progress": sweep.progress() if sweep else None,
        }

    def reasons(self, namespaces: list[str], now: float) -> list[str]:
        stale = []
        for ns in namespaces:
            ok, why = self.reconciled(ns, now)
            if not ok:
                stale.append(f"{ns} ({why})")
        return [f"deletes not reconciled since the last change: {'; '.join(stale)}"] if stale else []
