"""One timed run of suite 4's loop, in whatever interpreter runs this file (the pinned or the newest PyMongo).

Self-contained on purpose: the throwaway `.venv-bench-newest` has PyMongo and
nothing else. The parent passes the exact pipeline and resume token the
daemon uses. Prints one JSON line: {"pymongo": version, "events_per_s": wall-clock rate,
"cpu_us_per_event": this process's CPU time per event}. Most of the wall time is spent waiting for the
single-threaded sandbox (and, on a shared machine, for whatever else runs): the CPU time is the driver's cost.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from typing import Any

import pymongo
from bson.binary import Binary
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient, ReplaceOne


async def main(source_uri: str, target_uri: str, n: int, out: str, pipeline: list[Any],
               token_data: bytes, ca_file: str = "") -> tuple[float, float]:
    raw: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
    src: AsyncMongoClient[Any] = AsyncMongoClient(source_uri, retryWrites=False)
    # The sandbox's target serves TLS with a CA of its own (its file is the 7th argument).
    dst: AsyncMongoClient[Any] = AsyncMongoClient(target_uri, retryWrites=False,
                                                  **({"tlsCAFile": ca_file} if ca_file else {}))
    try:
        coll = src.bench.get_collection("events", codec_options=raw)
        target = dst.bench.get_collection(out, codec_options=raw)
        await src.admin.command("ping")
        await dst.admin.command("ping")
        t0, c0 = time.perf_counter(), time.process_time()
        seen = 0
        ops: list[Any] = []
        async with await coll.watch(pipeline, full_document="updateLookup", resume_after={"_data": Binary(token_data)},
                                    max_await_time_ms=100) as stream:
            while seen < n:
                event = await stream.try_next()
                if event is None:
                    continue
                seen += 1
                ops.append(ReplaceOne(event["documentKey"], event["fullDocument"], upsert=True))
                if len(ops) == 1000:
                    await target.bulk_write(ops, ordered=False)
                    ops = []
        if ops:
            await target.bulk_write(ops, ordered=False)
        rate, cpu = n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6
        await target.drop()  # untimed: keeps the sandbox target the same size for every run
        return rate, cpu
    finally:
        await src.close()
        await dst.close()


if __name__ == "__main__":
    source_uri, target_uri, n, out, pipeline, token = sys.argv[1:7]
    ca_file = sys.argv[7] if len(sys.argv) > 7 else ""
    rate, cpu = asyncio.run(main(source_uri, target_uri, int(n), out, json.loads(pipeline), base64.b64decode(token),
                                 ca_file))
    print(json.dumps({"pymongo": pymongo.__version__, "events_per_s": rate, "cpu_us_per_event": cpu}))
