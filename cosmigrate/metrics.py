"""Metrics: the daemon's state as Prometheus text and as CloudWatch embedded-metric-format lines.

One registry is built per scrape from the status object (`cosmigrate.status`)
plus the few in-memory counters that status does not show (bytes, source
throttles, deletes). Every status figure can be read back from the metrics
(tests/test_metrics.py derives the status from a scrape): counts instead of
seqs (a gauge is never negative, and a seq starts at -1), timestamps as Unix
seconds with 0 for "never", states as one-hot gauges.

- Counters only grow for as long as their series exists: the ledger's event
  counts only grow, and the in-memory ones are carried over when a namespace
  is retried (`carry_over`). A namespace dropped by a SIGHUP exclude leaves
  the scrape; if it comes back, its in-memory counters start again at 0, which
  Prometheus reads as a counter reset.
- The full load and verification: `cosmigrate_backfill_documents_total`
  (status `docs_copied`, the applied events of a namespace loaded from the
  beginning), `cosmigrate_backfill_percent`; `cosmigrate_verified_documents`
  and `cosmigrate_verification_mismatches` are gauges (the latest pass's
  equal documents, the mismatches not yet found equal again), as in status.
- Partitions: capture reads one change stream per collection today, so the
  per-partition families carry `partition="all"`.

Outputs: `cosmigrate ctl metrics` (control socket), an optional HTTP endpoint
(`metrics.listen`, off by default, no authentication: bind it to loopback or
guard it with the security group), and with `metrics.cloudwatch = true` one
EMF JSON line per namespace plus one for the cluster on stdout every
`metrics.cloudwatch_interval_s`, which CloudWatch Logs turns into metrics
(deploy/cloudwatch/ ships the agent configuration and the template's alarms).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from cosmigrate.clock import Wall
from cosmigrate.logs import get_logger
from cosmigrate.status import PHASES, STATES
from cosmigrate.timeouts import within

if TYPE_CHECKING:
    from cosmigrate.apply import NamespaceApplier
    from cosmigrate.capture import NamespaceCapture
    from cosmigrate.worker import Worker

PARTITION = "all"
"""The partition label: one change stream per collection today."""
FRESHNESS_KINDS = ("current", "behind", "not sampled yet", "source head unreachable", "unknown")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HTTP_CLIENTS = 8
HTTP_READ_TIMEOUT_S = 5.0
MAX_REQUEST_HEAD_BYTES = 8192

# name -> (type, help). The one table of what is exported; `render` keeps this order.
FAMILIES: dict[str, tuple[str, str]] = {
    "cosmigrate_build_info": ("gauge", "Always 1; the labels carry the version, the cluster name and this worker's id."),
    "cosmigrate_worker_units": ("gauge", "Units (namespaces) each worker of the cluster holds, as this worker last read them."),
    "cosmigrate_uptime_seconds": ("gauge", "Seconds since the daemon started."),
    "cosmigrate_writer_started": ("gauge", "1 while the writer is started (changes are applied to the target)."),
    "cosmigrate_ready_for_cutover": ("gauge", "1 when status says READY FOR CUTOVER."),
    "cosmigrate_not_ready_reasons": ("gauge", "How many reasons status gives for not being ready."),
    "cosmigrate_gap_seconds": ("gauge", "The largest namespace lag (status gap_in_seconds)."),
    "cosmigrate_cutover_threshold_seconds": ("gauge", "apply.cutover_threshold_seconds: readiness needs the gap under it."),
    "cosmigrate_namespaces": ("gauge", "Namespaces in each state."),
    "cosmigrate_events_captured_total": ("counter", "Change events committed to the ledger (all daemons, since the start)."),
    "cosmigrate_events_applied_total": ("counter", "Change events applied to the target (all daemons, since the start)."),
    "cosmigrate_batches_captured_total": ("counter", "Batches committed (status captured_seq + 1)."),
    "cosmigrate_batches_applied_total": ("counter", "Batches applied (status applied_seq + 1)."),
    "cosmigrate_pending_events": ("gauge", "Events captured but not applied yet."),
    "cosmigrate_pending_batches": ("gauge", "Batches captured but not applied yet."),
    "cosmigrate_captured_bytes_total": ("counter", "Raw BSON bytes of the events this daemon committed."),
    "cosmigrate_stored_bytes_total": ("counter", "Bytes this daemon put in the batch store (compressed)."),
    "cosmigrate_source_throttled_total": ("counter", "Source requests answered with throttling (16500) or a time limit."),
    "cosmigrate_empty_pages_total": ("counter", "Empty change-stream pages that came back at once (a throttled stream)."),
    "cosmigrate_deletes_applied_total": ("counter", "Delete events applied to the target (delete preview only)."),
    "cosmigrate_unique_cycles_broken_total": ("counter", "Unique-index cycles broken by rewriting the documents involved."),
    "cosmigrate_deferred_writes": ("gauge", "Writes parked by unique-index conflicts (block readiness)."),
    "cosmigrate_lag_seconds": ("gauge", "How far the target is behind the sampled source head (status lag_seconds)."),
    "cosmigrate_caught_up_timestamp_seconds": ("gauge", "The latest sampled moment captured and applied; 0 = never."),
    "cosmigrate_last_capture_contact_timestamp_seconds": ("gauge", "When the watcher last heard from the source; 0 = never."),
    "cosmigrate_last_error_timestamp_seconds": ("gauge", "When the namespace's current last_error was set; 0 = none."),
    "cosmigrate_applied_events_per_second": ("gauge", "Events applied per second over the last minute."),
    "cosmigrate_namespace_state": ("gauge", "1 for the namespace's state, 0 for the others."),
    "cosmigrate_namespace_phase": ("gauge", "1 for the namespace's phase, 0 for the others."),
    "cosmigrate_freshness": ("gauge", "1 for the kind of the namespace's freshness, 0 for the others."),
    "cosmigrate_process_asyncio_tasks": ("gauge", "asyncio tasks alive in the daemon (flat over hours; growth is a leak)."),
    "cosmigrate_process_open_fds": ("gauge", "File descriptors the daemon holds open (flat over hours; growth is a leak)."),
    "cosmigrate_backfill_documents_total": ("counter", "Events applied for the namespace since its full load began: one per "
                                                       "live document, plus the changes made meanwhile (status docs_copied)."),
    "cosmigrate_backfill_percent": ("gauge", "Full load progress: documents copied vs the source's count (100 once tailing)."),
    "cosmigrate_verified_documents": ("gauge", "Documents found equal on both sides by the latest verification pass."),
    "cosmigrate_verification_mismatches": ("gauge", "Documents found different by verification and not yet found equal "
                                                    "again (status mismatches)."),
}


def freshness_kind(freshness: str) -> str:
    """The status freshness text without its detail ("source head unreachable: timeout" -> its kind)."""
    for kind in FRESHNESS_KINDS:
        if freshness == kind or freshness.startswith(kind + ":"):
            return kind
    return "unknown"


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@dataclass
class PartCounters:
    """What capture and apply count in memory beyond the status object."""

    captured_bytes: int = 0
    stored_bytes: int = 0
    throttled: int = 0
    deletes_applied: int = 0
    cycles_broken: int = 0

    @classmethod
    def read(cls, cap: NamespaceCapture | None, app: NamespaceApplier | None) -> PartCounters:
        return cls(
            captured_bytes=cap.status.committed_bytes if cap else 0,
            stored_bytes=cap.status.stored_bytes if cap else 0,
            throttled=cap.status.throttled if cap else 0,
            deletes_applied=app.status.deletes_applied if app else 0,
            cycles_broken=app.status.cycles_broken if app else 0,
        )


def carry_over(old_cap: NamespaceCapture | None, old_app: NamespaceApplier | None,
               new_cap: NamespaceCapture, new_app: NamespaceApplier) -> None:
    """Give a restarted namespace's new capture and applier the counts of the ones they replace.

    `ctl retry` builds new parts; without this their counters (and the status's
    empty_pages) would fall back to 0 while the namespace's series go on.
    """
    if old_cap is not None:
        for name in ("committed_bytes", "stored_bytes", "throttled", "empty_pages", "events_read"):
            setattr(new_cap.status, name, getattr(new_cap.status, name) + getattr(old_cap.status, name))
        new_cap.status.started_at = old_cap.status.started_at
    if old_app is not None:
        for name in ("deletes_applied", "cycles_broken"):
            setattr(new_app.status, name, getattr(new_app.status, name) + getattr(old_app.status, name))
        new_app.status.recent.extend(old_app.status.recent)


@dataclass
class Sample:
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass
class Registry:
    """Metric families and their samples, in FAMILIES order when rendered."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, name: str, value: float, **labels: str) -> None:
        kind, _ = FAMILIES[name]
        value = float(value)
        if not math.isfinite(value) or value < 0:
            value = 0.0  # gauges and counters are never negative (a seq of -1 is exported as a count of 0)
        self.samples.setdefault(name, []).append(Sample(tuple(sorted(labels.items())), value))

    def value(self, name: str, **labels: str) -> float | None:
        want = tuple(sorted(labels.items()))
        return next((s.value for s in self.samples.get(name, []) if s.labels == want), None)

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        for name, (kind, help_text) in FAMILIES.items():
            lines.append(f"# HELP {name} {_escape_help(help_text)}")
            lines.append(f"# TYPE {name} {kind}")
            for sample in self.samples.get(name, []):
                labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels)
                lines.append(f"{name}{{{labels}}} {_number(sample.value)}" if labels else f"{name} {_number(sample.value)}")
        return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def build_registry(status: Mapping[str, Any], parts: Mapping[str, PartCounters]) -> Registry:
    """The registry for one scrape: `status` as built by `cosmigrate.status.build_status`."""
    reg = Registry()
    reg.add("cosmigrate_build_info", 1, version=str(status["version"]), cluster=str(status["cluster_name"]),
            worker=str(status.get("this_worker", "")))
    for w in status.get("workers", []):
        reg.add("cosmigrate_worker_units", len(w["units"]), worker=str(w["worker"]), host=str(w["host"]))
    reg.add("cosmigrate_uptime_seconds", status["uptime_s"])
    reg.add("cosmigrate_writer_started", status["writer"] == "started")
    reg.add("cosmigrate_ready_for_cutover", bool(status["ready_for_cutover"]))
    reg.add("cosmigrate_not_ready_reasons", len(status["not_ready_reasons"]))
    reg.add("cosmigrate_gap_seconds", status["gap_in_seconds"])
    reg.add("cosmigrate_cutover_threshold_seconds", status["cutover_threshold_seconds"])
    namespaces = status["namespaces"]
    for state in STATES:
        reg.add("cosmigrate_namespaces", sum(1 for n in namespaces if n["state"] == state), state=state)
    for n in namespaces:
        ns = str(n["namespace"])
        counts = parts.get(ns, PartCounters())
        reg.add("cosmigrate_events_captured_total", n["captured_events"], namespace=ns, partition=PARTITION)
        reg.add("cosmigrate_events_applied_total", n["applied_events"], namespace=ns, partition=PARTITION)
        reg.add("cosmigrate_batches_captured_total", n["captured_seq"] + 1, namespace=ns)
        reg.add("cosmigrate_batches_applied_total", n["applied_seq"] + 1, namespace=ns)
        reg.add("cosmigrate_pending_events", n["pending_events"], namespace=ns)
        reg.add("cosmigrate_pending_batches", n["pending_batches"], namespace=ns)
        reg.add("cosmigrate_captured_bytes_total", counts.captured_bytes, namespace=ns, partition=PARTITION)
        reg.add("cosmigrate_stored_bytes_total", counts.stored_bytes, namespace=ns)
        reg.add("cosmigrate_source_throttled_total", counts.throttled, namespace=ns)
        reg.add("cosmigrate_empty_pages_total", n["empty_pages"], namespace=ns)
        reg.add("cosmigrate_deletes_applied_total", counts.deletes_applied, namespace=ns)
        reg.add("cosmigrate_unique_cycles_broken_total", counts.cycles_broken, namespace=ns)
        reg.add("cosmigrate_deferred_writes", n["deferred"], namespace=ns)
        reg.add("cosmigrate_lag_seconds", n["lag_seconds"], namespace=ns)
        reg.add("cosmigrate_caught_up_timestamp_seconds", _epoch(n["caught_up_at"]), namespace=ns)
        reg.add("cosmigrate_last_capture_contact_timestamp_seconds", _epoch(n["last_capture_contact"]), namespace=ns)
        reg.add("cosmigrate_last_error_timestamp_seconds", _epoch(n["last_error_at"]), namespace=ns)
        reg.add("cosmigrate_applied_events_per_second", n["throughput_eps"], namespace=ns)
        for state in STATES:
            reg.add("cosmigrate_namespace_state", n["state"] == state, namespace=ns, state=state)
        for phase in PHASES:
            reg.add("cosmigrate_namespace_phase", n["phase"] == phase, namespace=ns, phase=phase)
        kind = freshness_kind(n["freshness"])
        for k in FRESHNESS_KINDS:
            reg.add("cosmigrate_freshness", k == kind, namespace=ns, freshness=k)
        reg.add("cosmigrate_backfill_documents_total", n.get("docs_copied") or 0, namespace=ns)
        reg.add("cosmigrate_backfill_percent", n.get("percent") or 0.0, namespace=ns)
        reg.add("cosmigrate_verified_documents", n.get("documents_verified") or 0, namespace=ns)
        reg.add("cosmigrate_verification_mismatches", n.get("mismatches") or 0, namespace=ns)
    return reg


# --- CloudWatch embedded metric format ------------------------------------------------------------------------

# EMF metric name -> (unit, how it is read, cumulative?). Cumulative ones are sent as the increase since the
# previous line, so that CloudWatch's Sum over a period is the count in that period (throttles per 5 minutes).
EMF_NAMESPACE_METRICS: dict[str, tuple[str, Callable[[Mapping[str, Any], PartCounters], float], bool]] = {
    "LagSeconds": ("Seconds", lambda n, c: n["lag_seconds"], False),
    "PendingEvents": ("Count", lambda n, c: n["pending_events"], False),
    "DeferredWrites": ("Count", lambda n, c: n["deferred"], False),
    "Failed": ("Count", lambda n, c: n["state"] == "failed", False),
    "EventsCaptured": ("Count", lambda n, c: n["captured_events"], True),
    "EventsApplied": ("Count", lambda n, c: n["applied_events"], True),
    "CapturedBytes": ("Bytes", lambda n, c: c.captured_bytes, True),
    "SourceThrottles": ("Count", lambda n, c: c.throttled, True),
    "EmptyPages": ("Count", lambda n, c: n["empty_pages"], True),
    "DeletesApplied": ("Count", lambda n, c: c.deletes_applied, True),
}
EMF_CLUSTER_METRICS = ("GapSeconds", "ReadyForCutover", "WriterStarted", "FailedNamespaces", "SourceThrottles",
                       "EventsCaptured", "EventsApplied", "UptimeSeconds")


class EmfWriter:
    """Builds EMF lines; remembers the previous cumulative values to send increases."""

    def __init__(self, cloudwatch_namespace: str) -> None:
        self.namespace = cloudwatch_namespace
        self._previous: dict[tuple[str, str], float] = {}

    def _increase(self, ns: str, name: str, total: float) -> float:
        before = self._previous.get((ns, name))
        self._previous[(ns, name)] = total
        if before is None or total < before:  # first line, or the counter started again (a re-included namespace)
            return total if before is not None else 0.0
        return total - before

    def lines(self, status: Mapping[str, Any], parts: Mapping[str, PartCounters], now: Wall | None = None) -> list[str]:
        timestamp = int((Wall.now() if now is None else now).s * 1000)
        cluster = str(status["cluster_name"])
        out: list[str] = []
        totals = {"SourceThrottles": 0.0, "EventsCaptured": 0.0, "EventsApplied": 0.0}
        for n in status["namespaces"]:
            ns = str(n["namespace"])
            counts = parts.get(ns, PartCounters())
            values: dict[str, float] = {}
            for name, (_, read, cumulative) in EMF_NAMESPACE_METRICS.items():
                value = max(0.0, float(read(n, counts)))
                values[name] = self._increase(ns, name, value) if cumulative else value
            for name in totals:
                totals[name] += values[name]
            out.append(self._line(timestamp, {"Cluster": cluster, "Collection": ns},
                                  {k: (EMF_NAMESPACE_METRICS[k][0], v) for k, v in values.items()}))
        cluster_values = {
            "GapSeconds": ("Seconds", float(status["gap_in_seconds"])),
            "ReadyForCutover": ("Count", float(bool(status["ready_for_cutover"]))),
            "WriterStarted": ("Count", float(status["writer"] == "started")),
            "FailedNamespaces": ("Count", float(sum(1 for n in status["namespaces"] if n["state"] == "failed"))),
            "SourceThrottles": ("Count", totals["SourceThrottles"]),
            "EventsCaptured": ("Count", totals["EventsCaptured"]),
            "EventsApplied": ("Count", totals["EventsApplied"]),
            "UptimeSeconds": ("Seconds", float(status["uptime_s"])),
        }
        out.append(self._line(timestamp, {"Cluster": cluster}, cluster_values))
        return out

    def _line(self, timestamp: int, dimensions: dict[str, str], values: dict[str, tuple[str, float]]) -> str:
        record: dict[str, Any] = {
            "_aws": {
                "Timestamp": timestamp,
                "CloudWatchMetrics": [{
                    "Namespace": self.namespace,
                    "Dimensions": [list(dimensions)],
                    "Metrics": [{"Name": name, "Unit": unit} for name, (unit, _) in values.items()],
                }],
            },
            **dimensions,
            **{name: value for name, (_, value) in values.items()},
        }
        return json.dumps(record, separators=(",", ":"))


# --- the daemon's side ----------------------------------------------------------------------------------------


class Metrics:
    """Scrapes one worker; serves `ctl metrics`, the HTTP endpoint and the EMF lines."""

    def __init__(self, worker: Worker, out: TextIO | None = None) -> None:
        self.worker = worker
        self.out = out
        self.log = get_logger(component="metrics")
        self._server: asyncio.Server | None = None
        self._clients = asyncio.Semaphore(MAX_HTTP_CLIENTS)
        self.address: tuple[str, int] | None = None

    def parts(self) -> dict[str, PartCounters]:
        return {unit.ns: PartCounters.read(unit.capture, unit.applier) for unit in self.worker.units.values()}

    async def registry(self) -> Registry:
        from cosmigrate.status import build_status

        status = await build_status(self.worker)
        reg = build_registry(status, self.parts())
        reg.add("cosmigrate_process_asyncio_tasks", len(asyncio.all_tasks()))
        with contextlib.suppress(OSError):  # /proc only on Linux: the gauge is then left out
            reg.add("cosmigrate_process_open_fds", len(os.listdir("/proc/self/fd")))
        return reg

    async def text(self) -> str:
        return (await self.registry()).render()

    # HTTP ------------------------------------------------------------------------------------------------------

    async def start_http(self, host: str, port: int) -> None:
        """Listen for GET /metrics; a port in use is a StartupError-worthy OSError for the caller."""
        self._server = await asyncio.start_server(self._serve_http, host, port, limit=MAX_REQUEST_HEAD_BYTES)
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self.log.info("metrics endpoint listening", url=f"http://{host}:{self.address[1]}/metrics")

    async def stop_http(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)
            self._server = None

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients.locked():  # a bounded number of scrapers: the rest are closed at once
            writer.close()
            return
        async with self._clients:
            try:
                head = await within(reader.readuntil(b"\r\n\r\n"), HTTP_READ_TIMEOUT_S)
                method, path = _request_line(head)
                if method not in ("GET", "HEAD"):
                    await _respond(writer, 405, "method not allowed\n", head_only=False)
                elif path.split("?", 1)[0] not in ("/metrics", "/"):
                    await _respond(writer, 404, "not found: the metrics are at /metrics\n", head_only=method == "HEAD")
                else:
                    await _respond(writer, 200, await self.text(), head_only=method == "HEAD", content_type=CONTENT_TYPE)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                with contextlib.suppress(Exception):
                    await _respond(writer, 400, "bad request\n", head_only=False)
            except (ConnectionError, OSError):
                pass
            except Exception:  # a scrape never takes the daemon down
                self.log.exception("metrics scrape failed")
                with contextlib.suppress(Exception):
                    await _respond(writer, 500, "internal error\n", head_only=False)
            finally:
                writer.close()

    # CloudWatch ------------------------------------------------------------------------------------------------

    async def emf_loop(self, interval_s: float, cloudwatch_namespace: str) -> None:
        """Every `interval_s`, one EMF line per namespace and one for the cluster on stdout."""
        from cosmigrate.ledger import LedgerError
        from cosmigrate.status import build_status

        emf = EmfWriter(cloudwatch_namespace)
        while True:
            await asyncio.sleep(interval_s)
            try:
                status = await build_status(self.worker)
            except LedgerError as exc:
                self.log.warning("metrics skipped a round: the ledger did not answer", error=str(exc))
                continue
            out = self.out or sys.stdout
            out.write("".join(line + "\n" for line in emf.lines(status, self.parts())))
            out.flush()


def _request_line(head: bytes) -> tuple[str, str]:
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = first.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request line")
    return parts[0], parts[1]


async def _respond(writer: asyncio.StreamWriter, code: int, body: str, *, head_only: bool,
                   content_type: str = "text/plain; charset=utf-8") -> None:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}[code]
    data = body.encode()
    writer.write(f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + (b"" if head_only else data))
    await writer.drain()
