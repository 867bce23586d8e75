"""`cosmigrate cutover`: a resumable state machine from "ready" to "proven equal", whose step lives in the ledger.

The steps, in order (`STEPS`):

1. `precheck`: the readiness conditions (writer started, every namespace
   healthy, nothing deferred, caught up to a recent head). Those only an
   operator clears (writer stopped, a failed namespace, a deferred write)
   fail at once; the rest are waited for, up to
   `cutover.precheck_timeout_s`, and `waiting` names them for the client;
   each failing one is named (exit 5).
2. `quiesce`: the applications have stopped writing. Every namespace's head
   is sampled twice, `cutover.quiesce_s` apart; if one moved, "the source is
   still being written" (exit 3). The second sample is stored. A collection
   the source holds that has no head here (created since the precheck) is a
   write too: back to `precheck`, which waits for it to be captured.
3. `apply`: capture and apply up to the heads sampled again now (at or past
   the stored ones; if they moved, the step's end says so, exit 3).
4. `sweep` (needs the writer started: its deletes go through it; stopped, the
   step fails at once, exit 5): a final delete sweep of every namespace, over everything, with
   the source quiet, comparing `_id`s in every range (equal counts would let
   a stale and a missing document cancel out); the `_id`s the target lacks
   go to verification, so the recheck reports them.
5. `recheck`: verification brought to a clean state: a full pass where none
   completed, documents changed since re-checked from the batch log, every
   mismatch compared again, up to `cutover.recheck_rounds` rounds (exit 6
   with the report when documents still differ).
6. `finalize`: the source's indexes the target lacks are built, TTL indexes
   included (they could not be live while the source still expired
   documents); `_ts` expiry cannot be rebuilt and is reported with its
   `[ttl]` decision (`cosmigrate.ttl`).
7. `ttl`: every TTL index the target got during the migration was built
   without its expiry (`cosmigrate.indexplan`); its `expireAfterSeconds`
   is set now, read back first so a second run changes nothing.
8. `report`: a JSON report (per namespace: documents, verified, deletes,
   duration, the heads it stopped at, the source's expiry and the `[ttl]`
   decision for it) is stored and printed. Exit 0.

Then status says `cutover complete`, the writer is stopped (before `complete` is stored) and refuses to
start again without `--force`; the sweep and verification stop (the target
belongs to the applications now). The source is never written.

Every ending that is not `complete` returns a report too (`outcome`
stopped or cancelled, the step, the exit code and why), so `--report`
always leaves a file. `ctl cutover --cancel` stops a run at its next step
boundary (or while precheck, apply or the sweep waits), recorded under `cancelled`
(exit 7). The report's `started_at` is this run's start;
`first_started_at` is when the cutover first began.

Resumable: the step is stored (compare-and-set on the ledger's cluster item)
after each step's work; a kill or a restart continues at the stored step,
and every step can run twice. From `apply` on, each step ends by sampling the
heads again: if they moved since `quiesce`, the applications wrote during the
cutover; the machine goes back to `quiesce` and exits 3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import bson
from bson.binary import Binary
from pymongo.errors import OperationFailure, PyMongoError

from cosmigrate.apply import WriterGate
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import Config
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.deletes.service import Deletes
from cosmigrate.indexplan import enable_ttl
from cosmigrate.ledger import Ledger
from cosmigrate.logs import get_logger
from cosmigrate.mongo import change_stream_tokens, list_namespaces
from cosmigrate.nslink import ApplierNotReady, NamespaceLink
from cosmigrate.preflight import unsupported_index
from cosmigrate.redact import redact
from cosmigrate.timeouts import cancel_and_wait
from cosmigrate.tokens import TokenFormatError, positions
from cosmigrate.ttl import read_ttl_indexes, ttl_state
from cosmigrate.verify.service import Verification

KIND, KEY = "cutover", "state"
COMPLETE = "complete"
EXIT_OK, EXIT_ERROR, EXIT_WRITTEN, EXIT_NOT_READY, EXIT_DIFFERENT, EXIT_CANCELLED = 0, 1, 3, 5, 6, 7
STALL_S = 120.0  # apply making no progress this long fails the `apply` step
WAITING_LOG_S = 5.0  # how often precheck says what it still waits for
T = TypeVar("T")


class CutoverStop(Exception):
    """Ends a run with an exit code and one line for the operator (the step stays where it says)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CutoverCancelled(CutoverStop):
    """`ctl cutover --cancel`: the run stopped at a step boundary; the stored step is where the next run starts."""


class CutoverHost(Protocol):
    """What the machine needs from the daemon that runs it."""

    cfg: Config
    crash: CrashPoints
    deletes: Deletes | None
    verification: Verification | None
    links: dict[str, NamespaceLink]

    @property
    def ledger(self) -> Ledger | None: ...

    @property
    def source(self) -> Any: ...

    @property
    def target(self) -> Any: ...

    @property
    def gate(self) -> WriterGate: ...

    async def readiness(self) -> tuple[list[str], list[str]]:
        """The readiness reasons that the cutover itself does not resolve, as (needs the operator, clears by
        itself); both empty: ready."""

    async def wait_discovered(self) -> None:
        """Returns once the first namespace discovery round attached every namespace."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Cutover], Awaitable[None]]
    says: str


@dataclass
class Result:
    code: int
    message: str
    report: dict[str, Any] | None = None


class Cutover:
    def __init__(self, host: CutoverHost) -> None:
        self.host = host
        self.cfg = host.cfg
        assert host.ledger is not None
        self.ledger: Ledger = host.ledger
        self.state: dict[str, Any] = {}
        self.version = 0
        self.step = ""
        self.waiting = ""
        """What precheck waits for right now ("" when it waits for nothing): the client prints it."""
        self.cancel_by = ""
        """Who asked to cancel (`ctl cutover --cancel`); the run stops at the next step boundary."""
        self.log = get_logger(component="cutover")

    # --- ledger -----------------------------------------------------------------------------

    async def load(self) -> dict[str, Any]:
        item = await self.ledger.get_progress("", KIND, KEY)
        self.state, self.version = (item.doc(), item.version) if item is not None else ({}, 0)
        return self.state

    async def _save(self) -> None:
        await self.ledger.put_progress("", KIND, KEY, bson.encode(self.state), epoch=None, expect_version=self.version)
        self.version += 1

    async def complete(self) -> bool:
        return (await self.load()).get("step") == COMPLETE

    # --- the machine ---------------------------------------------------------------------------

    def cancel(self, by: str) -> None:
        """Stop at the next step boundary (or while precheck waits); the run records who and where."""
        self.cancel_by = by or "ctl"

    async def _check_cancel(self) -> None:
        if not self.cancel_by:
            return
        self.state["cancelled"] = {"by": self.cancel_by, "at": Wall.now().s, "step": self.step}  # wall seconds
        await self._save()
        self.log.warning("cutover cancelled", step=self.step, by=self.cancel_by)
        raise CutoverCancelled(EXIT_CANCELLED, f"cutover cancelled by {self.cancel_by} before the {self.step} step; "
                                               "run it again to resume from there")

    def _first_started(self, default: Wall) -> Wall:
        """When the first run of this cutover started (stored as wall seconds)."""
        return Wall(float(self.state.get("started_at", default.s)))

    def _stopped_report(self, stop: CutoverStop, started: Wall) -> dict[str, Any]:
        """The report of a run that did not complete: where it stopped and why (the `--report` file gets it too)."""
        now = Wall.now()
        return {
            "cluster_name": self.cfg.cluster_name, "outcome": "cancelled" if isinstance(stop, CutoverCancelled)
            else "stopped", "step": self.step, "exit_code": stop.code, "message": str(stop),
            "started_at": started.iso(), "finished_at": now.iso(), "duration_s": round(now - started, 3),
            "first_started_at": self._first_started(started).iso(), "equal": False,
            "verification": self.state.get("verification"),
        }

    async def run(self) -> Result:
        started = Wall.now()  # this run's start: the report's started_at (a resumed cutover keeps its first start)
        await self.load()
        if self.state.get("step") == COMPLETE:
            return Result(EXIT_OK, "cutover is already complete", self.state.get("report"))
        if not self.state:
            self.state = {"step": STEPS[0].name, "started_at": started.s}  # wall seconds in the ledger
        self.state["run_started_at"] = started.s
        self.state.pop("cancelled", None)
        await self._save()
        await self.host.wait_discovered()
        names = [s.name for s in STEPS]
        try:
            for step in STEPS[names.index(self.state["step"]):]:
                self.step = step.name
                self.host.crash.hit(f"cutover_before_{step.name}")  # stored step = this one, its work not begun
                await self._check_cancel()
                self.log.info("cutover step", step=step.name, what=step.says)
                await step.run(self)
                self.host.crash.hit(f"cutover_{step.name}")
                following = names.index(step.name) + 1
                if following == len(names):
                    # The writer stops before `complete` is stored: a kill between the two must never leave a
                    # completed cutover whose writer the next daemon starts again (over the applications' target).
                    await self.host.gate.stop()
                    await self.ledger.set_writer("stopped", "cutover", Wall.now().s)
                self.state["step"] = names[following] if following < len(names) else COMPLETE
                await self._save()
        except CutoverStop as stop:
            self.log.warning("cutover stopped", step=self.step, exit_code=stop.code, reason=str(stop))
            return Result(stop.code, str(stop), self._stopped_report(stop, started))
        finally:
            self.waiting = ""
        self.host.crash.hit("cutover_complete")  # `complete` stored, the run not finished
        self.state["finished_at"] = Wall.now().s
        await self._save()
        self.log.info("cutover complete")
        return Result(EXIT_OK, "cutover complete: the target equals the source", self.state.get("report"))

    @property
    def namespaces(self) -> list[str]:
        return sorted(self.host.links)

    # --- heads ---------------------------------------------------------------------------------

    async def _heads(self) -> dict[str, list[bytes]]:
        out: dict[str, list[bytes]] = {}
        for ns in self.namespaces:
            try:
                out[ns] = await change_stream_tokens(self.host.source, ns)
            except (PyMongoError, ValueError) as exc:
                raise CutoverStop(EXIT_ERROR, f"cannot sample the source head of {ns}: {redact(str(exc))[:200]}") from None
        return out

    @staticmethod
    def _moved(before: dict[str, list[bytes]], after: dict[str, list[bytes]]) -> list[str]:
        moved = []
        for ns, tokens in after.items():
            try:
                a = {r: lsn for t in before.get(ns, []) for r, lsn in positions(t).items()}
                b = {r: lsn for t in tokens for r, lsn in positions(t).items()}
            except TokenFormatError:
                moved.append(ns)  # unreadable: never claim the source is quiet
                continue
            if a != b:
                moved.append(ns)
        return moved

    def _stored_heads(self) -> dict[str, list[bytes]]:
        return {ns: [bytes(t) for t in tokens] for ns, tokens in (self.state.get("heads") or {}).items()}

    async def _still_quiet(self) -> None:
        """Every step after `quiesce` ends here: a write since then sends the machine back to `quiesce`."""
        moved = self._moved(self._stored_heads(), await self._heads())
        if moved:
            self.state["step"] = "quiesce"
            await self._save()
            raise CutoverStop(EXIT_WRITTEN, f"the source is still being written ({', '.join(moved)}): stop the "
                                            "applications' writes to Cosmos DB, then run cutover again")
        await self._none_created(self._stored_heads())

    async def _none_created(self, known: Iterable[str]) -> None:
        """A collection the source holds that this cutover samples no head of: created after the precheck (the
        applications still write), and not captured until discovery's next round. The heads alone never see it,
        and the report would say equal without it: back to `precheck`, which waits until it is captured and
        caught up."""
        try:
            names = await list_namespaces(self.host.source, self.cfg.capture.include, self.cfg.capture.exclude)
        except PyMongoError as exc:
            raise CutoverStop(EXIT_ERROR, f"cannot list the source's collections: {redact(str(exc))[:200]}") from None
        created = sorted(set(names) - set(known))
        if created:
            self.state["step"] = STEPS[0].name
            await self._save()
            raise CutoverStop(EXIT_WRITTEN, f"the source is still being written (collections created during the "
                                            f"cutover: {', '.join(created[:10])}): stop the applications' writes to "
                                            "Cosmos DB, then run cutover again (its precheck waits for them to be "
                                            "captured)")

    # --- steps ---------------------------------------------------------------------------------

    async def precheck(self) -> None:
        """Conditions that need the operator (writer stopped, a failed namespace, a deferred write) fail at once;
        those that clear by themselves (lag, a head not sampled yet) are waited for, and `waiting` says which."""
        deadline = Mono.now() + self.cfg.cutover.precheck_timeout_s
        logged: Mono | None = None
        while True:
            operator, transient = await self.host.readiness()
            if not operator and not transient:
                operator = await self._expiry_undecided()  # a `[ttl]` decision: only the operator makes it
            if operator:
                raise CutoverStop(EXIT_NOT_READY, "not ready for cutover (needs you): " + "; ".join(operator + transient))
            if not transient:
                self.waiting = ""
                return
            if Mono.now() >= deadline:
                raise CutoverStop(EXIT_NOT_READY, "not ready for cutover: " + "; ".join(transient))
            self.waiting = "; ".join(transient)
            if logged is None or logged.elapsed() >= WAITING_LOG_S:
                logged = Mono.now()
                self.log.info("cutover precheck waiting", waiting_for=self.waiting[:500])
            await self._check_cancel()
            await asyncio.sleep(0.5)

    async def _expiry_undecided(self) -> list[str]:
        """The source's TTL indexes read now (status read them when capture started; one may have been created
        since): a `_ts` TTL without a `[ttl]` decision stops the cutover like any readiness condition."""
        out: list[str] = []
        for ns in self.namespaces:
            try:
                indexes, unknown = await read_ttl_indexes(self.host.source, ns)
            except PyMongoError as exc:
                indexes, unknown = [], f"the source's indexes could not be read: {redact(str(exc))[:120]}"
            blocking = ttl_state(ns, indexes, self.cfg, unknown).blocking
            if blocking:
                out.append(f"source expiry (TTL) needs a decision, or is not known: {blocking}")
        return out

    async def quiesce(self) -> None:
        first = await self._heads()
        await asyncio.sleep(self.cfg.cutover.quiesce_s)
        second = await self._heads()
        moved = self._moved(first, second)
        if moved:
            raise CutoverStop(EXIT_WRITTEN, f"the source is still being written ({', '.join(moved)}): stop the "
                                            "applications' writes to Cosmos DB, then run cutover again")
        await self._none_created(second)
        self.state["heads"] = {ns: [Binary(t) for t in tokens] for ns, tokens in second.items()}
        self.state["heads_at"] = Wall.now().s

    async def apply(self) -> None:
        # The heads are sampled again here, on the monotonic clock read before the request (the one freshness
        # orders its samples on), and those are what apply waits for: at or past the stored ones. The stored
        # heads carry no moment of this process: stamped "now" in a resumed run (hours after quiesce, the
        # applications writing again), they made freshness caught up "now", lag near 0, `current`, whatever
        # the target missed. A wall-clock stamp here once sat in the samples as the newest moment for good.
        at = Mono.now()
        heads = await self._heads()
        for ns in self.namespaces:
            link = self.host.links[ns]
            link.add_head(at, heads[ns])
            progress, since = (link.committed_seq(), link.written_seq()), Mono.now()
            while not await link.wait_caught_up_to(at, 5.0, sample_every_s=0.5):
                if not self.host.gate.started:  # only an operator starts it again: fail now, not after STALL_S
                    raise CutoverStop(EXIT_NOT_READY, f"{ns} cannot reach the quiesced head: the writer is stopped "
                                                      "(run `cosmigrate ctl writer start`, then cutover again)")
                await self._check_cancel()
                now = (link.committed_seq(), link.written_seq())
                if now != progress:
                    progress, since = now, Mono.now()
                elif since.elapsed() > STALL_S:
                    writer = "started" if self.host.gate.started else "stopped (run `cosmigrate ctl writer start`)"
                    raise CutoverStop(EXIT_ERROR, f"{ns} does not reach the quiesced head: capture and apply made no "
                                                  f"progress for {STALL_S:.0f}s (writer {writer})")
        await self._still_quiet()

    async def _through_the_writer(self, work: Awaitable[T]) -> T:
        """Work that writes through the writer (the final sweep's deletes): a stopped writer holds it for ever, deaf
        to `--cancel` (the precheck that checks the writer is behind a resumed step). Either ends the step; its
        work is cancelled (a sweep pass is: `Deletes.stop`) and runs again from its start next time."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                if not self.host.gate.started:  # only an operator starts it again: fail now
                    raise CutoverStop(EXIT_NOT_READY, f"the {self.step} step writes to the target through the writer, "
                                                      "which is stopped (run `cosmigrate ctl writer start`, then "
                                                      "cutover again)")
                await self._check_cancel()
                await asyncio.wait({task}, timeout=0.5)
            return task.result()
        finally:
            await cancel_and_wait([task])

    async def sweep(self) -> None:
        deletes = self.host.deletes
        counts: dict[str, int] = dict(self.state.get("deleted") or {})
        if deletes is not None:
            await deletes.stop()
            for ns in self.namespaces:
                counts[ns] = counts.get(ns, 0) + await self._through_the_writer(deletes.final_sweep(ns))
                missing = deletes.final_missing(ns)
                if missing and self.host.verification is not None:
                    await self.host.verification.suspect(ns, missing)
        self.state["deleted"] = counts
        await self._still_quiet()

    async def recheck(self) -> None:
        verification = self.host.verification
        if verification is None:
            return
        await verification.stop()
        try:
            left = await verification.recheck_until_clean(self.namespaces, self.cfg.cutover.recheck_rounds)
        except ApplierNotReady as exc:
            raise CutoverStop(EXIT_ERROR, f"cannot re-check yet: {exc}; run cutover again") from None
        self.state["verification"] = await verification.report(self._first_started(Wall(0.0)),
                                                               self.cfg.verify.max_mismatches, self.namespaces)
        if left:
            await self._save()
            raise CutoverStop(EXIT_DIFFERENT, f"{left} documents still differ after {self.cfg.cutover.recheck_rounds} "
                                              "re-check rounds with the source quiet; see the report's mismatches")
        await self._still_quiet()

    async def finalize(self) -> None:
        target_major = 5
        try:
            info = await self.host.target.admin.command("buildInfo")
            target_major = int(str(info.get("version", "5")).split(".")[0])
        except (PyMongoError, ValueError):
            pass
        out: dict[str, Any] = {}
        for ns in self.namespaces:
            db, _, coll = ns.partition(".")
            built: list[str] = []
            not_built: list[dict[str, str]] = []
            existing = {ix["name"]: ix async for ix in await self.host.target[db][coll].list_indexes()}
            specs = [dict(ix) async for ix in await self.host.source[db][coll].list_indexes()]
            decision = ttl_state(ns, specs, self.cfg).decision_text
            for spec in specs:
                name = spec.get("name", "")
                if name == "_id_" or name in existing:
                    continue
                keys = dict(spec["key"])
                if "expireAfterSeconds" in spec and list(keys) == ["_ts"]:
                    not_built.append({"index": name, "reason": "expiry by _ts cannot be rebuilt on DocumentDB",
                                      "ttl_decision": decision})
                    continue
                why = unsupported_index(spec, target_major)
                if why:
                    not_built.append({"index": name, "reason": why})
                    continue
                options = {k: v for k, v in spec.items() if k in ("unique", "sparse", "expireAfterSeconds",
                                                                  "partialFilterExpression")}
                try:
                    await self.host.target[db][coll].create_index(list(keys.items()), name=name, **options)
                    built.append(name)
                except OperationFailure as exc:
                    not_built.append({"index": name, "reason": redact(str(exc.details.get("errmsg", exc)
                                                                      if exc.details else exc))[:200]})
            out[ns] = {"built": built, "not_built": not_built}
        self.state["finalize"] = out
        await self._still_quiet()

    async def ttl(self) -> None:
        out: dict[str, Any] = {}
        for ns in self.namespaces:
            try:
                out[ns] = await enable_ttl(self.host.source, self.host.target, ns, self.cfg)
            except PyMongoError as exc:
                raise CutoverStop(EXIT_ERROR, f"cannot enable the TTL indexes of {ns}: {redact(str(exc))[:200]}") from None
        self.state["ttl"] = out
        await self._still_quiet()

    async def report(self) -> None:
        now = Wall.now()
        started = Wall(float(self.state.get("run_started_at", self.state.get("started_at", now.s))))
        verification = self.state.get("verification") or {}
        by_ns = {n["namespace"]: n for n in verification.get("namespaces", [])}
        namespaces = []
        for ns in self.namespaces:
            db, _, coll = ns.partition(".")
            docs = int((await self.host.source[db].command({"count": coll}))["n"])
            heads = []
            for token in self._stored_heads().get(ns, []):
                try:
                    heads += [{"range": f"{lo}-{hi}", "lsn": lsn} for (lo, hi), lsn in sorted(positions(token).items())]
                except TokenFormatError:
                    heads.append({"range": "?", "lsn": None})
            v = by_ns.get(ns, {})
            expiry = ttl_state(ns, [dict(ix) async for ix in await self.host.source[db][coll].list_indexes()], self.cfg)
            deletes = self.host.deletes.fields(ns)["deletes_applied"] if self.host.deletes else 0
            # Proven equal: the last full pass covered every document then; every change since went through the
            # batch log and was re-checked (inserts and updates) or swept (deletes), with the source quiet.
            verified = docs - int(v.get("mismatches", 0)) if v.get("complete") else int(v.get("verified", 0))
            namespaces.append({
                "namespace": ns, "documents": docs, "verified": max(0, verified),
                "mismatches": v.get("mismatches", 0), "deletes": deletes,
                "final_sweep_deletes": (self.state.get("deleted") or {}).get(ns, 0),
                "indexes": (self.state.get("finalize") or {}).get(ns, {}), "heads": heads,
                "ttl": (self.state.get("ttl") or {}).get(ns, []),
                **expiry.as_dict(),
            })
        equal = bool(verification.get("equal"))
        self.state["report"] = {
            "cluster_name": self.cfg.cluster_name, "outcome": "complete", "started_at": started.iso(),
            "finished_at": now.iso(), "duration_s": round(now - started, 3),
            "first_started_at": self._first_started(started).iso(), "equal": equal,
            "verdict": verification.get("verdict", "not verified"),
            "namespaces": namespaces,
            "not_comparable_as_is": verification.get("not_comparable_as_is", []),
            "mismatches": verification.get("mismatches", []),
        }
        await self._still_quiet()


STEPS: tuple[Step, ...] = (
    Step("precheck", Cutover.precheck, "the readiness conditions"),
    Step("quiesce", Cutover.quiesce, "the applications have stopped writing: heads sampled twice"),
    Step("apply", Cutover.apply, "capture and apply up to the sampled heads"),
    Step("sweep", Cutover.sweep, "a final delete sweep"),
    Step("recheck", Cutover.recheck, "a final re-check until clean"),
    Step("finalize", Cutover.finalize, "remaining indexes and TTL"),
    Step("ttl", Cutover.ttl, "TTL indexes given their expiry"),
    Step("report", Cutover.report, "the report"),
)
"""The cutover, step by step; the stored step names where a run (re)starts."""
