"""Full load, capture side: one collection of 4 physical partitions read per partition vs through one stream.

The sandbox (own process) holds one collection with `PARTITIONS` physical
partitions and `docs` documents of about 1 KB; `cosmigrate run` (own process)
captures it from the beginning of its feed twice, in the same run, on the
same data (a fresh sandbox and ledger each time):

- per partition (the default): one change stream per partition, from
  `GetChangeStreamTokens` at `Timestamp(0, 0)`;
- the reference: `capture.per_partition = false`, one whole-collection
  stream over the same partitions (what a tool without per-partition
  capture does).

Both are timed from the first batch committed in the ledger to the last
(the start-up before it is the same for both and is not capture). Reported: documents/s of each and
`fullload.capture_partitions_vs_single_stream`, their ratio (over 1: the
partitions are read faster than one stream). `python bench/capture_partitions.py
[--docs N]` runs it alone and merges its keys into bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from pymongo import AsyncMongoClient  # noqa: E402

from bench.harness import Daemon, Sandbox, bench_config, prepare  # noqa: E402

PARTITIONS = 4
NS = "full.load"
RESULTS = Path(__file__).parent / "results" / "latest.json"


async def _load(uri: str, docs: int) -> None:
    client: AsyncMongoClient[Any] = AsyncMongoClient(uri)
    try:
        await client.admin.command({"cosmigrateSandbox": 1, "faults": {"partitions": PARTITIONS}})
        coll = client.full.load
        for start in range(0, docs, 2000):
            await coll.insert_many([{"_id": i, "n": i, "pad": "x" * 1000} for i in range(start, min(docs, start + 2000))],
                                   ordered=False)
    finally:
        await client.close()


async def _capture_once(docs: int, per_partition: bool) -> float:
    """Documents/s committed, from the first committed batch to the last (read from the ledger: `ctl status`
    samples the source's heads on demand and would add its own wait to the measurement)."""
    from cosmigrate.ledger import open_ledger

    with Sandbox() as sb:
        await _load(sb.source_uri, docs)
        cfg = bench_config(sb, "file+sqlite")
        cfg.capture.per_partition = per_partition
        cfg.capture.include = [NS]
        await prepare(cfg)
        ledger = open_ledger(cfg)
        try:
            async with Daemon(cfg) as daemon:
                deadline = time.monotonic() + 600
                first: tuple[float, int] | None = None
                while time.monotonic() < deadline:
                    meta = await ledger.get_namespace(NS)
                    captured = meta.captured_events if meta is not None else 0
                    now = time.monotonic()
                    if first is None and captured > 0:
                        first = (now, captured)  # start-up (discovery, claim, start positions) is not capture
                    if first is not None and captured >= docs:
                        st = await daemon.status()
                        parts = next((n["partitions"] for n in st["namespaces"] if n["namespace"] == NS), [])
                        assert (len(parts) == PARTITIONS) == per_partition, parts
                        return (docs - first[1]) / (now - first[0])
                    await asyncio.sleep(0.01)
        finally:
            await ledger.close()
        raise RuntimeError("capture did not finish")


async def run_capture_partitions(docs: int) -> dict[str, Any]:
    single = await _capture_once(docs, per_partition=False)
    partitioned = await _capture_once(docs, per_partition=True)
    return {
        "fullload.capture_docs": docs,
        "fullload.capture_partitions": PARTITIONS,
        "fullload.capture_single_stream_docs_per_s": round(single),
        "fullload.capture_partitioned_docs_per_s": round(partitioned),
        "fullload.capture_partitions_vs_single_stream": round(partitioned / single, 2),
    }


def merge(results: dict[str, Any], path: Path = RESULTS) -> None:
    """Add these keys to latest.json, keeping every other suite's."""
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(results)
    path.write_text(json.dumps(current, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    args = parser.parse_args()
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")
    results = asyncio.run(run_capture_partitions(args.docs))
    merge(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
