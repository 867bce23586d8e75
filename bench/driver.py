"""Suite 4, driver check: the same watcher read + bulk-write loop with PyMongo's AsyncMongoClient and with Motor.

Each reads N change events from the sandbox source's change stream (from the
beginning, raw BSON) and writes them to the target as unordered ReplaceOne
bulk writes of 1,000. Same run, same servers, alternating order. The project
pins one PyMongo (the newest release, see README "Compatibility"), so the
question left is the client: the native asyncio one the daemon uses, or
Motor, which runs every call (`try_next()` included) on a thread pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, MongoClient, ReplaceOne

from bench.harness import Sandbox
from cosmigrate.mongo import change_pipeline
from cosmigrate.sandbox.cosmos import beginning_token

RAW: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def loop(client: Any, target: Any, n: int, out: str) -> tuple[float, float]:
    """(events/s, this process's CPU microseconds per event) of one read + write loop."""
    coll = client.bench.get_collection("events", codec_options=RAW)
    dst = target.bench.get_collection(out, codec_options=RAW)
    t0, c0 = time.perf_counter(), time.process_time()
    seen = 0
    ops: list[Any] = []
    stream = await coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=beginning_token(),
                              max_await_time_ms=100) if isinstance(client, AsyncMongoClient) else \
        coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=beginning_token(),
                   max_await_time_ms=100)
    async with stream:
        while seen < n:
            event = await stream.try_next()
            if event is None:
                continue
            seen += 1
            ops.append(ReplaceOne(event["documentKey"], event["fullDocument"], upsert=True))
            if len(ops) == 1000:
                await dst.bulk_write(ops, ordered=False)
                ops = []
    if ops:
        await dst.bulk_write(ops, ordered=False)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


async def run_driver(n: int, repeats: int) -> dict[str, Any]:
    import pymongo
    from motor.motor_asyncio import AsyncIOMotorClient

    with Sandbox() as sb:
        seed: MongoClient[Any] = MongoClient(sb.source_uri)
        for s in range(0, n, 5000):
            seed.bench.events.insert_many([{"_id": i, "v": i, "pad": "x" * 700} for i in range(s, min(n, s + 5000))])
        seed.close()
        native: list[tuple[float, float]] = []
        motor: list[tuple[float, float]] = []
        for r in range(repeats):
            for name in (("native", "motor") if r % 2 == 0 else ("motor", "native")):
                if name == "native":
                    src, dst = AsyncMongoClient(sb.source_uri), AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
                    native.append(await loop(src, dst, n, f"native{r}"))
                    await src.close()
                    await dst.close()
                else:
                    msrc, mdst = AsyncIOMotorClient(sb.source_uri), AsyncIOMotorClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
                    motor.append(await loop(msrc, mdst, n, f"motor{r}"))
                    msrc.close()
                    mdst.close()
    a, b = median([x[0] for x in native]), median([x[0] for x in motor])
    return {"driver.events": n, "driver.pymongo": pymongo.__version__, "driver.native_events_per_s": round(a),
            "driver.motor_events_per_s": round(b), "driver.ratio_native_vs_motor": round(a / b, 2),
            "driver.native_cpu_us_per_event": round(median([x[1] for x in native]), 1),
            "driver.motor_cpu_us_per_event": round(median([x[1] for x in motor]), 1)}


if __name__ == "__main__":
    import json
    import sys

    quick = "--quick" in sys.argv
    print(json.dumps(asyncio.run(run_driver(20_000 if quick else 100_000, 2 if quick else 3)), indent=2))
