"""Capture memory stays bounded when the store is slow (issue: capture, docs/design.md, invariant 5).

500,000 change events wait in the sandbox source; the capture pipeline reads
them into batches for a store that takes 1 s per put. Each variant runs in a
fresh process (so its peak RSS is its own), for the same window:
- bounded: the default backpressure (`capture.max_unflushed_bytes` = 64 MiB);
- reference, same run: backpressure effectively off (max_unflushed_bytes = 64 GiB).
Reported: peak RSS growth over the process's baseline, events read, events
committed, and the ratio bounded/reference.

Usage: python bench/capture_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).parent.parent))


class SlowStore:
    """A local store whose every put takes `delay_s` (a congested S3)."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s, self.url = inner, delay_s, inner.url

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.sleep(self.delay_s)
        await self.inner.put(key, data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def variant(source_uri: str, unflushed: int, window_s: float) -> dict:
    from cosmigrate.capture import NamespaceCapture
    from cosmigrate.config import Config
    from cosmigrate.ledger import open_ledger
    from cosmigrate.mongo import source_client
    from cosmigrate.stores import open_store

    tmp = Path(tempfile.mkdtemp(prefix="cosmigrate-bench-"))
    cfg = Config(cluster_name="bench")
    cfg.source.uri = source_uri
    cfg.store.url = f"file://{tmp / 'batches'}"
    cfg.ledger.url = f"sqlite://{tmp / 'ledger.db'}"
    cfg.capture.start_at = "beginning"
    cfg.capture.max_unflushed_bytes = unflushed
    ledger = open_ledger(cfg)
    await ledger.init()
    store = SlowStore(open_store(cfg), 1.0)
    client = source_client(source_uri)
    await client.admin.command("ping")
    meta = await ledger.claim("bench.events", "bench")
    baseline = rss_mb()
    cap = NamespaceCapture("bench.events", meta, client, store, ledger, cfg)  # type: ignore[arg-type]
    task = asyncio.create_task(cap.run())
    await asyncio.sleep(window_s)
    peak = rss_mb()
    read, committed = cap.status.events_read, cap.status.committed_events
    cap._dead = True  # measurement over: drop what is queued instead of draining it at 1 s per batch
    cap.stop()
    task.cancel()
    await client.close()
    return {"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1), "growth_mb": round(peak - baseline, 1),
            "events_read": read, "events_committed": committed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--window", type=float, default=20.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        unflushed = 64 * 1024 * 1024 if args.variant == "bounded" else 64 * 1024**3
        print(json.dumps(asyncio.run(variant(args.source, unflushed, args.window))))
        return
    window = 8.0 if args.quick else 20.0
    events = 500_000
    sandbox = subprocess.Popen([sys.executable, "-m", "cosmigrate", "sandbox"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        assert sandbox.stdout is not None
        source_uri = sandbox.stdout.readline().strip()
        from pymongo import MongoClient

        client: MongoClient = MongoClient(source_uri)
        pad = "x" * 400
        t0 = time.time()
        for start in range(0, events, 10_000):
            client.bench.events.insert_many([{"_id": i, "n": i, "pad": pad} for i in range(start, start + 10_000)])
        print(f"loaded {events} documents into the source in {time.time() - t0:.1f}s")
        out = {}
        for name in ("bounded", "reference"):
            proc = subprocess.run([sys.executable, __file__, "--variant", name, "--source", source_uri,
                                   "--window", str(window)], capture_output=True, text=True, check=True)
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(name, out[name])
    finally:
        sandbox.terminate()
        sandbox.wait()
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "events_waiting": events,
        "store_put_delay_s": 1.0,
        "window_s": window,
        "capture.bounded": out["bounded"],
        "capture.unbounded_reference": out["reference"],
        "capture.rss_growth_ratio_vs_unbounded": round(out["bounded"]["growth_mb"] / max(out["reference"]["growth_mb"], 0.1), 3),
        "capture.max_unflushed_mb": 64,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capture_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
