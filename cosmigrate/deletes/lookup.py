"""Tier 2: a change event whose document lookup found nothing.

With `fullDocument: "updateLookup"`, Cosmos reads the document when it serves
the page; an event without a document (and without the delete preview's
`operationType: "delete"`) says only "this `_id` changed, and at lookup time
it was not there". There is no evidence that the latest-version feed emits
such events, and a lookup can miss for reasons other than a delete, so it is
never taken as a delete by itself: the applier hands these keys here, inside
its round, and writes what the source holds *now*: the document if it is
there (a spurious miss must not leave an old version), a delete if it is not.
Both are ordinary ops of the same round, so any later change of the same
`_id` is applied after them.
"""

from __future__ import annotations

from typing import Any

from bson.raw_bson import RawBSONDocument

from cosmigrate.apply import Op
from cosmigrate.budget import SourceBudget
from cosmigrate.idorder import encode_id, id_doc, id_order, id_value
from cosmigrate.logs import get_logger
from cosmigrate.mongo import RAW, raw_collection

CHUNK = 1000


class LookupMisses:
    def __init__(self, ns: str, source: Any, budget: SourceBudget | None = None) -> None:
        self.ns = ns
        self.coll = raw_collection(source, ns)
        self.budget = budget or SourceBudget()
        self.deleted = 0
        self.rewritten = 0
        self.log = get_logger(namespace=ns, component="deletes")

    async def resolve(self, misses: dict[bytes, int]) -> dict[bytes, Op]:
        """For each documentKey (with the seq of its event): the op that makes the target match the source now."""
        keys = list(misses)
        ids = {key: encode_id(RawBSONDocument(key, RAW)["_id"]) for key in keys}
        found: dict[tuple[Any, ...], RawBSONDocument] = {}
        for i in range(0, len(keys), CHUNK):
            values = [id_value(ids[k]) for k in keys[i:i + CHUNK]]

            async def read(values: list[Any] = values) -> list[RawBSONDocument]:
                return [d async for d in self.coll.find({"_id": {"$in": values}})]

            for got in await self.budget.run(read):
                found[id_order(id_doc(bytes(got.raw)))] = got
        ops: dict[bytes, Op] = {}
        for key, seq in misses.items():
            doc = found.get(id_order(ids[key]))
            ops[key] = Op(key, RawBSONDocument(key, RAW), RawBSONDocument(bytes(doc.raw), RAW) if doc is not None else None,
                          seq)
        gone = sum(1 for op in ops.values() if op.doc is None)
        self.deleted += gone
        self.rewritten += len(ops) - gone
        self.log.info("change events without a document re-read at the source", deleted=gone,
                      rewritten=len(ops) - gone)
        return ops
