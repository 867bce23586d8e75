"""`cosmigrate run`: the one long-running process.

Modelled on uvicorn's server lifecycle: a config object, `serve()`, signal
handlers that request a graceful stop. One supervisor owns every task; on
SIGTERM/SIGINT every namespace drains (complete pages are committed, the
rest is re-read on the next start) within `daemon.drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from cosmigrate import __version__
from cosmigrate.apply import NamespaceApplier, WriterGate
from cosmigrate.backfill import BACKFILL, BackfillError, NamespaceBackfill, backfill_loop
from cosmigrate.bytebudget import ByteBudget
from cosmigrate.capture import NamespaceCapture
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import Config, worker_socket
from cosmigrate.control import ControlError, ControlServer
from cosmigrate.crashpoints import CrashPoints
from cosmigrate.drivererrors import FIRST_CONTACT_S, first_contact_error
from cosmigrate.freshness import Freshness
from cosmigrate.heads import HeadSampler
from cosmigrate.indexplan import IndexBuilder
from cosmigrate.leases import Held, LeaseKeeper, LeaseTable
from cosmigrate.leases.records import WorkerId
from cosmigrate.ledger import Ledger, LedgerError, open_ledger
from cosmigrate.limits import raise_open_file_limit
from cosmigrate.lock import ClusterLock, LockError
from cosmigrate.logs import get_logger
from cosmigrate.metrics import Metrics, carry_over
from cosmigrate.mongo import discover_namespaces, list_namespaces, matches_patterns, source_client, target_client
from cosmigrate.planrecord import plan_loop
from cosmigrate.progress import progress_loop
from cosmigrate.proof import Proof
from cosmigrate.readiness import ForeignUnits
from cosmigrate.redact import redact
from cosmigrate.sdnotify import Notifier
from cosmigrate.status import build_status, one_line
from cosmigrate.stores import BatchStore, StoreError, open_store
from cosmigrate.timeouts import cancel_and_wait, within
from cosmigrate.tls import connection_tls
from cosmigrate.ttl import read_ttl_indexes
from cosmigrate.versions import SOURCE, TARGET, raise_for_driver_error, require_supported
from cosmigrate.vouch import prove, prove_loop, publish_loop


class StartupError(Exception):
    """A dependency did not answer at start-up; the message says what to do."""


EXIT_FENCED = 4
"""Kept for the unit file's RestartPreventExitStatus: no longer used since leases (a worker whose units were all
taken stays up as a standby, docs/design.md "Workers")."""


class Daemon:
    def __init__(self, cfg: Config, env: Mapping[str, str] | None = None, config_path: str | None = None,
                 job: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._reload = asyncio.Event()
        env = os.environ if env is None else env
        self.crash = CrashPoints.from_env(env)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.worker = WorkerId(self.owner, name=cfg.daemon.worker)
        self.log = get_logger(cluster=cfg.cluster_name, worker=self.owner)
        self.keeper: LeaseKeeper | None = None
        """This worker's leases: which units (namespaces) it runs (`cosmigrate.leases`)."""
        self.foreign = ForeignUnits()
        """What this worker proved about the units other workers hold (`cosmigrate.readiness`)."""
        self._unanswered: dict[str, Mono] = {}
        """Stopped units whose last write went unanswered, and when (a handover of them is not clean)."""
        self.start_failures: dict[str, str] = {}
        """Units this worker took but could not start, and why (handed back; status lists them as not captured)."""
        self.captures: dict[str, NamespaceCapture] = {}
        self.appliers: dict[str, NamespaceApplier] = {}
        self.freshness: dict[str, Freshness] = {}
        self.backfills: dict[str, NamespaceBackfill] = {}
        self.read_budget = ByteBudget(cfg.capture.max_unflushed_bytes_total)
        """Bytes read but not yet in the store, over every namespace (each has its own share under it)."""
        """Each namespace's full-load phase (backfill / tailing / dropped), stored in the ledger."""
        self.builders: dict[str, IndexBuilder] = {}
        """Each namespace's index plan, run in its own task (`cosmigrate.indexplan`)."""
        self._index_tasks: dict[str, asyncio.Task[None]] = {}
        self.not_captured: dict[str, str] = {}  # namespaces that exist but cannot be captured, and why
        self.started_at = Wall.now()
        self.sampler: HeadSampler | None = None
        self.unwatched: list[str] = []
        """Source namespaces the last `ctl status` listed that no capture watched yet (they block readiness)."""
        self.unlisted = ""
        """Why the last `ctl status` could not list the source's namespaces (blocks readiness), or ""."""
        self._rescan = asyncio.Event()
        self.exit_code = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self.ledger: Ledger | None = None
        self.store: BatchStore | None = None
        self.source: Any = None
        self.target: Any = None
        self.gate = WriterGate(started=False)
        self.pool = asyncio.Semaphore(cfg.apply.pool_size)
        self.control: ControlServer | None = None
        self.lock: ClusterLock | None = None
        self.open_files = (0, 0)  # RLIMIT_NOFILE (soft, hard) once started
        self.target_tls = connection_tls(cfg.target.uri, cfg.target.tls_ca_file)  # insecure only if allowed
        self.notify = Notifier(env)
        self.metrics = Metrics(self)
        self.proof: Proof | None = None
        self.job = job
        """A control request to run and then stop (`cosmigrate verify` / `cutover` without a running daemon)."""
        self.job_result: dict[str, Any] | None = None
        self.plan_record: dict[str, Any] = {}
        """The full-load estimate this migration started with (`cosmigrate.planrecord`); {} until loaded."""

    def request_stop(self) -> None:
        self._stop.set()

    async def _connect(self) -> None:
        self.open_files = raise_open_file_limit()  # capture's files must never run short (see cosmigrate.limits)
        self.ledger = open_ledger(self.cfg)
        try:
            await self.ledger.check()
        except LedgerError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.lock = ClusterLock.acquire_for(self.cfg)
        except LockError as exc:
            raise StartupError(str(exc)) from None
        self.store = open_store(self.cfg)
        try:
            await self.store.check()
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        await require_supported(SOURCE, self.cfg.source.uri)  # UnsupportedVersion: one line, exit 2
        self.source = source_client(self.cfg.source.uri, serverSelectionTimeoutMS=15_000)
        try:
            with pymongo.timeout(FIRST_CONTACT_S):  # a wrong URI is said in seconds, not after the selection timeout
                await self.source.admin.command("ping")
        except PyMongoError as exc:
            raise_for_driver_error(SOURCE, exc)
            raise StartupError(first_contact_error(SOURCE, self.cfg.source.uri, exc)) from None
        await require_supported(TARGET, self.cfg.target.uri, self.cfg.target.tls_ca_file)
        self.target = target_client(self.cfg.target.uri, self.cfg.target.tls_ca_file, serverSelectionTimeoutMS=30_000)
        try:
            with pymongo.timeout(FIRST_CONTACT_S):
                await self.target.admin.command("ping")
        except PyMongoError as exc:
            raise_for_driver_error(TARGET, exc)
            raise StartupError(first_contact_error(TARGET, self.cfg.target.uri, exc)) from None
        control = await self.ledger.get_control()
        if control.writer == "started":
            self.gate.start()
        self.proof = Proof(self)
        await self.proof.start()
        if self.lock is not None:
            self.worker = WorkerId(self.owner, name=self.cfg.daemon.worker, slot=str(self.lock.path.resolve()))
        self.keeper = LeaseKeeper(LeaseTable(self.ledger, self.worker), self.cfg.leases, self.cfg.apply.write_bound_s,
                                  self, self.log, wanted=self._wanted)
        try:
            await self.keeper.join()
        except LedgerError as exc:
            raise StartupError(f"ledger {self.cfg.ledger.url}: cannot write this worker's heartbeat: {exc}") from None
        self.control = ControlServer(worker_socket(self.cfg.control.socket, self.cfg.daemon.worker), self.handle_control,
                                     allowed_group=self.cfg.control.allowed_group,
                                     max_request_bytes=self.cfg.control.max_request_bytes)
        try:
            await self.control.start()
        except ControlError as exc:
            raise StartupError(str(exc)) from None
        if self.cfg.metrics.listen:
            from cosmigrate.config import listen_address

            try:
                await self.metrics.start_http(*listen_address(self.cfg.metrics.listen))
            except OSError as exc:
                raise StartupError(f"metrics.listen {self.cfg.metrics.listen}: cannot listen "
                                   f"({exc.strerror or exc})") from None

    async def handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """One control request; every failure is an error reply."""
        cmd = request.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "status":
            asked = Mono.now()  # the clock freshness compares samples on
            await self.certify()
            return {"ok": True, "status": await build_status(self, fresh_after=asked)}
        if cmd == "metrics":
            return {"ok": True, "metrics": await self.metrics.text()}
        if cmd == "retry":
            ns = request.get("namespace")
            if not isinstance(ns, str) or not ns:
                return {"ok": False, "error": 'retry needs "namespace": "db.collection"'}
            try:
                return await self.retry(ns)
            except LedgerError as exc:
                return {"ok": False, "error": f"{ns}: the ledger did not answer ({redact(str(exc))}); try again"}
        if cmd in ("verify", "cutover") and self.proof is not None:
            return await self.proof.handle(request)
        if cmd == "writer":
            action = request.get("action")
            if action not in ("start", "stop"):
                return {"ok": False, "error": 'writer needs "action": "start" or "stop"'}
            refused = self.proof.writer_start_refused(request) if self.proof is not None and action == "start" else ""
            if refused:
                return {"ok": False, "error": refused}
            assert self.ledger is not None
            by = str(request.get("by", "ctl"))[:100]
            state = "started" if action == "start" else "stopped"
            await self.ledger.set_writer(state, by, Wall.now().s)  # wall seconds in the ledger
            if action == "start":
                self.gate.start()
            else:
                await self.gate.stop()  # returns once no bulk write is in flight
            self.log.info(f"writer {state}", by=by)
            return {"ok": True, "writer": state}
        return {"ok": False, "error": f"unknown command {cmd!r} (known: status, writer, retry, metrics, verify, cutover, "
                                      "ping)"}

    async def serve(self) -> int:
        """Run until a stop is requested; the exit status for `cosmigrate run` (0, or EXIT_FENCED)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        slow_stop: asyncio.Task[None] | None = None
        try:
            self.log.info(f"cosmigrate {__version__} starting", version=__version__, pid=os.getpid(),
                          config=self.config_path or "")
            await self._connect()
            self.log.info("cosmigrate started", version=__version__, owner=self.owner, store=self.cfg.store.url,
                          ledger=self.cfg.ledger.url, open_files_limit=self.open_files[0])
            if not self.target_tls.secure:
                self.log.warning("target.allow_insecure_tls: the target connection is not protected; its password and "
                                 "the documents can be read or changed on the network", problem=self.target_tls.problem)
            sampler = self.sampler = HeadSampler(self.source, self._sampled, self.cfg.capture.head_sample_interval_s)
            assert self.keeper is not None
            # Renewal runs on its own task until the drain is over (then the leases are handed over).
            renewer = asyncio.create_task(self.keeper.renew_loop(), name="lease-renew")
            background = [asyncio.create_task(self.keeper.balance_loop(), name="lease-balance"),
                          asyncio.create_task(self._follow_writer(), name="writer-follow"),
                          asyncio.create_task(self._discovery(), name="discovery"),
                          asyncio.create_task(self._report(), name="sd-status"),
                          asyncio.create_task(sampler.run(), name="head-sampler"),
                          asyncio.create_task(publish_loop(self), name="readiness-publish"),
                          asyncio.create_task(prove_loop(self), name="readiness-prove"),
                          asyncio.create_task(progress_loop(self, self.cfg.log.progress_interval_s), name="progress"),
                          asyncio.create_task(backfill_loop(self), name="backfill"),
                          asyncio.create_task(plan_loop(self), name="plan")]
            if self.cfg.metrics.cloudwatch:
                background.append(asyncio.create_task(self.metrics.emf_loop(
                    self.cfg.metrics.cloudwatch_interval_s, self.cfg.metrics.cloudwatch_namespace), name="emf"))
            if self.notify.watchdog_interval_s:
                background.append(asyncio.create_task(self._watchdog(self.notify.watchdog_interval_s), name="watchdog"))
            if self.job is not None:
                background.append(asyncio.create_task(self._run_job(self.job), name="job"))
            self.notify.ready(f"writer {'started' if self.gate.started else 'stopped'}, starting capture")
            await self._stop.wait()
            self.notify.stopping()
            self.log.info("stopping: draining namespaces", namespaces=len(self.captures))
            slow_stop = asyncio.create_task(self._report_slow_stop(), name="slow-stop")
            await cancel_and_wait(background)
            if self.proof is not None:
                await self.proof.stop()
            await self._drain()
            await cancel_and_wait([renewer])
            await self.keeper.release_all()  # the drain is over: others take the units at once
            self.log.info("cosmigrate stopped", exit_code=self.exit_code)
            return self.exit_code
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._close()
            if slow_stop is not None:
                slow_stop.cancel()
                await asyncio.gather(slow_stop, return_exceptions=True)

    async def _report_slow_stop(self) -> None:
        """A stop that outlasts the drain timeout names what it waits for, in the journal.

        Every wait on the way out is bounded, so this should never fire; if it does, the operator
        (and the bug report) gets the tasks still running and where each one is, instead of a
        process that systemd eventually kills without a word.
        """
        await asyncio.sleep(self.cfg.daemon.drain_timeout_s + 10)
        while True:
            me = asyncio.current_task()
            for task in asyncio.all_tasks():
                if task is me:
                    continue
                frames = _awaiting(task)
                self.log.warning("stop is slow: still waiting for a task", task=task.get_name(), stack=" > ".join(frames))
            await asyncio.sleep(30)

    async def certify(self) -> None:
        """Sample every head now and give capture and apply a moment to reach it.

        `ctl status` calls this, so "lag 0" means caught up to the source as it was
        when the operator asked, not as it was at the last periodic sample (the
        applications may have written in between). Bounded: at most one getMore
        wait plus a second; a namespace that has not reached the new head by then
        simply shows its lag.
        """
        if self.sampler is None:
            return
        await self._list_unwatched()
        limit_s = self.cfg.capture.max_await_ms / 1000 + 1.0
        async with asyncio.TaskGroup() as group:
            group.create_task(self._certify_local(limit_s))
            group.create_task(prove(self, limit_s))  # the units other workers hold: from the ledger
        if self.proof is not None:
            await self.proof.certify(2.0)  # deletes reconciled up to this head too, if a quick sweep can tell

    async def _certify_local(self, limit_s: float) -> None:
        assert self.sampler is not None
        targets = self._sampled()
        if not targets:
            return
        async with asyncio.TaskGroup() as group:
            for ns, fresh in targets.items():
                group.create_task(self.sampler.sample(ns, fresh))
        deadline = Mono.now() + limit_s
        while Mono.now() < deadline:
            behind = False
            for ns, fresh in targets.items():
                cap, app = self.captures.get(ns), self.appliers.get(ns)
                if cap is None or app is None:
                    continue
                fresh.update(cap.status.committed_seq, app.status.applied_seq)
                behind = behind or not fresh.latest_is_caught_up
            if not behind:
                break
            await asyncio.sleep(0.05)

    async def _list_unwatched(self) -> None:
        """List the source's namespaces now: one created since the last discovery round is not captured yet,
        so readiness must wait for it (and discovery is asked to start it at once, not at its next round)."""
        try:
            names = await within(
                list_namespaces(self.source, self.cfg.capture.include, self.cfg.capture.exclude),
                max(5.0, self.cfg.capture.max_await_ms / 1000 + 1.0),
            )
        except (PyMongoError, TimeoutError) as exc:
            self.unlisted = redact(str(exc))[:200] or type(exc).__name__
            return
        self.unlisted = ""
        # Watched here (a capture runs), or held by another worker (status lists it from the ledger and it
        # blocks readiness there); a lease item alone, free or held by this worker but not started, is not.
        me = self.keeper.me.id if self.keeper is not None else ""
        elsewhere = {u for u, rec in (self.keeper.leases if self.keeper is not None else {}).items()
                     if not rec.free and rec.owner != me}
        self.unwatched = [ns for ns in names if ns not in self.captures and ns not in elsewhere]
        if self.unwatched:
            self._rescan.set()

    def _sampled(self) -> dict[str, Freshness]:
        """The namespaces whose head the sampler reads: every one this daemon captures."""
        return {ns: self.freshness[ns] for ns, cap in self.captures.items() if ns in self.freshness}

    async def _first_round(self) -> bool:
        """Whether this is the cluster's very first discovery round.

        `capture.start_at = "now"` applies only to the namespaces found then. Any
        namespace first seen later (a collection created after the first start, or
        while the daemon was down) starts from the beginning of its feed: its first
        writes were never copied anywhere else. The marker is recorded BEFORE the
        first listing, so a crash in the first round errs on the side of "beginning".
        """
        assert self.ledger is not None
        if await self.ledger.get_first_discovery():
            return False
        mine = Wall.now().s  # wall seconds in the ledger
        return await self.ledger.set_first_discovery(mine) == mine

    async def _discovery(self) -> None:
        assert self.ledger is not None and self.store is not None
        first: bool | None = None
        while not self._stop.is_set():
            try:
                if first is None:
                    first = await self._first_round()
                names, refused = await discover_namespaces(self.source, self.cfg.capture.include,
                                                           self.cfg.capture.exclude)
                start_at, first = ("" if first else "beginning"), False  # a retry of this round errs to "beginning"
                assert self.keeper is not None
                # Each unit gets its lease item (once, cluster-wide); the balance round decides who runs it.
                await self.keeper.offer(names, start_at)
                # Take this worker's share now, inside the round: what waits for the first round (a cutover,
                # verification) then finds the units it holds started, as with a single process.
                await self.keeper.balance_once(steal=False)
                for ns, why in self.start_failures.items():
                    refused.setdefault(ns, why)
                self._not_captured(refused)
                await self._refresh_ttl()
                if self.proof is not None:
                    self.proof.first_round_done()
            except (PyMongoError, LedgerError) as exc:
                self.log.warning("namespace discovery failed; will retry", error=redact(str(exc)))
            except Exception as exc:  # never let discovery die silently: log it and try again next round
                self.log.exception("namespace discovery crashed; will retry", error=redact(repr(exc)))
            waits = {asyncio.ensure_future(e.wait()) for e in (self._stop, self._reload, self._rescan)}
            await asyncio.wait(waits, timeout=self.cfg.capture.discovery_interval_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            self._rescan.clear()
            if self._reload.is_set():
                self._reload.clear()
                await self._apply_reload()

    async def _refresh_ttl(self) -> None:
        """Each discovery round, the TTL indexes of every captured namespace read again: one created at the
        source after capture started must reach status (its `_ts` expiry needs a decision; its sweep a
        schedule). A transient error keeps what was read last; the next round tries again."""
        for ns, cap in list(self.captures.items()):
            if cap.status.ttl_indexes is None:
                continue  # the watcher reads them itself before it runs
            try:
                cap.status.ttl_indexes, cap.status.ttl_unknown = await read_ttl_indexes(self.source, ns)
            except PyMongoError:
                continue

    def _not_captured(self, refused: dict[str, str]) -> None:
        """Remember the namespaces that exist but are not captured (status lists them, readiness waits), and
        log each one once per reason; they are tried again every discovery round."""
        for ns, why in refused.items():
            if self.not_captured.get(ns) != why:
                self.log.warning("namespace not captured; retried every discovery round", namespace=ns, error=why)
        self.not_captured = refused

    async def _apply_reload(self) -> None:
        """SIGHUP: take the new include/exclude patterns, the `[ttl]` decisions and the log level; everything else
        needs a restart. A decision takes effect in status at once; a `field` decision's index is built by the
        cutover's `ttl` step if the namespace's index plan was read before it."""
        from cosmigrate.config import ConfigError, load_config
        from cosmigrate.logs import configure_logging

        if self.config_path is None:
            self.log.warning("SIGHUP ignored: the daemon was not started from a config file")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            self.log.error("reload refused; keeping the running configuration", error=str(exc))
            return
        self.cfg.capture.include, self.cfg.capture.exclude = new.capture.include, new.capture.exclude
        self.cfg.log.level = new.log.level
        self.cfg.ttl = new.ttl
        configure_logging(new.log.level, self.cfg.log.format)
        dropped = [ns for ns in self.captures if not matches_patterns(ns, new.capture.include, new.capture.exclude)]
        await self._stop_units(dropped, fenced=False)
        if self.keeper is not None:
            for ns in dropped:
                await self.keeper.release(ns)
        self.log.info("configuration reloaded", include=new.capture.include, exclude=new.capture.exclude,
                      level=new.log.level, ttl={ns: d.text() for ns, d in new.ttl.items()}, stopped=dropped)

    async def _stop_units(self, units: list[str], *, fenced: bool) -> None:
        """Stop units and forget them (excluded by a reload, or their lease lost): capture commits what it
        holds, the applier's write in flight is answered. `fenced`: another worker owns them now, so the
        appliers never write again."""
        for ns in units:
            if ns in self.captures:
                self.captures[ns].stop()
            app = self.appliers.get(ns)
            if app is not None:
                app.fence() if fenced else app.stop()
        names = [name for ns in units for name in (ns, f"apply:{ns}")]
        tasks = [self._tasks.pop(name) for name in names if name in self._tasks]
        # Bounded like a SIGTERM drain: a committer retrying a put that keeps failing (a full disk) must
        # not block discovery and every later reload. What is not committed is re-read if re-included.
        await self._wait_or_cancel(tasks, "stopped namespaces did not drain in time; stopped without committing the rest")
        for ns in units:
            self.captures.pop(ns, None)
            app = self.appliers.pop(ns, None)
            if app is not None and app.unanswered_at is not None:
                self._unanswered[ns] = app.unanswered_at
            self.freshness.pop(ns, None)
            self.backfills.pop(ns, None)
            self.builders.pop(ns, None)
            index_task = self._index_tasks.pop(ns, None)
            if index_task is not None:
                await cancel_and_wait([index_task])
            if self.proof is not None:
                await self.proof.detach(ns)

    # --- what the lease keeper tells the worker (cosmigrate.leases.UnitEvents) ----------------------------------

    def _wanted(self, ns: str) -> bool:
        return matches_patterns(ns, self.cfg.capture.include, self.cfg.capture.exclude) and not self._stop.is_set()

    async def gained(self, held: Held) -> None:
        """A lease taken: start the unit. Its first target write waits for the fence (the applier does)."""
        ns = held.unit
        try:
            await self._start_capture(ns, held.record.start_at or None, lease=held)
        except (PyMongoError, LedgerError, BackfillError) as exc:
            self.start_failures[ns] = redact(f"could not start: {exc}")[:300]
            await self._stop_units([ns], fenced=False)
            raise
        self.start_failures.pop(ns, None)

    async def lost(self, unit: str, reason: str) -> None:
        """A lease lost (taken by another worker, or not renewed in time): stop the unit, never write again."""
        await self._stop_units([unit], fenced=True)

    def clean(self, unit: str) -> bool:
        """No write of the stopped unit went unanswered within the bound: the next owner needs no fence wait."""
        app = self.appliers.get(unit)
        at = app.unanswered_at if app is not None else self._unanswered.get(unit)
        return at is None or at.elapsed() > self.cfg.apply.write_bound_s

    async def _follow_writer(self) -> None:
        """The writer switch is the cluster's: `ctl writer` on any worker reaches every worker within a renew."""
        assert self.ledger is not None
        while True:
            await asyncio.sleep(self.cfg.leases.renew_s)
            try:
                control = await self.ledger.get_control()
            except LedgerError as exc:
                self.log.warning("cannot read the writer switch; keeping the last state", error=redact(str(exc)))
                continue
            if control.writer == "started" and not self.gate.started:
                self.gate.start()
                self.log.info("writer started (by another worker)", by=control.changed_by)
            elif control.writer != "started" and self.gate.started:
                await self.gate.stop()
                self.log.info("writer stopped (by another worker)", by=control.changed_by)

    async def _report(self) -> None:
        """Refresh systemd's STATUS= line (what `systemctl status cosmigrate` shows)."""
        while True:
            await asyncio.sleep(self.cfg.daemon.status_interval_s)
            try:
                self.notify.status(one_line(await build_status(self)))
            except LedgerError as exc:
                self.notify.status(f"ledger unavailable: {redact(str(exc))[:200]}")

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd from the event loop itself: a blocked loop misses pings and gets restarted."""
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    async def retry(self, ns: str) -> dict[str, Any]:
        """`ctl retry NS`: restart a failed namespace after the operator fixed its cause.

        Its capture and applier are stopped (capture commits what it holds), the
        ledger's failed state is reset under the old epoch (a namespace another
        daemon took over is not taken back), and new ones are started from the
        ledger's position: nothing is re-captured, nothing skipped.
        """
        assert self.ledger is not None
        cap, app = self.captures.get(ns), self.appliers.get(ns)
        if cap is None or app is None:
            return {"ok": False, "error": f"{ns}: this daemon does not watch that namespace "
                                          f"(known: {', '.join(sorted(self.captures)) or 'none yet'})"}
        meta = await self.ledger.get_namespace(ns)
        states = {cap.status.state, app.status.state, meta.state if meta else ""}
        if cap.status.partition_failed:
            states.add("failed")  # status says failed too: the others go on, but that partition is not read
        if "failed" not in states:
            return {"ok": False, "error": f"{ns} has not failed (state {'/'.join(sorted(s for s in states if s))}); "
                                          "nothing to retry"}
        cap.stop()
        app.stop()
        await asyncio.gather(*(self._tasks.pop(name) for name in (ns, f"apply:{ns}") if name in self._tasks),
                             return_exceptions=True)
        try:
            await self.ledger.set_state(ns, cap.epoch, "running")
        except LedgerError as exc:
            self.log.error("retry refused", namespace=ns, error=redact(str(exc)))
            return {"ok": False, "error": f"{ns}: cannot reset its failed state: {redact(str(exc))}"}
        stored = await self.ledger.get_namespace(ns)
        await self._start_capture(ns, None if stored and stored.resume_token is not None else "beginning",
                                  previous=(cap, app))
        self.log.info("namespace restarted by ctl retry", namespace=ns)
        return {"ok": True, "namespace": ns, "state": "running"}

    async def _start_capture(self, ns: str, start_at: str | None,
                             previous: tuple[NamespaceCapture, NamespaceApplier] | None = None,
                             lease: Held | None = None) -> None:
        assert self.ledger is not None and self.store is not None
        if self.proof is not None:
            await self.proof.deletes_tier(ns)  # before the first stream opens: the delete preview changes its pipeline
        meta = await self.ledger.claim(ns, self.owner)
        # A retried namespace keeps its head samples: its ledger position (and so their seqs) did not change.
        fresh = (self.freshness.get(ns) if previous else None) or Freshness()
        fresh.barriers.clear()
        # The full-load phase, before the watcher records a start position: the head it must reach is sampled now.
        backfill = await NamespaceBackfill.prepare(
            ns, self.ledger, self.source, meta.epoch, from_beginning=(start_at or self.cfg.capture.start_at) == "beginning",
            has_position=meta.resume_token is not None, freshness=fresh)
        cap = NamespaceCapture(ns, meta, self.source, self.store, self.ledger, self.cfg, self.crash,
                               start_at=start_at, freshness=fresh, budget=self.read_budget)
        held = lease if lease is not None else (previous[1].lease if previous is not None else None)
        app = NamespaceApplier(ns, self.target, self.store, self.ledger, self.cfg, self.gate, self.pool, self.crash,
                               epoch=meta.epoch, lease=held)
        cap.on_commit = app.wake.set
        app.inserts_first = lambda: backfill.phase == BACKFILL  # a full load's first versions go as inserts
        if previous is not None:
            carry_over(*previous, cap, app)
        self.freshness[ns] = fresh
        self.captures[ns] = cap
        self.appliers[ns] = app
        self.backfills[ns] = backfill
        builder = self.builders.get(ns) if previous else None
        if builder is None:
            builder = self.builders[ns] = IndexBuilder(ns, self.source, self.target, self.cfg)
            self._index_tasks[ns] = asyncio.create_task(builder.run(), name=f"indexes:{ns}")
        if backfill.phase != BACKFILL:
            builder.backfill_done.set()
        self._tasks[ns] = asyncio.create_task(self._supervise(cap, cap.run), name=f"capture:{ns}")
        self._tasks[f"apply:{ns}"] = asyncio.create_task(
            self._supervise(app, lambda: self._apply_when_indexed(builder, app)), name=f"apply:{ns}")
        if self.proof is not None:
            self.proof.attach(ns, cap, app, fresh)
        self.log.info("watching namespace", namespace=ns, epoch=meta.epoch, next_seq=meta.next_seq,
                      applied_seq=meta.applied_seq, start_at=cap.start_at if meta.resume_token is None else "stored")

    async def _apply_when_indexed(self, builder: IndexBuilder, app: NamespaceApplier) -> None:
        """The applier starts once the unique indexes exist on the target (its conflict handling reads them);
        capture does not wait for any index."""
        waits = [asyncio.ensure_future(builder.unique_ready.wait()), asyncio.ensure_future(app._stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if not builder.unique_ready.is_set():
            app.status.state = "stopped"
            return
        await app.run()

    async def _supervise(self, part: NamespaceCapture | NamespaceApplier, run: Any) -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must mark the namespace, never kill the process silently
            part.status.state = "failed"
            part.status.last_error = redact(f"internal error: {exc!r}")
            self.log.exception("namespace task crashed", namespace=part.ns, task=type(part).__name__)
        if isinstance(part, NamespaceCapture) and part.status.state == "fenced":
            self._fenced(part.ns)

    def _fenced(self, ns: str) -> None:
        """A capture lost its namespace (a newer epoch): its applier stops too (the new owner applies). The
        lease keeper drops the unit at its next renew or balance round; a worker left with no units stays
        up as a standby."""
        app = self.appliers.get(ns)
        if app is not None:
            app.fence()

    async def _drain(self) -> None:
        # A build in flight finishes on the target; a restart reads the plan back.
        await cancel_and_wait(list(self._index_tasks.values()))
        for app in self.appliers.values():
            app.stop()
        for cap in self.captures.values():
            cap.stop()
        await self._wait_or_cancel(list(self._tasks.values()),
                                   "drain timed out; uncommitted events will be re-read on the next start")

    async def _wait_or_cancel(self, tasks: list[asyncio.Task[None]], warning: str) -> None:
        """Let tasks finish within `daemon.drain_timeout_s`, then cancel and await the rest (none is orphaned)."""
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.cfg.daemon.drain_timeout_s)
        if pending:
            self.log.warning(warning, namespaces=len(pending))
            await cancel_and_wait(pending)

    async def _run_job(self, job: dict[str, Any]) -> None:
        """Run one verify/cutover request in this process, keep its result, then stop the daemon."""
        assert self.proof is not None
        cmd = str(job["cmd"])
        try:
            reply = await self.proof.handle(job)
            while reply.get("ok") and reply[cmd]["running"]:
                await asyncio.sleep(0.2)
                reply = await self.proof.handle({"cmd": cmd, "action": "status"})
            self.job_result = reply
        except Exception as exc:  # the job's caller gets one line, never a daemon left running
            self.job_result = {"ok": False, "error": f"{cmd} failed: {redact(str(exc) or repr(exc))[:300]}"}
        finally:
            self.request_stop()

    async def _close(self) -> None:
        self.notify.close()
        await self.metrics.stop_http()
        if self.control is not None:
            await self.control.stop()
        if self.target is not None:
            await self.target.close()
        if self.source is not None:
            await self.source.close()
        if self.store is not None:
            await self.store.close()
        if self.ledger is not None:
            await self.ledger.close()
        if self.lock is not None:
            self.lock.release()


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task is, outermost first: its coroutine and every coroutine it awaits."""
    frames: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None and len(frames) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}:{frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames
