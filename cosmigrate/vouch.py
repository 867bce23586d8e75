"""The loops behind READY across workers (`cosmigrate.readiness`): publish what this worker vouches for, and
prove the other workers' units from the ledger and this worker's own head samples.

Both run on their own tasks: the publisher must keep writing while a unit's
batches commit (its silence is how the others learn that it stopped), and
the prover's head samples must not wait behind this worker's own sampling.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from cosmigrate.clock import Mono
from cosmigrate.cluster import ELSEWHERE, unit_lease
from cosmigrate.ledger import Fenced, LedgerError
from cosmigrate.readiness import publish
from cosmigrate.redact import redact
from cosmigrate.status import publishable
from cosmigrate.timeouts import within
from cosmigrate.tokens import Positions, TokenFormatError, positions

if TYPE_CHECKING:
    from cosmigrate.worker import Worker


def foreign_units(worker: Worker) -> list[str]:
    """Units another worker holds (its lease renewed, as this worker saw it) and this one runs no capture of."""
    if worker.keeper is None:
        return []
    now = Mono.now()
    return sorted(ns for ns in worker.keeper.leases
                  if ns not in worker.units and unit_lease(worker.keeper, ns, now).lease == ELSEWHERE)


async def publish_once(worker: Worker) -> None:
    """One readiness item per unit held here, each fenced by the unit's epoch."""
    assert worker.ledger is not None
    now = Mono.now()
    for ns in sorted(worker.keeper.held if worker.keeper is not None else ()):
        record = publishable(worker, ns, now)
        unit = worker.units.get(ns)
        if record is None or unit is None:
            continue
        try:
            await within(publish(worker.ledger, ns, unit.epoch, record), worker.cfg.leases.renew_s)
        except Fenced:
            continue  # the unit moved on: its new owner publishes; the lease loop stops it here
        except (LedgerError, TimeoutError) as exc:
            worker.log.warning("readiness not published; will retry", namespace=ns, error=redact(str(exc)) or "timeout")


async def publish_loop(worker: Worker) -> None:
    while True:
        await publish_once(worker)
        await asyncio.sleep(worker.cfg.leases.renew_s)


async def _sample(worker: Worker, ns: str) -> None:
    assert worker.sampler is not None
    unit = worker.foreign.of(ns)
    try:
        _, at, tokens = await worker.sampler.head(ns)
        head: Positions = {}
        for token in tokens:
            head.update(positions(token))
    except TokenFormatError as exc:
        unit.last_sample_error = f"unreadable head token: {exc}"
        return
    except Exception as exc:  # no sample this round: its freshness ages, which is the point
        unit.last_sample_error = redact(str(exc))[:300] or type(exc).__name__
        return
    if not head:
        unit.last_sample_error = "the source returned no head token"
        return
    unit.add_sample(at, head)


async def prove(worker: Worker, limit_s: float) -> None:
    """Sample every foreign unit's head now, then read their ledger items until each is caught up to it, for at
    most `limit_s` (a unit that is not by then simply shows its lag)."""
    assert worker.ledger is not None
    names = foreign_units(worker)
    worker.foreign.keep(set(names))
    if not names or worker.sampler is None:
        return
    async with asyncio.TaskGroup() as group:
        for ns in names:
            group.create_task(_sample(worker, ns))
    deadline = Mono.now() + limit_s
    while True:
        try:
            await worker.foreign.read(worker.ledger, names)
        except LedgerError as exc:
            worker.log.warning("could not read the other workers' units", error=redact(str(exc)))
            return
        if Mono.now() >= deadline or all(worker.foreign.of(ns).caught_up for ns in names):
            return
        await asyncio.sleep(0.1)


async def prove_loop(worker: Worker) -> None:
    """The other workers' units, proven every head-sample interval (the periodic status and metrics read it)."""
    while True:
        await prove(worker, 1.0)
        await asyncio.sleep(worker.cfg.capture.head_sample_interval_s)
