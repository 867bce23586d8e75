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
from collections.abc import Mapping
from typing import Any

import pymongo
from pymongo.errors import PyMongoError

from cosmigrate import __version__
from cosmigrate.apply import NamespaceApplier, WriteLease
from cosmigrate.backfill import BACKFILL, BackfillError, NamespaceBackfill
from cosmigrate.capture import NamespaceCapture
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import Config, worker_socket
from cosmigrate.control import ControlError, ControlServer
from cosmigrate.drivererrors import FIRST_CONTACT_S, first_contact_error
from cosmigrate.freshness import Freshness
from cosmigrate.heads import HeadSampler
from cosmigrate.indexplan import IndexBuilder
from cosmigrate.leases import Held, LeaseKeeper, LeaseTable
from cosmigrate.leases.records import WorkerId
from cosmigrate.ledger import LedgerError, open_ledger
from cosmigrate.limits import raise_open_file_limit
from cosmigrate.lock import ClusterLock, LockError
from cosmigrate.metrics import Metrics, carry_over
from cosmigrate.mongo import discover_namespaces, list_namespaces, matches_patterns, source_client, target_client
from cosmigrate.planrecord import plan_loop
from cosmigrate.progress import progress_loop
from cosmigrate.proof import Proof
from cosmigrate.redact import redact
from cosmigrate.sdnotify import Notifier
from cosmigrate.status import build_status, one_line
from cosmigrate.stores import StoreError, open_store
from cosmigrate.timeouts import cancel_and_wait, within
from cosmigrate.ttl import read_ttl_indexes
from cosmigrate.units import Unit
from cosmigrate.versions import SOURCE, TARGET, raise_for_driver_error, require_supported
from cosmigrate.vouch import prove, prove_loop, publish_loop
from cosmigrate.worker import Worker


class LeaseMoved(Exception):
    """A unit's lease was lost while the unit was being started or retried: it is not started here."""


class StartupError(Exception):
    """A dependency did not answer at start-up; the message says what to do."""


EXIT_FENCED = 4
"""Kept for the unit file's RestartPreventExitStatus: no longer used since leases (a worker whose units were all
taken stays up as a standby, docs/design.md "Workers")."""


WRITER_FOLLOW_S = 1.0
"""How often a worker reads the cluster's writer switch (set by `ctl writer` on any worker)."""


class Daemon:
    """One worker's lifecycle: connect, take and lose leases, start and stop units, drain on SIGTERM.

    The worker's state (connections, leases, the registry of units) is a `Worker` (`cosmigrate.worker`), which
    status, metrics and the proof layer read; this class only runs it.
    """

    def __init__(self, cfg: Config, env: Mapping[str, str] | None = None, config_path: str | None = None,
                 job: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._reload = asyncio.Event()
        env = os.environ if env is None else env
        self.worker = Worker(cfg, env)
        self.units = self.worker.units
        self.log = self.worker.log
        self._rescan = asyncio.Event()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self.control: ControlServer | None = None
        self.lock: ClusterLock | None = None
        self.open_files = (0, 0)  # RLIMIT_NOFILE (soft, hard) once started
        self.notify = Notifier(env)
        self.metrics = Metrics(self.worker)
        self.proof: Proof | None = None
        self.job = job
        """A control request to run and then stop (`cosmigrate verify` / `cutover` without a running daemon)."""
        self.job_result: dict[str, Any] | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def _connect(self) -> None:
        self.open_files = raise_open_file_limit()  # capture's files must never run short (see cosmigrate.limits)
        self.worker.ledger = open_ledger(self.cfg)
        try:
            await self.worker.ledger.check()
        except LedgerError as exc:
            raise StartupError(str(exc)) from None
        try:
            self.lock = ClusterLock.acquire_for(self.cfg)
        except LockError as exc:
            raise StartupError(str(exc)) from None
        self.worker.store = open_store(self.cfg)
        try:
            await self.worker.store.check()
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        await require_supported(SOURCE, self.cfg.source.uri)  # UnsupportedVersion: one line, exit 2
        self.worker.source = source_client(self.cfg.source.uri, serverSelectionTimeoutMS=15_000)
        try:
            with pymongo.timeout(FIRST_CONTACT_S):  # a wrong URI is said in seconds, not after the selection timeout
                await self.worker.source.admin.command("ping")
        except PyMongoError as exc:
            raise_for_driver_error(SOURCE, exc)
            raise StartupError(first_contact_error(SOURCE, self.cfg.source.uri, exc)) from None
        self.worker.source_streams = source_client(self.cfg.source.uri, serverSelectionTimeoutMS=15_000,
                                                   maxPoolSize=None)
        await require_supported(TARGET, self.cfg.target.uri, self.cfg.target.tls_ca_file)
        self.worker.target = target_client(self.cfg.target.uri, self.cfg.target.tls_ca_file, serverSelectionTimeoutMS=30_000)
        try:
            with pymongo.timeout(FIRST_CONTACT_S):
                await self.worker.target.admin.command("ping")
        except PyMongoError as exc:
            raise_for_driver_error(TARGET, exc)
            raise StartupError(first_contact_error(TARGET, self.cfg.target.uri, exc)) from None
        control = await self.worker.ledger.get_control()
        if control.writer == "started":
            self.worker.gate.start()
        self.proof = self.worker.proof = Proof(self.worker, self.certify)
        await self.proof.start()
        if self.lock is not None:
            self.worker.id = WorkerId(self.worker.owner, name=self.cfg.daemon.worker, slot=str(self.lock.path.resolve()))
        self.worker.keeper = LeaseKeeper(LeaseTable(self.worker.ledger, self.worker.id), self.cfg.leases,
                                         self.cfg.apply.write_bound_s, self, self.log, wanted=self._wanted)
        try:
            await self.worker.keeper.join()
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
            return {"ok": True, "status": await build_status(self.worker, fresh_after=asked, judged_at=asked)}
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
            assert self.worker.ledger is not None
            by = str(request.get("by", "ctl"))[:100]
            state = "started" if action == "start" else "stopped"
            await self.worker.ledger.set_writer(state, by, Wall.now().s)  # wall seconds in the ledger
            if action == "start":
                self.worker.gate.start()
            else:
                await self.worker.gate.stop()  # returns once no bulk write is in flight
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
            self.log.info("cosmigrate started", version=__version__, owner=self.worker.owner, store=self.cfg.store.url,
                          ledger=self.cfg.ledger.url, open_files_limit=self.open_files[0])
            if not self.worker.target_tls.secure:
                self.log.warning("target.allow_insecure_tls: the target connection is not protected; its password and "
                                 "the documents can be read or changed on the network", problem=self.worker.target_tls.problem)
            sampler = self.worker.sampler = HeadSampler(self.worker.source, self._sampled,
                                                        self.cfg.capture.head_sample_interval_s,
                                                        self.cfg.capture.head_sample_concurrency,
                                                        self.cfg.capture.head_sample_max_per_s)
            assert self.worker.keeper is not None and self.worker.ledger is not None
            # Renewal runs on its own task until the drain is over (then the leases are handed over).
            renewer = asyncio.create_task(self.worker.keeper.renew_loop(), name="lease-renew")
            background = [asyncio.create_task(self.worker.keeper.balance_loop(), name="lease-balance"),
                          asyncio.create_task(self._follow_writer(), name="writer-follow"),
                          asyncio.create_task(self._discovery(), name="discovery"),
                          asyncio.create_task(self._report(), name="sd-status"),
                          asyncio.create_task(sampler.run(), name="head-sampler"),
                          asyncio.create_task(publish_loop(self.worker), name="readiness-publish"),
                          asyncio.create_task(prove_loop(self.worker), name="readiness-prove"),
                          asyncio.create_task(progress_loop(self.worker, self.cfg.log.progress_interval_s), name="progress"),
                          asyncio.create_task(self._backfill_loop(), name="backfill"),
                          asyncio.create_task(plan_loop(self.worker), name="plan")]
            if self.cfg.metrics.cloudwatch:
                background.append(asyncio.create_task(self.metrics.emf_loop(
                    self.cfg.metrics.cloudwatch_interval_s, self.cfg.metrics.cloudwatch_namespace), name="emf"))
            if self.notify.watchdog_interval_s:
                background.append(asyncio.create_task(self._watchdog(self.notify.watchdog_interval_s), name="watchdog"))
            if self.job is not None:
                background.append(asyncio.create_task(self._run_job(self.job), name="job"))
            self.notify.ready(f"writer {'started' if self.worker.gate.started else 'stopped'}, starting capture")
            await self._stop.wait()
            self.notify.stopping()
            self.log.info("stopping: draining namespaces", namespaces=len(self.units))
            slow_stop = asyncio.create_task(self._report_slow_stop(), name="slow-stop")
            await cancel_and_wait(background)
            if self.proof is not None:
                await self.proof.stop()
            await self._drain()
            await cancel_and_wait([renewer])
            await self.worker.keeper.release_all()  # the drain is over: others take the units at once
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
        if self.worker.sampler is None:
            return
        await self._list_unwatched()
        limit_s = self.cfg.capture.max_await_ms / 1000 + 1.0
        async with asyncio.TaskGroup() as group:
            group.create_task(self._certify_local(limit_s))
            group.create_task(prove(self.worker, limit_s))  # the units other workers hold: from the ledger
        if self.proof is not None:
            await self.proof.certify(2.0)  # deletes reconciled up to this head too, if a quick sweep can tell

    async def _certify_local(self, limit_s: float) -> None:
        assert self.worker.sampler is not None
        targets = self._sampled()
        if not targets:
            return
        async with asyncio.TaskGroup() as group:
            for ns, fresh in targets.items():
                group.create_task(self.worker.sampler.sample(ns, fresh))
        deadline = Mono.now() + limit_s
        while Mono.now() < deadline:
            behind = False
            for ns, fresh in targets.items():
                unit = self.units.get(ns)
                if unit is None:
                    continue
                fresh.update(unit.capture.status.committed_seq, unit.applier.status.applied_seq)
                behind = behind or not fresh.latest_is_caught_up
            if not behind:
                break
            await asyncio.sleep(0.05)

    async def _list_unwatched(self) -> None:
        """List the source's namespaces now: one created since the last discovery round is not captured yet,
        so readiness must wait for it (and discovery is asked to start it at once, not at its next round)."""
        try:
            names = await within(
                list_namespaces(self.worker.source, self.cfg.capture.include, self.cfg.capture.exclude),
                max(5.0, self.cfg.capture.max_await_ms / 1000 + 1.0),
            )
        except (PyMongoError, TimeoutError) as exc:
            self.worker.unlisted = redact(str(exc))[:200] or type(exc).__name__
            return
        self.worker.unlisted = ""
        # Watched here (a capture runs), or held by another worker (status lists it from the ledger and it
        # blocks readiness there); a lease item alone, free or held by this worker but not started, is not.
        me = self.worker.keeper.me.id if self.worker.keeper is not None else ""
        elsewhere = {u for u, rec in (self.worker.keeper.leases if self.worker.keeper is not None else {}).items()
                     if not rec.free and rec.owner != me}
        self.worker.unwatched = [ns for ns in names if ns not in self.units and ns not in elsewhere]
        if self.worker.unwatched:
            self._rescan.set()

    def _sampled(self) -> dict[str, Freshness]:
        """The namespaces whose head the sampler reads: every unit this worker runs."""
        return self.units.sampled()

    async def _first_round(self) -> bool:
        """Whether this is the cluster's very first discovery round.

        `capture.start_at = "now"` applies only to the namespaces found then. Any
        namespace first seen later (a collection created after the first start, or
        while the daemon was down) starts from the beginning of its feed: its first
        writes were never copied anywhere else. The marker is recorded BEFORE the
        first listing, so a crash in the first round errs on the side of "beginning".
        """
        assert self.worker.ledger is not None
        if await self.worker.ledger.get_first_discovery():
            return False
        mine = Wall.now().s  # wall seconds in the ledger
        return await self.worker.ledger.set_first_discovery(mine) == mine

    async def _discovery(self) -> None:
        assert self.worker.ledger is not None and self.worker.store is not None
        first: bool | None = None
        while not self._stop.is_set():
            try:
                if first is None:
                    first = await self._first_round()
                names, refused = await discover_namespaces(self.worker.source, self.cfg.capture.include,
                                                           self.cfg.capture.exclude)
                start_at, first = ("" if first else "beginning"), False  # a retry of this round errs to "beginning"
                assert self.worker.keeper is not None
                # Each unit gets its lease item (once, cluster-wide); the balance round decides who runs it.
                await self.worker.keeper.offer(names, start_at)
                # Take this worker's share now, inside the round: what waits for the first round (a cutover,
                # verification) then finds the units it holds started, as with a single process.
                await self.worker.keeper.balance_once(steal=False)
                for ns, why in self.units.start_failures.items():
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
        for ns in self.units:
            unit = self.units.get(ns)
            if unit is None:
                continue  # stopped meanwhile
            cap = unit.capture
            if cap.status.ttl_indexes is None:
                continue  # the watcher reads them itself before it runs
            try:
                cap.status.ttl_indexes, cap.status.ttl_unknown = await read_ttl_indexes(self.worker.source, ns)
            except PyMongoError:
                continue

    def _not_captured(self, refused: dict[str, str]) -> None:
        """Remember the namespaces that exist but are not captured (status lists them, readiness waits), and
        log each one once per reason; they are tried again every discovery round."""
        for ns, why in refused.items():
            if self.worker.not_captured.get(ns) != why:
                self.log.warning("namespace not captured; retried every discovery round", namespace=ns, error=why)
        self.worker.not_captured = refused

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
        dropped = [ns for ns in self.units if not matches_patterns(ns, new.capture.include, new.capture.exclude)]
        await self._stop_units(dropped, fenced=False)
        if self.worker.keeper is not None:
            for ns in dropped:
                await self.worker.keeper.release(ns)
        self.log.info("configuration reloaded", include=new.capture.include, exclude=new.capture.exclude,
                      level=new.log.level, ttl={ns: d.text() for ns, d in new.ttl.items()}, stopped=dropped)

    async def _stop_units(self, units: list[str], *, fenced: bool) -> None:
        """Stop units and forget them (excluded by a reload, or their lease lost): capture commits what it
        holds, the applier's write in flight is answered. `fenced`: another worker owns them now, so the
        appliers never write again."""
        stopping = [unit for unit in (self.units.get(ns) for ns in units) if unit is not None]
        for unit in stopping:
            unit.stop(fenced=fenced)
        # Bounded like a SIGTERM drain: a committer retrying a put that keeps failing (a full disk) must
        # not block discovery and every later reload. What is not committed is re-read if re-included.
        await self._wait_or_cancel([task for unit in stopping for task in unit.tasks],
                                   "stopped namespaces did not drain in time; stopped without committing the rest")
        for unit in stopping:
            self.units.remove(unit)
            await unit.stop_indexes()
            if self.proof is not None:
                await self.proof.detach(unit)

    # --- what the lease keeper tells the worker (cosmigrate.leases.UnitEvents) ----------------------------------

    def _wanted(self, ns: str) -> bool:
        return matches_patterns(ns, self.cfg.capture.include, self.cfg.capture.exclude) and not self._stop.is_set()

    async def gained(self, held: Held) -> None:
        """A lease taken: start the unit. Its first target write waits for the fence (the applier does)."""
        ns = held.unit
        try:
            await self._start_capture(ns, held.record.start_at or None, lease=held)
        except (PyMongoError, LedgerError, BackfillError) as exc:
            self.units.start_failures[ns] = redact(f"could not start: {exc}")[:300]
            await self._stop_units([ns], fenced=False)
            raise

    async def lost(self, unit: str, reason: str) -> None:
        """A lease lost (taken by another worker, or not renewed in time): stop the unit, never write again."""
        await self._stop_units([unit], fenced=True)

    def clean(self, unit: str) -> bool:
        """No write of the stopped unit went unanswered within the bound: the next owner needs no fence wait."""
        at = self.units.unanswered_at(unit)
        return at is None or at.elapsed() > self.cfg.apply.write_bound_s

    async def _follow_writer(self) -> None:
        """The writer switch is the cluster's: `ctl writer` on any worker reaches every other worker within
        `WRITER_FOLLOW_S` (one small ledger read a second; a renew interval of 10 s would leave the others
        idle that long after `ctl writer start`)."""
        assert self.worker.ledger is not None
        while True:
            await asyncio.sleep(min(WRITER_FOLLOW_S, self.cfg.leases.renew_s))
            try:
                control = await self.worker.ledger.get_control()
            except LedgerError as exc:
                self.log.warning("cannot read the writer switch; keeping the last state", error=redact(str(exc)))
                continue
            if control.writer == "started" and not self.worker.gate.started:
                self.worker.gate.start()
                self.log.info("writer started (by another worker)", by=control.changed_by)
            elif control.writer != "started" and self.worker.gate.started:
                await self.worker.gate.stop()
                self.log.info("writer stopped (by another worker)", by=control.changed_by)

    async def _report(self) -> None:
        """Refresh systemd's STATUS= line (what `systemctl status cosmigrate` shows)."""
        while True:
            await asyncio.sleep(self.cfg.daemon.status_interval_s)
            try:
                self.notify.status(one_line(await build_status(self.worker)))
            except LedgerError as exc:
                self.notify.status(f"ledger unavailable: {redact(str(exc))[:200]}")

    async def _backfill_loop(self, interval_s: float = 0.25) -> None:
        """Every unit's full-load check, every `interval_s` (`cosmigrate.backfill.check_round`)."""
        assert self.worker.ledger is not None
        while True:
            for unit in self.units.values():
                await unit.check_backfill(self.worker.source, self.worker.ledger)
            await asyncio.sleep(interval_s)

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
        w = self.worker
        assert w.ledger is not None
        old = self.units.get(ns)
        if old is None:
            return {"ok": False, "error": f"{ns}: this daemon does not watch that namespace "
                                          f"(known: {', '.join(sorted(self.units)) or 'none yet'})"}
        cap, app = old.capture, old.applier
        meta = await w.ledger.get_namespace(ns)
        states = {cap.status.state, app.status.state, meta.state if meta else ""}
        if cap.status.partition_failed:
            states.add("failed")  # status says failed too: the others go on, but that partition is not read
        if "failed" not in states:
            return {"ok": False, "error": f"{ns} has not failed (state {'/'.join(sorted(s for s in states if s))}); "
                                          "nothing to retry"}
        old.stop(fenced=False)
        await asyncio.gather(*old.tasks, return_exceptions=True)
        try:
            await w.ledger.set_state(ns, cap.epoch, "running")
        except LedgerError as exc:
            self.log.error("retry refused", namespace=ns, error=redact(str(exc)))
            return {"ok": False, "error": f"{ns}: cannot reset its failed state: {redact(str(exc))}"}
        stored = await w.ledger.get_namespace(ns)
        if self.units.get(ns) is not old:  # its lease was lost (and the unit stopped) while it was being retried
            return {"ok": False, "error": f"{ns}: its lease moved while it was being retried; see `ctl status`"}
        try:
            await self._start_capture(ns, None if stored and stored.resume_token is not None else "beginning",
                                      previous=old)
        except LeaseMoved as exc:
            return {"ok": False, "error": str(exc)}
        self.log.info("namespace restarted by ctl retry", namespace=ns)
        return {"ok": True, "namespace": ns, "state": "running"}

    async def _start_capture(self, ns: str, start_at: str | None, previous: Unit | None = None,
                             lease: Held | None = None) -> None:
        """Build the unit's parts, register it and start it. `previous`: the unit `ctl retry` replaces (its head
        samples, index plan and counters carry over: its ledger position did not change)."""
        w = self.worker
        assert w.ledger is not None and w.store is not None
        held = lease if lease is not None else (previous.applier.lease if previous is not None else None)
        if self.proof is not None:
            await self.proof.deletes_tier(ns)  # before the first stream opens: the delete preview changes its pipeline
        self._require_lease(ns, held)  # before the claim too: a claim bumps the epoch, fencing a new owner
        meta = await w.ledger.claim(ns, w.owner)
        fresh = previous.freshness if previous is not None else Freshness()
        fresh.barriers.clear()
        # The full-load phase, before the watcher records a start position: the head it must reach is sampled now.
        backfill = await NamespaceBackfill.prepare(
            ns, w.ledger, w.source, meta.epoch, from_beginning=(start_at or self.cfg.capture.start_at) == "beginning",
            has_position=meta.resume_token is not None, freshness=fresh)
        cap = NamespaceCapture(ns, meta, w.source_streams, w.store, w.ledger, self.cfg, w.crash,
                               start_at=start_at, freshness=fresh, budget=w.read_budget)
        app = NamespaceApplier(ns, w.target, w.store, w.ledger, self.cfg, w.gate, w.pool, w.crash,
                               epoch=meta.epoch, lease=held)
        cap.on_commit = app.wake.set
        app.inserts_first = lambda: backfill.phase == BACKFILL  # a full load's first versions go as inserts
        if previous is not None:
            carry_over(previous.capture, previous.applier, cap, app)
            builder, index_task = previous.builder, previous.index_task
        else:
            builder, index_task = IndexBuilder(ns, w.source, w.target, self.cfg), None
        if backfill.phase != BACKFILL:
            builder.backfill_done.set()
        unit = Unit(ns, cap, app, fresh, backfill, builder, index_task=index_task)
        existing = self.units.get(ns)
        if existing is not None and existing is not previous:  # never two units of one namespace at once
            await self._stop_units([ns], fenced=True)
        # No await from here to the start: the lease checked is the lease the unit runs under.
        self._require_lease(ns, held)
        if previous is not None and self.units.get(ns) is not previous:
            raise LeaseMoved(f"{ns}: stopped while it was being retried; not started again here")
        self.units.add(unit)
        unit.start()
        if self.proof is not None:
            self.proof.attach(unit)
        self.log.info("watching namespace", namespace=ns, epoch=meta.epoch, next_seq=meta.next_seq,
                      applied_seq=meta.applied_seq, start_at=cap.start_at if meta.resume_token is None else "stored")

    def _require_lease(self, ns: str, held: WriteLease | None) -> None:
        """Raise LeaseMoved unless this worker still holds the lease a unit is being started under."""
        keeper = self.worker.keeper
        if held is not None and keeper is not None and keeper.holds(ns) is not held:
            raise LeaseMoved(f"{ns}: its lease moved while the unit was starting; not started here")

    async def _drain(self) -> None:
        units = self.units.values()
        # A build in flight finishes on the target; a restart reads the plan back.
        await cancel_and_wait([unit.index_task for unit in units if unit.index_task is not None])
        for unit in units:
            unit.stop(fenced=False)
        await self._wait_or_cancel(self.units.tasks(), "drain timed out; uncommitted events will be re-read on the next start")

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
        if self.worker.target is not None:
            await self.worker.target.close()
        if self.worker.source is not None:
            await self.worker.source.close()
        if self.worker.source_streams is not None:
            await self.worker.source_streams.close()
        if self.worker.store is not None:
            await self.worker.store.close()
        if self.worker.ledger is not None:
            await self.worker.ledger.close()
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
