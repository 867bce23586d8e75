"""The status an operator watches before cutover (`ctl status`, systemd STATUS=).

Lag is measured against the source's head, never inferred from silence: the
daemon samples each namespace's head position every few seconds (see
`cosmigrate.freshness`). `lag_seconds` is 0 when the namespace has captured
and applied up to its latest head sample, otherwise now - the latest sampled
moment that is both captured and applied (`caught_up_at`). `gap_in_seconds`
is the largest lag. Ready for cutover = writer started, every namespace
healthy, nothing deferred, and every namespace caught up to a head sampled
within the threshold. A namespace whose head cannot be sampled has unknown
freshness and blocks readiness, with a reason that says what to grant.
A unit another worker holds is judged here too, from the ledger and this
worker's own head samples (`cosmigrate.readiness`), so READY means the same
on every worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cosmigrate import __version__
from cosmigrate.backfill import BACKFILL, DROPPED, totals
from cosmigrate.clock import Mono, Wall
from cosmigrate.cluster import ELSEWHERE, EXPIRED, unit_lease, workers
from cosmigrate.mongo import matches_patterns
from cosmigrate.planrecord import plan_status
from cosmigrate.readiness import Published
from cosmigrate.ttl import ttl_state

if TYPE_CHECKING:
    from cosmigrate.capture import NamespaceCapture
    from cosmigrate.config import Config
    from cosmigrate.worker import Worker

NAMESPACE_FIELDS = (
    "namespace", "state", "captured_seq", "captured_events", "applied_seq", "applied_events", "pending_batches",
    "pending_events", "lag_seconds", "caught_up_at", "freshness", "last_capture_contact", "empty_pages", "deferred",
    "deferred_reason", "expiry", "ttl_decision", "partitions", "throughput_eps", "last_error", "last_error_at", "phase",
    # deletes, verification (cosmigrate.proof)
    "deletes_tier", "deletes_reconciled_at", "deletes_applied", "sweep_progress", "documents_verified", "mismatches",
    "last_verify_pass",
    # the full load (cosmigrate.backfill) and the index plan (cosmigrate.indexplan)
    "load_phase", "docs_copied", "docs_estimated", "percent", "rate_docs_per_s", "eta_s", "backfill_reason", "indexes",
    # workers (cosmigrate.cluster)
    "worker", "lease", "worker_heartbeat_age_s",
)
CLUSTER_FIELDS = (
    "cluster_name", "version", "uptime_s", "current_time", "writer", "gap_in_seconds", "cutover_threshold_seconds",
    "ready_for_cutover", "not_ready_reasons", "needs_operator", "insecure_target_tls", "namespaces", "cutover", "backfill",
    "plan", "this_worker", "workers",
)
STATES = ("starting", "running", "paused", "failed", "fenced", "stopped", "elsewhere")
PHASES = ("backfill", "dropped", "capturing", "catching up", "in sync", "failed", "fenced", "stopped", "elsewhere")
NO_BACKFILL = {"load_phase": "", "docs_copied": 0, "docs_estimated": None, "percent": 0.0, "rate_docs_per_s": 0.0,
               "eta_s": None, "backfill_reason": ""}


def phase(state: str, freshness: str, load_phase: str = "") -> str:
    """Where a namespace is in the migration, in one word or two (the progress log line, the table, metrics).

    backfill: its full load has not applied the head sampled when it began; dropped: the collection was
    dropped at the source during its backfill. Once tailing: capturing: the writer is stopped, changes pile
    up for later; catching up: applying, not yet at the source head; in sync: applying and caught up to a
    recent head sample; failed / fenced / stopped.
    """
    if load_phase == DROPPED:
        return DROPPED
    if state in ("failed", "fenced", "stopped", "elsewhere"):
        return state
    if load_phase == BACKFILL:
        return BACKFILL
    if state in ("failed", "fenced", "stopped"):
        return state
    if state == "starting":
        return "capturing"
    if state == "paused":
        return "capturing"
    return "in sync" if freshness == "current" else "catching up"


def _expiry(ns: str, cap: NamespaceCapture | None, cfg: Config, blocking: list[str],
            pending: list[str] | None = None) -> dict[str, str]:
    """The namespace's `expiry` and `ttl_decision` fields (`cosmigrate.ttl`); a `_ts` TTL without a decision, or
    indexes that could not be read, add to `blocking`. Not read yet (capture reads them beside its watchers):
    unknown, and blocking too, but in `pending` when given: that clears by itself, and a cutover waits for it
    instead of calling it the operator's (a loaded source answered the read after the cutover's first look)."""
    if cap is None:
        return {"expiry": "", "ttl_decision": ""}
    if cap.status.ttl_indexes is None:
        (blocking if pending is None else pending).append(f"{ns}: expiry unknown (the source's indexes are not read yet)")
        return {"expiry": "unknown: the source's indexes are not read yet", "ttl_decision": "unknown"}
    state = ttl_state(ns, cap.status.ttl_indexes, cfg, cap.status.ttl_unknown)
    if state.blocking:
        blocking.append(state.blocking)
    return {"expiry": state.describe(), "ttl_decision": state.decision_text}


def _latest_error(*candidates: tuple[str, Wall | None]) -> tuple[str, Wall | None]:
    """The most recent non-empty (error, when) pair; ("", None) when every part is healthy."""
    found = [c for c in candidates if c[0]]
    return max(found, key=lambda c: c[1] or Wall(0.0)) if found else ("", None)


def _iso(ts: Wall | None) -> str | None:
    return None if ts is None or not ts.s else ts.iso()


def publishable(worker: Worker, ns: str, now: Mono) -> Published | None:
    """What the holder of unit `ns` publishes for the other workers' READY (`cosmigrate.readiness`): every
    reason this worker alone can see, and the head its delete sweep covers. None when it runs no capture of
    `ns` (nothing to vouch for). Freshness is not in it: each asking worker proves that itself."""
    unit = worker.units.get(ns)
    held = worker.keeper.holds(ns) if worker.keeper is not None else None
    if unit is None or held is None:
        return None
    cap, app = unit.capture, unit.applier
    blocks: list[str] = []
    states = {cap.status.state, app.status.state}
    if "failed" in states or cap.status.partition_failed:
        blocks.append(f"{ns}: failed (see last_error on its worker)")
    elif "fenced" in states:
        blocks.append(f"{ns}: fenced")
    elif cap.status.state == "starting":
        blocks.append(f"{ns}: starting")
    if app.status.deferred:
        blocks.append(f"{ns}: {app.status.deferred} writes deferred by unique-index conflicts"
                      + (f" ({app.status.deferred_reason})" if app.status.deferred_reason else ""))
    if not unit.builder.unique_ready.is_set():
        blocks.append(f"{ns}: index plan not ready ({unit.builder.summary()})")
    load_phase = unit.backfill.phase
    if load_phase in (BACKFILL, DROPPED):
        blocks.append(f"{ns}: full load {load_phase}")
    _expiry(ns, cap, worker.cfg, blocks)
    always, head, why = False, None, "deletes are not tracked by this worker"
    if worker.proof is not None:
        blocks += worker.proof.verification.reasons([ns]) if worker.proof.verification is not None else []
        if worker.proof.deletes is not None:
            always, head, why = worker.proof.deletes.claim(ns)
    return Published(worker.keeper.me.id if worker.keeper is not None else "", tuple(blocks),
                     fence_over=not held.write_block(now), deletes_always=always, deletes_head=head, deletes_why=why,
                     written_at=Wall.now())


async def build_status(worker: Worker, fresh_after: Mono | None = None, proof: bool = True,
                       judged_at: Mono | None = None) -> dict[str, Any]:
    """Assemble the status object from the ledger, the head samples and the in-memory tasks.

    `fresh_after`: a namespace shows lag 0 only when it reached a head sampled at or after this
    moment, on the monotonic clock (`ctl status` samples on demand and passes the request's time;
    the periodic STATUS= line accepts the last couple of sampling rounds). Lag and "current" are
    monotonic: a wall clock stepped back must never turn an old catch-up into lag 0. `proof=False`
    leaves out the reasons that deletes and verification add (cutover's precheck: the cutover
    resolves those itself). `judged_at`: the moment "current" (caught up to a head sampled less than the
    threshold before it) is judged at, now if None. `ctl status` passes the moment it was asked: it samples
    every head first, and with thousands of units over a real round trip to Azure the first samples would
    otherwise be older than the threshold by the time the last one returns, and READY would never come,
    though each unit was caught up to a head sampled after the question. Lag is still measured now.
    """
    assert worker.ledger is not None
    now = Wall.now()
    mono = Mono.now()
    if fresh_after is None:
        round_s = worker.sampler.round_s if worker.sampler is not None else worker.cfg.capture.head_sample_interval_s
        fresh_after = mono.minus(max(2 * round_s, 1.0))
    writer = "started" if worker.gate.started else "stopped"
    threshold = worker.cfg.apply.cutover_threshold_seconds
    include, exclude = worker.cfg.capture.include, worker.cfg.capture.exclude
    namespaces: list[dict[str, Any]] = []
    stale: list[str] = []
    lease_blocks: list[tuple[str, str]] = []  # (lease, why) of the units not writable here
    foreign_blocks: list[str] = []  # why the units other workers hold are not ready, as proven here
    cut_here: list[tuple[str, str]] = []  # the units other workers hold: a cutover on this worker waits for them
    local: list[str] = []  # the namespaces judged by this worker's own parts
    at = mono
    expiry: list[str] = []
    expiry_unread: list[str] = []
    for meta in await worker.ledger.list_namespaces():
        if not matches_patterns(meta.ns, include, exclude):
            continue  # excluded (SIGHUP or config): not part of the migration any more
        held = unit_lease(worker.keeper, meta.ns, at)
        unit = worker.units.get(meta.ns)
        cap, app, fresh = (unit.capture, unit.applier, unit.freshness) if unit is not None else (None, None, None)
        foreign = held.lease == ELSEWHERE and cap is None
        if held.block:
            (cut_here if foreign else lease_blocks).append((held.lease, held.block))
        committed_seq = meta.next_seq - 1
        if not foreign:
            local.append(meta.ns)
        if foreign:  # judged here from the ledger and this worker's own head samples (`cosmigrate.readiness`)
            judged = worker.foreign.judge(meta.ns, held.worker, threshold, worker.cfg.leases.renew_s, mono,
                                          fresh_after, judged_at)
            foreign_blocks += judged.blocks
            lag, freshness, caught_up_at = judged.lag, judged.freshness, None
        elif fresh is not None:
            fresh.update(committed_seq, meta.applied_seq)
            lag = fresh.lag(mono, fresh_after=fresh_after)
            if fresh.unknown_reason:
                freshness = f"unknown: {fresh.unknown_reason}"
            elif not fresh.sampled:
                freshness = "not sampled yet"
            elif fresh.last_sample_error:
                # The latest attempt failed: whatever was proven before says nothing about writes since.
                freshness = f"source head unreachable: {fresh.last_sample_error[:160]}"
            elif fresh.current(threshold, judged_at or mono):
                freshness = "current"
            else:
                freshness = "behind"
            caught_up_at = fresh.caught_up_at
        else:
            since = cap.status.started_at if cap else worker.started_at
            lag, freshness, caught_up_at = max(0.0, now - since), "not sampled yet", None
        if held.lease == EXPIRED and cap is None:
            freshness = "no worker holds it"
        elif freshness != "current" and not foreign:
            stale.append(f"{meta.ns} ({freshness})")
        states = [s for s in (cap.status.state if cap else None, app.status.state if app else None) if s]
        if meta.state == "failed" or "failed" in states or (cap is not None and cap.status.partition_failed):
            state = "failed"  # a failed partition too: the others go on, but its changes are not read
        elif "fenced" in states:
            state = "fenced"
        elif cap is None and held.lease in (ELSEWHERE, EXPIRED):
            state = "elsewhere"  # another worker runs it (or ran it: see `lease`); not_ready_reasons says which
        elif cap is None:
            state = "stopped"
        elif cap.status.state == "starting":
            state = "starting"  # no start position recorded yet: a bulk copy begun now could miss changes
        elif writer == "stopped":
            state = "paused"
        else:
            state = "running"
        error, error_at = _latest_error(
            (meta.last_error if meta.state == "failed" else "", Wall(meta.updated_at)),  # wall seconds in the ledger
            (cap.status.last_error, cap.status.last_error_at) if cap else ("", None),
            (app.status.last_error, app.status.last_error_at) if app else ("", None),
        )
        namespaces.append({
            "namespace": meta.ns,
            "state": state,
            "captured_seq": committed_seq,
            "captured_events": meta.captured_events,
            "applied_seq": meta.applied_seq,
            "applied_events": meta.applied_events,
            "pending_batches": max(0, committed_seq - meta.applied_seq),
            "pending_events": max(0, meta.captured_events - meta.applied_events),
            "lag_seconds": round(lag, 3),
            "caught_up_at": _iso(caught_up_at),
            "freshness": freshness,
            "last_capture_contact": _iso(cap.status.last_contact) if cap else None,
            "empty_pages": cap.status.empty_pages if cap else 0,
            "deferred": app.status.deferred if app else 0,
            "deferred_reason": app.status.deferred_reason if app and app.status.deferred else "",
            **_expiry(meta.ns, cap, worker.cfg, expiry, expiry_unread),
            "partitions": list(cap.status.partitions) if cap else [],
            "throughput_eps": round(app.status.throughput(), 1) if app else 0.0,
            "last_error": error,
            "last_error_at": _iso(error_at),
            "phase": phase(state, freshness),  # refined below once the full-load phase is known
            **(worker.proof.fields(meta.ns) if worker.proof is not None else {}),
        })
        namespaces[-1].update(unit.backfill.fields(meta.applied_events) if unit is not None else NO_BACKFILL)
        namespaces[-1]["phase"] = phase(state, freshness, namespaces[-1]["load_phase"])
        namespaces[-1]["indexes"] = unit.builder.summary() if unit is not None else ""
        namespaces[-1].update(worker=held.worker, lease=held.lease, worker_heartbeat_age_s=held.heartbeat_age_s)
    gap = max((n["lag_seconds"] for n in namespaces), default=0.0)
    reasons = []
    operator = []  # the reasons only an operator clears (a cutover fails on them at once, never waits)
    if writer != "started":
        operator.append("writer is stopped (run `cosmigrate ctl writer start`)")
    failed = [n["namespace"] for n in namespaces if n["state"] in ("failed", "fenced")]
    if failed:
        operator.append(f"namespaces not healthy: {', '.join(failed)} failed (see last_error; `cosmigrate ctl retry "
                        "NAMESPACE` once fixed)")
    listed = {n["namespace"] for n in namespaces}
    unclaimed = sorted(u for u in (worker.keeper.leases if worker.keeper is not None else {})
                       if u not in listed and matches_patterns(u, include, exclude))
    if unclaimed:  # a lease item but no ledger record yet: taken (or about to be) and not started
        reasons.append(f"units not started yet: {', '.join(unclaimed[:10])}"
                       + (f"; and {len(unclaimed) - 10} more" if len(unclaimed) > 10 else ""))
    if foreign_blocks:
        more = f"; and {len(foreign_blocks) - 10} more" if len(foreign_blocks) > 10 else ""
        reasons.append(f"units held by other workers are not ready: {'; '.join(foreign_blocks[:10])}{more}")
    elsewhere = [why for lease, why in lease_blocks + (cut_here if not proof else []) if lease == ELSEWHERE]
    if elsewhere:  # the cutover's precheck: a cutover here cannot stop their writes.
        # Not an operator reason: a worker that just started sees a crashed holder's lease as held until it is
        # taken (at once under its own lock, else after expiry), and a cutover started then must wait, not fail.
        more = f"; and {len(elsewhere) - 10} more" if len(elsewhere) > 10 else ""
        reasons.append(f"units held by other workers (stop them to cut over here): {'; '.join(elsewhere[:10])}{more}")
    waiting = [why for lease, why in lease_blocks if lease != ELSEWHERE]
    if waiting:  # ownerless (taken at the next balance round), or in a new owner's fence wait
        more = f"; and {len(waiting) - 10} more" if len(waiting) > 10 else ""
        reasons.append(f"units not ready yet: {'; '.join(waiting[:10])}{more}")
    refused = [f"{ns} ({why})" for ns, why in sorted(worker.not_captured.items()) if matches_patterns(ns, include, exclude)]
    if refused:  # they exist on the source and nothing migrates them: never ready while there are any
        more = f"; and {len(refused) - 10} more" if len(refused) > 10 else ""
        operator.append(f"namespaces not captured: {'; '.join(refused[:10])}{more}")
    deferred = sum(n["deferred"] for n in namespaces)
    if deferred:
        lasting = [f"{n['namespace']}: {n['deferred_reason']}" for n in namespaces if n["deferred_reason"]]
        operator.append(f"{deferred} writes deferred by unique-index conflicts" + (f" ({'; '.join(lasting)})" if lasting else ""))
    if expiry:  # a `[ttl]` decision in the config: only the operator makes it
        operator.append(f"source expiry (TTL) needs a decision, or is not known: {'; '.join(expiry)}")
    reasons += operator
    if expiry_unread:  # capture reads them beside its watchers: waited for, not the operator's
        more = f"; and {len(expiry_unread) - 10} more" if len(expiry_unread) > 10 else ""
        reasons.append(f"source expiry (TTL) not read yet: {'; '.join(expiry_unread[:10])}{more}")
    unhealthy = [n["namespace"] for n in namespaces if n["state"] in ("stopped", "starting")]
    if unhealthy:
        reasons.append(f"namespaces not healthy yet (starting): {', '.join(unhealthy)}")
    in_backfill = [f"{n['namespace']} ({n['percent']:g}%)" for n in namespaces if n["load_phase"] == BACKFILL]
    if in_backfill:
        reasons.append("backfill not complete (the head sampled at its start is not applied yet): "
                       f"{', '.join(in_backfill)}")
    dropped = [n["namespace"] for n in namespaces if n["load_phase"] == DROPPED]
    if dropped:
        operator.append(f"collections dropped at the source during their backfill (incomplete on the target; exclude "
                       f"them with capture.exclude and drop them on the target): {', '.join(dropped)}")
        reasons.append(operator[-1])
    if stale:
        reasons.append(f"not caught up to a source head sampled in the last {threshold:g}s: {'; '.join(stale)}")
    if gap >= threshold:
        reasons.append(f"gap {gap:.1f}s is not under {threshold:g}s")
    unwatched = [ns for ns in worker.unwatched if ns not in worker.units and matches_patterns(ns, include, exclude)]
    if unwatched:
        reasons.append(f"collections on the source not captured yet (discovery is starting them): {', '.join(unwatched)}")
    if worker.unlisted:
        reasons.append(f"cannot list the source's collections: {worker.unlisted}")
    if not namespaces:
        reasons.append("no namespace is being captured yet")
    cutover = worker.proof.cutover_status() if worker.proof is not None else "not started"
    if proof and worker.proof is not None:
        reasons += worker.proof.reasons(local)  # the other workers' units: in their published readiness
        if cutover == "cutover complete":
            reasons.append("cutover complete: the applications use the target now")
    return {
        "cluster_name": worker.cfg.cluster_name,
        "version": __version__,
        "uptime_s": round(max(0.0, now - worker.started_at), 1),
        "current_time": _iso(now),
        "writer": writer,
        "gap_in_seconds": round(gap, 3),
        "cutover_threshold_seconds": threshold,
        "ready_for_cutover": not reasons,
        "not_ready_reasons": reasons,
        "needs_operator": operator,
        "insecure_target_tls": not worker.target_tls.secure,  # only with target.allow_insecure_tls = true
        "namespaces": namespaces,
        "cutover": cutover,
        "backfill": totals(namespaces),
        "plan": plan_status(worker, {n["namespace"]: n["applied_events"] for n in namespaces}),
        "this_worker": worker.keeper.me.id if worker.keeper is not None else "",
        "workers": workers(worker.keeper, at),
    }


def one_line(status: dict[str, Any]) -> str:
    """A summary for systemd's STATUS= and the demo's progress line."""
    failed = sum(1 for n in status["namespaces"] if n["state"] in ("failed", "fenced"))
    if status.get("cutover") == "cutover complete":
        return f"cutover complete, writer {status['writer']}, {len(status['namespaces'])} namespaces"
    load = status.get("backfill") or {}
    backfill = ""
    if load.get("namespaces_in_backfill"):
        eta = load.get("eta_s")
        backfill = (f", backfill {load['percent']:g}% ({load['docs_copied']}/{load['docs_estimated']} docs, "
                    f"{load['rate_docs_per_s']:.0f}/s, eta {'unknown' if eta is None else f'{eta:.0f}s'})")
    return (f"writer {status['writer']}, gap {status['gap_in_seconds']:.1f}s, "
            f"{len(status['namespaces'])} namespaces, {failed} failed, "
            f"{'READY for cutover' if status['ready_for_cutover'] else 'not ready'}{backfill}"
            f"{', TARGET TLS OFF OR UNVERIFIED' if status.get('insecure_target_tls') else ''}")
