"""The target's write rate, measured the way the applier writes, in a scratch collection that is removed.

The scratch collection lives in the database `SCRATCH_DB` under a name that
starts with `SCRATCH_PREFIX`: a database no Cosmos account can hand over to a
migration (discovery and verification skip it, `cosmigrate.mongo`), so it can
never be a user collection. It is dropped when the probe ends, however it
ends; a probe killed outright (SIGKILL) leaves it behind, and every plan
starts by removing such leftovers.

The probe writes documents shaped like the source's (the RU probe's sample,
each under a new `_id`) as the applier does: unordered bulk ReplaceOne with
upsert, `apply.max_ops_per_write` at most per write, `apply.write_concurrency`
writes at once; bounded in documents and seconds.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument
from pymongo import ReplaceOne

from cosmigrate.clock import Mono
from cosmigrate.mongo import RAW, SCRATCH_DB
from cosmigrate.timeouts import within

SCRATCH_PREFIX = "plan_scratch_"
SYNTHETIC_BYTES = 1024
WRITES_PER_WRITER = 2
"""At least this many writes per concurrent writer, so the rate is not one write's latency."""


@dataclass
class TargetBounds:
    docs: int = 20_000
    seconds: float = 5.0

    def as_dict(self) -> dict[str, Any]:
        return {"docs": self.docs, "seconds": self.seconds}


@dataclass
class TargetProbe:
    bounds: TargetBounds
    docs: int = 0
    seconds: float = 0.0
    shaped_like: str = ""
    stopped_by: str = ""

    @property
    def docs_per_s(self) -> float | None:
        return self.docs / self.seconds if self.docs and self.seconds > 0 else None

    def as_dict(self) -> dict[str, Any]:
        rate = self.docs_per_s
        return {"bounds": self.bounds.as_dict(), "docs": self.docs, "seconds": round(self.seconds, 3),
                "docs_per_s": None if rate is None else round(rate, 1), "shaped_like": self.shaped_like,
                "stopped_by": self.stopped_by}


async def remove_leftovers(target: Any) -> list[str]:
    """Drop the scratch collections an earlier plan left (it was killed during its probe); their names."""
    names = [n for n in await target[SCRATCH_DB].list_collection_names() if n.startswith(SCRATCH_PREFIX)]
    for name in names:
        await target[SCRATCH_DB].drop_collection(name)
    return names


def rekey(raw: bytes, n: int) -> RawBSONDocument:
    """The document under `_id` n, every other field as it was (raw values re-encoded as they came)."""
    doc = RawBSONDocument(raw, RAW)
    fields: dict[str, Any] = {"_id": n}
    for key, value in doc.items():
        if key != "_id":
            fields[key] = value
    return RawBSONDocument(bson.encode(fields, codec_options=RAW), RAW)


def shapes(samples: list[bytes], avg_size: int | None) -> tuple[list[bytes], str]:
    """The documents to copy: the source's sample, else one of the source's average size, else 1 KB."""
    if samples:
        return samples, f"{len(samples)} source documents"
    size = avg_size or SYNTHETIC_BYTES
    what = f"synthetic documents of the source's average size ({size} bytes)" if avg_size else \
        f"synthetic documents of {SYNTHETIC_BYTES} bytes (the source's sizes are unknown)"
    return [bson.encode({"_id": 0, "pad": "x" * max(1, size - 22)})], what


async def probe_target(target: Any, samples: list[bytes], avg_size: int | None, bounds: TargetBounds,
                       max_ops_per_write: int, concurrency: int) -> TargetProbe:
    """Write up to `bounds.docs` documents for at most `bounds.seconds`; the rate, the scratch collection gone.

    Raises PyMongoError when the target refuses or is unreachable (after the drop was tried)."""
    docs, shaped = shapes(samples, avg_size)
    result = TargetProbe(bounds, shaped_like=shaped)
    coll = target[SCRATCH_DB].get_collection(f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}", codec_options=RAW)
    concurrency = max(1, concurrency)
    chunk = max(1, min(max_ops_per_write, bounds.docs // (concurrency * WRITES_PER_WRITER) or 1))
    # Built before the clock starts: the probe times the target, not its own encoding.
    writes: list[list[ReplaceOne[Any]]] = [
        [ReplaceOne({"_id": i}, rekey(docs[i % len(docs)], i), upsert=True)
         for i in range(start, min(bounds.docs, start + chunk))] for start in range(0, bounds.docs, chunk)]
    gate = asyncio.Semaphore(concurrency)

    async def write(ops: list[ReplaceOne[Any]]) -> None:
        async with gate:
            await coll.bulk_write(ops, ordered=False)
            result.docs += len(ops)

    async def all_writes() -> None:
        async with asyncio.TaskGroup() as group:
            for ops in writes:
                group.create_task(write(ops))

    try:
        try:
            await within(coll.insert_one(rekey(docs[0], -1)), bounds.seconds)  # creates the collection, untimed
        except TimeoutError:
            result.stopped_by = "seconds"  # not even one write: the rate stays unknown
            return result
        started = Mono.now()
        try:
            await within(all_writes(), bounds.seconds)
            result.stopped_by = "documents"
        except TimeoutError:
            result.stopped_by = "seconds"
        result.seconds = Mono.now() - started
    finally:
        await asyncio.shield(coll.drop())
    return result
