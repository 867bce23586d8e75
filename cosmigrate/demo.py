"""`cosmigrate demo`: the whole job on the embedded defaults, in one command.

It plays every role of a real migration on this machine: the sandbox plays
Cosmos DB and DocumentDB, a local directory and a SQLite file play S3 and
DynamoDB, `cosmigrate run` runs as a child process (as systemd would run it),
and the demo acts as the application (a write workload with hot keys, a
unique index with value swaps, throttling bursts) and as the operator
(`ctl writer start`, watching status, cutover). It ends by proving that the
target equals the source document for document.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure, PyMongoError
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from cosmigrate.backoff import retry_after_s
from cosmigrate.config import Config, to_toml
from cosmigrate.control import ControlError, request
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from cosmigrate.sandbox.workload import Workload
from cosmigrate.statusview import render
from cosmigrate.terminal import printable
from cosmigrate.timeouts import within

NAMESPACES = ["app.users", "app.orders", "app.events", "shop.items", "shop.carts"]
# app.users carries the unique index and only sees email swaps and profile edits.
WORKLOAD_NAMESPACES = NAMESPACES[1:]


@dataclass
class Summary:
    writes: int = 0
    events_captured: int = 0
    events_applied: int = 0
    batches: int = 0
    target_writes: int = 0
    max_gap_s: float = 0.0
    seconds_to_ready: float | None = None
    apply_eps_peak: float = 0.0
    app_throttled: int = 0
    problems: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, workdir: Path, duration_s: float, console: Console) -> None:
        self.workdir = workdir
        self.duration_s = duration_s
        self.console = console
        self.summary = Summary()
        self.cfg = Config(cluster_name="demo")

    def say(self, text: str) -> None:
        self.console.print(text)

    async def run(self) -> int:
        async with Sandbox() as sandbox:
            return await self._run(sandbox)

    async def _run(self, sandbox: Sandbox) -> int:
        t0 = time.monotonic()
        cfg = self.cfg
        cfg.source.uri, cfg.target.uri = sandbox.source_uri, sandbox.target_uri
        cfg.target.tls_ca_file = sandbox.target_ca_file  # TLS as in production: the target's CA, given separately
        cfg.store.url = f"file://{self.workdir / 'batches'}"
        cfg.ledger.url = f"sqlite://{self.workdir / 'ledger.db'}"
        cfg.control.socket = str(self.workdir / "control.sock")
        cfg.capture.start_at = "beginning"
        cfg.capture.discovery_interval_s = 2.0
        cfg.log.format = "json"
        config_path = self.workdir / "cosmigrate.toml"
        config_path.write_text(to_toml(cfg))
        self.say(f"[bold]cosmigrate demo[/bold]: sandbox Cosmos DB on {sandbox.source.address}, "
                 f"DocumentDB on {sandbox.target.address}; work dir {escape(str(self.workdir))}")
        source: AsyncMongoClient[Any] = AsyncMongoClient(sandbox.source_uri)
        target: AsyncMongoClient[Any] = AsyncMongoClient(sandbox.target_uri, tlsCAFile=sandbox.target_ca_file)
        workload = Workload(source, WORKLOAD_NAMESPACES, keys_per_ns=3000, seed=int(time.time()))
        log = (self.workdir / "daemon.log").open("wb")
        daemon: asyncio.subprocess.Process | None = None
        try:
            # 1. The application's data, with a unique index (cosmigrate builds it on the target before the backfill).
            for client in (source, target):
                await client.app.users.create_index("email", unique=True)
            await source.app.users.insert_many([{"_id": i, "email": f"user{i}@example.com"} for i in range(200)])
            await workload.run_bulk(5000)
            self.say("1. source seeded: 5 collections, a unique index on app.users.email")
            # 2. The service starts: the full load through the change feed, then tailing.
            ledger = open_ledger(cfg)
            await ledger.init()
            await ledger.close()
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cosmigrate", "run", "--config", str(config_path), stdout=log, stderr=log)
            await self._wait_socket(daemon)
            self.say(f"2. `cosmigrate run` started (pid {daemon.pid}), capturing from the beginning of the change feed")
            # 3. The operator starts the writer.
            await request(cfg.control.socket, {"cmd": "writer", "action": "start", "by": "demo"})
            self.say("3. $ cosmigrate ctl writer start  ->  writer started")
            # 4. Live traffic while the target catches up.
            self.say(f"4. application traffic for {self.duration_s:.0f}s (hot keys, email swaps, throttling bursts):")
            await self._traffic(sandbox, workload, t0)
            # 5. Cutover: stop the application, wait for gap 0, compare.
            self.say("5. cutover: application stopped; waiting for the gap to reach 0")
            status = await self._wait_drained()
            equal, detail = await self._compare(source, target)
            self.summary.writes = workload.writes
            self.summary.events_captured = sum(n["captured_events"] for n in status["namespaces"])
            self.summary.events_applied = sum(n["applied_events"] for n in status["namespaces"])
            self.summary.batches = sum(n["captured_seq"] + 1 for n in status["namespaces"])
            self.summary.target_writes = sandbox.target.store.writes
            if not equal:
                self.summary.problems.append(detail)
            self.say(f"   target {'[green]equals[/green]' if equal else '[red]DIFFERS FROM[/red]'} the source: {escape(detail)}")
        except (ControlError, OSError, TimeoutError) as exc:
            self.summary.problems.append(str(exc))
        except Exception as exc:  # the demo reports, it does not print tracebacks
            self.summary.problems.append(f"unexpected error: {exc!r}"[:500])
        finally:
            if daemon is not None and daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    code = await within(daemon.wait(), 60)
                except TimeoutError:
                    daemon.kill()
                    code = await daemon.wait()
                if code != 0:
                    self.summary.problems.append(f"the daemon exited with {code} (see {self.workdir / 'daemon.log'})")
            log.close()
            await source.close()
            await target.close()
        self._print_summary(time.monotonic() - t0)
        return 1 if self.summary.problems else 0

    async def _wait_socket(self, daemon: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if daemon.returncode is not None:
                raise OSError(f"the daemon exited with {daemon.returncode}; see {self.workdir / 'daemon.log'}")
            with contextlib.suppress(ControlError):
                await request(self.cfg.control.socket, {"cmd": "ping"})
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the daemon did not open its control socket within 60s")

    async def _status(self) -> dict[str, Any]:
        status = (await request(self.cfg.control.socket, {"cmd": "status"}))["status"]
        self.summary.max_gap_s = max(self.summary.max_gap_s, status["gap_in_seconds"])
        self.summary.apply_eps_peak = max(self.summary.apply_eps_peak, sum(n["throughput_eps"] for n in status["namespaces"]))
        return dict(status)

    async def _traffic(self, sandbox: Sandbox, workload: Workload, t0: float) -> None:
        stop = asyncio.Event()
        source_users = workload.client.app.users

        async def writes() -> None:
            n = 0
            while not stop.is_set():
                try:
                    await workload.run_bulk(400, per_write=100)
                    n += 1
                    if n % 3 == 0:
                        a, b = workload.rng.sample(range(200), 2)
                        await workload.swap_emails("app.users", a, b)
                        await source_users.update_one({"_id": a}, {"$inc": {"logins": 1}})
                except PyMongoError as exc:  # Cosmos throttles the application too: back off, carry on
                    self.summary.app_throttled += 1
                    await asyncio.sleep(retry_after_s(exc) if isinstance(exc, OperationFailure) else 0.1)
                await asyncio.sleep(0.01)

        async def bursts() -> None:
            while not stop.is_set():
                await asyncio.sleep(4)
                sandbox.source.faults.throttle_rate = 0.3  # a throttling burst: 16500 on 30% of requests
                await asyncio.sleep(1)
                sandbox.source.faults.throttle_rate = 0.0

        tasks = [asyncio.create_task(writes()), asyncio.create_task(bursts())]
        started = time.monotonic()
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while time.monotonic() - started < self.duration_s or self.summary.seconds_to_ready is None:
                if time.monotonic() - started >= self.duration_s:
                    # The window is over: the application stops writing. Ready needs a delete sweep pass that
                    # covers the source's latest head, which a source written without pause never holds still for.
                    stop.set()
                status = await self._status()
                if status["ready_for_cutover"] and self.summary.seconds_to_ready is None:
                    self.summary.seconds_to_ready = time.monotonic() - t0
                said = (f"{time.monotonic() - started:.0f}s of {self.duration_s:.0f}s" if not stop.is_set()
                        else "writes stopped, waiting for ready")
                line = Text(f"   {workload.writes} application writes, {said}", style="dim",
                            no_wrap=True, overflow="ellipsis")
                # The empty last line: whatever the demo says next starts on a line of its own, also when
                # the live display is written to a file or a pipe (rich leaves its last line open there).
                live.update(Group(line, render(status, width=self.console.width), Text("")))
                if time.monotonic() - started > self.duration_s + 60:
                    self.summary.problems.append("never ready for cutover within 60s after the traffic window")
                    break
                await asyncio.sleep(0.5)
        stop.set()
        sandbox.source.faults.throttle_rate = 0.0
        await asyncio.gather(*tasks)

    async def _wait_drained(self) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        stable = 0
        last = -1
        while time.monotonic() < deadline:
            status = await self._status()
            captured = sum(n["captured_events"] for n in status["namespaces"])
            pending = sum(n["pending_events"] + n["deferred"] for n in status["namespaces"])
            stable = stable + 1 if captured == last and pending == 0 else 0
            last = captured
            if stable >= 4 and status["gap_in_seconds"] == 0:
                return status
            await asyncio.sleep(0.5)
        raise TimeoutError("the gap did not reach 0 within 60s of stopping the application")

    async def _compare(self, source: AsyncMongoClient[Any], target: AsyncMongoClient[Any]) -> tuple[bool, str]:
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument

        raw: CodecOptions[RawBSONDocument] = CodecOptions(document_class=RawBSONDocument)
        total = 0
        for ns in NAMESPACES:
            db, _, coll = ns.partition(".")
            src = {bytes(d.raw) async for d in source[db].get_collection(coll, codec_options=raw).find()}
            dst = {bytes(d.raw) async for d in target[db].get_collection(coll, codec_options=raw).find()}
            if src != dst:
                return False, f"{ns}: {len(src - dst)} source documents missing or different on the target"
            total += len(src)
        return True, f"{total} documents in {len(NAMESPACES)} collections identical, byte for byte"

    def _print_summary(self, seconds: float) -> None:
        s = self.summary
        ratio = s.target_writes / s.events_applied if s.events_applied else 0
        ready = f"{s.seconds_to_ready:.1f}s" if s.seconds_to_ready is not None else "never"
        self.say("\n[bold]summary[/bold]")
        self.say(f"  application writes      {s.writes} ({s.app_throttled} throttled with 16500 and retried later)")
        self.say(f"  change events captured  {s.events_captured} in {s.batches} batches")
        self.say(f"  events applied          {s.events_applied} with {s.target_writes} target writes "
                 f"({ratio:.2f} writes per event after collapsing)")
        self.say(f"  largest gap seen        {s.max_gap_s:.1f}s; ready for cutover after {ready}")
        self.say(f"  peak apply throughput   {s.apply_eps_peak:.0f} events/s")
        self.say(f"  total time              {seconds:.1f}s")
        if s.problems:
            for p in s.problems:
                self.say(f"[red]  problem: {escape(printable(p))}[/red]")
            self.say("[red bold]demo FAILED[/red bold]")
        else:
            self.say("[green bold]demo passed: the target equals the source[/green bold]")


def run_demo(workdir: str | None, duration_s: float) -> int:
    console = Console()
    if workdir:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return asyncio.run(Demo(path, duration_s, console).run())
    with tempfile.TemporaryDirectory(prefix="cosmigrate-demo-") as tmp:
        return asyncio.run(Demo(Path(tmp), duration_s, console).run())
