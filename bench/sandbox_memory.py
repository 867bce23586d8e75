"""The sandbox's memory per stored document: what it costs to hold a collection beside its raw BSON.

Issue 20: the sandbox alone held 5.5 GB at 200,000 documents of about 1 KB (the source with its change feed,
the target with the bench's copies), so the 2,000,000-document full load could not run. The goal is about
3 KB of overhead per stored version at most. This script starts `cosmigrate sandbox` (its own process),
inserts N documents of about 1 KB into the source (a collection of four physical partitions, so each has
its change-feed entry too) and the same N into the target, and reads the sandbox process's resident set
(VmRSS) before and after each step. Reported per side: bytes of RSS per stored document, the raw BSON size,
and the overhead (their difference).

Usage: python bench/sandbox_memory.py [N]   (default 100,000; prints JSON, merges `sandbox_memory.*` keys
into bench/results/latest.json)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

import bson  # noqa: E402

from bench.fullload import CHUNK, NS_COLL, NS_DB, PARTITIONS, make_docs, merge_results  # noqa: E402
from bench.harness import Sandbox, mongo_client  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def fill(client: Any, n: int) -> None:
    for s in range(0, n, CHUNK):
        await client[NS_DB][NS_COLL].insert_many(make_docs(s, min(CHUNK, n - s)), ordered=False)


async def run_sandbox_memory(n: int) -> dict[str, Any]:
    raw = len(bson.encode(make_docs(n // 2, 1)[0]))
    with Sandbox() as sb:
        source, target = mongo_client(sb.source_uri), mongo_client(sb.target_uri)
        try:
            await source.admin.command({"cosmigrateSandbox": 1, "faults": {"partitions": PARTITIONS}})
            await source[NS_DB].command("ping")
            base = rss_bytes(sb.proc.pid)
            await fill(source, n)
            after_source = rss_bytes(sb.proc.pid)
            await fill(target, n)
            after_target = rss_bytes(sb.proc.pid)
        finally:
            await source.close()
            await target.close()
    per_source = (after_source - base) / n
    per_target = (after_target - after_source) / n
    return {
        "sandbox_memory.docs": n,
        "sandbox_memory.doc_bson_bytes": raw,
        "sandbox_memory.source_bytes_per_doc": round(per_source),
        "sandbox_memory.target_bytes_per_doc": round(per_target),
        "sandbox_memory.source_overhead_bytes_per_doc": round(per_source - raw),
        "sandbox_memory.target_overhead_bytes_per_doc": round(per_target - raw),
        "sandbox_memory.rss_mb_at_end": round(after_target / 2**20, 1),
    }


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    result = asyncio.run(run_sandbox_memory(size))
    merge_results(result, Path(__file__).parent / "results" / "latest.json")
    print(json.dumps(result, indent=2))
