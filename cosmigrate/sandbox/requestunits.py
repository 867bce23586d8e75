"""Request units: the emulated Cosmos DB account's load-dependent throttling.

Cosmos DB (RU-based) gives each collection a budget of request units per
second; every request is charged by what it reads and writes, and once the
budget is spent requests are throttled (16500, or with server-side retry a
delayed 50) and change-stream pages come back empty at once. The sandbox's
charge model is deliberately simple and documented here, not a claim about
Cosmos's exact prices: a request costs REQUEST_RU plus, per document,
READ_RU_PER_KB (read or returned by a change stream) or WRITE_RU_PER_KB
(inserted, replaced, updated or deleted) for every started KiB. Microsoft
documents a 1 KB point read at 1 RU and writes at several RU per KB, which
is the ratio kept here.

Budgets are per physical partition, the collection's rate split evenly
(a collection of one partition keeps one budget under its own name).
Change-stream pages spend from the partitions they read; requests the
sandbox does not route to a partition (writes, queries) spend evenly from
all of the collection's partitions and wait until every one has units. A budget holds at
most one second of units and may be overdrawn by the request that empties
it; the next requests wait for the refill. Charges are counted per kind of
work (`feed`: change streams and GetChangeStreamTokens; `read`; `write`)
whether or not a budget is set, so a benchmark can report what a run cost.

Each request's own charge is also summed while it runs (`begin` / `end`, keyed
by the connection's task, since the server answers one request at a time per
connection): Cosmos's `getLastRequestStatistics` reports it per connection,
and `cosmigrate plan` reads the RU per document from it.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

REQUEST_RU = 1.0
READ_RU_PER_KB = 1.0
WRITE_RU_PER_KB = 5.0
KINDS = ("feed", "read", "write")


def read_cost(nbytes: int) -> float:
    return READ_RU_PER_KB * max(1, math.ceil(nbytes / 1024))


def write_cost(nbytes: int) -> float:
    return WRITE_RU_PER_KB * max(1, math.ceil(nbytes / 1024))


@dataclass
class _Budget:
    level: float
    at: float = field(default_factory=time.monotonic)

    def refill(self, rate: float) -> None:
        now = time.monotonic()
        self.level = min(rate, self.level + (now - self.at) * rate)
        self.at = now


@dataclass
class RequestUnits:
    """Budgets per collection (`ns`) at `rate` units per second, and the units charged so far."""

    charged: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    _budgets: dict[str, _Budget] = field(default_factory=dict)
    _open: dict[asyncio.Task[object], float] = field(default_factory=dict)
    """The charge so far of the request each connection task is answering."""

    def _budget(self, ns: str, rate: float) -> _Budget:
        budget = self._budgets.get(ns)
        if budget is None:
            budget = self._budgets[ns] = _Budget(rate)
        budget.refill(rate)
        return budget

    def wait_s(self, ns: str, rate: float) -> float:
        """Seconds until `ns` has units again (0 when it has some now, or when there is no budget)."""
        if rate <= 0:
            return 0.0
        budget = self._budget(ns, rate)
        return 0.0 if budget.level > 0 else (-budget.level + 1e-3) / rate

    def begin(self) -> None:
        """A request starts on this connection's task: its own charge counts from 0."""
        task = asyncio.current_task()
        if task is not None:
            self._open[task] = 0.0

    def end(self) -> float:
        """The units charged to the request this task answered (0 when it was never begun)."""
        task = asyncio.current_task()
        return self._open.pop(task, 0.0) if task is not None else 0.0

    def charge(self, ns: str | None, kind: str, units: float, rate: float) -> None:
        self.charged[kind] += units
        task = asyncio.current_task()
        if task is not None and task in self._open:
            self._open[task] += units
        if ns is not None and rate > 0:
            self._budget(ns, rate).level -= units

    def spend(self, key: str, units: float, rate: float) -> None:
        """Take `units` from budget `key` (a collection, or one partition of it) without counting them again."""
        if rate > 0:
            self._budget(key, rate).level -= units

    def snapshot(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.charged.items()}
