"""The index plan of a namespace and its execution on the target: what is built when, and how far it got.

`cosmigrate.indexes` reads and translates the source's indexes; this module
decides when each one is built and builds it:

- `before backfill`: unique indexes. The applier's unique-conflict handling
  reads them from the target, so they exist before the first batch of the
  namespace is applied (the daemon's apply task waits for this stage; the
  watcher does not: capture is never blocked by an index build).
- `after backfill`: every other buildable index, once the namespace's
  backfill completed (building them on an empty collection first would make
  every backfill write pay for them). A TTL index on a custom date field is
  built WITHOUT its expiry: a target that expires documents while the source
  still serves them would lose data; its expiry is set at cutover (stage
  `at cutover`, `enable_ttl`).
- `never`: what DocumentDB cannot build (wildcard, 2d, hashed, ...) and a TTL
  on Cosmos's system field `_ts`, with the reason and what the user must do.
  Listed in `preflight`, `cosmigrate indexes`, status (`indexes`) and the
  journal (once per start); never silently dropped. A `_ts` TTL carries the
  operator's `[ttl]` decision (`cosmigrate.ttl`); `field:<path>:<seconds>`
  adds a TTL index on that date field to the plan (`ttl_<path>`, stage
  `after backfill`, built without expiry and enabled at cutover like the
  source's own TTL indexes).

Builds are idempotent and resumable: the state is read back from the target
(`listIndexes`), never remembered elsewhere, so a restart simply builds what
is missing. A build that the target refuses is reported with its reason and
the rest go on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from cosmigrate.backoff import Backoff
from cosmigrate.config import Config
from cosmigrate.indexes import translate
from cosmigrate.logs import get_logger
from cosmigrate.mongo import list_namespaces, raw_collection, source_client, target_client
from cosmigrate.redact import redact
from cosmigrate.ttl import UNDECIDED, ttl_state

BEFORE, AFTER, NEVER = "before backfill", "after backfill", "never"
TRANSIENT_CODES = {16500, 50, 91, 189, 10107, 11600, 11602, 13435, 13436}


@dataclass
class PlannedIndex:
    ns: str
    name: str
    key: dict[str, Any]
    stage: str
    """`before backfill`, `after backfill` or `never`."""
    spec: dict[str, Any] | None
    """What is created on the target (TTL indexes: without expireAfterSeconds)."""
    expire_after: int | None = None
    """A custom-path TTL's seconds, set on the target at cutover."""
    reason: str = ""
    state: str = "pending"
    """`pending`, `built`, `ttl enabled`, `failed: <why>` or `cannot build`."""
    decision: str = ""
    """A `_ts` TTL's `[ttl]` decision (`undecided`, `none`, `field:<path>:<seconds>`); "" for other indexes."""

    @property
    def needs_action(self) -> bool:
        """Never built and nothing decided about it (a decided `_ts` TTL needs nothing more), or refused."""
        undecided_never = self.stage == NEVER and self.decision in ("", UNDECIDED)
        return undecided_never or self.state.startswith("failed")

    def as_dict(self) -> dict[str, Any]:
        return {"namespace": self.ns, "name": self.name, "key": self.key, "stage": self.stage, "state": self.state,
                "reason": self.reason, "expire_after_seconds": self.expire_after,
                "ttl_at_cutover": self.expire_after is not None, "ttl_decision": self.decision}


async def target_major(target: Any) -> int:
    try:
        info = await target.admin.command("buildInfo")
        return int(str(info.get("version", "5")).split(".")[0])
    except (PyMongoError, ValueError):
        return 5


def ttl_index_name(path: str) -> str:
    """The name of the TTL index a `field:<path>:<seconds>` decision puts on the target."""
    return f"ttl_{path}"


async def read_plan(source: Any, target: Any, ns: str, major: int, cfg: Config) -> list[PlannedIndex]:
    """The namespace's plan (with the `[ttl]` decision's index), each index's state read back from the target."""
    plan: list[PlannedIndex] = []
    specs = await _source_indexes(source, ns)
    ttl = ttl_state(ns, specs, cfg)
    for spec in specs:
        rep = translate(ns, spec, major)
        if rep.action == "implicit":
            continue
        if rep.action == "cannot build":
            decision = ttl.decision_text if rep.ttl == "_ts" else ""
            reason = f"{rep.reason}; [ttl] decision: {decision}" if decision else rep.reason
            plan.append(PlannedIndex(ns, rep.name, rep.key, NEVER, None, reason=reason, state="cannot build",
                                     decision=decision))
            continue
        expire = spec.get("expireAfterSeconds") if rep.ttl == "custom" else None
        stage = BEFORE if spec.get("unique") else AFTER
        plan.append(PlannedIndex(ns, rep.name, rep.key, stage, rep.target, int(expire) if expire is not None else None,
                                 reason=rep.reason))
    chosen = ttl.field_index
    if chosen is not None:
        name = ttl_index_name(chosen.path)
        plan.append(PlannedIndex(ns, name, {chosen.path: 1}, AFTER, {"key": {chosen.path: 1}, "name": name},
                                 chosen.seconds, reason=f"in place of the _ts TTL: [ttl] decision {chosen.text()}",
                                 decision=chosen.text()))
    existing = await _target_indexes(target, ns)
    for p in plan:
        have = existing.get(p.name)
        if have is not None and p.stage != NEVER:
            p.state = "ttl enabled" if p.expire_after is not None and "expireAfterSeconds" in have else "built"
    return plan


async def _source_indexes(source: Any, ns: str) -> list[dict[str, Any]]:
    try:
        return [dict(spec) async for spec in await raw_collection(source, ns).list_indexes()]
    except OperationFailure as exc:
        if exc.code == 26:  # dropped at the source: nothing left to build (status says the collection is gone)
            return []
        raise


async def _target_indexes(target: Any, ns: str) -> dict[str, dict[str, Any]]:
    try:
        return {str(ix["name"]): dict(ix) async for ix in await raw_collection(target, ns).list_indexes()}
    except OperationFailure as exc:
        if exc.code == 26:  # no collection yet: nothing built
            return {}
        raise


def summary(plan: list[PlannedIndex]) -> str:
    """One line for status: counts per state, and every index that will never be built, with its reason."""
    if not plan:
        return "none to build"
    counts: dict[str, int] = {}
    for p in plan:
        key = p.state.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    ttl = [p.name for p in plan if p.expire_after is not None and p.state == "built"]
    if ttl:
        text += f"; TTL enabled at cutover: {', '.join(ttl)}"
    never = [f"{p.name} ({p.reason.split(':')[0]})" for p in plan if p.stage == NEVER]
    failed = [f"{p.name} ({p.state})" for p in plan if p.state.startswith("failed")]
    if never:
        text += f"; cannot build: {'; '.join(never)}"
    if failed:
        text += f"; refused: {'; '.join(failed)}"
    return text


class IndexBuilder:
    """Runs one namespace's plan in its own task; the applier waits only for `unique_ready`."""

    def __init__(self, ns: str, source: Any, target: Any, cfg: Config) -> None:
        self.ns = ns
        self.source = source
        self.target = target
        self.cfg = cfg
        self.plan: list[PlannedIndex] = []
        self.planned = False
        """The plan was read (it may be empty: a collection with only `_id` has nothing to build)."""
        self.unique_ready = asyncio.Event()
        self.backfill_done = asyncio.Event()
        self.log = get_logger(namespace=ns)
        self.error = ""

    def summary(self) -> str:
        if self.error and not self.planned:
            return f"plan not read yet: {self.error}"
        text = summary(self.plan) if self.plan else "none to build (only _id)" if self.planned else "planning"
        return f"{text}; {self.error}" if self.error else text

    async def run(self) -> None:
        """Read the plan (retrying), build the unique ones, wait for the backfill, build the rest.

        An unexpected failure is logged and shown in status; the applier is released then rather than left
        waiting forever (a missing index is reported, a stalled namespace would be silent)."""
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.error = redact(f"index builds stopped: {exc!r}")[:300]
            self.log.exception("index builds stopped; the namespace goes on without them", error=self.error)
            self.unique_ready.set()

    async def _run(self) -> None:
        backoff = Backoff(cap=30.0)
        while True:
            try:
                self.plan = await read_plan(self.source, self.target, self.ns, await target_major(self.target),
                                            self.cfg)
                self.planned = True
                self.error = ""
                break
            except PyMongoError as exc:
                self.error = redact(str(exc))[:200]
                self.log.warning("index plan not read; retrying", error=self.error)
                await asyncio.sleep(backoff.next_delay())
        for p in self.plan:
            if p.stage == NEVER:
                self.log.warning("index cannot be built on DocumentDB; it is not migrated", index=p.name,
                                 reason=p.reason)
        await self._build(BEFORE)
        self.unique_ready.set()
        await self.backfill_done.wait()
        await self._build(AFTER)

    async def _build(self, stage: str) -> None:
        for p in self.plan:
            if p.stage != stage or p.state != "pending" or p.spec is None:
                continue
            backoff = Backoff(cap=30.0)
            while True:
                try:
                    await create(self.target, self.ns, p.spec)
                    p.state = "built"
                    self.log.info("index built on the target", index=p.name, stage=stage)
                    break
                except (ConnectionFailure, OperationFailure) as exc:
                    code = getattr(exc, "code", None)
                    if isinstance(exc, ConnectionFailure) or code in TRANSIENT_CODES:
                        await asyncio.sleep(backoff.next_delay())
                        continue
                    msg = exc.details.get("errmsg") if isinstance(exc, OperationFailure) and exc.details else str(exc)
                    p.state = f"failed: {redact(str(msg))[:200]}"
                    self.log.error("the target refused an index; the others are built", index=p.name,
                                   error=p.state)
                    break


async def create(target: Any, ns: str, spec: dict[str, Any], expire_after: int | None = None) -> None:
    db, _, coll = ns.partition(".")
    index = dict(spec)
    if expire_after is not None:
        index["expireAfterSeconds"] = expire_after
    await target[db].command({"createIndexes": coll, "indexes": [index]})


async def enable_ttl(source: Any, target: Any, ns: str, cfg: Config) -> list[dict[str, Any]]:
    """Cutover: give every custom-path TTL index its expiry on the target (idempotent; read back first).

    `collMod` changes expireAfterSeconds in place where the target takes it; otherwise the index is dropped
    and created again with it (the applications are stopped during a cutover, so the moment without the
    index costs nothing). `_ts` TTLs are reported with their `[ttl]` decision, never built; a `field`
    decision's index is enabled here like the others (created now, with its expiry, if it was not built yet).
    """
    out: list[dict[str, Any]] = []
    plan = await read_plan(source, target, ns, await target_major(target), cfg)
    db, _, coll = ns.partition(".")
    for p in plan:
        if p.stage == NEVER:
            if p.decision:
                out.append({"index": p.name, "ttl": "not built", "reason": p.reason, "ttl_decision": p.decision})
            continue
        if p.expire_after is None or p.spec is None or p.state == "ttl enabled":
            continue
        if p.state == "pending":
            await create(target, ns, p.spec, p.expire_after)
        else:
            try:
                await target[db].command({"collMod": coll, "index": {"name": p.name,
                                                                     "expireAfterSeconds": p.expire_after}})
            except OperationFailure:
                await target[db].command({"dropIndexes": coll, "index": p.name})
                await create(target, ns, p.spec, p.expire_after)
        out.append({"index": p.name, "ttl": "enabled", "expire_after_seconds": p.expire_after,
                    **({"ttl_decision": p.decision} if p.decision else {})})
    return out


async def plans(source: Any, target: Any, namespaces: list[str], cfg: Config) -> dict[str, list[PlannedIndex]]:
    """The plan and its status (read back from the target) for every namespace."""
    major = await target_major(target)
    return {ns: await read_plan(source, target, ns, major, cfg) for ns in namespaces}


async def plan_report(cfg: Config, namespaces: list[str] | None = None) -> list[PlannedIndex]:
    """`cosmigrate indexes --plan`: connect to both sides, read the plan and what the target already has."""
    source = source_client(cfg.source.uri, serverSelectionTimeoutMS=10_000)
    target = target_client(cfg.target.uri, cfg.target.tls_ca_file, serverSelectionTimeoutMS=10_000)
    try:
        names = namespaces or await list_namespaces(source, cfg.capture.include, cfg.capture.exclude)
        return [p for ps in (await plans(source, target, names, cfg)).values() for p in ps]
    finally:
        await source.close()
        await target.close()


def plan_line(p: PlannedIndex) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in p.key.items())
    text = f"{p.ns} {p.name} {{{fields}}}: {p.stage}, {p.state}"
    if p.expire_after is not None:
        why = f"; {p.reason}" if p.decision else ""
        text += f" (TTL: built without expiry, expireAfterSeconds={p.expire_after} set at cutover{why})"
    elif p.reason:
        text += f" ({p.reason})"
    return text
