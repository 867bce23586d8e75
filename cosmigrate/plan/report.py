"""The plan as text: one block per collection, then the target, the estimate, AWS counts and the advice."""

from __future__ import annotations

from cosmigrate.indexplan import AFTER, BEFORE
from cosmigrate.plan import ttl
from cosmigrate.plan.estimate import CPU, SOURCE, TARGET
from cosmigrate.plan.planner import CollectionPlan, Plan


def _n(v: float | int | None, unit: str = "", digits: int = 0) -> str:
    if v is None:
        return "unknown"
    return f"{v:,.{digits}f}{unit}"


def _bytes(v: int | None) -> str:
    if v is None:
        return "unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if v >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v} B"


def _collection(c: CollectionPlan) -> list[str]:
    ru = f"{_n(c.ru_per_s)} RU/s ({c.ru_per_s_from})" if c.ru_per_s else "RU/s unknown"
    lines = [f"{c.ns}: {_n(c.documents)} documents, {_bytes(c.bytes)} (average {_n(c.avg_size, ' B')}), "
             f"{_n(c.partitions)} physical partitions, {ru}"]
    p = c.probe
    if p is not None:
        per = p.ru_per_doc
        lines.append(f"  RU probe: {p.docs:,} documents from {p.partitions} partitions, {p.ru:,.1f} RU "
                     f"({'unknown' if per is None else f'{per:.3f}'} RU/document), {p.seconds:.1f} s, "
                     f"{p.throttled} throttled answers; stopped by {p.stopped_by} (bounds: {p.bounds.docs:,} "
                     f"documents, {p.bounds.ru:,.0f} RU, {p.bounds.seconds:g} s)")
    f = c.figures()
    ru_total = f.documents * f.ru_per_doc if f.documents is not None and f.ru_per_doc is not None else None
    secs = ru_total / c.ru_per_s if ru_total is not None and c.ru_per_s else None
    lines.append(f"  source RU for the full load: {_n(ru_total)}" + (f" ({secs:,.1f} s at {c.ru_per_s:,.0f} RU/s)"
                                                                     if secs is not None else ""))
    for r in c.indexes:
        if r.action == "implicit":
            continue
        stage = "" if r.action != "build" else f" ({BEFORE if r.target and r.target.get('unique') else AFTER})"
        text = r.line().replace(f"{r.ns} ", "", 1)
        shown = r.ttl and not r.decision  # a `_ts` TTL's line already names its [ttl] decision
        lines.append(f"  index {text}{stage}" + (f"; TTL decision: {ttl.decision(r)}" if shown else ""))
    return lines


def render(plan: Plan) -> list[str]:
    o = plan.options
    lines = [f"cosmigrate plan: {len(plan.collections)} collection(s)" + (
        f"; probes bounded per collection (source feed: {o.source_bounds.docs:,} documents, "
        f"{o.source_bounds.ru:,.0f} RU, {o.source_bounds.seconds:g} s; target: {o.target_bounds.docs:,} documents, "
        f"{o.target_bounds.seconds:g} s)" if o.probes else "; no probes")]
    for c in plan.collections:
        lines += _collection(c)
    docs = sum(c.documents or 0 for c in plan.collections)
    known = all(c.documents is not None for c in plan.collections)
    lines.append(f"total: {_n(docs if known else None)} documents, "
                 f"{_bytes(sum(c.bytes or 0 for c in plan.collections) if known else None)}")
    if plan.leftovers_removed:
        lines.append(f"target: removed {len(plan.leftovers_removed)} scratch collections an earlier plan left "
                     f"({', '.join(plan.leftovers_removed)})")
    t = plan.target
    if t is not None:
        lines.append(f"target write rate: {_n(t.docs_per_s, ' documents/s')} ({t.docs:,} documents shaped like "
                     f"{t.shaped_like} in {t.seconds:.2f} s, as the applier writes; stopped by {t.stopped_by}; "
                     "scratch collection removed)")
    e = plan.estimate
    if e is not None:
        rates = ", ".join(f"{k} {_n(e.docs_per_s[k], ' docs/s')}" for k in (SOURCE, TARGET, CPU))
        head = "at least " if not e.complete and e.seconds is not None else ""
        lines.append(f"estimated full-load time: {head}{_n(e.seconds, ' s', 1)}"
                     + (f", limited by the {e.limit}" if e.limit else "")
                     + f" ({rates}; {o.workers} worker(s) at {o.cpu_us_per_doc:g} us of CPU per document)")
        lines.append(f"estimated source RU for the full load: {_n(e.ru_total)}")
    a = plan.aws
    if a:
        lines.append(f"AWS (counts, prices are yours): S3 PUTs at least {_n(a['s3_puts_at_least'])}, stored bytes at "
                     f"most {_bytes(a['s3_stored_bytes_at_most'])}; DynamoDB item writes for batches "
                     f"{_n(a['dynamodb_batch_item_writes_at_least'])}-{_n(a['dynamodb_batch_item_writes_at_most'])}, "
                     f"leases {a['dynamodb_lease_writes']}, progress {a['dynamodb_progress_item_writes']}")
    for line in plan.recommendation:
        lines.append(f"recommendation: {line}")
    for line in plan.every_lack:
        lines.append(f"unknown: {line}")
    problems = plan.index_problems
    lines.append(f"{len(problems)} indexes need action; {len(plan.every_lack)} parts of the estimate unknown")
    return lines
