"""`make soak`: the live workload for a long time, looking for slow leaks. CI never runs it.

`cosmigrate run`, the sandbox and the generator in their own processes (file + SQLite); the generator
writes at half the highest sustained rate of the last bench run (`live.max_sustained_rate` in
bench/results/latest.json; COSMIGRATE_SOAK_RATE overrides it). Every sixth of the run (5 minutes of the
default 30) the daemon gets a SIGHUP and the writer is stopped and started again. Every 10 s: the
daemon's RSS (/proc), its open file descriptors and live asyncio tasks (`ctl metrics`:
cosmigrate_process_open_fds, cosmigrate_process_asyncio_tasks), and an end-to-end probe lag.

Verdict keys (`soak.*`): RSS growth between the sample at a sixth of the run (minute 5) and the last
one (minute 30) as a share of the former (goal <= 0.10); fds and tasks: the spread (max - min) after
the first sixth (goal: flat, i.e. no upward drift). Results go to bench/results/soak.json, which
`bench/run.py` folds into the table.

    COSMIGRATE_SOAK_MINUTES=30 (default) | --short (3 minutes, a smoke check)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from pymongo import AsyncMongoClient  # noqa: E402

from bench.harness import Daemon, Sandbox, bench_config, prepare, totals  # noqa: E402
from cosmigrate.control import request  # noqa: E402
from cosmigrate.sandbox.workload import Workload  # noqa: E402

HERE = Path(__file__).parent
NAMESPACES = ["app.orders", "app.events", "shop.items"]
SAMPLE_S = 10.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def process_gauges(daemon: Daemon) -> dict[str, float]:
    text = (await request(daemon.cfg.control.socket, {"cmd": "metrics"}))["metrics"]
    out = {}
    for line in text.splitlines():
        for name in ("cosmigrate_process_open_fds", "cosmigrate_process_asyncio_tasks"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


async def run_soak(minutes: float, rate: int) -> dict[str, Any]:
    total_s = minutes * 60
    cycle_s = total_s / 6  # SIGHUP + writer stop/start: every 5 minutes of 30
    samples: list[dict[str, float]] = []
    with Sandbox() as sb:
        cfg = bench_config(sb, "file+sqlite")
        await prepare(cfg)
        client: AsyncMongoClient[Any] = AsyncMongoClient(sb.source_uri)
        target: AsyncMongoClient[Any] = AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
        async with Daemon(cfg) as daemon:
            await daemon.writer("start")
            workload = Workload(client, NAMESPACES, keys_per_ns=20_000, seed=13)
            t0 = time.perf_counter()
            written = 0
            next_sample, next_cycle, probe_i = t0, t0 + cycle_s, 0
            hups = 0
            while (now := time.perf_counter()) - t0 < total_s:
                due = int(rate * (now - t0 + 0.1))
                if due > written:  # at most a second's worth at once: samples and cycles keep their cadence
                    n = min(due - written, rate)
                    await workload.run_bulk(n, per_write=500)
                    written += n
                if now >= next_cycle:
                    daemon.proc.send_signal(signal.SIGHUP)
                    await daemon.writer("stop")
                    await asyncio.sleep(1.0)
                    await daemon.writer("start")
                    hups += 1
                    next_cycle += cycle_s
                if now >= next_sample:
                    probe_i += 1
                    sent = time.perf_counter()
                    await client.app.orders.replace_one({"_id": "soak-probe"}, {"_id": "soak-probe", "i": probe_i},
                                                        upsert=True)
                    while True:
                        doc = await target.app.orders.find_one({"_id": "soak-probe"})
                        if (doc and doc["i"] >= probe_i) or time.perf_counter() - sent > 30:
                            break
                        await asyncio.sleep(0.02)
                    gauges = await process_gauges(daemon)
                    status = totals(await daemon.status())
                    samples.append({"t_s": round(now - t0, 1), "rss_mb": round(rss_mb(daemon.proc.pid), 1),
                                    "fds": gauges.get("cosmigrate_process_open_fds", -1),
                                    "tasks": gauges.get("cosmigrate_process_asyncio_tasks", -1),
                                    "lag_s": round(time.perf_counter() - sent, 3),
                                    "pending_events": status["pending_events"]})
                    print(json.dumps(samples[-1]), flush=True)
                    next_sample += SAMPLE_S
                await asyncio.sleep(max(0.0, t0 + written / rate - time.perf_counter()))
            achieved = written / (time.perf_counter() - t0)
        await client.close()
        await target.close()
    later = [s for s in samples if s["t_s"] >= cycle_s] or samples
    base, last = later[0], samples[-1]
    return {
        "soak.minutes": minutes,
        "soak.rate_set": rate,
        "soak.rate_achieved": round(achieved),
        "soak.sighups": hups,
        "soak.rss_mb_at_first_sixth": base["rss_mb"],
        "soak.rss_mb_at_end": last["rss_mb"],
        "soak.rss_growth": round((last["rss_mb"] - base["rss_mb"]) / base["rss_mb"], 3),
        "soak.fds_min_max": [min(s["fds"] for s in later), max(s["fds"] for s in later)],
        "soak.tasks_min_max": [min(s["tasks"] for s in later), max(s["tasks"] for s in later)],
        "soak.lag_p50_s": sorted(s["lag_s"] for s in samples)[len(samples) // 2],
        "soak.lag_max_s": max(s["lag_s"] for s in samples),
        "soak.samples": samples,
    }


def main() -> None:
    short = "--short" in sys.argv
    minutes = 3.0 if short else float(os.environ.get("COSMIGRATE_SOAK_MINUTES", "30"))
    rate = int(os.environ.get("COSMIGRATE_SOAK_RATE", "0"))
    if not rate:
        latest = HERE / "results" / "latest.json"
        best = json.loads(latest.read_text()).get("live.max_sustained_rate", 0) if latest.exists() else 0
        rate = max(100, int(best) // 2) if best else 1000
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")
    result = asyncio.run(run_soak(minutes, rate))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "soak.samples"}, indent=2))


if __name__ == "__main__":
    main()
