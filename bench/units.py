"""The size of a real account, on one worker: many units, many watchers, many collections.

Two shapes, each on a fresh cluster (its own ledger) and one `cosmigrate run` process:

1. **200 watchers**: one collection of `--partitions` physical partitions (100) and `--small` collections of
   one partition each (100). A unit is a namespace here (docs/design.md "What a unit is"), so this is 101
   lease units and 200 partition watchers, each holding its own source connection while it waits on its
   stream.
2. **Many collections**: `--collections` collections of one partition (2,000 by default; `--full`: 10,000).

For each: seconds from the process start until every collection is in a lease item (discovered), until
`ctl status` lists every one as captured with a start position (started), and until it says READY
(writer started at once, so every unit must reach a head sampled after the question); then `ctl status`
latency (median and max of 5 calls), the process's RSS, open file descriptors and threads, and its CPU
seconds per second while idle (the cost of keeping every watcher's stream open).

The reference, measured in the same run: one `ctl status` of a worker holding one collection (its latency
and RSS), so each figure is reported as a ratio beside its absolute value.

`python bench/units.py [--full]` merges its keys (`units.*`) into bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.fullload import merge_results  # noqa: E402
from bench.harness import AWS_ENV, Sandbox, bench_config, mongo_client, prepare, proc_cpu_s  # noqa: E402
from cosmigrate.config import Config, to_toml  # noqa: E402
from cosmigrate.control import request  # noqa: E402
from cosmigrate.leases import LeaseTable  # noqa: E402
from cosmigrate.leases.records import WorkerId  # noqa: E402
from cosmigrate.ledger import open_ledger  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def _proc(pid: int) -> dict[str, float]:
    """RSS in MB, open file descriptors and threads of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    threads = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("Threads:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


async def _create(source: Any, names: list[str], docs: int = 1) -> None:
    gate = asyncio.Semaphore(32)

    async def one(ns: str) -> None:
        db, _, coll = ns.partition(".")
        async with gate:
            await source[db][coll].insert_many([{"_id": i, "v": 0} for i in range(docs)])

    await asyncio.gather(*(one(ns) for ns in names))


class Run:
    """One `cosmigrate run` process of a fresh cluster, and the figures of its start."""

    def __init__(self, sandbox: Sandbox, tag: str, db: str) -> None:
        self.cfg: Config = bench_config(sandbox, "file+sqlite")
        self.cfg.cluster_name = f"units-{tag}-{random.randrange(1 << 30):x}"
        self.cfg.capture.include = [f"{db}.*"]
        self.cfg.capture.discovery_interval_s = 5.0
        self.config = Path(self.cfg.control.socket).parent / "cosmigrate.toml"
        self.config.write_text(to_toml(self.cfg))
        self.log_path = self.config.parent / "worker.log"

    async def start(self) -> None:
        await prepare(self.cfg)
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", "run", "--config", str(self.config), stdout=self.log, stderr=self.log,
            env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + 120
        while True:
            try:
                await request(self.cfg.control.socket, {"cmd": "ping"})
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start; see {self.log_path}") from None
                await asyncio.sleep(0.2)

    async def status(self, timeout_s: float = 600.0) -> dict[str, Any]:
        reply = await request(self.cfg.control.socket, {"cmd": "status"}, limit_s=timeout_s)
        return dict(reply["status"])

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 120)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()


async def _until(predicate: Any, limit_s: float, what: str, interval_s: float = 0.5) -> float:
    """Seconds until `predicate()` is true (raises after `limit_s`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if await predicate():
            return time.monotonic() - t0
        await asyncio.sleep(interval_s)
    raise RuntimeError(f"timed out after {limit_s:.0f}s waiting for {what}")


async def measure(sandbox: Sandbox, tag: str, db: str, names: list[str], limit_s: float) -> dict[str, Any]:
    run = Run(sandbox, tag, db)
    ledger = open_ledger(run.cfg)
    table = LeaseTable(ledger, WorkerId("bench-observer"))
    await run.start()
    want = set(names)
    out: dict[str, Any] = {"collections": len(names)}
    try:
        await request(run.cfg.control.socket, {"cmd": "writer", "action": "start"})

        async def discovered() -> bool:
            return want <= {rec.unit for rec in await table.leases()}

        await _until(discovered, limit_s, "every collection in a lease item")
        out["discovered_s"] = round(time.monotonic() - run.started, 1)

        async def started() -> bool:
            rows = (await run.status())["namespaces"]
            return want <= {r["namespace"] for r in rows if r["state"] in ("running", "paused")}

        await _until(started, limit_s, "every collection captured with a start position", 1.0)
        out["started_s"] = round(time.monotonic() - run.started, 1)

        async def ready() -> bool:
            return bool((await run.status())["ready_for_cutover"])

        await _until(ready, limit_s, "READY", 1.0)
        out["ready_s"] = round(time.monotonic() - run.started, 1)
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            st = await run.status()
            latencies.append(time.monotonic() - t0)
        out["status_rows"] = len(st["namespaces"])
        out["status_p50_s"] = round(statistics.median(latencies), 3)
        out["status_max_s"] = round(max(latencies), 3)
        out.update(_proc(run.proc.pid))
        cpu0, t0 = proc_cpu_s(run.proc.pid), time.monotonic()
        await asyncio.sleep(10)
        out["idle_cpu_share"] = round((proc_cpu_s(run.proc.pid) - cpu0) / (time.monotonic() - t0), 3)
    finally:
        await run.stop()
        await ledger.close()
    return out


async def run_units(full: bool = False, partitions: int = 100, small: int = 100,
                    collections: int | None = None) -> dict[str, Any]:
    collections = collections or (10_000 if full else 2_000)
    out: dict[str, Any] = {}
    with Sandbox(split=True) as sandbox:
        source = mongo_client(sandbox.source_uri)
        try:
            await source.admin.command({"cosmigrateSandbox": 1, "faults": {"collection_partitions": f"one.big:{partitions};wide.big:{partitions}"}})
            await _create(source, ["ref.only"], docs=10)
            ref = await measure(sandbox, "ref", "ref", ["ref.only"], 120)
            print(f"  reference, 1 collection: {ref}", flush=True)
            await _create(source, ["wide.big"], docs=1000)
            await _create(source, [f"wide.s{i:03d}" for i in range(small)], docs=10)
            wide = await measure(sandbox, "wide", "wide", ["wide.big"] + [f"wide.s{i:03d}" for i in range(small)], 600)
            wide["watchers"] = partitions + small
            print(f"  {partitions} partitions + {small} collections: {wide}", flush=True)
            many_names = [f"many.c{i:05d}" for i in range(collections)]
            await _create(source, many_names)
            many = await measure(sandbox, "many", "many", many_names, 1800)
            print(f"  {collections} collections: {many}", flush=True)
        finally:
            await source.close()
    for name, figures in (("ref", ref), ("wide", wide), ("many", many)):
        out.update({f"units.{name}.{k}": v for k, v in figures.items()})
    for name, figures in (("wide", wide), ("many", many)):
        out[f"units.{name}.status_vs_ref"] = round(figures["status_p50_s"] / max(ref["status_p50_s"], 1e-3), 1)
        out[f"units.{name}.rss_vs_ref"] = round(figures["rss_mb"] / ref["rss_mb"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="10,000 collections instead of 2,000")
    parser.add_argument("--collections", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=100)
    parser.add_argument("--small", type=int, default=100)
    ns = parser.parse_args()
    out = asyncio.run(run_units(ns.full, ns.partitions, ns.small, ns.collections))
    merge_results(out, RESULTS / "latest.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
