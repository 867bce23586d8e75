"""Deleting a target document only where no newer write of the same `_id` can be overtaken.

The sweep finds documents that the target holds and the source does not. The
danger is ordering: between the moment the source is checked and the moment
the target copy is deleted, the application may insert the same `_id` again;
its change is captured and applied by the namespace's applier. A delete that
lands after that upsert would remove a live document, and nothing would ever
bring it back (see docs/deletes.md for the interleavings).

So a verified delete goes through the applier's ordered path:

1. everything captured before the check is written first (the applier's
   written seq reaches the committed seq read now), so no older upsert
   queued in the batch log can land after the delete and revive the
   document. This waits as long as it takes (a slow target, a stopped
   writer, an applier not started yet: its written seq is -1 until then);
   it never gives up and deletes anyway. The committed seq comes from the
   ledger when capture starts, so "-1" only ever means "nothing committed";
2. then, holding the applier's round lock (no apply round runs), the
   candidates are checked at the source (`$in`, MongoDB equality: 1 and
   1.0 are one `_id`) and the absent ones deleted on the target through the
   applier's own fenced, gated write path (`NamespaceApplier.send`).

A re-insert that the source accepted after step 2's check is captured after
it and applied after the lock is released: the upsert lands last and wins.
A re-insert before the check makes the check see the document: no delete.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from bson.raw_bson import RawBSONDocument
from pymongo import DeleteOne

from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Mono
from cosmigrate.idorder import IdDoc, id_order, id_value, order_key
from cosmigrate.logs import get_logger
from cosmigrate.nslink import NamespaceLink

RECHECK_CHUNK = 1000


class ApplyPort(Protocol):
    """The two things the ordered path needs from a NamespaceApplier."""

    def exclusive(self) -> AbstractAsyncContextManager[Any]:
        """Held while no apply round runs."""

    async def send(self, requests: list[Any]) -> None:
        """One bulk write, gated by the writer switch and fenced by the owner's epoch."""


async def present_at_source(coll: Any, ids: list[IdDoc], budget: SourceBudget) -> set[tuple[Any, ...]]:
    """The order keys (MongoDB equality) of those `_id`s the source holds now."""
    found: set[tuple[Any, ...]] = set()
    for i in range(0, len(ids), RECHECK_CHUNK):
        values = [id_value(d) for d in ids[i:i + RECHECK_CHUNK]]

        async def read(values: list[Any] = values) -> list[Any]:
            return [d["_id"] async for d in coll.find({"_id": {"$in": values}}, {"_id": 1})]

        for value in await budget.run(read):
            found.add(order_key(value))
    return found


class OrderedDeletes:
    def __init__(self, link: NamespaceLink, source_coll: Any, applier: ApplyPort, budget: SourceBudget,
                 catch_up_s: float = 30.0) -> None:
        """`catch_up_s`: how often a delete still waiting for the applier says so in the log (it keeps waiting)."""
        self.link = link
        self.source = source_coll
        self.applier = applier
        self.budget = budget
        self.catch_up_s = catch_up_s
        self.applied = 0
        self.log = get_logger(namespace=link.ns, component="deletes")
        self.after_check: Callable[[list[IdDoc]], Awaitable[None]] | None = None
        """Test seam: runs between the source check and the delete (the interleaving tests use it)."""

    async def delete_absent(self, ids: list[IdDoc]) -> int:
        """Delete, on the target, those of `ids` that the source does not hold; returns how many."""
        if not ids:
            return 0
        await self._written_up_to(self.link.committed_seq())
        async with self.applier.exclusive():
            present = await present_at_source(self.source, ids, self.budget)
            absent = [i for i in ids if id_order(i) not in present]
            if self.after_check is not None:
                await self.after_check(absent)
            if absent:
                await self.applier.send([DeleteOne(RawBSONDocument(i)) for i in absent])
        self.applied += len(absent)
        return len(absent)

    async def _written_up_to(self, seq: int) -> None:
        """Wait until the applier has written every batch up to `seq`, however long that takes."""
        waited = Mono.now()
        while not await self.link.wait_written(seq, self.catch_up_s):
            self.log.info("an ordered delete waits for the applier to write what was captured before it "
                          "(it never goes ahead of a queued write)", committed_seq=seq,
                          written_seq=self.link.written_seq(), waited_s=round(waited.elapsed(), 1))
