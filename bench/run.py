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
from bench.fullload import run_fullload  # noqa: E402
from bench.live import run_live  # noqa: E402
from bench.pipeline import run_suite as run_pipeline  # noqa: E402
from bench.plan import run_plan_bench  # noqa: E402
from bench.requestunits import run_requestunits  # noqa: E402
from bench.units import run_units  # noqa: E402
from bench.verify import run_verify_bench  # noqa: E402
from bench.workers import run_workers  # noqa: E402

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
    ("fullload.ratio_vs_single_stream", ">=", 1.5, "backfill vs a plain single-stream copy (find in _id order + insert_many)"),
    ("fullload.daemon_cpu_us_per_doc", "<=", 10.0,
     "daemon CPU time per document during the backfill (the copy client's: `fullload.single_stream_cpu_us_per_doc`)"),
    ("fullload.ru_ratio_vs_feed_minimum", "<=", 1.2,
     "source request units per document of the backfill vs the change feed's own minimum (sandbox RU accounting)"),
    ("fullload.peak_rss_mb_large", "<", 512, "daemon peak RSS during the backfill at the large size"),
    ("fullload.peak_rss_mb_small", "<", 512, "daemon peak RSS at the small size (independent of size)"),
    ("plan.time_ratio", "within", (0.75, 1.25), "`cosmigrate plan`'s full-load time / the measured one (4 partitions, RU-throttled)"),
    ("plan.ru_ratio", "within", (0.8, 1.2), "`cosmigrate plan`'s source RU / the RU the sandbox charged for the full load"),
    ("workers.scaling_2", ">=", 0.8, "2 workers' documents/s vs 2 x one worker's, on a latency-bound target"),
    ("workers.scaling_4", ">=", 0.8, "4 workers' documents/s vs 4 x one worker's, on a latency-bound target"),
    ("units.many.started_s", "<=", 60.0,
     "seconds until `ctl status` lists every collection started, one worker (goal set for 10,000: `units.many.collections`)"),
    ("units.wide.ready_s", "<=", 60.0, "seconds to READY, one worker holding 100 partitions + 100 collections"),
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


def shown(r: dict[str, Any], key: str) -> str:
    """A figure as the table shows it: the median, and for a ratio the range of its runs."""
    runs = r.get(f"{key}_runs")
    return f"{r.get(key)} ({min(runs)}-{max(runs)})" if runs else str(r.get(key))


def table(r: dict[str, Any]) -> str:
    n = r.get("repeats", 1)
    lines = [f"Every figure is the median of {n} run{'s' if n != 1 else ''} of its suite; a ratio shows its runs' "
             "range after it (min-max).", "",
             "| metric | value | target | verdict | what |", "| --- | --- | --- | --- | --- |"]
    for key, op, goal, what in TARGETS:
        goal_text = f"{goal[0]:g}..{goal[1]:g}" if op == "within" else f"{op} {goal:g}"
        lines.append(f"| `{key}` | {shown(r, key)} | {goal_text} | {verdict(r.get(key), op, goal)} | {what} |")
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
                "driver.ratio_native_vs_motor", "driver.pymongo", "driver.native_cpu_us_per_event",
                "driver.motor_cpu_us_per_event",
                "ru.per_document_captured", "ru.per_document_applied",
                "ru.capture_ratio_vs_point_reads", "ru.point_read_reference", "ru.idle_per_s",
                "verify.docs", "verify.docs_per_s", "verify.reference_scan_per_s",
                "deletes.docs", "deletes.expected", "deletes.found", "deletes.all_found", "deletes.seconds",
                "fullload.docs_small", "fullload.docs_large", "fullload.partitions", "fullload.backfill_docs_per_s",
                "fullload.target_insert_ceiling_docs_per_s", "fullload.single_stream_copy_docs_per_s",
                "fullload.ratio_vs_target_ceiling_small", "fullload.ratio_vs_single_stream_small",
                "fullload.capture_docs", "fullload.capture_single_stream_docs_per_s",
                "fullload.capture_partitioned_docs_per_s", "fullload.single_stream_cpu_us_per_doc",
                "fullload.daemon_cpu_us_per_doc_small",
                "fullload.source_ru_per_doc", "fullload.feed_minimum_ru_per_doc", "fullload.point_read_ru_per_doc",
                "live.apply_drain_s", "live.apply_drain_s_polled", "live.apply_ratio_vs_target_ceiling_polled",
                "sandbox_memory.source_overhead_bytes_per_doc", "sandbox_memory.target_overhead_bytes_per_doc",
                "plan.docs", "plan.estimated_s", "plan.measured_s",
                "plan.limit", "plan.estimated_ru", "plan.charged_ru", "plan.cpu_us_per_doc", "plan.probe_seconds",
                "plan.probe_feed_ru", "plan.probe_feed_events"):
        lines.append(f"| `{key}` | {shown(r, key)} |")
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


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One suite's repeated runs as one result: every number the median of its runs, every ratio with its runs.

    A ratio of two rates measured on this shared machine moves by tens of percent between runs (issue 20: live
    apply read 0.40 in one quick run, 0.73 in another); one run cannot say which is the figure. Non-numbers
    (lists, tables of live runs, flags) are the first run's.
    """
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for run in runs for k in run):
        values = [run[key] for run in runs if key in run]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) and values:
            out[key] = median(values)
            if is_ratio(key) and len(values) > 1:
                out[f"{key}_runs"] = values
        else:
            out[key] = values[0]
    return out


def median(values: list[Any]) -> Any:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else round((ordered[mid - 1] + ordered[mid]) / 2, 3)


def is_ratio(key: str) -> bool:
    return "ratio" in key or "headroom" in key or any(key == k for k, *_ in TARGETS)


SEPARATE_RUNS = ("capture_memory.", "sandbox.", "sandbox_memory.", "soak.")
"""Key prefixes of scripts run on their own (`make bench` runs the first three beside run.py, `make soak` the
last): their figures in latest.json stay. Every other key is this run's, so a suite that failed now cannot
leave an older run's figure behind in the table."""


def write_latest(r: dict[str, Any], path: Path) -> None:
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = {k: v for k, v in old.items() if k.startswith(SEPARATE_RUNS) and k not in r}
    path.write_text(json.dumps({**kept, **r}, indent=2) + "\n")


def run_suites(suites: list[tuple[str, Any]], repeats: int) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """Run each suite `repeats` times: (the combined figures, each repetition's own figures, the failures).

    A suite that raises is named in the failures (and the run exits non-zero); the others' figures are kept.
    """
    combined: dict[str, Any] = {}
    failed: list[str] = []
    per_run: list[dict[str, Any]] = [{} for _ in range(repeats)]
    for name, run in suites:
        runs = []
        for i in range(repeats):
            print(f"{name} (run {i + 1} of {repeats})", flush=True)
            try:
                runs.append(run())
            except Exception as exc:  # one broken suite must not throw away the others' figures
                print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
                failed.append(f"{name} (run {i + 1}): {type(exc).__name__}")
                continue
            per_run[i].update(runs[-1])
        if runs:
            combined.update(combine(runs))
    return combined, per_run, failed


def main() -> None:
    parser = argparse.ArgumentParser(description="Run every benchmark suite.")
    parser.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes per repetition)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each suite; every figure is the median of them, every ratio shows its runs (3)")
    args = parser.parse_args()
    if args.repeats < 1:
        print("run.py: --repeats must be at least 1", file=sys.stderr)
        sys.exit(2)
    from cosmigrate.logs import configure_logging

    configure_logging("warning", "json")  # the in-process suites would otherwise print every batch
    t0 = time.monotonic()
    q = args.quick
    r: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": q,
                         "repeats": args.repeats}
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
        ("suite 10: several workers", lambda: asyncio.run(run_workers(full=not q))),
        # Many units: 1,000 collections quick, 2,000 full (10,000: `python bench/units.py --full`, by hand: the
        # first READY of that many takes longer than a suite's limits on this machine).
        ("suite 11: many units on one worker", lambda: asyncio.run(run_units(collections=1_000 if q else 2_000))),
    ]
    combined, per_run, r["failed_suites"] = run_suites(suites, args.repeats)
    r.update(combined)
    r.setdefault("live.runs", {})
    headroom = [round(x["pipeline.events_per_s"] / x["catchup.target_ceiling_writes_per_s"], 2) for x in per_run
                if "pipeline.events_per_s" in x and "catchup.target_ceiling_writes_per_s" in x]
    if headroom:  # each run's pipeline against the same run's ceiling, then the median
        r["pipeline.headroom_vs_target_ceiling"] = median(headroom)
        if len(headroom) > 1:
            r["pipeline.headroom_vs_target_ceiling_runs"] = headroom
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
    write_latest(r, RESULTS / "latest.json")
    (RESULTS / "latest.md").write_text(md + "\n")
    update_readme(md, r)
    print(md)
    print(f"done in {r['seconds']:.0f}s; bench/results/latest.json, latest.md, latest.png, bench/README.md")
    if r["failed_suites"]:  # a broken suite must not hide in a table: the run fails
        print(f"FAILED suites: {'; '.join(r['failed_suites'])}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
