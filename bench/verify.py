"""Verification and the delete sweep at scale, against the sandbox in processes of their own.

Source and target are served by two separate `cosmigrate sandbox` processes
(the source of one, the target of the other), so each side has its own core,
as two real servers would. Measured in the same run:

- reference: the raw `_id`-ordered scan rate of each side (RAW documents,
  batches of 1,000); the slower side is the reference;
- verify: one full pass of `NamespaceVerifier` (merge-compare, bytes) over
  identical sides; documents/s as a ratio of the reference (target >= 0.5);
- verifier memory: the pass runs in a child process whose peak RSS (VmHWM)
  is read at two sizes (full: 2,000,000 and 200,000 documents), to show it
  does not grow with the collection (target <= 256 MB at both);
- delete sweep: the target holds N documents, the source the same minus 1%
  deleted at random; one `DeleteSweep` pass must find every delete, and its
  source reads (`_id`s and counted entries returned, re-checked candidates)
  as a ratio of one full `_id` scan of the source (target <= 1.2).

Usage: python bench/verify.py [--quick]   (prints the figures as JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bson import Int64  # noqa: E402
from pymongo import AsyncMongoClient, DeleteOne  # noqa: E402

from bench.harness import Sandbox, mongo_client  # noqa: E402
from cosmigrate.mongo import RAW  # noqa: E402

NS = "bench.docs"


def make_doc(i: int, rng: random.Random) -> dict[str, Any]:
    return {"_id": i, "name": f"user-{i}", "n": Int64(i), "score": rng.random(), "tags": ["a", "b", i % 7],
            "addr": {"city": "X", "zip": f"{i % 100000:05d}"}, "pad": "x" * rng.randint(100, 300)}


async def load(uri: str, n: int, skip: set[int] | None = None, seed: int = 1) -> None:
    client: AsyncMongoClient[Any] = mongo_client(uri)
    rng = random.Random(seed)
    coll = client.bench.docs
    batch = []
    for i in range(n):
        doc = make_doc(i, rng)
        if skip and i in skip:
            continue
        batch.append(doc)
        if len(batch) >= 5000:
            await coll.insert_many(batch, ordered=False)
            batch = []
    if batch:
        await coll.insert_many(batch, ordered=False)
    await client.close()


async def scan_rate(uri: str) -> float:
    client: AsyncMongoClient[Any] = mongo_client(uri)
    coll = client.bench.get_collection("docs", codec_options=RAW)
    t0 = time.perf_counter()
    n = 0
    async for _ in coll.find().sort("_id", 1).batch_size(1000):
        n += 1
    rate = n / (time.perf_counter() - t0)
    await client.close()
    return rate


def child(kind: str, source_uri: str, target_uri: str, page: int) -> dict[str, Any]:
    """Run one verify pass or one sweep pass in a child process; its figures and its peak RSS."""
    out = subprocess.run([sys.executable, __file__, f"--child-{kind}", source_uri, target_uri, str(page)],
                         capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def child_verify(source_uri: str, target_uri: str, page: int) -> dict[str, Any]:
    from cosmigrate.nslink import NamespaceLink
    from cosmigrate.verify.passes import NamespaceVerifier

    source: AsyncMongoClient[Any] = mongo_client(source_uri)
    target: AsyncMongoClient[Any] = mongo_client(target_uri)
    v = NamespaceVerifier(NamespaceLink(NS, 1), source, target, None, None, page)
    v.frozen = True
    t0 = time.perf_counter()
    await v.run_pass()
    seconds = time.perf_counter() - t0
    await source.close()
    await target.close()
    return {"docs": v.state.docs, "equal": v.state.equal, "mismatches": v.mismatch_count, "seconds": seconds,
            "peak_rss_mb": peak_rss_mb()}


class _Port:
    def __init__(self, coll: Any) -> None:
        self.coll = coll
        self.lock = asyncio.Lock()

    def exclusive(self) -> asyncio.Lock:
        return self.lock

    async def send(self, requests: list[DeleteOne]) -> None:
        await self.coll.bulk_write(requests, ordered=False)


async def child_sweep(source_uri: str, target_uri: str, page: int) -> dict[str, Any]:
    from cosmigrate.budget import SourceBudget
    from cosmigrate.deletes.ordered import OrderedDeletes
    from cosmigrate.deletes.sweep import DeleteSweep
    from cosmigrate.mongo import raw_collection
    from cosmigrate.nslink import NamespaceLink

    source: AsyncMongoClient[Any] = mongo_client(source_uri)
    target: AsyncMongoClient[Any] = mongo_client(target_uri)
    from cosmigrate.clock import Mono

    link = NamespaceLink(NS, 1, caught_up_at=time.time, caught_up=Mono.now)  # frozen sides: always caught up
    src, tgt = raw_collection(source, NS), raw_collection(target, NS)
    budget = SourceBudget()
    sweep = DeleteSweep(link, src, tgt, None, OrderedDeletes(link, src, _Port(tgt), budget), page, budget)
    t0 = time.perf_counter()
    await sweep.run_pass()
    seconds = time.perf_counter() - t0
    result = {"deleted": sweep.state.last_deleted, "source_reads": sweep.state.last_source_reads,
              "scanned": sweep.state.last_scanned, "counted_ranges": sweep.state.counted_ranges,
              "merged_ranges": sweep.state.merged_ranges, "seconds": seconds, "peak_rss_mb": peak_rss_mb(),
              "target_left": await tgt.count_documents({}), "source_docs": await src.count_documents({})}
    await source.close()
    await target.close()
    return result


async def verify_at(n: int, page: int) -> tuple[dict[str, Any], float, float]:
    with Sandbox(split=True) as servers:
        await asyncio.gather(load(servers.source_uri, n), load(servers.target_uri, n))
        src_rate, tgt_rate = await scan_rate(servers.source_uri), await scan_rate(servers.target_uri)
        result = await asyncio.to_thread(child, "verify", servers.source_uri, servers.target_uri, page)
    return result, src_rate, tgt_rate


async def sweep_at(n: int, page: int, share: float = 0.01) -> dict[str, Any]:
    rng = random.Random(7)
    deleted = set(rng.sample(range(n), int(n * share)))
    with Sandbox(split=True) as servers:
        await asyncio.gather(load(servers.source_uri, n, skip=deleted), load(servers.target_uri, n))
        result = await asyncio.to_thread(child, "sweep", servers.source_uri, servers.target_uri, page)
    result["expected_deletes"] = len(deleted)
    return result


async def run_verify_bench(quick: bool) -> dict[str, Any]:
    large, small, sweep_n = (200_000, 20_000, 100_000) if quick else (2_000_000, 200_000, 1_000_000)
    page = 1000
    big, src_rate, tgt_rate = await verify_at(large, page)
    little, _, _ = await verify_at(small, page)
    assert big["docs"] == big["equal"] == large and little["docs"] == small, (big, little)
    reference = min(src_rate, tgt_rate)
    rate = big["docs"] / big["seconds"]
    sweep = await sweep_at(sweep_n, page)
    return {
        "verify.docs": large,
        "verify.docs_per_s": round(rate),
        "verify.reference_scan_per_s": round(reference),
        "verify.reference_scan_per_s_by_side": [round(src_rate), round(tgt_rate)],
        "verify.ratio_vs_scan": round(rate / reference, 3),
        "verify.peak_rss_mb_large": round(big["peak_rss_mb"], 1),
        "verify.peak_rss_mb_small": round(little["peak_rss_mb"], 1),
        "verify.docs_small": small,
        "deletes.docs": sweep_n,
        "deletes.expected": sweep["expected_deletes"],
        "deletes.found": sweep["deleted"],
        "deletes.all_found": sweep["deleted"] == sweep["expected_deletes"] and sweep["target_left"] == sweep["source_docs"],
        "deletes.source_reads": sweep["source_reads"],
        "deletes.source_reads_ratio_vs_scan": round(sweep["source_reads"] / sweep["source_docs"], 3),
        "deletes.counted_ranges": sweep["counted_ranges"],
        "deletes.merged_ranges": sweep["merged_ranges"],
        "deletes.seconds": round(sweep["seconds"], 1),
        "deletes.peak_rss_mb": round(sweep["peak_rss_mb"], 1),
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] in ("--child-verify", "--child-sweep"):
        from cosmigrate.logs import configure_logging

        configure_logging("warning", "json")
        fn = child_verify if sys.argv[1] == "--child-verify" else child_sweep
        print(json.dumps(asyncio.run(fn(sys.argv[2], sys.argv[3], int(sys.argv[4])))))
        return
    parser = argparse.ArgumentParser(description="Verification and delete-sweep benchmarks.")
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run_verify_bench(args.quick)), indent=1))


if __name__ == "__main__":
    main()
