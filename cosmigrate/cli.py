"""The `cosmigrate` command line.

Commands import their machinery lazily so that `cosmigrate --help` and the
control client stay fast. Bad input ends in one line on stderr and exit 2,
never a traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import bson
import typer

if TYPE_CHECKING:
    from cosmigrate.config import Config

app = typer.Typer(
    name="cosmigrate",
    help="Live-migrate Azure Cosmos DB for MongoDB to Amazon DocumentDB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Live-migrate Azure Cosmos DB for MongoDB to Amazon DocumentDB."""


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    typer.echo(f"cosmigrate: error: {message}", err=True)
    return typer.Exit(code)


ledger_app = typer.Typer(help="The checkpoint ledger (DynamoDB table or SQLite file).", no_args_is_help=True)
batches_app = typer.Typer(help="Look inside the captured change batches.", no_args_is_help=True)
ctl_app = typer.Typer(help="Talk to the running daemon over its control socket.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(batches_app, name="batches")
app.add_typer(ctl_app, name="ctl")
DEFAULT_SOCKET = "/run/cosmigrate/control.sock"

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the TOML config file.")]


def _load(config: Path, files: bool = False) -> Config:
    """Load and validate the config; `files`: also check the CA bundles (commands that connect)."""
    from cosmigrate.config import ConfigError, check_files, load_config

    try:
        cfg = load_config(config)
        if files:
            check_files(cfg)
        return cfg
    except ConfigError as exc:
        raise fail(f"config: {exc}") from None


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


@app.command()
def run(config: ConfigOpt) -> None:
    """Run the migration daemon: discover namespaces, capture their change streams (and apply them)."""
    from cosmigrate.daemon import Daemon, StartupError
    from cosmigrate.logs import configure_logging

    cfg = _load(config, files=True)
    configure_logging(cfg.log.level, cfg.log.format)
    try:
        code = _run_async(Daemon(cfg, config_path=str(config)).serve())
    except StartupError as exc:
        raise fail(str(exc), code=1) from None
    if code:
        raise typer.Exit(code)


@app.command()
def preflight(config: ConfigOpt) -> None:
    """Check the set-up before migrating: source, target, store, ledger, control socket. Exit 1 on any FAIL."""
    from cosmigrate.preflight import Preflight

    cfg = _load(config, files=True)
    checks = _run_async(Preflight(cfg).run())
    for check in checks:
        typer.echo(check.line())
    failed = [c for c in checks if not c.ok]
    typer.echo(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@ledger_app.command("init")
def ledger_init(config: ConfigOpt) -> None:
    """Create the ledger (DynamoDB table with on-demand capacity, PITR and TTL, or the SQLite file). Idempotent."""
    from cosmigrate.ledger import LedgerError, open_ledger

    cfg = _load(config)

    async def init() -> None:
        ledger = open_ledger(cfg)
        try:
            await ledger.init()
        finally:
            await ledger.close()

    try:
        _run_async(init())
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo(f"ledger ready: {cfg.ledger.url}")


@batches_app.command("list")
def batches_list(
    config: ConfigOpt,
    namespace: Annotated[str | None, typer.Argument(help="db.collection; all namespaces when left out.")] = None,
) -> None:
    """List committed batches: seq, events, bytes, capture time, applied or not."""
    from cosmigrate.ledger import LedgerError, open_ledger

    cfg = _load(config)

    async def listing() -> list[str]:
        ledger = open_ledger(cfg)
        try:
            names = [namespace] if namespace else [m.ns for m in await ledger.list_namespaces()]
            lines = [f"{'namespace':<32} {'seq':>8} {'events':>8} {'bytes':>10}  {'captured_at (UTC)':<26} applied"]
            for ns in names:
                for b in await ledger.list_batches(ns):
                    when = dt.datetime.fromtimestamp(b.captured_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                    lines.append(f"{ns:<32} {b.seq:>8} {b.events:>8} {b.bytes:>10}  {when:<26} "
                                 f"{'yes' if b.applied_at else 'no'}")
            return lines
        finally:
            await ledger.close()

    try:
        lines = _run_async(listing())
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo("\n".join(lines))


@batches_app.command("dump")
def batches_dump(
    config: ConfigOpt,
    namespace: Annotated[str, typer.Argument(help="db.collection")],
    seq: Annotated[int, typer.Argument(help="Batch sequence number.")],
) -> None:
    """Print one batch's events as canonical Extended JSON, one per line, after verifying its checksum."""
    from bson import json_util

    from cosmigrate.batchfile import BatchCodec, CorruptBatch
    from cosmigrate.ledger import LedgerError, open_ledger
    from cosmigrate.stores import StoreError, open_store

    cfg = _load(config)

    async def dump() -> list[str]:
        ledger = open_ledger(cfg)
        store = open_store(cfg)
        try:
            found = await ledger.list_batches(namespace, seq, 1)
            if not found or found[0].seq != seq:
                raise LedgerError(f"{namespace}: no committed batch {seq}")
            data = await store.get(found[0].key)
            batch = BatchCodec().decode(data, expect_checksum=found[0].checksum)
            opts = json_util.CANONICAL_JSON_OPTIONS
            return [json_util.dumps(bson.decode(e, codec_options=opts.with_options(tz_aware=True)), json_options=opts)
                    for e in batch.events]
        finally:
            await store.close()
            await ledger.close()

    try:
        lines = _run_async(dump())
    except (LedgerError, StoreError) as exc:
        raise fail(str(exc), code=1) from None
    except CorruptBatch as exc:
        raise fail(f"{namespace} batch {seq} is corrupt: {exc}", code=1) from None
    typer.echo("\n".join(lines))


@ctl_app.callback()
def ctl(
    ctx: typer.Context,
    socket: Annotated[str | None, typer.Option(help=f"Control socket path (default: the config's, else {DEFAULT_SOCKET}).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Read the socket path from this config.")] = None,
) -> None:
    """Talk to the running daemon over its control socket."""
    path = socket or (_load(config).control.socket if config else DEFAULT_SOCKET)
    ctx.obj = path


def _ctl_request(path: str, payload: dict[str, Any], field: str, kind: type) -> Any:
    """One control request; returns the reply's `field`, which must be a `kind` (the peer may not be a daemon)."""
    from cosmigrate.control import ControlError, request

    try:
        reply = asyncio.run(request(path, payload))
    except ControlError as exc:
        raise fail(str(exc), code=1) from None
    value = reply.get(field)
    if not isinstance(value, kind):
        raise fail(f"{path} answered without a {field!r} {kind.__name__}; is it a cosmigrate control socket?", code=1)
    return value


def _render(path: str, status: dict[str, Any]) -> Any:
    """The status table; a status object without the expected fields is a one-line error, not a traceback."""
    from cosmigrate.statusview import render

    try:
        return render(status)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise fail(f"{path} answered a status without the expected fields; is it a daemon of this cosmigrate "
                   "version? (try --json)", code=1) from None


@ctl_app.command("writer")
def ctl_writer(
    ctx: typer.Context, action: Annotated[str, typer.Argument(help="start or stop")],
    force: Annotated[bool, typer.Option("--force", help="Start even after a completed cutover.")] = False,
) -> None:
    """Start or stop applying changes to the target (stored in the ledger: survives restarts).

    `stop` returns once the bulk write in flight has finished: nothing reaches
    the target after it answers. Capture continues either way. After a
    completed cutover, `start` is refused unless `--force` is given.
    """
    if action not in ("start", "stop"):
        raise fail(f"writer: action must be start or stop, not {action!r}")
    import getpass

    payload = {"cmd": "writer", "action": action, "by": getpass.getuser(), **({"force": True} if force else {})}
    state = _ctl_request(ctx.obj, payload, "writer", str)
    typer.echo(f"writer {state}")


@ctl_app.command("status")
def ctl_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status object as JSON.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Keep a live table on screen (Ctrl+C to leave).")] = False,
    interval: Annotated[float, typer.Option(help="Refresh interval for --watch, seconds.")] = 2.0,
) -> None:
    """Show lag, progress, failures and cutover readiness."""
    import json

    from rich.console import Console

    if interval <= 0:
        raise fail("--interval must be greater than 0")
    if not watch:
        status = _ctl_request(ctx.obj, {"cmd": "status"}, "status", dict)
        if as_json:
            typer.echo(json.dumps(status, indent=1))
        else:
            Console().print(_render(ctx.obj, status))
        return
    import time

    from rich.live import Live

    console = Console()
    status = _ctl_request(ctx.obj, {"cmd": "status"}, "status", dict)
    try:
        with Live(_render(ctx.obj, status), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                status = _ctl_request(ctx.obj, {"cmd": "status"}, "status", dict)
                live.update(_render(ctx.obj, status))
    except KeyboardInterrupt:
        return


ReportOpt = Annotated[Path | None, typer.Option("--report", help="Also write the JSON report to this file.")]


def _poll_job(path: str, cmd: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Start (or join) a verify/cutover job on the daemon and wait for its result, printing cutover's steps."""
    import time

    reply = _ctl_request(path, {"cmd": cmd, "action": "start", **extra}, cmd, dict)
    shown = ""
    while reply.get("running"):
        step = reply.get("step", "")
        if step and step != shown:
            typer.echo(f"cutover: {step}", err=True)
            shown = step
        time.sleep(0.3)
        reply = _ctl_request(path, {"cmd": cmd, "action": "status"}, cmd, dict)
    return dict(reply)


def _in_process_job(config: Path, cmd: str, extra: dict[str, Any]) -> dict[str, Any]:
    """No daemon runs: run one in this process for the job (logs on stderr), then stop it."""
    import structlog

    from cosmigrate.daemon import Daemon, StartupError
    from cosmigrate.logs import configure_logging

    cfg = _load(config, files=True)
    configure_logging(cfg.log.level, cfg.log.format)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    daemon = Daemon(cfg, config_path=str(config), job={"cmd": cmd, "action": "start", **extra})
    try:
        _run_async(daemon.serve())
    except StartupError as exc:
        raise fail(str(exc), code=1) from None
    reply = daemon.job_result or {}
    if not reply.get("ok"):
        raise fail(str(reply.get("error", f"{cmd} did not finish")), code=1)
    return dict(reply[cmd])


def _job(config: Path | None, socket: str | None, cmd: str, extra: dict[str, Any], report: Path | None) -> None:
    """verify / cutover: through the running daemon if one answers, else in this process."""
    import json

    from cosmigrate.control import ControlError, request

    path = socket or (_load(config).control.socket if config else DEFAULT_SOCKET)
    try:
        asyncio.run(request(path, {"cmd": "ping"}, limit_s=5))
        running = True
    except ControlError:
        running = False
    if running:
        reply = _poll_job(path, cmd, extra)
    elif config is None:
        raise fail(f"no cosmigrate daemon answers on {path}; give --config to run the {cmd} in this process", code=1)
    else:
        reply = _in_process_job(config, cmd, extra)
    result = reply.get("result")
    if not isinstance(result, dict):
        raise fail(f"{cmd}: the daemon answered without a result", code=1)
    if result.get("report") is not None:
        text = json.dumps(result["report"], indent=1)
        typer.echo(text)
        if report is not None:
            try:
                report.write_text(text + "\n")
            except OSError as exc:
                raise fail(f"--report {report}: {exc.strerror or exc}", code=1) from None
    code = int(result.get("exit_code", 1))
    typer.echo(f"cosmigrate {cmd}: {result.get('message', '')}", err=True)
    if code:
        raise typer.Exit(code)


@app.command()
def verify(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Path to the TOML config file.")] = None,
    report: ReportOpt = None,
    max_mismatches: Annotated[int | None, typer.Option("--max-mismatches", min=0,
                                                       help="List at most N mismatches (default verify.max_mismatches).")] = None,
    socket: Annotated[str | None, typer.Option(help="Control socket of a running daemon.")] = None,
) -> None:
    """Compare every document of the target with the source, range by range; exit 0 when equal, 6 when not.

    Runs in the daemon when one answers (else in this process). Resumable: a
    pass a kill interrupted continues where it stopped.
    """
    _job(config, socket, "verify", {} if max_mismatches is None else {"max_mismatches": max_mismatches}, report)


@app.command()
def cutover(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Path to the TOML config file.")] = None,
    report: ReportOpt = None,
    socket: Annotated[str | None, typer.Option(help="Control socket of a running daemon.")] = None,
) -> None:
    """Finish the migration: precheck, quiesce, apply, final delete sweep, re-check until clean, finalize, report.

    Resumable (the step is in the ledger). Exit 0 when complete, 3 when the
    source is still being written, 5 when not ready, 6 when documents differ.
    """
    _job(config, socket, "cutover", {}, report)


@ctl_app.command("cutover")
def ctl_cutover(ctx: typer.Context, report: ReportOpt = None) -> None:
    """Run (or join) the cutover in the running daemon; see `cosmigrate cutover`."""
    _job(None, ctx.obj, "cutover", {}, report)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of application traffic.")] = 20.0,
    workdir: Annotated[str | None, typer.Option(help="Keep the batches, ledger and daemon log here (default: a temp dir).")] = None,
) -> None:
    """Run a whole migration on this machine: sandbox databases, local store, SQLite ledger, live traffic."""
    from cosmigrate.demo import run_demo

    if duration <= 0:
        raise fail("--duration must be greater than 0")
    raise typer.Exit(run_demo(workdir, duration))


@app.command()
def sandbox(
    source_port: Annotated[int, typer.Option(help="Port of the Cosmos DB emulator (0 = any free port).")] = 0,
    target_port: Annotated[int, typer.Option(help="Port of the DocumentDB emulator (0 = any free port).")] = 0,
    faults: Annotated[str | None, typer.Option(help="Fault switches, e.g. 'throttle_rate=0.2,retry_after_ms=50,deletes_preview'.")] = None,
    target_version: Annotated[str, typer.Option(help="DocumentDB version to emulate.")] = "5.0.0",
) -> None:
    """Run the Cosmos DB and DocumentDB emulators on 127.0.0.1 (test and demo use only).

    Prints the source URI, then the target URI, then runs until SIGINT/SIGTERM.
    """
    from cosmigrate.sandbox import FaultSpecError
    from cosmigrate.sandbox.runner import build_faults, serve

    try:
        build_faults(faults)
    except FaultSpecError as exc:
        raise fail(f"--faults: {exc}") from None
    try:
        asyncio.run(serve(source_port, target_port, faults, target_version))
    except OSError as exc:
        raise fail(f"cannot listen: {exc.strerror or exc}") from None


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
