"""A one-minute smoke check of the sandbox with the real PyMongo async client.

`make demo` runs this until the full migration demo exists: it starts both
emulators, writes to the source, reads the Cosmos change stream from the
beginning, copies the documents to the target with bulk upserts, and checks
that the target equals the source.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from pymongo import AsyncMongoClient, ReplaceOne

from cosmigrate.sandbox import Sandbox, beginning_token

PIPELINE: list[dict[str, Any]] = [
    {"$match": {"operationType": {"$in": ["insert", "update", "replace"]}}},
    {"$project": {"_id": 1, "fullDocument": 1, "ns": 1, "documentKey": 1}},
]


async def smoke(n: int = 5000) -> int:
    async with Sandbox() as sb:
        print(f"source {sb.source_uri}\ntarget {sb.target_uri}")
        source: AsyncMongoClient = AsyncMongoClient(sb.source_uri)
        target: AsyncMongoClient = AsyncMongoClient(sb.target_uri)
        try:
            coll = source.demo.items
            t0 = time.perf_counter()
            await coll.insert_many([{"_id": i, "v": 0} for i in range(n)])
            await coll.update_many({"_id": {"$lt": n // 2}}, {"$inc": {"v": 1}})
            events = 0
            ops = []
            async with await coll.watch(PIPELINE, full_document="updateLookup",
                                        resume_after=beginning_token()) as stream:
                while events < n:
                    change = await stream.try_next()
                    if change is None:
                        continue
                    events += 1
                    doc = change["fullDocument"]
                    ops.append(ReplaceOne({"_id": doc["_id"]}, doc, upsert=True))
            await target.demo.items.bulk_write(ops, ordered=False)
            src = [d async for d in coll.find().sort("_id", 1)]
            dst = [d async for d in target.demo.items.find().sort("_id", 1)]
            ok = src == dst
            took = time.perf_counter() - t0
            print(f"{events} change events read, {len(dst)} documents copied in {took:.2f}s: "
                  f"target {'equals' if ok else 'DIFFERS FROM'} source")
            return 0 if ok else 1
        finally:
            await source.close()
            await target.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(smoke()))
