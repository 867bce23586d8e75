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
  documents without moving the head. The cutover's final sweep runs with
  the key off too (`final_only`).

Readiness: deletes are *reconciled* for a namespace when a sweep pass that
started after the tier became active has completed and its head covers the
latest sampled head: nothing was written at the source (a delete moves the
head too) since the moment the pass claims. There is no allowance in time:
a delete one second after a pass started is not swept by it, and "ready"
would then be said while the target still holds the document. With the
preview on, deletes after that first pass arrive in the feed. With neither,
deletes are never reconciled and status says so. A namespace that expires
documents is reconciled only by a pass that this process started less than
`apply.cutover_threshold_seconds` ago (expiry is not in the feed, preview or
not, and moves no head), on top of the rules above.

Times: the schedule's interval, the expiry rule's age and the preview's
start are monotonic (`Mono`, this process only); the pass's stored times are
wall times (`Wall`), shown in status.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pymongo.errors import PyMongoError

from cosmigrate.apply import NamespaceApplier, WriteAborted
from cosmigrate.backoff import Backoff, IdlePace
from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Mono
from cosmigrate.config import Config
from cosmigrate.deletes.lookup import LookupMisses
from cosmigrate.deletes.ordered import OrderedDeletes
from cosmigrate.deletes.sweep import DeleteSweep
from cosmigrate.deletes.tiers import preview_available, tier_name
from cosmigrate.idorder import IdDoc
from cosmigrate.ledger import Fenced, Ledger, LedgerError
from cosmigrate.logs import get_logger
from cosmigrate.mongo import raw_collection
from cosmigrate.nslink import NamespaceLink
from cosmigrate.redact import redact
from cosmigrate.stores import StoreError
from cosmigrate.timeouts import Pulse, cancel_and_wait, check_cancelled, within
from cosmigrate.tokens import Positions, reached

IDLE_CHECK_MAX_S = 1.0
"""How long a namespace's sweep loop waits at most, once idle, before it looks whether a pass is due."""


class Deletes:
    def __init__(self, cfg: Config, source: Any, target: Any, ledger: Ledger) -> None:
        self.cfg = cfg
        self.source = source
        self.target = target
        self.ledger = ledger
        self.preview = cfg.capture.deletes_preview
        self.preview_since: Mono | None = Mono.now() if self.preview else None
        """When the delete preview became active in this process: a pass that started before it does not count."""
        self._detected = not cfg.deletes.detect_preview or self.preview
        self._detect_lock = asyncio.Lock()
        self.links: dict[str, NamespaceLink] = {}
        self.sweeps: dict[str, DeleteSweep] = {}
        self.lookups: dict[str, LookupMisses] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.final_only: dict[str, DeleteSweep] = {}
        """With `deletes.enabled` false: the sweep of each namespace, for the cutover's final pass only."""
        self._kicked: set[str] = set()
        self._nudge = Pulse()
        """Fired when `certify` kicks passes: the idle loops stop waiting at once."""
        self.halted = False
        """Set by a completed cutover: the target belongs to the applications now, nothing is deleted any more."""
        self.log = get_logger(component="deletes")

    # --- wiring ----------------------------------------------------------------------------

    async def detect(self, ns: str) -> None:
        """Tier 1: ask the account once (on the first namespace) whether it has the delete preview."""
        async with self._detect_lock:  # units start concurrently: none opens its stream before the answer is in
            if self._detected:
                return
            self._detected = True
            found = await preview_available(self.source, ns)
            if found:
                self.cfg.capture.deletes_preview = self.preview = True
                self.preview_since = Mono.now()
        self.log.info("delete tier", tier=tier_name(self.preview, self.cfg.deletes.enabled),
                      preview="available" if found else "refused" if found is False else "unknown (could not ask)")

    def attach(self, link: NamespaceLink, applier: NamespaceApplier) -> None:
        ns = link.ns
        self.links[ns] = link
        lookups = self.lookups[ns] = LookupMisses(ns, self.source)
        applier.lookup_misses = lookups.resolve
        budget = SourceBudget(self.cfg.deletes.max_source_share)
        source = raw_collection(self.source, ns)
        deleter = OrderedDeletes(link, source, applier, budget)
        sweep = DeleteSweep(link, source, raw_collection(self.target, ns), self.ledger, deleter,
                            self.cfg.deletes.page_size, budget,
                            catch_up_s=max(5.0, 3 * self.cfg.capture.head_sample_interval_s))
        if not self.cfg.deletes.enabled:
            # No background passes, but the cutover's final sweep still runs: without the preview, the deletes
            # are in no batch log, and the report would otherwise stand on a verification that never sees them.
            self.final_only[ns] = sweep
            return
        self.sweeps[ns] = sweep
        if not self.halted:
            self._tasks[ns] = asyncio.create_task(self._loop(ns), name=f"deletes:{ns}")

    async def detach(self, ns: str) -> None:
        await cancel_and_wait(self.forget(ns))

    def forget(self, ns: str) -> list[asyncio.Task[None]]:
        """Drop the namespace's parts at once (no await: a new incarnation attached while the old task is being
        cancelled keeps its own; popping after the await took the new one's sweep) and return the task to
        cancel."""
        task = self._tasks.pop(ns, None)
        self.sweeps.pop(ns, None)
        self.final_only.pop(ns, None)
        self.lookups.pop(ns, None)
        self.links.pop(ns, None)
        return [task] if task is not None else []

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

    def _counts(self, sweep: DeleteSweep) -> bool:
        """A completed pass that started after the preview came on (if it did)."""
        started = sweep.last_started_mono
        return sweep.state.completed and (self.preview_since is None
                                          or (started is not None and started >= self.preview_since))

    def _due(self, sweep: DeleteSweep) -> bool:
        s = sweep.state
        if s.running:
            return True
        head = sweep.link.latest_head()
        if head is None:
            return False  # no head sampled yet: a pass could not say up to where it reconciles
        if not self._counts(sweep):
            return True
        if _covers(s.last_head, head) and not sweep.link.expires():
            return False
        if sweep.ns in self._kicked:
            self._kicked.discard(sweep.ns)
            return True
        started = sweep.last_started_mono
        return started is None or started.elapsed() >= self.cfg.deletes.interval_s

    async def certify(self, limit_s: float) -> None:
        """`ctl status`: a namespace whose source changed since its last pass gets one now, waited for a moment.

        So that status right after the applications stopped writing can say "reconciled" without waiting
        for `deletes.interval_s`; bounded, a pass that takes longer simply shows as not reconciled yet.
        """
        asked = Mono.now()
        stale = [ns for ns, sw in self.sweeps.items() if ns in self._tasks and not sw.state.running
                 and sw.state.completed and (not _covers(sw.state.last_head, sw.link.latest_head()) or self._expired(sw))]
        self._nudge.fire()  # every loop looks now (a first pass that waits for its first head included)
        if not stale:
            return
        self._kicked.update(stale)

        def covered(sweep: DeleteSweep) -> bool:
            if sweep.link.expires():
                started = sweep.last_started_mono
                return started is not None and started >= asked  # a pass begun after the question
            return _covers(sweep.state.last_head, sweep.link.latest_head())

        async def settled(sweep: DeleteSweep) -> None:
            async with sweep.completed:
                await sweep.completed.wait_for(lambda: covered(sweep))

        with contextlib.suppress(TimeoutError):
            await within(asyncio.gather(*(settled(self.sweeps[ns]) for ns in stale)), limit_s)

    def _expired(self, sweep: DeleteSweep) -> bool:
        """The source expires documents and the last pass started too long ago (or in another process) to vouch
        for the documents that expired since (the same allowance as the lag)."""
        started = sweep.last_started_mono
        return sweep.link.expires() and (started is None
                                         or started.elapsed() >= self.cfg.apply.cutover_threshold_seconds)

    async def _loop(self, ns: str) -> None:
        sweep = self.sweeps[ns]
        backoff = Backoff(base=1.0, cap=60.0)
        idle = IdlePace(IDLE_CHECK_MAX_S, after=0, first=0.25)
        while not self.halted:
            check_cancelled()
            try:
                if not sweep.loaded:
                    await sweep.load()
                if self._due(sweep):
                    await sweep.run_pass()
                    backoff.reset()
                    idle.reset()
                else:
                    # Not due: look again soon, then less often (a thousand idle namespaces checked four times
                    # a second each); `certify` ends the wait at once.
                    await self._nudge.wait(idle.next_delay())
            except (Fenced, WriteAborted):
                return  # another owner, or the daemon stops: nothing more to do here
            except (PyMongoError, LedgerError, StoreError) as exc:
                self.log.warning("delete sweep failed; will retry", namespace=ns, error=redact(str(exc))[:300])
                await asyncio.sleep(backoff.next_delay())
            except Exception as exc:  # never let a sweep bug kill the daemon silently
                self.log.exception("delete sweep crashed; will retry", namespace=ns, error=redact(repr(exc))[:300])
                await asyncio.sleep(backoff.next_delay())

    async def final_sweep(self, ns: str) -> int:
        """Cutover: a new pass over everything, at full speed, with the source quiet; returns documents deleted.

        Whatever `deletes.enabled` says: the report stands on this pass (the source's deletes reach no batch log).
        """
        sweep = self.sweeps.get(ns) or self.final_only.get(ns)
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

    def final_missing(self, ns: str) -> list[IdDoc]:
        """The `_id`s the last final sweep found at the source but not on the target (for verification)."""
        sweep = self.sweeps.get(ns) or self.final_only.get(ns)
        return list(sweep.missing) if sweep is not None else []

    # --- status ----------------------------------------------------------------------------

    def reconciled(self, ns: str) -> tuple[bool, str]:
        """Whether deletes of `ns` are reconciled (see the module docstring), and why not."""
        always, claimed, why = self.claim(ns)
        if always or why:
            return always, why
        sweep = self.sweeps[ns]
        head = sweep.link.latest_head()
        if head is None:
            return False, "no source head sampled yet"
        if _covers(claimed, head):
            return True, ""
        s = sweep.state
        return False, (f"the source changed since the last completed sweep pass started at {s.last_started_at.iso()}"
                       + ("; a pass is running" if s.running else ""))

    def claim(self, ns: str) -> tuple[bool, Positions | None, str]:
        """What this worker can say about the deletes of `ns` without a head: (reconciled whatever the head,
        the head its last counting pass covers, why not reconciled when no head decides it). Other workers
        judge the covered head against their own sample (`cosmigrate.readiness`)."""
        sweep = self.sweeps.get(ns)
        if sweep is None:
            link = self.links.get(ns)
            if link is not None and link.expires():
                return False, None, ("the source expires documents (TTL), which no change event shows, and "
                                     "deletes.enabled is false: expired documents stay on the target")
            if self.preview:
                return True, None, ""
            return False, None, "no delete tier: the account has no delete preview and deletes.enabled is false"
        if not self._counts(sweep):
            return False, None, "no delete sweep has completed yet"
        if self._expired(sweep):
            started = sweep.last_started_mono
            return False, None, ("the source expires documents (TTL) and the last sweep started "
                                 + (f"{started.elapsed():.0f}s ago" if started is not None else "before this process"))
        if self.preview:
            return True, None, ""
        return False, sweep.state.last_head, ""

    def fields(self, ns: str) -> dict[str, Any]:
        sweep = self.sweeps.get(ns)
        lookups = self.lookups.get(ns)
        applied = (sweep.state.deletes_applied if sweep else 0) + (lookups.deleted if lookups else 0)
        return {
            "deletes_tier": tier_name(self.preview, sweep is not None),
            # Wall seconds, made ISO by the caller (status shows every wall time so).
            "deletes_reconciled_at": sweep.state.last_started_at.s if sweep and sweep.state.completed else 0.0,
            "deletes_applied": applied,
            "sweep_progress": sweep.progress() if sweep else None,
        }

    def reasons(self, namespaces: list[str]) -> list[str]:
        stale = []
        for ns in namespaces:
            ok, why = self.reconciled(ns)
            if not ok:
                stale.append(f"{ns} ({why})")
        return [f"deletes not reconciled since the last change: {'; '.join(stale)}"] if stale else []


def _covers(claimed: Positions | None, latest: Positions | None) -> bool:
    """A pass's head covers the latest sampled head: nothing was written at the source after the pass's sample."""
    return claimed is not None and latest is not None and reached(claimed, latest)
