"""Turning "replicated" into "proven equal", inside the daemon: deletes, verification and the cutover.

The daemon owns one `Proof`. It wires the three capabilities to each
namespace's pipeline as the namespace starts (`attach`), answers the control
requests `verify` and `cutover`, adds their fields and readiness reasons to
status, and keeps the writer stopped after a completed cutover unless an
operator forces it. The capabilities themselves live in `cosmigrate.deletes`,
`cosmigrate.verify` and `cosmigrate.cutover`.

Jobs (`cosmigrate verify`, `cosmigrate cutover`) run here as tasks: the
control request starts one (or reports the one running), and the client polls
`{"cmd": ..., "action": "status"}` until it has a result. A job survives its
client going away; a second request while one runs just reports on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pymongo.errors import PyMongoError

from cosmigrate.clock import Mono, Wall
from cosmigrate.cutover.machine import COMPLETE, EXIT_ERROR, Cutover, Result
from cosmigrate.deletes.service import Deletes
from cosmigrate.logs import get_logger
from cosmigrate.nslink import NamespaceLink
from cosmigrate.redact import redact
from cosmigrate.timeouts import cancel_and_wait
from cosmigrate.verify.report import iso
from cosmigrate.verify.service import Verification

if TYPE_CHECKING:
    from cosmigrate.units import Unit
    from cosmigrate.worker import Worker

EXIT_MISMATCHES = 6


class Proof:
    def __init__(self, worker: Worker, certify: Callable[[], Awaitable[None]]) -> None:
        """`certify`: sample every head now and let capture and apply reach it (the daemon's, as `ctl status`
        does before it answers); the cutover's readiness check runs it first."""
        self.worker = worker
        self._certify_heads = certify
        self.cfg = worker.cfg
        self.crash = worker.crash
        self.links: dict[str, NamespaceLink] = {}
        self.deletes: Deletes | None = None
        self.verification: Verification | None = None
        self.discovered = asyncio.Event()
        self.cutover_step = ""
        self.machine: Cutover | None = None
        self.jobs: dict[str, asyncio.Task[Result]] = {}
        self.results: dict[str, Result] = {}
        self.verify_scope: list[str] = []
        self.verify_estimate: int | None = None
        """The source's estimated document count over the namespaces a one-off pass reads (its ETA)."""
        self.log = get_logger(component="proof")

    # --- CutoverHost ------------------------------------------------------------------------

    @property
    def ledger(self) -> Any:
        return self.worker.ledger

    @property
    def source(self) -> Any:
        return self.worker.source

    @property
    def target(self) -> Any:
        return self.worker.target

    @property
    def gate(self) -> Any:
        return self.worker.gate

    async def readiness(self) -> tuple[list[str], list[str]]:
        from cosmigrate.status import build_status

        await self._certify_heads()
        status = await build_status(self.worker, fresh_after=Mono.now().minus(2 * self.cfg.capture.head_sample_interval_s),
                                    proof=False)
        operator = list(status["needs_operator"])
        return operator, [r for r in status["not_ready_reasons"] if r not in operator]

    async def wait_discovered(self) -> None:
        await self.discovered.wait()

    # --- wiring -------------------------------------------------------------------------------

    async def start(self) -> None:
        """After the daemon connected: the services, and whether a cutover already completed."""
        assert self.worker.ledger is not None and self.worker.store is not None
        self.deletes = Deletes(self.cfg, self.worker.source, self.worker.target, self.worker.ledger)
        self.verification = Verification(self.cfg, self.worker.source, self.worker.target, self.worker.ledger,
                                         self.worker.store, self.crash)
        state = await Cutover(self).load()
        self.cutover_step = str(state.get("step", ""))
        if self.cutover_step == COMPLETE:
            self.deletes.halted = self.verification.halted = True

    async def deletes_tier(self, ns: str) -> None:
        """Before a namespace's first stream opens: whether the account has the delete preview (asked once)."""
        if self.deletes is not None:
            await self.deletes.detect(ns)

    def attach(self, unit: Unit) -> None:
        """A unit started: its deletes and verification follow its capture and applier."""
        assert self.deletes is not None and self.verification is not None
        ns, cap, app, fresh = unit.ns, unit.capture, unit.applier, unit.freshness
        sampler = self.worker.sampler

        def caught_up() -> Mono | None:
            fresh.update(cap.status.committed_seq, app.status.applied_seq)
            return fresh.caught_up_t

        async def sample() -> None:
            if sampler is not None:
                await sampler.sample(ns, fresh)

        link = unit.link = self.links[ns] = NamespaceLink(
            ns, cap.epoch, committed_seq=lambda: cap.status.committed_seq, written_seq=lambda: app.status.written_seq,
            positioned=lambda: app.status.positioned, caught_up=caught_up,
            latest_head=lambda: fresh.latest_head,
            latest_head_at=lambda: fresh.last_sample_at,
            sample=sample, add_head=fresh.add_sample, deletes_applied=lambda: app.deletes_sent,
            expires=lambda: bool(cap.status.ttl_indexes or cap.status.ttl_unknown),
            reuse_heads_s=max(0.5, 2 * self.cfg.capture.head_sample_interval_s),
        )
        self.deletes.attach(link, app)
        self.verification.attach(link)

    async def detach(self, unit: Unit) -> None:
        """A unit stopped: its deletes and verification stop too. Only its own: when the namespace was started
        again meanwhile (its lease taken back while this one drained), the new unit's parts stay."""
        ns = unit.ns
        if unit.link is None or self.links.get(ns) is not unit.link:
            return
        self.links.pop(ns, None)
        # Every part dropped before the first await: the namespace may be attached again during it.
        tasks = self.deletes.forget(ns) if self.deletes is not None else []
        tasks += self.verification.forget(ns) if self.verification is not None else []
        await cancel_and_wait(tasks)

    async def certify(self, limit_s: float) -> None:
        if self.deletes is not None and not self.deletes.halted:
            await self.deletes.certify(limit_s)

    def first_round_done(self) -> None:
        self.discovered.set()

    async def stop(self) -> None:
        await cancel_and_wait(list(self.jobs.values()))
        if self.deletes is not None:
            await self.deletes.stop()
        if self.verification is not None:
            await self.verification.stop()

    # --- jobs ---------------------------------------------------------------------------------

    def start_job(self, name: str, make: Callable[[], Awaitable[Result]]) -> None:
        if name in self.jobs and not self.jobs[name].done():
            return
        self.results.pop(name, None)

        async def run() -> Result:
            try:
                result = await make()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a job's failure is its result, never a dead daemon
                self.log.exception(f"{name} failed", error=redact(repr(exc))[:300])
                result = Result(EXIT_ERROR, f"{name} failed: {redact(str(exc) or repr(exc))[:300]}")
            self.results[name] = result
            return result

        self.jobs[name] = asyncio.create_task(run(), name=f"job:{name}")

    async def run_cutover(self) -> Result:
        machine = self.machine = Cutover(self)
        try:
            result = await machine.run()
        finally:
            self.cutover_step = str(machine.state.get("step", self.cutover_step))
        if self.cutover_step == COMPLETE:
            if self.deletes is not None:
                self.deletes.halted = True
                await self.deletes.stop()
            if self.verification is not None:
                self.verification.halted = True
                await self.verification.stop()
        else:
            self.resume_background()
        return result

    def resume_background(self) -> None:
        """After a cutover that stopped early: the sweeps and continuous verification go on."""
        if self.deletes is not None:
            self.deletes.resume()
        if self.verification is not None:
            self.verification.resume()

    async def run_verify(self, limit: int) -> Result:
        from cosmigrate.backfill import estimate_count

        assert self.verification is not None
        await self.discovered.wait()
        started = Wall.now()
        self.verify_scope = sorted(self.links)
        self.verify_estimate = None
        with contextlib.suppress(PyMongoError):  # the ETA is advisory: a count the source refuses only loses it
            counts = [await estimate_count(self.source, ns) for ns in self.verify_scope]
            self.verify_estimate = None if None in counts else sum(c or 0 for c in counts)
        await self.verification.one_pass(sorted(self.links))
        report = await self.verification.report(started, limit, sorted(self.links))
        if report["equal"]:
            return Result(0, report["verdict"], report)
        return Result(EXIT_MISMATCHES, report["verdict"], report)

    def job_reply(self, name: str) -> dict[str, Any]:
        task = self.jobs.get(name)
        result = self.results.get(name)
        out: dict[str, Any] = {"running": task is not None and not task.done()}
        if name == "cutover":
            out["step"] = self.machine.step if out["running"] and self.machine else self.cutover_step
            out["waiting_for"] = self.machine.waiting if out["running"] and self.machine else ""
        elif self.verification is not None:  # the pass's progress, for the client's rate and ETA
            verifiers = [self.verification.verifiers[ns] for ns in self.verify_scope if ns in self.verification.verifiers]
            out["docs_checked"] = sum(v.state.docs for v in verifiers)
            out["docs_estimated"] = self.verify_estimate
        if result is not None and not out["running"]:
            out["result"] = {"exit_code": result.code, "message": result.message, "report": result.report}
        return out

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control requests `verify` and `cutover` ({"action": "start" | "status"})."""
        cmd = str(request.get("cmd"))
        action = request.get("action", "start")
        if action == "cancel" and cmd == "cutover":
            running = "cutover" in self.jobs and not self.jobs["cutover"].done()
            if not running or self.machine is None:
                return {"ok": False, "error": f"no cutover is running (status: {self.cutover_status()})"}
            self.machine.cancel(str(request.get("by", "ctl"))[:100])
            self.log.warning("cutover cancel requested", by=self.machine.cancel_by, step=self.machine.step)
            return {"ok": True, cmd: self.job_reply(cmd)}
        if action not in ("start", "status"):
            return {"ok": False, "error": f'{cmd} needs "action": "start" or "status" (cutover: or "cancel")'}
        if action == "start":
            if cmd == "cutover":
                self.start_job("cutover", self.run_cutover)
            else:
                limit = request.get("max_mismatches", self.cfg.verify.max_mismatches)
                if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
                    return {"ok": False, "error": "max_mismatches must be a whole number, 0 or more"}
                if self.cutover_step == COMPLETE:
                    return {"ok": False, "error": "cutover is complete: the target belongs to the applications now"}
                self.start_job("verify", lambda: self.run_verify(limit))
        return {"ok": True, cmd: self.job_reply(cmd)}

    # --- status -------------------------------------------------------------------------------

    def writer_start_refused(self, request: dict[str, Any]) -> str:
        """Why `ctl writer start` is refused ("" if it is not): after cutover, only with --force."""
        if self.cutover_step == COMPLETE and not request.get("force"):
            return ("cutover is complete: the applications write to the target now, and starting the writer would "
                    "overwrite their changes; use --force if you really mean it")
        return ""

    def fields(self, ns: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.deletes is not None:
            out.update(self.deletes.fields(ns))
        else:
            out.update(deletes_tier="none", deletes_reconciled_at=0.0, deletes_applied=0, sweep_progress=None)
        if self.verification is not None:
            out.update(self.verification.fields(ns))
        else:
            out.update(documents_verified=0, mismatches=0, last_verify_pass=None)
        out["deletes_reconciled_at"] = iso(out["deletes_reconciled_at"])  # wall seconds (cosmigrate/deletes/ fields)
        last: Wall | None = out["last_verify_pass"]
        out["last_verify_pass"] = last.iso() if last is not None else None
        return out

    def reasons(self, namespaces: list[str]) -> list[str]:
        out: list[str] = []
        if self.deletes is not None:
            out += self.deletes.reasons(namespaces)
        if self.verification is not None:
            out += self.verification.reasons(namespaces)
        return out

    def cutover_status(self) -> str:
        running = "cutover" in self.jobs and not self.jobs["cutover"].done()
        if self.cutover_step == COMPLETE:
            return "cutover complete"
        if running:
            return f"cutover running: {self.machine.step if self.machine else self.cutover_step}"
        if self.cutover_step:
            return f"cutover stopped at {self.cutover_step}"
        return "not started"
