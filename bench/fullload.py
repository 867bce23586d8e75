"""Suite 7, the full load: a backfill through the change feed against two references measured in the same run.

For each size, in fresh sandbox processes (the source served by one, the target by another, as two servers:
one single-threaded process serving both would make the reads and the writes take turns), the same documents
(about 1 KB each) are:

1. inserted straight into the target by unordered `insert_many` batches of 1,000: the target's own
   bulk-insert ceiling (the documents are made by the same function, chunk by chunk);
2. copied by a plain single-stream copy, the stand-in for mongodump / mongorestore: one `find` on the
   source in `_id` order and unordered `insert_many` batches of 1,000 into the target;
3. backfilled by `cosmigrate run` (its own process, writer started, `capture.start_at = "beginning"`,
   the collection in four physical partitions, one change stream each):
   timed by the ledger's own record, from the unit's creation (head sampled) to the phase becoming
   `tailing` (that head applied). Its peak RSS (VmHWM) is read at the end.

Reported under `fullload.*`: documents/s of each, the ratios backfill / ceiling and backfill / single
stream, the peak RSS at two sizes (memory must not grow with the size), the daemon's own CPU time per
document during the backfill (from /proc) beside the single-stream copy client's (this process's CPU time
while it copies), and the source request units charged per document during the backfill (the sandbox's RU
accounting: change feed, head tokens, reads) beside the change feed's own minimum (one plain stream reading
the feed from the beginning in pages of 10,000) and one point read per document. Quick mode: 20,000 and
100,000 documents; `--full`: 200,000 and 2,000,000. `python bench/fullload.py [--full]` merges its keys into
bench/results/latest.json without touching the others; `bench/run.py` runs it as suite 7.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

import bson  # noqa: E402
from pymongo import AsyncMongoClient  # noqa: E402

from bench.harness import Daemon, Sandbox, bench_config, prepare, wait_backfilled  # noqa: E402
from cosmigrate.sandbox.requestunits import REQUEST_RU, read_cost  # noqa: E402

NS_DB, NS_COLL = "load", "docs"
PARTITIONS = 4  # the setting: a collection of four physical partitions, read one stream each
CHUNK = 1000
PAD = "x" * 900


def make_docs(start: int, n: int) -> list[dict[str, Any]]:
    """About 1 KB each (BSON), the same for every copy."""
    return [{"_id": i, "n": i, "name": f"customer {i}", "tags": ["a", "b", str(i % 97)], "pad": PAD}
            for i in range(start, start + n)]


async def _load(client: AsyncMongoClient[Any], db: str, coll: str, n: int) -> float:
    """Insert n documents by unordered batches; documents/s."""
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        await client[db][coll].insert_many(make_docs(s, min(CHUNK, n - s)), ordered=False)
    return n / (time.perf_counter() - t0)


async def _single_stream(source: AsyncMongoClient[Any], target: AsyncMongoClient[Any], n: int) -> tuple[float, float]:
    """The reference copy: one find in _id order, unordered insert_many batches of 1,000.

    (documents/s, this process's CPU microseconds per document): the bench process does nothing else meanwhile,
    so its CPU time is the copy client's, the reference for the daemon's CPU per document."""
    t0, c0 = time.perf_counter(), time.process_time()
    batch: list[Any] = []
    copied = 0
    async for doc in source[NS_DB][NS_COLL].find({}, sort=[("_id", 1)], batch_size=CHUNK):
        batch.append(doc)
        if len(batch) >= CHUNK:
            await target.copy[NS_COLL].insert_many(batch, ordered=False)
            copied += len(batch)
            batch = []
    if batch:
        await target.copy[NS_COLL].insert_many(batch, ordered=False)
        copied += len(batch)
    assert copied == n, (copied, n)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


async def _backfill(sb: Sandbox, n: int) -> tuple[float, float, float]:
    """The daemon's backfill of the loaded namespace: (documents/s, peak RSS in MB, daemon CPU us per document).

    The CPU time is the daemon's own (/proc), from its first answer on the control socket (start-up and imports
    done; the backfill starts about then) to the end of the backfill."""
    from cosmigrate.ledger import open_ledger

    cfg = bench_config(sb, "file+sqlite")
    cfg.capture.include = [f"{NS_DB}.{NS_COLL}"]
    await prepare(cfg)
    ledger = open_ledger(cfg)
    await ledger.set_writer("started", "bench", time.time())
    await ledger.close()
    async with Daemon(cfg) as daemon:
        cpu0 = daemon.cpu_s()
        doc = await wait_backfilled(cfg, f"{NS_DB}.{NS_COLL}")
        cpu = daemon.cpu_s() - cpu0
        seconds = float(doc["completed_at"]) - float(doc["started_at"])
        rss = daemon.peak_rss_mb()
    return n / seconds, rss, cpu / n * 1e6


async def _units(source: AsyncMongoClient[Any]) -> float:
    """Source request units charged so far for reads (change feed, head tokens, queries): the sandbox's account."""
    charged = (await source.admin.command("cosmigrateSandbox"))["requestUnits"]
    return float(charged["feed"] + charged["read"])


async def _feed_minimum(source: AsyncMongoClient[Any], n: int) -> float:
    """The change feed's own minimum, request units per document: the collection's feed read from the beginning
    by one plain stream in the largest pages (10,000 events), nothing else; its first 100,000 events at most
    (the charge is per document and its size, so a sample of that many is the whole feed's figure)."""
    n = min(n, 100_000)
    from cosmigrate.mongo import RAW, change_pipeline
    from cosmigrate.sandbox.cosmos import beginning_token

    coll = source[NS_DB].get_collection(NS_COLL, codec_options=RAW)
    before, seen = await _units(source), 0
    async with await coll.watch(change_pipeline(False), full_document="updateLookup", resume_after=beginning_token(),
                                batch_size=10_000, max_await_time_ms=100) as stream:
        while seen < n:
            if await stream.try_next() is not None:
                seen += 1
    return (await _units(source) - before) / n


async def run_size(n: int) -> dict[str, float]:
    # The source and the target in two sandbox processes, as two servers: the backfill reads one while it writes
    # the other, and one single-threaded process serving both would make them take turns.
    with Sandbox(split=True) as sb:
        source: AsyncMongoClient[Any] = AsyncMongoClient(sb.source_uri)
        target: AsyncMongoClient[Any] = AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
        try:
            await source.admin.command({"cosmigrateSandbox": 1, "faults": {"partitions": PARTITIONS}})
            await _load(source, NS_DB, NS_COLL, n)
            ceiling = await _load(target, "ceiling", NS_COLL, n)
            await target.drop_database("ceiling")
            single, single_cpu = await _single_stream(source, target, n)
            await target.drop_database("copy")
            ru0 = await _units(source)
            backfill, rss, cpu = await _backfill(sb, n)
            ru = (await _units(source) - ru0) / n
            feed_minimum = await _feed_minimum(source, n)
            copied = await target[NS_DB][NS_COLL].estimated_document_count()
            assert copied == n, (copied, n)
        finally:
            await source.close()
            await target.close()
    return {"docs": n, "backfill_docs_per_s": backfill, "ceiling_docs_per_s": ceiling,
            "single_stream_docs_per_s": single, "peak_rss_mb": rss, "daemon_cpu_us_per_doc": cpu,
            "single_stream_cpu_us_per_doc": single_cpu, "ru_per_doc": ru, "feed_minimum_ru_per_doc": feed_minimum,
            "point_read_ru": read_cost(len(bson.encode(make_docs(n // 2, 1)[0]))) + REQUEST_RU}


async def run_fullload(full: bool = False) -> dict[str, Any]:
    small, large = (200_000, 2_000_000) if full else (20_000, 100_000)
    a = await run_size(small)
    b = await run_size(large)
    return {
        "fullload.docs_small": small,
        "fullload.docs_large": large,
        "fullload.partitions": PARTITIONS,
        "fullload.backfill_docs_per_s": round(b["backfill_docs_per_s"]),
        "fullload.target_insert_ceiling_docs_per_s": round(b["ceiling_docs_per_s"]),
        "fullload.single_stream_copy_docs_per_s": round(b["single_stream_docs_per_s"]),
        "fullload.ratio_vs_target_ceiling": round(b["backfill_docs_per_s"] / b["ceiling_docs_per_s"], 3),
        "fullload.ratio_vs_single_stream": round(b["backfill_docs_per_s"] / b["single_stream_docs_per_s"], 3),
        "fullload.ratio_vs_target_ceiling_small": round(a["backfill_docs_per_s"] / a["ceiling_docs_per_s"], 3),
        "fullload.ratio_vs_single_stream_small": round(a["backfill_docs_per_s"] / a["single_stream_docs_per_s"], 3),
        "fullload.daemon_cpu_us_per_doc": round(b["daemon_cpu_us_per_doc"], 2),
        "fullload.single_stream_cpu_us_per_doc": round(b["single_stream_cpu_us_per_doc"], 2),
        "fullload.daemon_cpu_us_per_doc_small": round(a["daemon_cpu_us_per_doc"], 2),
        "fullload.source_ru_per_doc": round(b["ru_per_doc"], 3),
        "fullload.feed_minimum_ru_per_doc": round(b["feed_minimum_ru_per_doc"], 3),
        "fullload.ru_ratio_vs_feed_minimum": round(b["ru_per_doc"] / b["feed_minimum_ru_per_doc"], 3),
        "fullload.point_read_ru_per_doc": b["point_read_ru"],
        "fullload.peak_rss_mb_small": round(a["peak_rss_mb"], 1),
        "fullload.peak_rss_mb_large": round(b["peak_rss_mb"], 1),
    }


def merge_results(new: dict[str, Any], path: Path) -> None:
    """Add these keys to latest.json, keeping every other key."""
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(new)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")
    result = asyncio.run(run_fullload("--full" in sys.argv))
    merge_results(result, Path(__file__).parent / "results" / "latest.json")
    print(json.dumps(result, indent=2))
