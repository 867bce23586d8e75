"""The `cosmigrate` command line.

Commands import their machinery lazily so that `cosmigrate --help` and the
control client stay fast. Bad input ends in one line on stderr and exit 2,
never a traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import bson
import typer

from cosmigrate import __version__

if TYPE_CHECKING:
    from cosmigrate.config import Config

app = typer.Typer(
    name="cosmigrate",
    help="Live-migrate Azure Cosmos DB for MongoDB to Amazon DocumentDB.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cosmigrate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version_callback,
                                          help="Print the version and exit.")] = False,
) -> None:
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

DEFAULT_CONFIG = "/etc/cosmigrate/cosmigrate.toml"
EXIT_NOT_READY = 2
EXIT_NAMESPACE_FAILED = 3

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", envvar="COSMIGRATE_CONFIG", metavar="PATH",
                                         help="The TOML config file.")]
EnvFileOpt = Annotated[Path | None, typer.Option(
    "--env-file", metavar="PATH",
    help="Read environment variables (the secrets) from this systemd EnvironmentFile first, "
         "e.g. /etc/cosmigrate/cosmigrate.env, as the service does.")]


def _load(config: Path, files: bool = False, secrets: bool = True, env_file: Path | None = None) -> Config:
    """Load and validate the config.

    `files`: also check the CA bundles (commands that connect). `secrets=False`: leave the
    connection strings unresolved (commands that never connect to a database). `env_file`:
    variables from a systemd EnvironmentFile, under those of the process.
    """
    from cosmigrate.config import ConfigError, check_files, load_config, read_env_file

    try:
        env: dict[str, str] = {**read_env_file(env_file), **os.environ} if env_file else dict(os.environ)
        cfg = load_config(config, env=env, secrets=secrets)
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


WorkerOpt = Annotated[str, typer.Option(
    "--worker", envvar="COSMIGRATE_WORKER", metavar="NAME",
    help="This worker's name on its host (daemon.worker): its own lock file and control socket "
         "(control.<NAME>.sock), so several workers of one cluster share the host.")]


WorkersOpt = Annotated[int, typer.Option(
    "--workers", envvar="COSMIGRATE_WORKERS", metavar="N", min=1, max=64,
    help="Start N worker processes (named w1..wN) under this one, sharing the cluster's units; "
         "a dead one is started again.")]


@app.command()
def run(config: ConfigOpt = Path(DEFAULT_CONFIG), worker: WorkerOpt = "", workers: WorkersOpt = 1) -> None:
    """Run the migration daemon: discover namespaces, capture their change streams (and apply them)."""
    from cosmigrate.config import ConfigError, validate
    from cosmigrate.daemon import Daemon, StartupError
    from cosmigrate.logs import configure_logging
    from cosmigrate.versions import UnsupportedVersion

    cfg = _load(config, files=True)
    if workers > 1:
        if worker:
            raise fail("--workers and --worker: a supervisor names its workers itself (w1..wN)")
        from cosmigrate.supervisor import Supervisor

        configure_logging(cfg.log.level, cfg.log.format)
        code = _run_async(Supervisor(str(config), workers, cfg.daemon.drain_timeout_s + 15).serve())
        if code:
            raise typer.Exit(code)
        return
    if worker:
        cfg.daemon.worker = worker
        try:
            validate(cfg, uris=False)
        except ConfigError as exc:
            raise fail(f"--worker: {exc}") from None
    configure_logging(cfg.log.level, cfg.log.format)
    try:
        code = _run_async(Daemon(cfg, config_path=str(config)).serve())
    except StartupError as exc:
        raise fail(str(exc), code=1) from None
    except UnsupportedVersion as exc:  # a set-up problem, like a bad config value: exit 2
        raise fail(str(exc), code=exc.exit_code) from None
    if code:
        raise typer.Exit(code)


@app.command("check-config")
def check_config(config: ConfigOpt = Path(DEFAULT_CONFIG), env_file: EnvFileOpt = None) -> None:
    """Check the config as `run` and a reload would read it (secrets resolved); exit 2 with the problem if not.

    The unit runs it before each `systemctl reload`, so a refused file fails the reload.
    """
    _load(config, files=True, env_file=env_file)
    typer.echo(f"config ok: {config}")


@app.command()
def preflight(config: ConfigOpt = Path(DEFAULT_CONFIG), env_file: EnvFileOpt = None) -> None:
    """Check the set-up before migrating: source, target, store, ledger, control socket. Exit 1 on any FAIL."""
    from cosmigrate.preflight import Preflight

    cfg = _load(config, files=True, env_file=env_file)
    checks = _run_async(Preflight(cfg).run())
    for check in checks:
        typer.echo(check.line())
    failed = [c for c in checks if not c.ok]
    typer.echo(f"{len(checks) - len(failed)} ok, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def indexes(
    config: ConfigOpt,
    namespaces: Annotated[list[str] | None, typer.Argument(help="db.collection ...; every migrated one when left out.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
    max_candidates: Annotated[int, typer.Option(help="Bound of the unique check: documents read per unique index.")] = 10_000,
    unique_check: Annotated[bool, typer.Option(help="Check the source's documents against each unique index.")] = True,
    plan: Annotated[bool, typer.Option("--plan", help="Show the build plan instead: when each index is built on "
                                       "the target (before / after the backfill, never) and how far it got.")] = False,
) -> None:
    """Read the source's indexes and say what DocumentDB can build, what it cannot (and why), the TTL kinds,
    and which source documents break a unique index under DocumentDB's semantics (by _id). Writes nothing.
    Exit 1 when an index needs action."""
    import json

    from bson import json_util
    from pymongo.errors import PyMongoError

    from cosmigrate.indexes import report
    from cosmigrate.redact import redact

    if max_candidates < 1:
        raise fail("--max-candidates must be at least 1")
    cfg = _load(config, files=True)
    if plan:
        from cosmigrate.indexplan import NEVER, plan_line, plan_report

        try:
            planned = _run_async(plan_report(cfg, namespaces or None))
        except PyMongoError as exc:
            raise fail(f"cannot read the indexes: {redact(str(exc)).splitlines()[0][:300]}", code=1) from None
        if as_json:
            typer.echo(json.dumps(json.loads(json_util.dumps([p.as_dict() for p in planned])), indent=1))
        else:
            for p in planned:
                typer.echo(plan_line(p))
            typer.echo(f"{len(planned)} indexes planned, {sum(p.stage == NEVER for p in planned)} never built")
        if any(p.stage == NEVER or p.state.startswith("failed") for p in planned):
            raise typer.Exit(1)
        return
    try:
        reports = _run_async(report(cfg, namespaces or None, check_unique=unique_check, max_candidates=max_candidates))
    except PyMongoError as exc:
        raise fail(f"cannot read the indexes: {redact(str(exc)).splitlines()[0][:300]}", code=1) from None
    if as_json:
        typer.echo(json.dumps(json.loads(json_util.dumps([r.as_dict() for r in reports])), indent=1))
    else:
        for r in reports:
            typer.echo(r.line())
    problems = [r for r in reports if r.problem or (r.unique is not None and not r.unique.complete)]
    if not as_json:
        typer.echo(f"{len(reports)} indexes, {len(problems)} need action")
    if problems:
        raise typer.Exit(1)


@ledger_app.command("init")
def ledger_init(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Describe the ledger and the batch store, create what is missing, and prove the store takes a write.

    An existing DynamoDB table is only described and checked (the instance role's
    permissions suffice); a missing one is created (on-demand, PITR, TTL) when the
    caller may. Connection strings are not needed. Idempotent.
    """
    from cosmigrate.ledger import LedgerError
    from cosmigrate.ledgerinit import init_ledger_and_store
    from cosmigrate.stores import StoreError

    cfg = _load(config, secrets=False)
    try:
        for line in _run_async(init_ledger_and_store(cfg)):
            typer.echo(line)
    except (LedgerError, StoreError) as exc:
        raise fail(str(exc), code=1) from None


@batches_app.command("list")
def batches_list(
    namespace: Annotated[str | None, typer.Argument(help="db.collection; all namespaces when left out.",
                                                    metavar="NAMESPACE", show_default=False)] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """List committed batches: seq, events, bytes, capture time, applied or not."""
    from cosmigrate.ledger import LedgerError, open_ledger
    from cosmigrate.terminal import printable

    cfg = _load(config, secrets=False)

    async def listing() -> list[str]:
        ledger = open_ledger(cfg)
        try:
            names = [namespace] if namespace else [m.ns for m in await ledger.list_namespaces()]
            lines = [f"{'namespace':<32} {'seq':>8} {'events':>8} {'bytes':>10}  {'captured_at (UTC)':<26} applied"]
            for ns in names:
                for b in await ledger.list_batches(ns):
                    when = dt.datetime.fromtimestamp(b.captured_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                    lines.append(f"{printable(ns):<32} {b.seq:>8} {b.events:>8} {b.bytes:>10}  {when:<26} "
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
    namespace: Annotated[str, typer.Argument(help="db.collection", metavar="NAMESPACE")],
    seq: Annotated[int, typer.Argument(help="Batch sequence number.", metavar="SEQ")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Print one batch's events as canonical Extended JSON, one per line, after verifying its checksum."""
    from bson import json_util

    from cosmigrate.batchfile import BatchCodec, CorruptBatch
    from cosmigrate.ledger import LedgerError, open_ledger
    from cosmigrate.stores import StoreError, open_store

    cfg = _load(config, secrets=False)

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


SocketOpt = Annotated[str | None, typer.Option("--socket", metavar="PATH",
                                               help=f"Control socket path (default: the config's, else {DEFAULT_SOCKET}).")]
CtlConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", metavar="PATH",
    help=f"Read the socket path from this config (default: $COSMIGRATE_CONFIG, else {DEFAULT_CONFIG} if readable). "
         "Only control.socket is read: no secret is resolved.")]


CtlWorkerOpt = Annotated[str, typer.Option(
    "--worker", envvar="COSMIGRATE_WORKER", metavar="NAME",
    help="Talk to this worker (`run --worker NAME`, or w1..wN under `run --workers N`): control.<NAME>.sock.")]


@ctl_app.callback()
def ctl(ctx: typer.Context, socket: SocketOpt = None, config: CtlConfigOpt = None, worker: CtlWorkerOpt = "") -> None:
    """Talk to the running daemon over its control socket."""
    ctx.obj = {"socket": socket, "config": config, "worker": worker}


def _socket_path(ctx: typer.Context, socket: str | None, config: Path | None) -> str:
    """--socket, else the config's control.socket (--config, $COSMIGRATE_CONFIG, the default file), else the default.

    Options given after the subcommand win over those given before it. Only the socket path
    is read from the config: `ctl` runs in an operator's shell, which cannot (and need not)
    read the service's secrets.
    """
    from cosmigrate.config import ConfigError, control_socket, worker_socket

    given: dict[str, Any] = ctx.obj or {}
    if given.get("worker") and not (socket or given.get("socket")):
        plain = dict(given, worker="")
        ctx.obj = plain
        try:
            return worker_socket(_socket_path(ctx, None, config), str(given["worker"]))
        finally:
            ctx.obj = given
    socket = socket or given.get("socket")
    config = config or given.get("config")
    if socket:
        return socket
    implicit = False
    if config is None and os.environ.get("COSMIGRATE_CONFIG"):
        config = Path(os.environ["COSMIGRATE_CONFIG"])
    elif config is None and os.path.exists(DEFAULT_CONFIG):
        config, implicit = Path(DEFAULT_CONFIG), True
    try:
        return control_socket(config)
    except ConfigError as exc:
        if implicit:  # the default file exists but this user may not read it: the default socket is the best guess
            return os.environ.get("COSMIGRATE_CONTROL_SOCKET") or DEFAULT_SOCKET
        raise fail(f"config: {exc}") from None


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


def _render(path: str, status: dict[str, Any], width: int) -> Any:
    """The status table; a status object without the expected fields is a one-line error, not a traceback."""
    from cosmigrate.statusview import render

    try:
        return render(status, width=width)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        raise fail(f"{path} answered a status without the expected fields; is it a daemon of this cosmigrate "
                   "version? (try --json)", code=1) from None


class WriterAction(enum.StrEnum):
    start = "start"
    stop = "stop"


@ctl_app.command("writer")
def ctl_writer(
    ctx: typer.Context,
    action: Annotated[WriterAction, typer.Argument(help="start or stop applying.", metavar="start|stop",
                                                   case_sensitive=False)],
    force: Annotated[bool, typer.Option("--force", help="Start even after a completed cutover.")] = False,
    socket: SocketOpt = None, config: CtlConfigOpt = None,
) -> None:
    """Start or stop applying changes to the target (stored in the ledger: survives restarts).

    `stop` returns once the bulk write in flight has finished: nothing reaches
    the target after it answers. Capture continues either way. After a
    completed cutover, `start` is refused unless `--force` is given.
    """
    import getpass

    path = _socket_path(ctx, socket, config)
    payload = {"cmd": "writer", "action": action.value, "by": getpass.getuser(), **({"force": True} if force else {})}
    state = _ctl_request(path, payload, "writer", str)
    typer.echo(f"writer {state}")


def status_exit_code(status: dict[str, Any]) -> int:
    """0 ready for cutover, 3 a namespace failed, 2 not ready otherwise (so a script can wait on it)."""
    if any(n.get("state") == "failed" for n in status.get("namespaces", [])):
        return EXIT_NAMESPACE_FAILED
    return 0 if status.get("ready_for_cutover") is True else EXIT_NOT_READY


@ctl_app.command("status")
def ctl_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status object as JSON (one line per refresh "
                                                         "with --watch).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl+C.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", metavar="SECONDS")] = 2.0,
    socket: SocketOpt = None, config: CtlConfigOpt = None,
) -> None:
    """Show lag, progress, failures and cutover readiness.

    Exit status (without --watch): 0 ready for cutover, 2 not ready, 3 a namespace
    failed, 1 no daemon answered.
    """
    import json
    import time

    from rich.console import Console

    if interval <= 0:
        raise fail("--interval must be greater than 0")
    path = _socket_path(ctx, socket, config)
    if not watch:
        status = _ctl_request(path, {"cmd": "status"}, "status", dict)
        if as_json:
            typer.echo(json.dumps(status, indent=1))
        else:
            console = Console()
            console.print(_render(path, status, console.width))
        raise typer.Exit(status_exit_code(status))
    try:
        if as_json:
            while True:  # JSON lines: one status object per line, for jq and log shippers
                typer.echo(json.dumps(_ctl_request(path, {"cmd": "status"}, "status", dict)))
                sys.stdout.flush()
                time.sleep(interval)
        from rich.live import Live

        console = Console()
        status = _ctl_request(path, {"cmd": "status"}, "status", dict)
        with Live(_render(path, status, console.width), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                status = _ctl_request(path, {"cmd": "status"}, "status", dict)
                live.update(_render(path, status, console.width))
    except KeyboardInterrupt:
        return
    except BrokenPipeError:  # `ctl status --json --watch | head`
        return


@ctl_app.command("retry")
def ctl_retry(
    ctx: typer.Context,
    namespace: Annotated[str, typer.Argument(help="db.collection of a failed namespace.", metavar="NAMESPACE")],
    socket: SocketOpt = None, config: CtlConfigOpt = None,
) -> None:
    """Restart a failed namespace once its cause is fixed (a restored batch object, a fixed document).

    The service keeps running; the namespace resumes from its ledger position.
    """
    path = _socket_path(ctx, socket, config)
    state = _ctl_request(path, {"cmd": "retry", "namespace": namespace}, "state", str)
    typer.echo(f"{namespace} {state}")


@ctl_app.command("metrics")
def ctl_metrics(ctx: typer.Context, socket: SocketOpt = None, config: CtlConfigOpt = None) -> None:
    """Print the daemon's metrics in the Prometheus text format."""
    path = _socket_path(ctx, socket, config)
    typer.echo(_ctl_request(path, {"cmd": "metrics"}, "metrics", str), nl=False)


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
def ctl_cutover(ctx: typer.Context, report: ReportOpt = None, socket: SocketOpt = None,
                config: CtlConfigOpt = None) -> None:
    """Run (or join) the cutover in the running daemon; see `cosmigrate cutover`."""
    _job(None, _socket_path(ctx, socket, config), "cutover", {}, report)


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
    target_version: Annotated[str, typer.Option(help="DocumentDB version to emulate: 3.6, 4.0, 5.0, 8.0 or elastic.")] = "5.0.0",
    source_version: Annotated[str, typer.Option(help="Cosmos DB server version to emulate: 3.6, 4.0, 4.2, 5.0, 6.0 or 7.0.")] = "6.0",
    target_tls: Annotated[bool, typer.Option("--target-tls/--target-plain",
                                             help="Serve TLS on the target, with a CA made at start (or plain TCP).")] = True,
) -> None:
    """Run the Cosmos DB and DocumentDB emulators on 127.0.0.1 (test and demo use only).

    Prints the source URI, the target URI and the target's CA file (for
    target.tls_ca_file / tlsCAFile), one per line, then runs until SIGINT/SIGTERM.
    """
    from cosmigrate.sandbox import FaultSpecError
    from cosmigrate.sandbox.runner import build_faults, serve
    from cosmigrate.sandbox.tls import SandboxTlsError
    from cosmigrate.versions import SOURCE, TARGET, lookup

    try:
        build_faults(faults)
    except FaultSpecError as exc:
        raise fail(f"--faults: {exc}") from None
    for option, role, value in (("--source-version", SOURCE, source_version), ("--target-version", TARGET, target_version)):
        try:
            lookup(role, value)
        except ValueError as exc:
            raise fail(f"{option}: {exc}") from None
    try:
        asyncio.run(serve(source_port, target_port, faults, target_version, source_version, target_tls))
    except OSError as exc:
        raise fail(f"cannot listen: {exc.strerror or exc}") from None
    except SandboxTlsError as exc:
        raise fail(str(exc)) from None


def _tidy(command: Any, version: Any) -> None:
    """Give every command and group the root's `--version`, and help without type artefacts (`<bool>`, `<str>`)."""
    if version not in command.params:
        command.params.append(version)
    for param in command.params:
        if getattr(param, "_tidied", False):
            continue
        param.display_type_rich = param.display_type = lambda ctx, p=param: _type_label(p, ctx)
        param._tidied = True
    make_help = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = make_help(ctx)
        if option is not None:
            option.display_type_rich = option.display_type = lambda ctx: None
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _tidy(sub, version)


def _type_label(param: Any, ctx: Any) -> str | None:
    """What the help shows beside an option: nothing for a flag or an argument, else its metavar (PATH, SECONDS...)."""
    if getattr(param, "is_flag", False) or param.param_type_name == "argument":
        return None
    if param.metavar:
        return str(param.metavar)
    original = getattr(type(param), "display_type", None)  # the class's own, not the instance override
    label = str(original(param, ctx) or "") if original is not None else ""
    return label.strip("<>").upper() or None


def main() -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    version = next(p for p in command.params if p.name == "version")
    version.expose_value = False  # shared by every command: only its eager callback acts
    _tidy(command, version)
    try:
        command(prog_name="cosmigrate")
    except KeyboardInterrupt:
        sys.exit(130)
