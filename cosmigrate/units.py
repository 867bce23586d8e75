"""One object per unit of work, and the registry of the units one worker runs.

A unit (a namespace: `cosmigrate.leases`) is run by several parts that only
make sense together: its capture, its applier, its head samples
(`Freshness`), its full-load phase (`NamespaceBackfill`) and its index plan
(`IndexBuilder`), with the tasks that drive them. A lease starts them all
and a lost lease stops them all, so they live and die as one `Unit`: no
reader can find a capture without its applier, and nothing is left behind
in a dictionary when a unit moves to another worker. The model is
Litestream's per-database `DB` under its `Store`, and KCL's `ShardConsumer`
per lease.

`Units` is the worker's registry. Status, metrics, the proof layer and the
full-load check read it (through `cosmigrate.worker.Worker`), never the
daemon's own fields. It also remembers, per namespace, what outlives a unit:
when its last write went unanswered (a handover before `write_bound_s` is
not clean) and why it could not start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cosmigrate.apply import NamespaceApplier
from cosmigrate.backfill import NamespaceBackfill, check_round
from cosmigrate.capture import NamespaceCapture
from cosmigrate.clock import Mono
from cosmigrate.freshness import Freshness
from cosmigrate.indexplan import IndexBuilder
from cosmigrate.ledger import Ledger
from cosmigrate.logs import get_logger
from cosmigrate.redact import redact
from cosmigrate.timeouts import cancel_and_wait


@dataclass(eq=False)
class Unit:
    """Everything one worker runs for one unit, started together by its lease and stopped together."""

    ns: str
    capture: NamespaceCapture
    applier: NamespaceApplier
    freshness: Freshness
    backfill: NamespaceBackfill
    builder: IndexBuilder
    index_task: asyncio.Task[None] | None = None
    """The index plan's task. A `ctl retry` hands it to the unit's next incarnation (the plan is not redone)."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    """The capture and apply tasks, while they run."""
    link: Any = None
    """What the proof layer attached to this unit (`cosmigrate.nslink.NamespaceLink`), once attached."""

    @property
    def epoch(self) -> int:
        return self.capture.epoch

    def start(self) -> None:
        """Start capture at once, and apply once the unique indexes exist on the target (its conflict handling
        reads them). Each task is supervised: a crash marks the unit failed, never the process."""
        if self.index_task is None or self.index_task.cancelled():  # a stop cancelled the one handed over
            self.index_task = asyncio.create_task(self.builder.run(), name=f"indexes:{self.ns}")
        self.tasks = [
            asyncio.create_task(self._supervise(self.capture, self.capture.run), name=f"capture:{self.ns}"),
            asyncio.create_task(self._supervise(self.applier, self._apply_when_indexed), name=f"apply:{self.ns}"),
        ]

    def stop(self, *, fenced: bool) -> None:
        """Ask both parts to stop: capture commits what it holds, the applier's write in flight is answered.
        `fenced`: another worker owns the unit now, so the applier never writes again."""
        self.capture.stop()
        if fenced:
            self.applier.fence()
        else:
            self.applier.stop()

    async def check_backfill(self, source: Any, ledger: Ledger) -> None:
        """One round of this unit's full-load check (`cosmigrate.backfill.check_round`)."""
        await check_round(self.backfill, self.capture, self.applier, self.freshness, self.builder, source, ledger)

    async def stop_indexes(self) -> None:
        """A build in flight finishes on the target; the next owner reads the plan back."""
        if self.index_task is not None:
            await cancel_and_wait([self.index_task])

    async def _apply_when_indexed(self) -> None:
        waits = [asyncio.ensure_future(self.builder.unique_ready.wait()),
                 asyncio.ensure_future(self.applier.stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not self.builder.unique_ready.is_set():
            self.applier.status.state = "stopped"
            return
        await self.applier.run()

    async def _supervise(self, part: NamespaceCapture | NamespaceApplier, run: Callable[[], Any]) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must mark the namespace, never kill the process silently
            part.status.state = "failed"
            part.status.last_error = redact(f"internal error: {exc!r}")
            get_logger(namespace=self.ns).exception("namespace task crashed", task=type(part).__name__)
        if part is self.capture and part.status.state == "fenced":
            # A newer epoch took the namespace: the applier stops too (the new owner applies). The lease keeper
            # drops the unit at its next renew or balance round.
            self.applier.fence()


class Units:
    """The registry of the units this worker runs, by namespace."""

    def __init__(self) -> None:
        self._units: dict[str, Unit] = {}
        self.unanswered: dict[str, Mono] = {}
        """Units stopped while their last write went unanswered, and when (a handover of them is not clean)."""
        self.start_failures: dict[str, str] = {}
        """Units this worker took but could not start, and why (handed back; status lists them as not captured)."""

    def __contains__(self, ns: object) -> bool:
        return ns in self._units

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._units))

    def __len__(self) -> int:
        return len(self._units)

    def __getitem__(self, ns: str) -> Unit:
        return self._units[ns]

    def get(self, ns: str) -> Unit | None:
        return self._units.get(ns)

    def values(self) -> list[Unit]:
        return list(self._units.values())

    def add(self, unit: Unit) -> None:
        self._units[unit.ns] = unit
        self.start_failures.pop(unit.ns, None)

    def remove(self, unit: Unit) -> None:
        """Forget a stopped unit, remembering whether its last write went unanswered. Only that very unit: one
        that replaced it meanwhile (`ctl retry`, or the lease taken again) stays registered."""
        if unit.applier.unanswered_at is not None:
            self.unanswered[unit.ns] = unit.applier.unanswered_at
        if self._units.get(unit.ns) is unit:
            del self._units[unit.ns]

    def unanswered_at(self, ns: str) -> Mono | None:
        unit = self._units.get(ns)
        return unit.applier.unanswered_at if unit is not None else self.unanswered.get(ns)

    def sampled(self) -> dict[str, Freshness]:
        """The head samples of every unit this worker runs (what the head sampler keeps fresh)."""
        return {ns: unit.freshness for ns, unit in self._units.items()}

    def tasks(self) -> list[asyncio.Task[None]]:
        return [task for unit in self._units.values() for task in unit.tasks]
