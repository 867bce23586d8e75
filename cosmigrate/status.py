"""The status an operator watches before cutover (`ctl status`, systemd STATUS=).

Cosmos events carry no source timestamp, so lag is measured as the operator
feels it: per namespace, the age of the oldest captured batch not yet applied
(0 when none is pending). `gap_in_seconds` is the largest namespace lag, as in
the old recipe's status output. Ready for cutover = writer started, every
namespace healthy, nothing deferred, and the gap under the threshold.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cosmigrate.daemon import Daemon

NAMESPACE_FIELDS = (
    "namespace", "state", "captured_seq", "captured_events", "applied_seq", "applied_events", "pending_batches",
    "pending_events", "lag_seconds", "last_capture_contact", "deferred", "throughput_eps", "last_error",
)
CLUSTER_FIELDS = (
    "cluster_name", "current_time", "writer", "gap_in_seconds", "ready_for_cutover", "not_ready_reasons", "namespaces",
)


def _iso(ts: float) -> str | None:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def build_status(daemon: Daemon) -> dict[str, Any]:
    """Assemble the status object from the ledger and the in-memory tasks."""
    assert daemon.ledger is not None
    now = time.time()
    writer = "started" if daemon.gate.started else "stopped"
    namespaces: list[dict[str, Any]] = []
    for meta in await daemon.ledger.list_namespaces():
        cap = daemon.captures.get(meta.ns)
        app = daemon.appliers.get(meta.ns)
        lag = 0.0
        if meta.next_seq - 1 > meta.applied_seq:
            oldest = await daemon.ledger.list_batches(meta.ns, meta.applied_seq + 1, 1)
            if oldest:
                lag = max(0.0, now - oldest[0].first_captured_at)
        states = [s for s in (cap.status.state if cap else None, app.status.state if app else None) if s]
        if meta.state == "failed" or "failed" in states:
            state = "failed"
        elif "fenced" in states:
            state = "fenced"
        elif cap is None:
            state = "stopped"
        elif writer == "stopped":
            state = "paused"
        else:
            state = "running"
        errors = [e for e in (meta.last_error, cap.status.last_error if cap else "", app.status.last_error if app else "") if e]
        namespaces.append({
            "namespace": meta.ns,
            "state": state,
            "captured_seq": meta.next_seq - 1,
            "captured_events": meta.captured_events,
            "applied_seq": meta.applied_seq,
            "applied_events": meta.applied_events,
            "pending_batches": max(0, meta.next_seq - 1 - meta.applied_seq),
            "pending_events": max(0, meta.captured_events - meta.applied_events),
            "lag_seconds": round(lag, 3),
            "last_capture_contact": _iso(cap.status.last_contact) if cap else None,
            "deferred": app.status.deferred if app else 0,
            "throughput_eps": round(app.status.throughput(), 1) if app else 0.0,
            "last_error": errors[-1] if errors else "",
        })
    gap = max((n["lag_seconds"] for n in namespaces), default=0.0)
    threshold = daemon.cfg.apply.cutover_threshold_seconds
    reasons = []
    if writer != "started":
        reasons.append("writer is stopped (run `cosmigrate ctl writer start`)")
    unhealthy = [n["namespace"] for n in namespaces if n["state"] in ("failed", "fenced", "stopped")]
    if unhealthy:
        reasons.append(f"namespaces not healthy: {', '.join(unhealthy)}")
    deferred = sum(n["deferred"] for n in namespaces)
    if deferred:
        reasons.append(f"{deferred} writes deferred by unique-index conflicts")
    if gap >= threshold:
        reasons.append(f"gap {gap:.1f}s is not under {threshold:g}s")
    if not namespaces:
        reasons.append("no namespace is being captured yet")
    return {
        "cluster_name": daemon.cfg.cluster_name,
        "current_time": _iso(now),
        "writer": writer,
        "gap_in_seconds": round(gap, 3),
        "ready_for_cutover": not reasons,
        "not_ready_reasons": reasons,
        "namespaces": namespaces,
    }


def one_line(status: dict[str, Any]) -> str:
    """A summary for systemd's STATUS= and the demo's progress line."""
    failed = sum(1 for n in status["namespaces"] if n["state"] in ("failed", "fenced"))
    return (f"writer {status['writer']}, gap {status['gap_in_seconds']:.1f}s, "
            f"{len(status['namespaces'])} namespaces, {failed} failed, "
            f"{'READY for cutover' if status['ready_for_cutover'] else 'not ready'}")
