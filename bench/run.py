"""`make bench` / `make bench-quick`: every suite, then bench/results/latest.json, a markdown table, a plot.

Numbers are ratios against references measured in the same run wherever a
target is a ratio; absolute figures are reported with the machine they came from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))

from bench.capture_partitions import run_capture_partitions  # noqa: E402
from bench.catchup import run_catchup  # noqa: E402
from bench.driver import run_driver  # noqa: E402
from bench.fullload import merge_results, run_fullload  # noqa: E402
from bench.live import run_live  # noqa: E402
from bench.pipeline import run_suite as run_pipeline  # noqa: E402
from bench.plan import run_plan_bench  # noqa: E402
from bench.requestunits import run_requestunits  # noqa: E402
from bench.verify import run_verify_bench  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results"

TARGETS = [
    ("catchup.ratio_vs_target_ceiling", ">=", 3.0, "backlog events applied/s vs the target's own bulk-upsert ceiling"),
    ("catchup.writes_per_event_vs_distinct_share", "<=", 1.3, "target writes per event / distinct-key share"),
    ("catchup.peak_rss_mb", "<", 400, "daemon peak RSS while capturing and draining the backlog"),
    ("live.apply_ratio_vs_target_ceiling", ">=", 0.9, "apply writes/s vs the target's ceiling, nothing to collapse"),
    ("live.lag_p50_s_at_1000", "<=", 0.3, "end-to-end lag p50 at 1,000 events/s"),
    ("live.lag_p99_s_at_1000", "<=", 1.0, "end-to-end lag p99 at 1,000 events/s"),
    ("live.lag_p99_s", "<=", 2.0, "end-to-end lag p99 at the highest sustained rate"),
    ("pipeline.headroom_vs_target_ceiling", ">=", 2.5, "pipeline events/s (one core) vs the target's ceiling"),
    ("pipeline.ratio_vs_seed_path", ">=", 5.0, "events/s vs (b) the old recipe's JSON path"),
    ("pipeline.events_per_s", ">=", 50_000, "events/s through the whole pipeline"),
    ("soak.rss_growth", "<=", 0.10, "daemon RSS growth, minute 5 to minute 30 of `make soak` (separate run)"),
    ("ru.capture_ratio_vs_point_reads", "<", 1.0, "source request units per captured event vs one point read per document"),
    ("verify.ratio_vs_scan", ">=", 0.5, "verify documents/s vs the slower side's raw _id-ordered scan"),
    ("verify.peak_rss_mb_large", "<", 256, "verifier peak RSS at the large size (2,000,000 documents full)"),
    ("verify.peak_rss_mb_small", "<", 256, "verifier peak RSS at a tenth of it (independent of size)"),
    ("deletes.source_reads_ratio_vs_scan", "<", 1.2, "delete sweep's source reads vs one _id scan (1% deleted)"),
    ("fullload.capture_partitions_vs_single_stream", ">=", 1.0,
     "capture documents/s of one 4-partition collection, per partition vs one whole-collection stream"),
    ("fullload.ratio_vs_target_ceiling", ">=", 0.8, "backfill documents/s vs the target's bulk-insert ceiling (same documents)"),
    ("fullload.ratio_vs_single_stream", ">=", 2.0, "backfill vs a plain single-stream copy (find in _id order + insert_many)"),
    ("fullload.peak_rss_mb_large", "<", 512, "daemon peak RSS during the backfill at the large size"),
    ("fullload.peak_rss_mb_small", "<", 512, "daemon peak RSS at the small size (independent of size)"),
    ("plan.time_ratio", "within", (0.75, 1.25), "`cosmigrate plan`'s full-load time / the measured one (4 partitions, RU-throttled)"),
    ("plan.ru_ratio", "within", (0.8, 1.2), "`cosmigrate plan`'s source RU / the RU the sandbox charged for the full load"),
]


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {os.cpu_count()} cores {cpu}, Python {platform.python_version()}, {platform.system()}"


def verdict(value: Any, op: str, goal: Any) -> str:
    if value is None:
        return "not measured"
    if op == "within":
        return "met" if goal[0] <= value <= goal[1] else "**missed**"
    ok = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
    return "met" if ok else "**missed**"


def table(r: dict[str, Any]) -> str:
    lines = ["| metric | value | target | verdict | what |", "| --- | --- | --- | --- | --- |"]
    for key, op, goal, what in TARGETS:
        shown = f"{goal[0]:g}..{goal[1]:g}" if op == "within" else f"{op} {goal:g}"
        lines.append(f"| `{key}` | {r.get(key)} | {shown} | {verdict(r.get(key), op, goal)} | {what} |")
    share = r.get("catchup.distinct_key_share")
    lines.append(f"| `catchup.writes_per_event` | {r.get('catchup.writes_per_event')} | <= 1.3 x `catchup.distinct_key_share` "
                 f"({share}) | {verdict(r.get('catchup.writes_per_event'), '<=', 1.3 * share if share else 0)} "
                 "| target writes per captured event |")
    if r.get("failed_suites"):
        lines.append(f"\nSuites that failed in this run (their keys are missing): {'; '.join(r['failed_suites'])}.")
    lines += ["", "| more figures | value |", "| --- | --- |"]
    for key in ("pipeline.cpu_us_per_event", "pipeline.peak_rss_mb", "pipeline.reference_bson_events_per_s",
                "pipeline.reference_seed_events_per_s", "pipeline.seed_path_fidelity", "live.max_sustained_rate",
                "catchup.events_captured", "catchup.drain_s", "catchup.events_applied_per_s",
                "catchup.target_ceiling_writes_per_s", "live.apply_writes_per_s", "live.apply_target_ceiling_writes_per_s",
                "pipeline.ratio_vs_bson_reference", "soak.minutes", "soak.rate_achieved", "soak.sighups",
                "soak.rss_mb_at_first_sixth", "soak.rss_mb_at_end", "soak.fds_min_max", "soak.tasks_min_max",
                "soak.lag_p50_s", "soak.lag_max_s", "driver.native_events_per_s", "driver.motor_events_per_s",
                "driver.ratio_native_vs_motor", "driver.pinned_pymongo", "driver.newest_pymongo",
                "driver.pinned_cpu_us_per_event", "driver.newest_cpu_us_per_event", "driver.pinned_vs_newest_ratio",
                "ru.per_document_captured", "ru.per_document_applied",
                "ru.capture_ratio_vs_point_reads", "ru.point_read_reference", "ru.idle_per_s",
                "verify.docs", "verify.docs_per_s", "verify.reference_scan_per_s",
                "deletes.docs", "deletes.expected", "deletes.found", "deletes.all_found", "deletes.seconds",
                "fullload.docs_small", "fullload.docs_large", "fullload.partitions", "fullload.backfill_docs_per_s",
                "fullload.target_insert_ceiling_docs_per_s", "fullload.single_stream_copy_docs_per_s",
                "fullload.ratio_vs_target_ceiling_small", "fullload.ratio_vs_single_stream_small",
                "fullload.capture_docs", "fullload.capture_single_stream_docs_per_s",
                "fullload.capture_partitioned_docs_per_s", "plan.docs", "plan.estimated_s", "plan.measured_s",
                "plan.limit", "plan.estimated_ru", "plan.charged_ru", "plan.cpu_us_per_doc", "plan.probe_seconds",
                "plan.probe_feed_ru", "plan.probe_feed_events"):
        lines.append(f"| `{key}` | {r.get(key)} |")
    lines += ["", "| live run | rate set | achieved | lag p50 | lag p99 | lag max | max gap_in_seconds |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for backend, runs in r["live.runs"].items():
        for run in runs:
            lines.append(f"| {backend} | {run['rate']} | {run['achieved']} | {run['lag_p50_s']} s | {run['lag_p99_s']} s | "
                         f"{run['lag_max_s']} s | {run['gap_in_seconds_max']} s |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend, runs in r["live.runs"].items():
        for run in runs:
            xs = [t for t, _ in run["samples"]]
            ys = [lag for _, lag in run["samples"]]
            ax1.plot(xs, ys, marker=".", label=f"{backend}, {run['achieved']}/s")
    ax1.set_xlabel("seconds into the run")
    ax1.set_ylabel("end-to-end lag (s)")
    ax1.set_title("Lag under sustained load")
    ax1.legend(fontsize=8)
    ax3 = ax1.inset_axes([0.58, 0.55, 0.4, 0.4])  # the trade-off: lag percentiles against the rate achieved
    for backend, runs in r["live.runs"].items():
        ax3.plot([x["achieved"] for x in runs], [x["lag_p50_s"] for x in runs], marker="o", label=f"p50 {backend}")
        ax3.plot([x["achieved"] for x in runs], [x["lag_p99_s"] for x in runs], marker="^", label=f"p99 {backend}")
    ax3.set_xlabel("events/s", fontsize=7)
    ax3.set_ylabel("lag (s)", fontsize=7)
    ax3.tick_params(labelsize=6)
    ax3.legend(fontsize=5)
    names = ["pipeline", "ref (a) BSON", "ref (b) old recipe", "catch-up apply", "native driver", "Motor"]
    values = [r.get(k) or 0 for k in ("pipeline.events_per_s", "pipeline.reference_bson_events_per_s",
                                      "pipeline.reference_seed_events_per_s", "catchup.events_applied_per_s",
                                      "driver.native_events_per_s", "driver.motor_events_per_s")]
    ax2.barh(names, values, color=["#2a7", "#999", "#c55", "#2a7", "#27a", "#a72"])
    ax2.set_xlabel("events per second")
    ax2.set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(md: str, r: dict[str, Any]) -> None:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    block = (f"{start}\nLatest run: {r['date']} on {r['machine']} ({'quick' if r['quick'] else 'full'} mode, "
             f"{r['seconds']:.0f} s).\n\n{md}\n\n![lag and throughput](results/latest.png)\n{end}")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    readme.write_text(head + block + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    args = parser.parse_args()
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")  # the in-process suites would otherwise print every batch
    t0 = time.monotonic()
    q = args.quick
    r: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": q}
    suites: list[tuple[str, Any]] = [
        ("suite 1: pipeline cost", lambda: run_pipeline(q)),
        ("suite 2: sustained live load", lambda: asyncio.run(
            run_live(["file+sqlite"], [1000, 3000], 8) if q else
            run_live(["file+sqlite", "s3+dynamodb"], [1000, 3000, 6000], 20))),
        ("suite 3: catch-up", lambda: asyncio.run(run_catchup(100_000 if q else 1_000_000))),
        ("suite 4: driver check", lambda: asyncio.run(run_driver(20_000 if q else 100_000, 2 if q else 3))),
        ("suite 5: request units", lambda: asyncio.run(run_requestunits(20_000 if q else 100_000))),
        ("suite 6: verification and the delete sweep", lambda: asyncio.run(run_verify_bench(q))),
        ("suite 7: the full load", lambda: asyncio.run(run_fullload(full=not q))),
        ("suite 8: full load, capture per partition",
         lambda: asyncio.run(run_capture_partitions(30_000 if q else 100_000))),
        ("suite 9: the plan against the run", lambda: asyncio.run(run_plan_bench(full=not q))),
    ]
    r["failed_suites"] = []
    for name, run in suites:
        print(name, flush=True)
        try:
            r.update(run())
        except Exception as exc:  # one broken suite must not throw away the others' figures
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            r["failed_suites"].append(f"{name}: {type(exc).__name__}")
    r.setdefault("live.runs", {})
    if "pipeline.events_per_s" in r and "catchup.target_ceiling_writes_per_s" in r:
        r["pipeline.headroom_vs_target_ceiling"] = round(r["pipeline.events_per_s"] / r["catchup.target_ceiling_writes_per_s"], 2)
    soak = RESULTS / "soak.json"  # `make soak` is a run of its own (30 minutes): its latest figures join the table
    if soak.exists():
        r.update({k: v for k, v in json.loads(soak.read_text()).items() if k != "soak.samples"})
    r["seconds"] = time.monotonic() - t0
    RESULTS.mkdir(exist_ok=True)
    plot(r, RESULTS / "latest.png")
    md = table(r)
    for runs in r["live.runs"].values():
        for run in runs:
            run["lag_samples"] = len(run.pop("samples"))
    merge_results(r, RESULTS / "latest.json")  # keys written by other scripts (capture_memory, ...) stay
    (RESULTS / "latest.md").write_text(md + "\n")
    update_readme(md, r)
    print(md)
    print(f"done in {r['seconds']:.0f}s; bench/results/latest.json, latest.md, latest.png, bench/README.md")


if __name__ == "__main__":
    main()
