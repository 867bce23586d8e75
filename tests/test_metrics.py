"""Metrics: every status figure derivable from a scrape, counters that never go back, gauges never negative,
the HTTP endpoint and `ctl metrics` on a real daemon, EMF lines and the progress line from a real process."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from cosmigrate.apply import ApplyStatus
from cosmigrate.capture import CaptureStatus
from cosmigrate.metrics import (
    EMF_CLUSTER_METRICS,
    EMF_NAMESPACE_METRICS,
    FAMILIES,
    FRESHNESS_KINDS,
    EmfWriter,
    PartCounters,
    build_registry,
    carry_over,
    freshness_kind,
)
from cosmigrate.sandbox import Sandbox
from cosmigrate.status import PHASES, STATES, phase
from tests.helpers import make_config, prepare_backends, wait_for, write_config
from tests.test_apply import Running
from tests.test_capture_processes import Child

# --- a scrape, parsed by the reference parser, gives back the status ----------------------------------------------


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


FRESHNESS_TEXTS = ["current", "behind", "not sampled yet", "source head unreachable: timed out", "unknown: grant it"]


@st.composite
def statuses(draw: Any) -> dict[str, Any]:
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12),
                          max_size=4, unique=True))
    stamp = st.one_of(st.none(), st.integers(1_600_000_000_000, 1_900_000_000_000).map(lambda ms: _iso(ms / 1000)))
    seconds = st.floats(0, 1e6, allow_nan=False).map(lambda x: round(x, 3))
    namespaces = []
    for name in names:
        captured_seq = draw(st.integers(-1, 10**6))
        applied_seq = draw(st.integers(-1, captured_seq))
        captured = draw(st.integers(0, 10**9))
        applied = draw(st.integers(0, captured))
        state = draw(st.sampled_from(STATES))
        freshness = draw(st.sampled_from(FRESHNESS_TEXTS))
        namespaces.append({
            "namespace": name, "state": state, "captured_seq": captured_seq, "captured_events": captured,
            "applied_seq": applied_seq, "applied_events": applied, "pending_batches": captured_seq - applied_seq,
            "pending_events": captured - applied, "lag_seconds": draw(seconds), "caught_up_at": draw(stamp),
            "freshness": freshness, "last_capture_contact": draw(stamp), "empty_pages": draw(st.integers(0, 10**6)),
            "deferred": draw(st.integers(0, 1000)), "throughput_eps": round(draw(st.floats(0, 1e5)), 1),
            "last_error": "", "last_error_at": draw(stamp), "phase": phase(state, freshness),
        })
    return {
        "cluster_name": draw(st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)), "version": "0.1.0",
        "uptime_s": draw(seconds), "current_time": _iso(1_700_000_000), "writer": draw(st.sampled_from(["started", "stopped"])),
        "gap_in_seconds": max((n["lag_seconds"] for n in namespaces), default=0.0),
        "cutover_threshold_seconds": draw(st.floats(0.1, 600).map(lambda x: round(x, 2))),
        "ready_for_cutover": draw(st.booleans()), "not_ready_reasons": draw(st.lists(st.text(max_size=10), max_size=3)),
        "namespaces": namespaces,
    }


def _scrape(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.name, dict(sample.labels), sample.value))
    return out


def _one(samples: dict, name: str, **labels: str) -> float:
    found = [v for _, lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _hot(samples: dict, name: str, key: str, **labels: str) -> str:
    """The label value of the one-hot sample that is 1."""
    hot = [lab[key] for _, lab, v in samples.get(name, []) if v == 1 and all(lab.get(k) == w for k, w in labels.items())]
    assert len(hot) == 1, (name, labels, hot)
    return hot[0]


def _stamp(value: float) -> str | None:
    return _iso(value) if value else None


def derive(text: str) -> dict[str, Any]:
    """The status figures, computed from the metrics alone."""
    s = _scrape(text)
    (_, info, _), = s["cosmigrate_build_info"]
    out: dict[str, Any] = {
        "cluster_name": info["cluster"], "version": info["version"], "uptime_s": _one(s, "cosmigrate_uptime_seconds"),
        "writer": "started" if _one(s, "cosmigrate_writer_started") else "stopped",
        "gap_in_seconds": _one(s, "cosmigrate_gap_seconds"),
        "cutover_threshold_seconds": _one(s, "cosmigrate_cutover_threshold_seconds"),
        "ready_for_cutover": _one(s, "cosmigrate_ready_for_cutover") == 1,
        "not_ready_reasons": int(_one(s, "cosmigrate_not_ready_reasons")), "namespaces": [],
    }
    names = [lab["namespace"] for _, lab, _ in s.get("cosmigrate_lag_seconds", [])]
    for ns in names:
        captured_batches = int(_one(s, "cosmigrate_batches_captured_total", namespace=ns))
        applied_batches = int(_one(s, "cosmigrate_batches_applied_total", namespace=ns))
        captured = int(_one(s, "cosmigrate_events_captured_total", namespace=ns, partition="all"))
        applied = int(_one(s, "cosmigrate_events_applied_total", namespace=ns, partition="all"))
        out["namespaces"].append({
            "namespace": ns, "state": _hot(s, "cosmigrate_namespace_state", "state", namespace=ns),
            "captured_seq": captured_batches - 1, "captured_events": captured,
            "applied_seq": applied_batches - 1, "applied_events": applied,
            "pending_batches": max(0, captured_batches - applied_batches), "pending_events": max(0, captured - applied),
            "lag_seconds": _one(s, "cosmigrate_lag_seconds", namespace=ns),
            "caught_up_at": _stamp(_one(s, "cosmigrate_caught_up_timestamp_seconds", namespace=ns)),
            "freshness": _hot(s, "cosmigrate_freshness", "freshness", namespace=ns),
            "last_capture_contact": _stamp(_one(s, "cosmigrate_last_capture_contact_timestamp_seconds", namespace=ns)),
            "empty_pages": int(_one(s, "cosmigrate_empty_pages_total", namespace=ns)),
            "deferred": int(_one(s, "cosmigrate_deferred_writes", namespace=ns)),
            "throughput_eps": _one(s, "cosmigrate_applied_events_per_second", namespace=ns),
            "last_error_at": _stamp(_one(s, "cosmigrate_last_error_timestamp_seconds", namespace=ns)),
            "phase": _hot(s, "cosmigrate_namespace_phase", "phase", namespace=ns),
        })
    return out


@settings(max_examples=150, deadline=None)
@given(status=statuses())
def test_every_status_figure_is_derivable_from_the_metrics(status: dict[str, Any]) -> None:
    text = build_registry(status, {}).render()
    got = derive(text)
    expected = {k: v for k, v in status.items() if k not in ("current_time", "namespaces")}
    expected["not_ready_reasons"] = len(status["not_ready_reasons"])  # texts stay in status; their number is a metric
    assert {k: v for k, v in got.items() if k != "namespaces"} == expected
    want = [{**{k: v for k, v in n.items() if k != "last_error"}, "freshness": freshness_kind(n["freshness"])}
            for n in status["namespaces"]]
    assert got["namespaces"] == want
    # Namespaces in each state add up (what the "a namespace failed" alarm reads).
    s = _scrape(text)
    for state in STATES:
        assert _one(s, "cosmigrate_namespaces", state=state) == sum(n["state"] == state for n in status["namespaces"])


def test_the_families_are_documented_with_types_and_help() -> None:
    families = {f.name: f for f in text_string_to_metric_families(build_registry(_status_of([]), {}).render())}
    for name, (kind, help_text) in FAMILIES.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert families[base].type == kind and families[base].documentation == help_text
    assert "docs_copied" in FAMILIES["cosmigrate_backfill_documents_total"][1]
    assert "mismatches" in FAMILIES["cosmigrate_verification_mismatches"][1]
    assert set(FRESHNESS_KINDS) >= {freshness_kind(f) for f in FRESHNESS_TEXTS}
    assert set(PHASES) >= {phase(s, f) for s in STATES for f in FRESHNESS_TEXTS}


# --- counters never go back, gauges are never negative, also across `ctl retry` -------------------------------


def _parts() -> tuple[Any, Any]:
    return SimpleNamespace(status=CaptureStatus()), SimpleNamespace(status=ApplyStatus())


def _status_of(namespaces: list[dict[str, Any]]) -> dict[str, Any]:
    return {"cluster_name": "c", "version": "0.1.0", "uptime_s": 1.0, "current_time": _iso(1.7e9), "writer": "started",
            "gap_in_seconds": max((n["lag_seconds"] for n in namespaces), default=0.0), "cutover_threshold_seconds": 10.0,
            "ready_for_cutover": False, "not_ready_reasons": ["x"], "namespaces": namespaces}


STEPS = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 500), st.integers(1, 10**6)),
    st.tuples(st.just("apply"), st.integers(1, 5)),
    st.tuples(st.just("throttle")), st.tuples(st.just("empty")), st.tuples(st.just("delete")),
    st.tuples(st.just("cycle")), st.tuples(st.just("retry")),
    st.tuples(st.just("lag"), st.floats(0, 1e5, allow_nan=False)),
), max_size=60)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS)
def test_counters_only_grow_and_gauges_stay_non_negative_also_across_a_retry(steps: list[tuple[Any, ...]]) -> None:
    cap, app = _parts()
    batches: list[int] = []  # events per committed batch (the ledger)
    applied_seq, lag = -1, 0.0
    previous: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    counted = {"throttle": 0, "empty": 0, "delete": 0}
    for step in steps:
        kind = step[0]
        if kind in counted:
            counted[kind] += 1
        if kind == "commit":
            batches.append(step[1])
            cap.status.committed_bytes += step[2]
            cap.status.stored_bytes += step[2] // 3
        elif kind == "apply":
            applied_seq = min(len(batches) - 1, applied_seq + step[1])
        elif kind == "throttle":
            cap.status.throttled += 1
        elif kind == "empty":
            cap.status.empty_pages += 1
        elif kind == "delete":
            app.status.deletes_applied += 1
        elif kind == "cycle":
            app.status.cycles_broken += 1
        elif kind == "retry":  # what Daemon.retry does with the parts it replaces
            new_cap, new_app = _parts()
            carry_over(cap, app, new_cap, new_app)  # type: ignore[arg-type]
            cap, app = new_cap, new_app
        elif kind == "lag":
            lag = step[1]
        captured = sum(batches)
        applied = sum(batches[: applied_seq + 1])
        ns = {"namespace": "app.a", "state": "running", "captured_seq": len(batches) - 1, "captured_events": captured,
              "applied_seq": applied_seq, "applied_events": applied, "pending_batches": len(batches) - 1 - applied_seq,
              "pending_events": captured - applied, "lag_seconds": lag, "caught_up_at": None, "freshness": "behind",
              "last_capture_contact": None, "empty_pages": cap.status.empty_pages, "deferred": 0,
              "throughput_eps": 0.0, "last_error": "", "last_error_at": None, "phase": "catching up"}
        registry = build_registry(_status_of([ns]), {"app.a": PartCounters.read(cap, app)})
        for name, samples in registry.samples.items():
            for sample in samples:
                assert sample.value >= 0, (name, sample)
                if FAMILIES[name][0] == "counter":
                    key = (name, sample.labels)
                    assert sample.value >= previous.get(key, 0.0), (name, step)
                    previous[key] = sample.value
        # Nothing counted before a retry is lost by it.
        assert registry.value("cosmigrate_source_throttled_total", namespace="app.a") == counted["throttle"]
        assert registry.value("cosmigrate_empty_pages_total", namespace="app.a") == counted["empty"]
        assert registry.value("cosmigrate_deletes_applied_total", namespace="app.a") == counted["delete"]


def test_emf_sends_increases_and_every_declared_metric() -> None:
    emf = EmfWriter("cosmigrate")
    ns = dict(namespace="app.a", state="failed", captured_events=10, applied_events=4, empty_pages=1, lag_seconds=3.5,
              pending_events=6, deferred=0)
    first = [json.loads(line) for line in emf.lines({**_status_of([ns]), "gap_in_seconds": 3.5}, {"app.a": PartCounters(throttled=2)})]
    ns.update(captured_events=25, applied_events=20)
    second = [json.loads(line) for line in emf.lines(_status_of([ns]), {"app.a": PartCounters(throttled=7)})]
    for record in first + second:
        (directive,) = record["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "cosmigrate" and isinstance(record["_aws"]["Timestamp"], int)
        for dims in directive["Dimensions"]:
            assert all(isinstance(record[d], str) for d in dims)
        for metric in directive["Metrics"]:
            assert isinstance(record[metric["Name"]], float) and record[metric["Name"]] >= 0
    assert [m["Name"] for m in first[0]["_aws"]["CloudWatchMetrics"][0]["Metrics"]] == list(EMF_NAMESPACE_METRICS)
    assert [m["Name"] for m in first[1]["_aws"]["CloudWatchMetrics"][0]["Metrics"]] == list(EMF_CLUSTER_METRICS)
    # Cumulative counts go out as the increase since the last line (CloudWatch sums them per period).
    assert first[0]["EventsCaptured"] == 0 and second[0]["EventsCaptured"] == 15 and second[0]["SourceThrottles"] == 5
    assert second[1]["SourceThrottles"] == 5 and first[1]["FailedNamespaces"] == 1 and first[1]["GapSeconds"] == 3.5
    assert first[0]["Collection"] == "app.a" and first[0]["Cluster"] == "c" and first[0]["Failed"] == 1


# --- a real daemon ------------------------------------------------------------------------------------------------


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


async def _raw(host: str, port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def test_http_endpoint_and_ctl_metrics_on_a_daemon_with_deletes_and_throttling(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient) -> None:
    sandbox.source.faults.deletes_preview = True
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", deletes_preview=True)
    cfg.metrics.listen = "127.0.0.1:0"
    await source.app.a.insert_many([{"_id": i, "v": i} for i in range(20)])
    async with Running(cfg) as run:
        await run.writer("start")
        assert run.daemon.metrics.address is not None
        host, port = run.daemon.metrics.address
        await wait_for(lambda: _count(target.app.a, 20), 30, what="the documents on the target")
        await source.app.a.delete_one({"_id": 3})
        await wait_for(lambda: _count(target.app.a, 19), 30, what="the delete on the target")
        sandbox.source.faults.throttle_rate = 0.5
        await wait_for(lambda: _async(run.daemon.units["app.a"].capture.status.throttled > 0), 30, what="a throttled read")
        sandbox.source.faults.throttle_rate = 0.0

        code, ctype, body = await asyncio.to_thread(_get, f"http://{host}:{port}/metrics")
        assert code == 200 and ctype.startswith("text/plain; version=0.0.4"), (code, ctype)
        s = _scrape(body)
        assert _one(s, "cosmigrate_deletes_applied_total", namespace="app.a") == 1
        assert _one(s, "cosmigrate_source_throttled_total", namespace="app.a") >= 1
        assert _one(s, "cosmigrate_events_captured_total", namespace="app.a", partition="all") >= 21
        assert _one(s, "cosmigrate_captured_bytes_total", namespace="app.a", partition="all") > 0
        assert _one(s, "cosmigrate_stored_bytes_total", namespace="app.a") > 0
        assert _one(s, "cosmigrate_writer_started") == 1
        assert _one(s, "cosmigrate_verification_mismatches", namespace="app.a") == 0
        status = await run.status()
        users = run.ns_status(status, "app.a")
        assert _one(s, "cosmigrate_backfill_documents_total", namespace="app.a") <= users["docs_copied"]
        assert _one(s, "cosmigrate_backfill_documents_total", namespace="app.a") > 0
        assert (await asyncio.to_thread(_get, f"http://{host}:{port}/other"))[0] == 404
        assert (await _raw(host, port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert (await _raw(host, port, b"POST /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")

        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "cosmigrate", "ctl", "metrics", "--socket", cfg.control.socket],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert _one(_scrape(result.stdout), "cosmigrate_deletes_applied_total", namespace="app.a") == 1
    sandbox.source.faults.deletes_preview = False


def test_the_endpoint_is_off_by_default() -> None:
    from cosmigrate.config import Config

    assert Config().metrics.listen == "" and Config().metrics.cloudwatch is False


async def _count(coll: Any, n: int) -> bool:
    return await coll.count_documents({}) == n


async def _async(value: bool) -> bool:
    return value


# --- a real process: first line with the version, progress lines, EMF lines ---------------------------------------


async def test_a_process_logs_its_version_progress_at_info_and_emf_lines(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    await source.app.create_collection("a")  # no events yet: the first EMF line of app.a is the baseline (0)
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.log.level = "info"
    cfg.log.progress_interval_s = 0.3
    cfg.metrics.cloudwatch = True
    cfg.metrics.cloudwatch_interval_s = 0.3
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        await wait_for(lambda: _async(any(e.get("Collection") == "app.a" for e in child.events())), 60,
                       what="a first EMF line for app.a")
        await source.app.a.insert_many([{"_id": i} for i in range(5)])

        async def progressed() -> bool:
            return any(e.get("event", "").startswith("app.a: captured 5, applied 0") for e in child.events())

        await wait_for(progressed, 60, what="a progress line")
        await wait_for(lambda: _async(sum("_aws" in e for e in child.events()) >= 4), 30, what="EMF lines")
        # The progress line and the EMF lines come from two timers: wait for an EMF line past the fifth event too.
        await wait_for(lambda: _async(sum(e.get("EventsCaptured", 0) for e in child.events()
                                          if "_aws" in e and e.get("Collection") == "app.a") >= 5),
                       30, what="EMF increases reaching the five events")
    finally:
        assert await child.finish(signal.SIGTERM) == 0
    events = child.events()
    first = events[0]
    assert first["event"].startswith("cosmigrate 0.1.0 starting") and first["version"] == "0.1.0"
    progress = next(e for e in events if e.get("event", "").startswith("app.a: captured"))
    # app.a was empty when its backfill began: the phase is backfill until the monitor sees that head reached,
    # then capturing (tailing, with the writer stopped); which one the first line shows is a matter of timing.
    assert progress["level"] == "info" and progress["phase"] in ("backfill", "capturing")
    assert progress["namespace"] == "app.a"
    assert {"captured", "applied", "lag_s", "pending"} <= set(progress)
    emf = [e for e in events if "_aws" in e]
    per_ns = [e for e in emf if e.get("Collection") == "app.a"]
    assert per_ns and all(e["Cluster"] == "test" for e in emf)
    assert sum(e["EventsCaptured"] for e in per_ns) == 5  # increases add up to the total
