"""Suite 5, request units: what a migration costs the Cosmos account, per document.

`cosmigrate run` (own process) captures and applies a workload from the
sandbox (own process), whose Cosmos emulator charges request units by the
documented model of `cosmigrate.sandbox.requestunits` (per request, per KiB
read, per KiB written) and counts them by kind of work. Reported:

- `ru.per_document_captured`: units the daemon was charged on the source
  (change streams, GetChangeStreamTokens, any read) per change event captured;
- `ru.per_document_applied`: the same units per document written on the
  target (collapsing makes fewer target writes than events);
- `ru.capture_ratio_vs_point_reads`: `ru.per_document_captured` against the
  reference measured in the same run on the same documents: reading each one
  once by `_id` (a point read). Under 1 means the feed costs less than reading
  the changed documents one by one; a change that makes the watcher spin
  (empty pages, extra samples) shows up as a larger ratio;
- `ru.idle_per_s`: units per second the daemon burns while the source is
  quiet (head samples and empty getMores).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pymongo import AsyncMongoClient

from bench.harness import Daemon, Sandbox, bench_config, mongo_client, prepare, target_writes, totals
from cosmigrate.sandbox.workload import Workload

NAMESPACES = ["app.orders", "app.events", "shop.items"]


async def units(client: AsyncMongoClient[Any]) -> dict[str, float]:
    return dict((await client.admin.command("cosmigrateSandbox"))["requestUnits"])


def spent(after: dict[str, float], before: dict[str, float], *kinds: str) -> float:
    return sum(after[k] - before[k] for k in kinds)


async def _caught_up(daemon: Daemon, limit_s: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        st = await daemon.status()
        if totals(st)["pending_events"] == 0 and st["ready_for_cutover"] and st["gap_in_seconds"] == 0:
            return st
        await asyncio.sleep(0.2)
    raise RuntimeError("the daemon did not catch up")


async def run_requestunits(changes: int, idle_s: float = 4.0) -> dict[str, Any]:
    with Sandbox() as sb:
        cfg = bench_config(sb, "file+sqlite")
        await prepare(cfg)
        client: AsyncMongoClient[Any] = AsyncMongoClient(sb.source_uri)
        target: AsyncMongoClient[Any] = mongo_client(sb.target_uri)
        workload = Workload(client, NAMESPACES, keys_per_ns=max(1000, changes // 10), seed=15)
        try:
            await workload.run_bulk(300)  # the collections exist before the daemon starts
            async with Daemon(cfg) as daemon:
                await daemon.writer("start")
                start = await _caught_up(daemon)  # namespaces discovered and copied: the measured window starts here
                before = await units(client)
                writes_before = await target_writes(target)
                await workload.run_bulk(changes)
                st = await _caught_up(daemon)
                after = await units(client)
                captured = totals(st)["captured_events"] - totals(start)["captured_events"]
                applied = await target_writes(target) - writes_before
                await asyncio.sleep(idle_s)  # a quiet source: what does watching it cost?
                idle = await units(client)
            # Reference, same documents, same model: read each changed document once by _id.
            ref_before = await units(client)
            reads = 0
            for (ns, key), _ in workload.versions.items():
                db, _, coll = ns.partition(".")
                await client[db][coll].find_one({"_id": key})
                reads += 1
            ref = spent(await units(client), ref_before, "read") / reads
        finally:
            await client.close()
            await target.close()
    daemon_units = spent(after, before, "feed", "read")
    per_captured = daemon_units / max(1, captured)
    return {
        "ru.per_document_captured": round(per_captured, 3),
        "ru.per_document_applied": round(daemon_units / max(1, applied), 3),
        "ru.capture_ratio_vs_point_reads": round(per_captured / ref, 3),
        "ru.point_read_reference": round(ref, 3),
        "ru.idle_per_s": round(spent(idle, after, "feed", "read") / idle_s, 2),
        "ru.events_captured": captured,
        "ru.documents_applied": applied,
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(asyncio.run(run_requestunits(20_000 if "--quick" in sys.argv else 100_000)), indent=2))
