"""`cosmigrate plan`: read the source, probe both sides within bounds, and estimate the full load.

Every part that cannot be read or measured gets one line in `lacks` saying
what the estimate lacks and why (unreachable side, a refused permission, a
throttled probe); that part is then unknown, never guessed, and the rest of
the plan is still made. The daemon makes the same plan at its first start
with `probes=False` (no feed or target probe: sizes, partitions and RU/s
only), see `cosmigrate.planrecord`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from cosmigrate.budget import SourceBudget
from cosmigrate.config import Config
from cosmigrate.indexes import IndexReport, read_indexes
from cosmigrate.indexplan import target_major
from cosmigrate.mongo import change_stream_tokens, list_namespaces, source_client, target_client
from cosmigrate.plan import ttl
from cosmigrate.plan.estimate import (
    CPU_US_PER_DOC,
    BatchSettings,
    CollectionFigures,
    Estimate,
    aws_counts,
    estimate,
    recommend,
)
from cosmigrate.plan.sourceprobe import FeedProbe, ProbeBounds, collection_stats, probe_feed, provisioned_ru
from cosmigrate.plan.targetprobe import TargetBounds, TargetProbe, probe_target, remove_leftovers
from cosmigrate.redact import redact
from cosmigrate.timeouts import within

CONNECT_TIMEOUT_MS = 5_000
T = TypeVar("T")


@dataclass
class PlanOptions:
    namespaces: list[str] | None = None
    source_ru_per_s: float | None = None
    workers: int = 1
    cpu_us_per_doc: float = CPU_US_PER_DOC
    source_bounds: ProbeBounds = field(default_factory=ProbeBounds)
    target_bounds: TargetBounds = field(default_factory=TargetBounds)
    probes: bool = True
    indexes: bool = True


@dataclass
class CollectionPlan:
    ns: str
    documents: int | None = None
    bytes: int | None = None
    partitions: int | None = None
    ru_per_s: float | None = None
    ru_per_s_from: str = ""
    probe: FeedProbe | None = None
    indexes: list[IndexReport] = field(default_factory=list)
    lacks: list[str] = field(default_factory=list)

    @property
    def avg_size(self) -> int | None:
        return self.bytes // self.documents if self.documents and self.bytes is not None else None

    def figures(self) -> CollectionFigures:
        probe = self.probe
        return CollectionFigures(self.ns, self.documents, self.bytes, probe.ru_per_doc if probe else None,
                                 self.ru_per_s, probe.event_bytes_per_doc if probe else None)

    def index_dicts(self) -> list[dict[str, Any]]:
        out = []
        for r in self.indexes:
            d = r.as_dict()
            if r.ttl:
                d["ttl_decision"] = ttl.decision(r)
            out.append(d)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.ns, "documents": self.documents, "bytes": self.bytes, "avg_size": self.avg_size,
                "partitions": self.partitions, "ru_per_s": self.ru_per_s, "ru_per_s_from": self.ru_per_s_from,
                "probe": self.probe.as_dict() if self.probe else None,
                "ru_full_load": _ru(self.figures()), "indexes": self.index_dicts(), "lacks": self.lacks}


def _ru(c: CollectionFigures) -> float | None:
    return round(c.documents * c.ru_per_doc, 1) if c.documents is not None and c.ru_per_doc is not None else None


@dataclass
class Plan:
    options: PlanOptions
    collections: list[CollectionPlan] = field(default_factory=list)
    target: TargetProbe | None = None
    leftovers_removed: list[str] = field(default_factory=list)
    lacks: list[str] = field(default_factory=list)
    estimate: Estimate | None = None
    aws: dict[str, Any] = field(default_factory=dict)
    recommendation: list[str] = field(default_factory=list)

    @property
    def every_lack(self) -> list[str]:
        return self.lacks + [line for c in self.collections for line in c.lacks]

    @property
    def index_problems(self) -> list[IndexReport]:
        return [r for c in self.collections for r in c.indexes
                if r.problem or (r.unique is not None and not r.unique.complete)]

    @property
    def needs_action(self) -> bool:
        return bool(self.every_lack or self.index_problems)

    def as_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "workers": o.workers, "cpu_us_per_doc": o.cpu_us_per_doc, "source_ru_per_s": o.source_ru_per_s,
            "probes": o.probes, "source_probe_bounds": o.source_bounds.as_dict(),
            "target_probe_bounds": o.target_bounds.as_dict(),
            "collections": [c.as_dict() for c in self.collections],
            "documents": _total(c.documents for c in self.collections),
            "bytes": _total(c.bytes for c in self.collections),
            "target": self.target.as_dict() if self.target else None,
            "scratch_leftovers_removed": self.leftovers_removed,
            "estimate": self.estimate.as_dict() if self.estimate else None,
            "aws": self.aws, "recommendation": self.recommendation, "lacks": self.every_lack,
            "needs_action": self.needs_action,
        }


def _total(values: Any) -> int | None:
    vals = list(values)
    return None if any(v is None for v in vals) else sum(vals)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OperationFailure):
        text = str((exc.details or {}).get("errmsg") or exc)
        return redact(f"{(exc.details or {}).get('codeName') or exc.code}: {text}").splitlines()[0][:200]
    return redact(f"{type(exc).__name__}: {exc}").splitlines()[0][:200]


def _refused(exc: PyMongoError) -> bool:
    return isinstance(exc, OperationFailure) and exc.code == 13


async def _reachable(client: Any) -> str:
    try:
        await client.admin.command("ping")
        return ""
    except PyMongoError as exc:
        return _why(exc)


async def _read(opts: PlanOptions, fn: Callable[[], Awaitable[T]]) -> T:
    """A metadata read of the source, its throttling waited out (bounded by the probe's seconds: then
    TimeoutError, which the caller reports as throttled, never as a value)."""
    return await within(SourceBudget().run(fn), opts.source_bounds.seconds)


def _throttled(what: str, opts: PlanOptions) -> str:
    return f"{what}: the source stayed throttled for {opts.source_bounds.seconds:g} s"


async def collection_plan(source: Any, cfg: Config, ns: str, opts: PlanOptions, major: int | None) -> CollectionPlan:
    """Sizes, RU/s, indexes, then the RU probe (it spends request units: the reads before it are not throttled
    by it) and partitions, of one collection; a refusal is a `lacks` line."""
    c = CollectionPlan(ns)
    try:
        c.documents, c.bytes = await _read(opts, lambda: collection_stats(source, ns))
    except TimeoutError:
        c.lacks.append(_throttled(f"{ns}: documents and bytes unknown: collStats", opts))
    except PyMongoError as exc:
        c.lacks.append(f"{ns}: documents and bytes unknown: collStats failed ({_why(exc)})"
                       + ("; grant the user collStats (read on the database)" if _refused(exc) else ""))
    if opts.source_ru_per_s:
        c.ru_per_s, c.ru_per_s_from = opts.source_ru_per_s, "--source-ru-per-s"
    else:
        try:
            c.ru_per_s = await _read(opts, lambda: provisioned_ru(source, ns))
        except (PyMongoError, TimeoutError):
            c.ru_per_s = None
        c.ru_per_s_from = "provisioned, read with GetCollection" if c.ru_per_s else ""
        if c.ru_per_s is None:
            c.lacks.append(f"{ns}: source RU budget unknown: the account reports no provisioned RU/s for the "
                           "collection or its database (serverless, or the custom action is refused); give "
                           "--source-ru-per-s")
    if opts.indexes and major is not None:
        try:
            known = {ns: c.documents} if c.documents is not None else None
            c.indexes = await _read(opts, lambda: read_indexes(source, [ns], major, cfg, documents_known=known))
        except TimeoutError:
            c.lacks.append(_throttled(f"{ns}: indexes unknown: listIndexes or the unique check", opts))
        except PyMongoError as exc:
            c.lacks.append(f"{ns}: indexes unknown: listIndexes or the unique check failed ({_why(exc)})")
    if opts.probes:
        c.probe = await _feed_probe(cfg, ns, opts, c)
    if c.probe is not None and c.probe.partitions:
        c.partitions = c.probe.partitions  # the probe's own GetChangeStreamTokens: no request outside its bounds
    else:
        try:
            c.partitions = len(await _read(opts, lambda: change_stream_tokens(source, ns)))
        except TimeoutError:
            c.lacks.append(_throttled(f"{ns}: physical partitions unknown: GetChangeStreamTokens", opts))
        except (PyMongoError, ValueError) as exc:
            c.lacks.append(f"{ns}: physical partitions unknown: GetChangeStreamTokens failed ({_why(exc)})"
                           + ("; the full load needs this custom action: grant it" if isinstance(exc, PyMongoError)
                              and _refused(exc) else ""))
    return c


async def _feed_probe(cfg: Config, ns: str, opts: PlanOptions, c: CollectionPlan) -> FeedProbe | None:
    try:
        probe = await probe_feed(cfg.source.uri, ns, opts.source_bounds, deletes_preview=cfg.capture.deletes_preview)
    except (PyMongoError, ValueError) as exc:
        c.lacks.append(f"{ns}: RU per document unknown: the feed probe failed ({_why(exc)})"
                       + ("; grant the custom action GetChangeStreamTokens and change streams" if isinstance(
                           exc, PyMongoError) and _refused(exc) else ""))
        return None
    if probe.problem:
        c.lacks.append(f"{ns}: RU per document unknown: {probe.problem}")
    elif not probe.docs and c.documents:
        c.lacks.append(f"{ns}: RU per document unknown: the probe read no document in its {probe.seconds:.1f} s "
                       f"({probe.throttled} throttled answers): the source is throttled; retry when it is not, "
                       "or raise its RU/s")
    return probe


async def build_plan(source: Any | None, target: Any | None, cfg: Config, opts: PlanOptions) -> Plan:
    """The whole plan with the clients given (None: that side is unreachable, already said in `plan.lacks`)."""
    plan = Plan(opts)
    major = None
    if target is not None:
        major = await target_major(target)
    names = list(opts.namespaces or [])
    if source is not None and not names:
        try:
            names = await list_namespaces(source, cfg.capture.include, cfg.capture.exclude)
        except PyMongoError as exc:
            plan.lacks.append(f"source: the collections cannot be listed ({_why(exc)}); name them on the command line")
    if source is not None:
        for ns in names:
            plan.collections.append(await collection_plan(source, cfg, ns, opts, major))
    else:
        plan.collections = [CollectionPlan(ns) for ns in names]
    target_rate = None
    if opts.probes and target is not None:
        target_rate = await _target_probe(plan, target, cfg)
    figures = [c.figures() for c in plan.collections]
    plan.estimate = estimate(figures, target_rate, opts.workers, opts.cpu_us_per_doc)
    plan.aws = aws_counts(figures, plan.estimate, BatchSettings(
        cfg.capture.max_batch_events, cfg.capture.max_batch_bytes, cfg.capture.max_batch_age_s))
    plan.recommendation = recommend(plan.estimate, figures, opts.workers, opts.cpu_us_per_doc)
    return plan


async def _target_probe(plan: Plan, target: Any, cfg: Config) -> float | None:
    try:
        plan.leftovers_removed = await remove_leftovers(target)
    except PyMongoError as exc:
        plan.lacks.append(f"target: a scratch collection left by an earlier plan could not be removed ({_why(exc)})")
    probed = [c for c in plan.collections if c.probe and c.probe.samples]
    biggest = max(probed, key=lambda c: c.documents or 0, default=None)
    sized = max(plan.collections, key=lambda c: c.documents or 0, default=None)
    try:
        plan.target = await probe_target(target, biggest.probe.samples if biggest and biggest.probe else [],
                                         sized.avg_size if sized else None, plan.options.target_bounds,
                                         cfg.apply.max_ops_per_write, cfg.apply.write_concurrency)
    except PyMongoError as exc:
        plan.lacks.append(f"target: write rate unknown: the probe's writes failed ({_why(exc)})"
                          + ("; the target user needs readWrite" if _refused(exc) else ""))
        return None
    rate = plan.target.docs_per_s
    if rate is None:
        plan.lacks.append(f"target: write rate unknown: no write finished within the probe's "
                          f"{plan.options.target_bounds.seconds:g} s")
    return rate


async def run_plan(cfg: Config, opts: PlanOptions) -> Plan:
    """`cosmigrate plan`: connect to both sides (an unreachable one is a `lacks` line), then `build_plan`."""
    source = source_client(cfg.source.uri, serverSelectionTimeoutMS=CONNECT_TIMEOUT_MS)
    target = target_client(cfg.target.uri, cfg.target.tls_ca_file, serverSelectionTimeoutMS=CONNECT_TIMEOUT_MS)
    lacks = []
    try:
        if why := await _reachable(source):
            lacks.append(f"source: unreachable ({why}): documents, partitions, RU and indexes unknown")
        if why_t := await _reachable(target):
            lacks.append(f"target: unreachable ({why_t}): the target's write rate is unknown")
        plan = await build_plan(None if why else source, None if why_t else target, cfg, opts)
        plan.lacks[:0] = lacks
        return plan
    except ConnectionFailure as exc:  # a side that answered the ping and then went away
        plan = Plan(opts, lacks=[*lacks, f"a side stopped answering during the plan ({_why(exc)})"])
        return plan
    finally:
        await source.close()
        await target.close()
