"""Several workers (not yet a suite of `make bench`): N workers vs one on a latency-bound target, and the failover time after SIGKILL.

A remote DocumentDB answers each write after a network round trip, so one worker's throughput is bounded by
the writes it keeps in flight (`apply.pool_size` namespaces at once, `apply.write_concurrency` writes each),
not by the target's ceiling. The sandbox target is made latency-bound the same way: its slow-write fault
delays every write command by `--latency-ms` (asyncio sleeps, so the target process stays idle and many
writes wait at once). Each write carries `--ops-per-write` documents.

For N in (1, 2, 4), on a fresh cluster each time (its own ledger, target databases dropped):

1. `--collections` collections of `--docs` documents each (one unit each) exist on the source;
2. N `cosmigrate run --worker wI` processes start with the writer stopped, and the run waits until every
   worker holds its even share of the units, every document is captured (so the window below is apply) and
   no unit is in its fence wait (a stolen unit waits the old lease plus the write bound: the failover's cost,
   measured below, not throughput; the first run counted it and found 2 and 4 workers slower than one);
3. the writer starts; the window ends when the target holds every document of every collection.

Reported under `workers.*`: documents/s of each N, the ratio `throughput(N) / (N x throughput(1))` (goal
>= 0.8 for N = 2 and 4) and each worker's CPU microseconds per document in the window (from /proc).

Then the failover: two workers hold the units while a writer process keeps writing; one is SIGKILLed at a
random moment; the time from the kill until the survivor holds all the dead worker's units (read from the
lease items) and until its fence wait is over (its status shows each unit's lease "held here", no longer
"fence wait"). The killed worker is
started again and the units spread before the next kill. p50 and max over `--kills` kills, beside the lease
settings (tests' short leases by default, `--production-leases` for 30/10/15 s).

`python bench/workers.py [--full]` merges its keys into bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.fullload import merge_results  # noqa: E402
from bench.harness import AWS_ENV, Sandbox, bench_config, mongo_client, prepare, proc_cpu_s  # noqa: E402
from cosmigrate.config import Config, to_toml, worker_socket  # noqa: E402
from cosmigrate.control import request  # noqa: E402

RESULTS = Path(__file__).parent / "results"
DB = "wk"


class Worker:
    """One `cosmigrate run --worker NAME` process of the bench's cluster."""

    def __init__(self, config: Path, cfg: Config, name: str) -> None:
        self.config, self.cfg, self.name = config, cfg, name
        self.socket = worker_socket(cfg.control.socket, name)

    async def start(self) -> Worker:
        self.log = open(self.config.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", "run", "--config", str(self.config), "--worker", self.name,
            stdout=self.log, stderr=self.log, env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await request(self.socket, {"cmd": "ping"})
                return self
            except Exception:
                await asyncio.sleep(0.2)
        raise RuntimeError(f"worker {self.name} did not start; see {self.config.parent / (self.name + '.log')}")

    async def status(self) -> dict[str, Any]:
        return dict((await request(self.socket, {"cmd": "status"}))["status"])

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.log.close()

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid)


def _held(st: dict[str, Any]) -> dict[str, list[str]]:
    return {w["worker"]: w["units"] for w in st["workers"] if w["alive"]}


async def _wait(predicate: Any, limit_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise RuntimeError(f"timed out after {limit_s:.0f}s waiting for {what}")


def _cluster(sandbox: Sandbox, args: argparse.Namespace, tag: str) -> tuple[Config, Path]:
    cfg = bench_config(sandbox, "file+sqlite")
    cfg.cluster_name = f"bench-{tag}"
    cfg.capture.discovery_interval_s = 0.5
    cfg.apply.max_ops_per_write = args.ops_per_write
    if args.production_leases:
        cfg.leases.lease_s, cfg.leases.renew_s, cfg.leases.balance_s = 30.0, 10.0, 15.0
    else:
        cfg.leases.lease_s, cfg.leases.renew_s, cfg.leases.balance_s = 12.0, 3.0, 3.0
        cfg.apply.write_bound_s = 5.0
    config = Path(cfg.control.socket).parent / "cosmigrate.toml"
    config.write_text(to_toml(cfg))
    return cfg, config


async def _fill_source(sandbox: Sandbox, args: argparse.Namespace) -> None:
    source = mongo_client(sandbox.source_uri)
    try:
        await source.drop_database(DB)
        pad = "x" * 400
        for c in range(args.collections):
            coll = source[DB][f"c{c:02d}"]
            for s in range(0, args.docs, 1000):
                await coll.insert_many([{"_id": i, "n": i, "pad": pad} for i in range(s, min(args.docs, s + 1000))],
                                       ordered=False)
    finally:
        await source.close()


async def _set_latency(target: Any, ms: int) -> None:
    await target.admin.command({"cosmigrateSandbox": 1, "faults": {"slow_write_ms": ms}})


async def _throughput(sandbox: Sandbox, args: argparse.Namespace, n: int) -> dict[str, Any]:
    """One fresh cluster of n workers: documents/s of the apply window and CPU per document per worker."""
    cfg, config = _cluster(sandbox, args, f"n{n}-{random.randrange(1 << 30):x}")
    await prepare(cfg)
    target = mongo_client(sandbox.target_uri)
    await target.drop_database(DB)
    await _set_latency(target, 0)
    workers = [Worker(config, cfg, f"w{i + 1}") for i in range(n)]
    total = args.collections * args.docs
    try:
        for w in workers:
            await w.start()
        share = -(-args.collections // n)

        async def spread_and_captured() -> bool:
            st = await workers[0].status()
            held = _held(st)
            if len(held) < n or any(len(units) < args.collections // n for units in held.values()):
                return False
            if any(len(units) > share for units in held.values()):
                return False
            captured = sum(row["captured_events"] for row in st["namespaces"] if row["namespace"].startswith(DB))
            if captured < total:
                return False
            # A stolen unit's new owner waits the old lease plus the write bound before its first write (the
            # fence): that is the failover's cost, measured below, not throughput. Start once every fence is over.
            for w in workers:
                own = await w.status()
                if any(r.get("lease") == "fence wait" for r in own["namespaces"]
                       if r.get("worker") == own["this_worker"]):
                    return False
            return True

        await _wait(spread_and_captured, 600, f"{n} workers sharing the units and every document captured", 1.0)
        await _set_latency(target, args.latency_ms)
        cpu0 = [w.cpu_s() for w in workers]
        t0 = time.perf_counter()
        await request(workers[0].socket, {"cmd": "writer", "action": "start"})

        async def copied() -> bool:
            counts = [await target[DB][f"c{c:02d}"].estimated_document_count() for c in range(args.collections)]
            return sum(counts) >= total

        await _wait(copied, 1800, "every document on the target", 0.1)
        elapsed = time.perf_counter() - t0
        cpu = [w.cpu_s() - c for w, c in zip(workers, cpu0, strict=True)]
    finally:
        await _set_latency(target, 0)
        for w in workers:
            await w.stop()
        await target.close()
    return {"docs_per_s": round(total / elapsed, 1), "seconds": round(elapsed, 2),
            "cpu_us_per_doc_per_worker": [round(c * 1e6 / total, 1) for c in cpu]}


async def _kill_one(victim: Worker, survivor: Worker, table: Any) -> tuple[float, float, int]:
    """SIGKILL `victim`; seconds until `survivor` holds its units in the lease items, and until it may write
    them (its fence wait over), and how many units moved."""
    st = await survivor.status()
    ids = {w["name"]: w["worker"] for w in st["workers"]}
    lost = set(_held(st).get(ids[victim.name], []))
    killed = time.monotonic()
    await victim.stop(signal.SIGKILL)

    async def held_again() -> bool:
        leases = {rec.unit: rec for rec in await table.leases()}
        return all(not leases[u].free and leases[u].owner == ids[survivor.name] for u in lost)

    await _wait(held_again, 300, "the survivor to hold the killed worker's units", 0.1)
    taken = time.monotonic() - killed

    async def fenced_over() -> bool:
        rows = {r["namespace"]: r for r in (await survivor.status())["namespaces"]}
        return all(u in rows and rows[u].get("lease") == "held here" for u in lost)

    await _wait(fenced_over, 300, "the survivor's fence wait to end", 0.2)
    return taken, time.monotonic() - killed, len(lost)


async def _failover(sandbox: Sandbox, args: argparse.Namespace) -> dict[str, Any]:
    """Kill one of two workers at random moments; seconds until its units are held again, and writable."""
    from cosmigrate.leases import LeaseTable
    from cosmigrate.leases.records import WorkerId
    from cosmigrate.ledger import open_ledger

    cfg, config = _cluster(sandbox, args, f"fo-{random.randrange(1 << 30):x}")
    await prepare(cfg)
    target = mongo_client(sandbox.target_uri)
    await target.drop_database(DB)
    await _set_latency(target, 0)
    source = mongo_client(sandbox.source_uri)
    ledger = open_ledger(cfg)
    table = LeaseTable(ledger, WorkerId("bench-observer"))
    workers = {name: Worker(config, cfg, name) for name in ("w1", "w2")}
    taken: list[float] = []
    writable: list[float] = []
    stop = asyncio.Event()

    async def write() -> None:
        i = 0
        while not stop.is_set():
            await source[DB][f"c{i % args.collections:02d}"].update_one({"_id": i % args.docs}, {"$inc": {"v": 1}})
            i += 1
            await asyncio.sleep(0.005)

    writes = None
    try:
        for w in workers.values():
            await w.start()
        await request(workers["w1"].socket, {"cmd": "writer", "action": "start"})
        writes = asyncio.create_task(write())
        rng = random.Random(9)
        for k in range(args.kills):
            async def spread() -> bool:
                held = _held(await workers["w1"].status())
                return len(held) == 2 and all(held.values())

            await _wait(spread, 300, "both workers holding units", 1.0)
            await asyncio.sleep(rng.uniform(0.0, cfg.leases.renew_s * 2))  # a random moment of the lease cycle
            victim = workers["w2" if k % 2 == 0 else "w1"]
            survivor = workers["w1" if k % 2 == 0 else "w2"]
            took, wrote, lost = await _kill_one(victim, survivor, table)
            taken.append(took)
            writable.append(wrote)
            print(f"  kill {k + 1}: {lost} units taken after {taken[-1]:.1f}s, written to after "
                  f"{writable[-1]:.1f}s", flush=True)
            await victim.start()
    finally:
        stop.set()
        if writes is not None:
            await writes
        for w in workers.values():
            if hasattr(w, "proc"):
                await w.stop()
        await ledger.close()
        await source.close()
        await target.close()
    return {"taken_p50_s": round(statistics.median(taken), 2), "taken_max_s": round(max(taken), 2),
            "writable_p50_s": round(statistics.median(writable), 2), "writable_max_s": round(max(writable), 2),
            "kills": len(taken), "lease_s": cfg.leases.lease_s, "renew_s": cfg.leases.renew_s,
            "write_bound_s": cfg.apply.write_bound_s}


async def run_workers(full: bool = False, kills: int | None = None, production_leases: bool = False) -> dict[str, Any]:
    args = argparse.Namespace(collections=16, docs=4000 if full else 1500, latency_ms=100, ops_per_write=25,
                              kills=kills or (10 if full else 3), production_leases=production_leases)
    out: dict[str, Any] = {"workers.latency_ms": args.latency_ms, "workers.ops_per_write": args.ops_per_write,
                           "workers.collections": args.collections, "workers.docs": args.collections * args.docs}
    with Sandbox(split=True) as sandbox:
        await _fill_source(sandbox, args)
        one: float | None = None
        for n in (1, 2, 4):
            r = await _throughput(sandbox, args, n)
            print(f"  {n} worker(s): {r['docs_per_s']:.0f} documents/s ({r['seconds']}s), CPU us/doc per worker "
                  f"{r['cpu_us_per_doc_per_worker']}", flush=True)
            out[f"workers.docs_per_s_{n}"] = r["docs_per_s"]
            out[f"workers.cpu_us_per_doc_per_worker_{n}"] = r["cpu_us_per_doc_per_worker"]
            if n == 1:
                one = r["docs_per_s"]
            else:
                assert one
                out[f"workers.scaling_{n}"] = round(r["docs_per_s"] / (n * one), 3)
        fo = await _failover(sandbox, args)
        out.update({f"workers.failover_{k}": v for k, v in fo.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more documents and 10 kills")
    parser.add_argument("--kills", type=int, default=None)
    parser.add_argument("--production-leases", action="store_true", help="lease 30 s, renew 10 s, balance 15 s")
    ns = parser.parse_args()
    out = asyncio.run(run_workers(ns.full, ns.kills, ns.production_leases))
    merge_results(out, RESULTS / "latest.json")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
