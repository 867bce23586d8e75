"""Suite 9, the plan against the run: `cosmigrate plan`'s estimate next to a measured full load.

In one sandbox (four physical partitions, the source throttled by its RU budget: the `ru_per_s` fault), a
collection is loaded, then:

1. `cosmigrate plan --json` runs in its own process; the sandbox's counters before and after it give what
   its probes really read and cost (feed events, feed RU) and how long it took, against its stated bounds;
   afterwards the target holds no scratch collection;
2. `cosmigrate run` (its own process, writer started) backfills the collection; its time is the ledger's own
   record (unit created -> phase `tailing`), its RU the sandbox's charge (feed + read) over the same span, its
   CPU per document the daemon's user + system time over the span.

Reported: `plan.time_ratio` (estimated / measured full-load time, target 0.75..1.25), `plan.ru_ratio`
(estimated / charged RU, target 0.8..1.2), `plan.cpu_us_per_doc` (the measured figure behind
`cosmigrate.plan.estimate.CPU_US_PER_DOC`), and the probe's use of its bounds. `tests/test_plan.py` runs the
same measurement on a smaller collection. `python bench/plan.py [--full]` merges its keys into
bench/results/latest.json; `bench/run.py` runs it as suite 9.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from pymongo import AsyncMongoClient  # noqa: E402

from bench.harness import AWS_ENV, Daemon, Sandbox, bench_config, prepare, wait_backfilled  # noqa: E402
from cosmigrate.config import to_toml  # noqa: E402

NS_DB, NS_COLL = "plan", "docs"
PARTITIONS = 4
CHUNK = 1000
PAD = "x" * 400


async def counters(client: AsyncMongoClient[Any]) -> dict[str, float]:
    reply = await client.admin.command("cosmigrateSandbox")
    units = dict(reply["requestUnits"])
    return {"feed": float(units["feed"]), "read": float(units["read"]), "events": float(reply["feedEvents"])}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(source: AsyncMongoClient[Any], n: int, partitions: int) -> None:
    """n documents of about 500 bytes (each change event under 1 KiB) in a collection of `partitions`."""
    await source.admin.command({"cosmigrateSandbox": 1, "faults": {"partitions": partitions}})
    for s in range(0, n, CHUNK):
        await source[NS_DB][NS_COLL].insert_many(
            [{"_id": i, "n": i, "name": f"customer {i}", "pad": PAD} for i in range(s, min(n, s + CHUNK))],
            ordered=False)


async def run_plan(config: Path, *args: str) -> tuple[int, dict[str, Any], str, float]:
    """`cosmigrate plan --json` in its own process: (exit code, the plan, stderr, seconds)."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "plan", "--json", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, **AWS_ENV})
    out, err = await proc.communicate()
    seconds = time.monotonic() - started
    return proc.returncode or 0, json.loads(out) if out.strip() else {}, err.decode(errors="replace"), seconds


async def measure(sb: Any, n: int, ru_per_s: float, partitions: int = PARTITIONS) -> dict[str, Any]:
    """Load n documents, plan, then backfill for real; the plan's figures next to the measured ones."""
    source: AsyncMongoClient[Any] = AsyncMongoClient(sb.source_uri)
    target: AsyncMongoClient[Any] = AsyncMongoClient(sb.target_uri, tlsCAFile=sb.target_ca_file)
    try:
        await load(source, n, partitions)
        await source.admin.command({"cosmigrateSandbox": 1, "faults": {"ru_per_s": ru_per_s}})
        cfg = bench_config(sb, "file+sqlite")
        cfg.capture.include = [f"{NS_DB}.{NS_COLL}"]
        cfg.log.level = "info"  # the journal line of plan vs actual is read back
        config = Path(cfg.control.socket).parent / "cosmigrate.toml"
        config.write_text(to_toml(cfg))
        await prepare(cfg)
        before = await counters(source)
        code, plan, err, plan_s = await run_plan(config, "--record")
        after = await counters(source)
        if not plan:
            raise RuntimeError(f"cosmigrate plan printed no plan (exit {code}): {err[-500:]}")
        leftovers = await target["cosmigrate_plan"].list_collection_names()
        from cosmigrate.ledger import open_ledger

        ledger = open_ledger(cfg)
        await ledger.set_writer("started", "bench", time.time())
        await ledger.close()
        start_units = await counters(source)  # before the daemon starts: its first reads count too
        async with Daemon(cfg) as daemon:
            start_cpu = cpu_s(daemon.proc.pid)
            doc = await wait_backfilled(cfg, f"{NS_DB}.{NS_COLL}", interval_s=0.02)
            end_units, end_cpu = await counters(source), cpu_s(daemon.proc.pid)
            journal = Path(cfg.control.socket).parent / "daemon.log"
            line = await _journal_line(journal)
            status_plan = (await daemon.status())["plan"]
        copied = await target[NS_DB][NS_COLL].estimated_document_count()
    finally:
        await source.close()
        await target.close()
    measured_s = float(doc["completed_at"]) - float(doc["started_at"])
    charged = (end_units["feed"] - start_units["feed"]) + (end_units["read"] - start_units["read"])
    est = plan["estimate"]
    coll = plan["collections"][0]
    return {
        "exit_code": code, "plan": plan, "leftover_scratch": leftovers, "copied": copied,
        "journal_line": line, "status_plan": status_plan, "workdir": str(config.parent),
        "plan_seconds": plan_s, "probe_feed_ru": after["feed"] - before["feed"],
        "probe_feed_events": after["events"] - before["events"],
        "estimated_s": est["seconds"], "measured_s": measured_s, "limit": est["limit"],
        "estimated_ru": est["ru_total"], "charged_ru": charged, "ru_per_doc": coll["probe"]["ru_per_doc"],
        "time_ratio": est["seconds"] / measured_s if est["seconds"] else None,
        "ru_ratio": est["ru_total"] / charged if est["ru_total"] and charged else None,
        "cpu_us_per_doc": (end_cpu - start_cpu) * 1e6 / n,
    }


async def _journal_line(path: Path, limit_s: float = 30.0) -> dict[str, Any]:
    """The daemon's "full load done" journal line (plan vs actual), once it is written."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for raw in (await asyncio.to_thread(path.read_text, errors="replace")).splitlines():
            if '"full load done' in raw:
                return dict(json.loads(raw))
        await asyncio.sleep(0.1)
    raise RuntimeError(f"no plan-vs-actual journal line in {path}")


async def run_plan_bench(full: bool = False) -> dict[str, Any]:
    n, rate = (400_000, 20_000.0) if full else (100_000, 5_000.0)
    with Sandbox() as sb:
        m = await measure(sb, n, rate)
    assert m["copied"] == n, (m["copied"], n)
    return {
        "plan.docs": n, "plan.partitions": PARTITIONS, "plan.source_ru_per_s": rate,
        "plan.estimated_s": round(m["estimated_s"], 2), "plan.measured_s": round(m["measured_s"], 2),
        "plan.limit": m["limit"], "plan.time_ratio": round(m["time_ratio"], 3),
        "plan.estimated_ru": round(m["estimated_ru"]), "plan.charged_ru": round(m["charged_ru"]),
        "plan.ru_ratio": round(m["ru_ratio"], 3), "plan.cpu_us_per_doc": round(m["cpu_us_per_doc"], 1),
        "plan.probe_seconds": round(m["plan_seconds"], 2), "plan.probe_feed_ru": round(m["probe_feed_ru"], 1),
        "plan.probe_feed_events": int(m["probe_feed_events"]),
    }


if __name__ == "__main__":
    from bench.fullload import merge_results
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")
    result = asyncio.run(run_plan_bench("--full" in sys.argv))
    merge_results(result, Path(__file__).parent / "results" / "latest.json")
    print(json.dumps(result, indent=2))
