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
EXIT_NO_DAEMON = 1
EXIT_NOT_READY = 2
EXIT_NAMESPACE_FAILED = 3
EXIT_CUTOVER_COMPLETE = 4

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
    """Check the set-up before migrating: source, target, store, ledger, control socket. Exit 1 on any FAIL.

    A check that depends on a failed one says SKIP and why; each piece of advice is given once.
    """
    from cosmigrate.preflight import Preflight, lines

    cfg = _load(config, files=True, env_file=env_file)
    checks = _run_async(Preflight(cfg).run())
    for line in lines(checks):
        typer.echo(line)
    failed = [c for c in checks if c.failed]
    skipped = sum(c.skipped for c in checks)
    typer.echo(f"{sum(c.ok for c in checks)} ok, {len(failed)} failed" + (f", {skipped} skipped" if skipped else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def indexes(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
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
        if any(p.needs_action for p in planned):
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


@app.command("plan")
def plan_command(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    namespaces: Annotated[list[str] | None, typer.Argument(help="db.collection ...; every migrated one when left out.",
                                                           metavar="NAMESPACE", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    source_ru_per_s: Annotated[float | None, typer.Option(
        "--source-ru-per-s", metavar="N", help="RU/s the full load may spend on each collection (default: the "
        "provisioned RU/s the account reports).")] = None,
    workers: Annotated[int, typer.Option(metavar="N", help="Workers (cores) to estimate with.")] = 1,
    cpu_us_per_doc: Annotated[float | None, typer.Option(
        "--cpu-us-per-doc", metavar="US", help="CPU microseconds per document of the full load (default: the "
        "figure measured in bench).")] = None,
    probe_docs: Annotated[int, typer.Option(metavar="N", help="Feed probe bound: documents per collection.")] = 2000,
    probe_ru: Annotated[float, typer.Option(metavar="RU", help="Feed probe bound: RU per collection.")] = 4000.0,
    probe_seconds: Annotated[float, typer.Option(metavar="SECONDS", help="Probe bound: seconds per collection "
                                                 "(and for the target's probe).")] = 10.0,
    target_probe_docs: Annotated[int, typer.Option(metavar="N", help="Target probe bound: documents.")] = 20_000,
    record: Annotated[bool, typer.Option("--record", help="Store this plan in the ledger as the one the migration "
                                         "starts with (status compares the run with it).")] = False,
) -> None:
    """Say what the migration will take before it starts: sizes, partitions, indexes, source RU, the target's
    write rate, the full-load time and its limit, AWS counts, advice. Reads only (a scratch collection on the
    target is removed again; `--record` stores the plan in the ledger). Exit 0 for a plan, 1 when something
    needs action or is unknown, 2 bad input."""
    import json

    from cosmigrate.plan.estimate import CPU_US_PER_DOC
    from cosmigrate.plan.planner import PlanOptions, run_plan
    from cosmigrate.plan.report import render
    from cosmigrate.plan.sourceprobe import ProbeBounds
    from cosmigrate.plan.targetprobe import TargetBounds

    for name, value in (("--workers", workers), ("--probe-docs", probe_docs), ("--probe-ru", probe_ru),
                        ("--probe-seconds", probe_seconds), ("--target-probe-docs", target_probe_docs),
                        ("--source-ru-per-s", source_ru_per_s if source_ru_per_s is not None else 1),
                        ("--cpu-us-per-doc", cpu_us_per_doc if cpu_us_per_doc is not None else 1)):
        if not value > 0:
            raise fail(f"{name} must be greater than 0")
    for ns in namespaces or []:
        db, dot, coll = ns.partition(".")
        if not (db and dot and coll):
            raise fail(f"{ns!r} is not a namespace (db.collection)")
    cfg = _load(config, files=True)
    opts = PlanOptions(namespaces or None, source_ru_per_s, workers, cpu_us_per_doc or CPU_US_PER_DOC,
                       ProbeBounds(probe_docs, probe_ru, probe_seconds), TargetBounds(target_probe_docs, probe_seconds))
    plan = _run_async(run_plan(cfg, opts))
    if as_json:
        typer.echo(json.dumps(plan.as_dict(), indent=1, default=str))
    else:
        typer.echo("\n".join(render(plan)))
    if record:
        from cosmigrate.ledger import LedgerError
        from cosmigrate.planrecord import record_plan

        try:
            _run_async(record_plan(cfg, plan))
        except LedgerError as exc:
            raise fail(f"--record: the plan is not stored: {exc}", code=1) from None
        typer.echo(f"plan stored in the ledger ({cfg.ledger.url}): status compares the migration with it", err=True)
    if plan.needs_action:
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


YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation (scripts).")]


def _purge(config: Path, ns: str | None, yes: bool) -> None:
    """`ledger reset` / `drop-cluster`: count, refuse while held, confirm, re-check, remove, journal."""
    import getpass

    from cosmigrate.ledger import LedgerError, open_ledger
    from cosmigrate.ledgeradmin import describe, holder
    from cosmigrate.logs import configure_logging, get_logger
    from cosmigrate.terminal import printable

    cfg = _load(config, secrets=False)
    what = f"namespace {printable(ns)}" if ns is not None else "every namespace"

    async def step(dry_run: bool) -> tuple[str, dict[str, int]]:
        ledger = open_ledger(cfg)
        try:
            held = await holder(cfg, ledger, ns)
            return held, ({} if held else await ledger.purge(ns, dry_run=dry_run))
        finally:
            await ledger.close()

    try:
        held, counts = _run_async(step(dry_run=True))
        if held:
            raise fail(f"refusing to remove the ledger items of {what}: {held}", code=1)
        if not any(counts.values()):
            raise fail(f"the ledger {cfg.ledger.url} has no items for {what} of cluster {cfg.cluster_name}", code=1)
        after = ("the next start claims it anew and copies it again from the beginning (the target collection is "
                 "not touched: drop it first for a clean copy)") if ns is not None else (
                 "the next start begins a new migration of the cluster from the beginning (writer stopped; the "
                 "target and the batch objects are not touched)")
        typer.echo(f"This removes from {cfg.ledger.url}, cluster {cfg.cluster_name}, {what}: {describe(counts)}. "
                   f"Then {after}.", err=True)
        if not yes:
            if not sys.stdin.isatty():
                raise fail("not confirmed: run it in a terminal, or give --yes", code=1)
            if not typer.confirm("Remove them?", err=True):
                raise fail("not confirmed: nothing removed", code=1)
        held, counts = _run_async(step(dry_run=False))  # again: a daemon may have started meanwhile
        if held:
            raise fail(f"refusing to remove the ledger items of {what}: {held}", code=1)
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    configure_logging(cfg.log.level, cfg.log.format)
    log = get_logger(component="ledger")
    log.warning("ledger namespace reset" if ns is not None else "ledger cluster dropped", namespace=ns or "",
                by=getpass.getuser(), ledger=cfg.ledger.url, **counts)
    typer.echo(f"removed {describe(counts)} of {what}")


@ledger_app.command("reset")
def ledger_reset(
    namespace: Annotated[str, typer.Argument(help="db.collection whose ledger items to remove.", metavar="NAMESPACE")],
    yes: YesOpt = False, config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Remove one namespace's ledger items (meta, batches, progress) so that the next start copies it again.

    Refused while a daemon may hold it (the cluster lock, a daemon answering on the socket, a recent update by
    its owner). Asks first unless --yes; the removal is logged. Needs dynamodb:DeleteItem (not in the
    instance role).
    """
    if not namespace or "." not in namespace:
        raise fail(f"NAMESPACE: expected db.collection, got {namespace!r}")
    _purge(config, namespace, yes)


@ledger_app.command("drop-cluster")
def ledger_drop_cluster(yes: YesOpt = False, config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """Remove every ledger item of the config's cluster: namespaces, batches, progress, the writer switch.

    Refused while a daemon may hold any of it. Asks first unless --yes; the removal is logged.
    """
    _purge(config, None, yes)


@batches_app.command("list")
def batches_list(
    namespace: Annotated[str | None, typer.Argument(help="db.collection; all namespaces when left out.",
                                                    metavar="NAMESPACE", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=0, metavar="N",
                                              help="Only the latest N batches of each namespace.")] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """List committed batches: seq, events, bytes, capture time, applied or not; a summary per namespace on stderr."""
    from cosmigrate.ledger import LedgerError, open_ledger
    from cosmigrate.terminal import printable

    cfg = _load(config, secrets=False)

    async def listing() -> tuple[list[str], list[str]]:
        ledger = open_ledger(cfg)
        try:
            if namespace:
                found = await ledger.get_namespace(namespace)
                metas = [found] if found is not None else []
            else:
                metas = await ledger.list_namespaces()
            lines = [f"{'namespace':<32} {'seq':>8} {'events':>8} {'bytes':>10}  {'captured_at (UTC)':<26} applied"]
            summary = []
            for meta in metas:
                start = 0 if limit is None else max(0, meta.next_seq - limit)
                batches = await ledger.list_batches(meta.ns, start) if limit != 0 else []
                for b in batches:
                    when = dt.datetime.fromtimestamp(b.captured_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
                    lines.append(f"{printable(meta.ns):<32} {b.seq:>8} {b.events:>8} {b.bytes:>10}  {when:<26} "
                                 f"{'yes' if b.applied_at else 'no'}")
                pending = max(0, meta.next_seq - 1 - meta.applied_seq)
                shown = f", the latest {len(batches)} shown" if limit is not None else ""
                summary.append(f"{printable(meta.ns)}: {meta.next_seq} batches committed ({meta.captured_events} "
                               f"events), {meta.applied_seq + 1} applied ({meta.applied_events} events), {pending} "
                               f"pending{shown}")
            return lines, summary or [f"no batches{f' for {printable(namespace)}' if namespace else ''}"]
        finally:
            await ledger.close()

    try:
        lines, summary = _run_async(listing())
    except LedgerError as exc:
        raise fail(str(exc), code=1) from None
    typer.echo("\n".join(lines))
    typer.echo("\n".join(summary), err=True)  # stdout stays the table alone, for scripts


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


def _config_path(config: Path | None) -> tuple[Path | None, bool]:
    """The config every command reads: the one given, else $COSMIGRATE_CONFIG, else the default file if present.

    The second value is True for the default file found implicitly (an operator may not be allowed to read it).
    """
    if config is not None:
        return config, False
    if os.environ.get("COSMIGRATE_CONFIG"):
        return Path(os.environ["COSMIGRATE_CONFIG"]), False
    if os.path.exists(DEFAULT_CONFIG):
        return Path(DEFAULT_CONFIG), True
    return None, False


def _socket_from(config: Path | None, implicit: bool) -> str:
    """The config's control.socket (only that key is read: no secret), else the default socket."""
    from cosmigrate.config import ConfigError, control_socket

    try:
        return control_socket(config)
    except ConfigError as exc:
        if implicit:  # the default file exists but this user may not read it: the default socket is the best guess
            return os.environ.get("COSMIGRATE_CONTROL_SOCKET") or DEFAULT_SOCKET
        raise fail(f"config: {exc}") from None


def _socket_path(ctx: typer.Context, socket: str | None, config: Path | None) -> str:
    """--socket, else the config's control.socket (--config, $COSMIGRATE_CONFIG, the default file), else the default.

    Options given after the subcommand win over those given before it. Only the socket path
    is read from the config: `ctl` runs in an operator's shell, which cannot (and need not)
    read the service's secrets.
    """
    from cosmigrate.config import worker_socket

    given: dict[str, Any] = ctx.obj or {}
    if given.get("worker") and not (socket or given.get("socket")):
        plain = dict(given, worker="")
        ctx.obj = plain
        try:
            return worker_socket(_socket_path(ctx, None, config), str(given["worker"]))
        finally:
            ctx.obj = given
    socket = socket or given.get("socket")
    if socket:
        return socket
    return _socket_from(*_config_path(config or given.get("config")))


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
    """0 ready for cutover, 4 cutover complete, 3 a namespace failed, 2 not ready otherwise (so a script can wait
    on it; 1 is no daemon answering)."""
    if status.get("cutover") == "cutover complete":
        return EXIT_CUTOVER_COMPLETE
    if any(n.get("state") == "failed" for n in status.get("namespaces", [])):
        return EXIT_NAMESPACE_FAILED
    return 0 if status.get("ready_for_cutover") is True else EXIT_NOT_READY


def _watch_status(path: str) -> dict[str, Any] | str:
    """One status for --watch: the status, or why the daemon did not answer (the watch goes on and reconnects)."""
    from cosmigrate.control import ControlError, request

    try:
        reply = asyncio.run(request(path, {"cmd": "status"}, limit_s=10))
    except ControlError as exc:
        return str(exc)
    status = reply.get("status")
    return status if isinstance(status, dict) else f"{path} answered without a status"


@ctl_app.command("status")
def ctl_status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status object as JSON (one line per refresh "
                                                         "with --watch).")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until Ctrl+C; a daemon that goes away (a restart) "
                                                        "is shown as unreachable and reconnected to.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.", metavar="SECONDS")] = 2.0,
    socket: SocketOpt = None, config: CtlConfigOpt = None,
) -> None:
    """Show lag, progress, failures and cutover readiness.

    Exit status (without --watch): 0 ready for cutover, 2 not ready, 3 a namespace
    failed, 4 cutover complete, 1 no daemon answered.
    """
    import datetime
    import json
    import time

    from rich.console import Console
    from rich.text import Text

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
    down_since = ""

    def refresh() -> Any:
        """The next screen (or JSON line): the status, or "daemon unreachable since <time>" until it answers again."""
        nonlocal down_since
        got = _watch_status(path)
        if isinstance(got, dict):
            down_since = ""
            return got
        if not down_since:
            down_since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return {"daemon_unreachable_since": down_since, "error": got}

    try:
        if as_json:
            while True:  # JSON lines: one status object per line, for jq and log shippers
                typer.echo(json.dumps(refresh()))
                sys.stdout.flush()
                time.sleep(interval)
        from rich.live import Live

        console = Console()

        def screen(got: dict[str, Any]) -> Any:
            if "daemon_unreachable_since" in got:
                return Text(f"daemon unreachable since {got['daemon_unreachable_since']} ({got['error']}); "
                            "reconnecting every {:g}s, Ctrl+C to quit".format(interval), style="bold red")
            return _render(path, got, console.width)

        with Live(screen(refresh()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(screen(refresh()))
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


ReportOpt = Annotated[Path | None, typer.Option("--report", help="Also write the JSON report to this file (on "
                                                                   "every ending, failures included).")]
EXIT_INTERRUPTED = 130


def _write_report(report: Path | None, content: dict[str, Any]) -> None:
    import json

    if report is None:
        return
    try:
        report.write_text(json.dumps(content, indent=1) + "\n")
    except OSError as exc:
        raise fail(f"--report {report}: {exc.strerror or exc}", code=1) from None


class _Progress:
    """What a client waiting on a job prints (stderr): cutover's steps and what it waits for, verify's rate and ETA."""

    def __init__(self, cmd: str) -> None:
        import time

        self.cmd = cmd
        self.shown: tuple[str, str] = ("", "")
        self.samples: list[tuple[float, int]] = []
        self.printed_at = 0.0
        self.clock = time.monotonic

    def show(self, reply: dict[str, Any], final: bool = False) -> None:
        if self.cmd == "cutover":
            step, waiting = str(reply.get("step") or ""), str(reply.get("waiting_for") or "")
            if step and step != self.shown[0]:
                typer.echo(f"cutover: {step}", err=True)
            if waiting and (waiting != self.shown[1] or self.clock() - self.printed_at >= 15):
                typer.echo(f"cutover: {step} waits for: {waiting}", err=True)
                self.printed_at = self.clock()
            self.shown = (step, waiting)
            return
        checked, estimated = reply.get("docs_checked"), reply.get("docs_estimated")
        if not isinstance(checked, int):
            return
        now = self.clock()
        self.samples = [(t, n) for t, n in self.samples if now - t <= 30] + [(now, checked)]
        if now - self.printed_at < 2 and not final:
            return
        self.printed_at = now
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        line = f"verify: {checked} documents checked"
        if isinstance(estimated, int) and estimated > 0:
            left = max(0, estimated - checked)
            eta = f"{left / rate:.0f}s" if rate > 0 else "unknown"
            line += f" of about {estimated} ({min(99.9, 100 * checked / estimated):.1f}%), {rate:.0f}/s (30 s), eta {eta}"
        else:
            line += f", {rate:.0f}/s (30 s)"
        typer.echo(line, err=True)


def _detached(path: str, cmd: str, step: str, report: Path | None) -> typer.Exit:
    """Ctrl+C while following a job in the daemon: it goes on there. One line says how to follow and cancel it."""
    where = f" (step {step})" if step else ""
    if cmd == "cutover":
        _write_report(report, {"outcome": "detached", "step": step, "message": "the client detached; the cutover goes "
                               "on in the daemon"})
        typer.echo(f"\ncosmigrate cutover: detached; the cutover goes on in the daemon{where}. Follow it with "
                   "`cosmigrate ctl status --watch` (or rejoin with `cosmigrate ctl cutover --report FILE`); stop it "
                   "at the next step with `cosmigrate ctl cutover --cancel`", err=True)
    else:
        typer.echo("\ncosmigrate verify: detached; the pass goes on in the daemon. Rejoin it with "
                   "`cosmigrate ctl verify`", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


def _poll_job(path: str, cmd: str, extra: dict[str, Any], report: Path | None) -> dict[str, Any]:
    """Start (or join) a verify/cutover job on the daemon and wait for its result, printing its progress."""
    import time

    reply: dict[str, Any] = {}
    progress = _Progress(cmd)
    try:
        reply = _ctl_request(path, {"cmd": cmd, "action": "start", **extra}, cmd, dict)
        while reply.get("running"):
            progress.show(reply)
            time.sleep(0.3)
            reply = _ctl_request(path, {"cmd": cmd, "action": "status"}, cmd, dict)
        progress.show(reply, final=True)
    except KeyboardInterrupt:
        raise _detached(path, cmd, str(reply.get("step") or ""), report) from None
    return dict(reply)


def _in_process_job(config: Path, cmd: str, extra: dict[str, Any], report: Path | None) -> dict[str, Any]:
    """No daemon runs: run one in this process for the job (logs on stderr), then stop it.

    Ctrl+C stops the daemon and with it the job: the cutover's step is stored, so a new run resumes there.
    """
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
        step = daemon.proof.cutover_step if daemon.proof is not None else ""
        message = str(reply.get("error") or (f"{cmd} interrupted" + (f" at step {step}; run it again to resume there"
                                                                      if cmd == "cutover" and step else "")))
        if cmd == "cutover":
            _write_report(report, {"cluster_name": cfg.cluster_name, "outcome": "interrupted" if not reply else "failed",
                                   "step": step, "exit_code": 1, "message": message, "equal": False})
        raise fail(message, code=1)
    return dict(reply[cmd])


def _job(config: Path | None, socket: str | None, cmd: str, extra: dict[str, Any], report: Path | None) -> None:
    """verify / cutover: through the running daemon if one answers (only the socket path is read from the config,
    no secret), else in this process (which needs the config and its secrets)."""
    import json

    from cosmigrate.control import ControlError, request

    config, implicit = _config_path(config)
    path = socket or _socket_from(config, implicit)
    try:
        asyncio.run(request(path, {"cmd": "ping"}, limit_s=5))
        running = True
    except ControlError:
        running = False
    if running:
        reply = _poll_job(path, cmd, extra, report)
    elif config is None:
        raise fail(f"no cosmigrate daemon answers on {path}; give --config (or set COSMIGRATE_CONFIG) to run the "
                   f"{cmd} in this process", code=1)
    else:
        reply = _in_process_job(config, cmd, extra, report)
    result = reply.get("result")
    if not isinstance(result, dict):
        raise fail(f"{cmd}: the daemon answered without a result", code=1)
    code = int(result.get("exit_code", 1))
    content = result.get("report")
    if content is None:  # an ending without a report of its own still leaves one: the outcome and why
        content = {"outcome": "complete" if code == 0 else "stopped", "exit_code": code,
                   "message": result.get("message", ""), "equal": False}
    else:
        typer.echo(json.dumps(content, indent=1))
    _write_report(report, content)
    typer.echo(f"cosmigrate {cmd}: {result.get('message', '')}", err=True)
    if code:
        raise typer.Exit(code)


JobConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", metavar="PATH",
    help=f"The TOML config (default: $COSMIGRATE_CONFIG, else {DEFAULT_CONFIG} if present). With a running daemon "
         "only control.socket is read (no secret); without one the job runs in this process.")]
JobSocketOpt = Annotated[str | None, typer.Option("--socket", metavar="PATH", help="Control socket of a running daemon.")]
MaxMismatchesOpt = Annotated[int | None, typer.Option("--max-mismatches", min=0,
                                                      help="List at most N mismatches (default verify.max_mismatches).")]


@app.command()
def verify(config: JobConfigOpt = None, report: ReportOpt = None, max_mismatches: MaxMismatchesOpt = None,
           socket: JobSocketOpt = None) -> None:
    """Compare every document of the target with the source, range by range; exit 0 when equal, 6 when not.

    Runs in the daemon when one answers (else in this process), printing progress and an ETA on stderr.
    Resumable: a pass a kill interrupted continues where it stopped.
    """
    _job(config, socket, "verify", {} if max_mismatches is None else {"max_mismatches": max_mismatches}, report)


@app.command()
def cutover(config: JobConfigOpt = None, report: ReportOpt = None, socket: JobSocketOpt = None) -> None:
    """Finish the migration: precheck, quiesce, apply, final delete sweep, re-check until clean, finalize, report.

    Resumable (the step is in the ledger). Exit 0 when complete, 3 when the source is still being written,
    5 when not ready, 6 when documents differ, 7 when cancelled (`ctl cutover --cancel`).
    """
    _job(config, socket, "cutover", {}, report)


@ctl_app.command("cutover")
def ctl_cutover(ctx: typer.Context, report: ReportOpt = None,
                cancel: Annotated[bool, typer.Option("--cancel", help="Stop the running cutover at its next step "
                                                     "boundary (recorded; a new run resumes there).")] = False,
                socket: SocketOpt = None, config: CtlConfigOpt = None) -> None:
    """Run (or join) the cutover in the running daemon; see `cosmigrate cutover`. Ctrl+C detaches: it goes on."""
    import getpass

    path = _socket_path(ctx, socket, config)
    if cancel:
        reply = _ctl_request(path, {"cmd": "cutover", "action": "cancel", "by": getpass.getuser()}, "cutover", dict)
        typer.echo(f"cutover cancel requested: it stops before its next step (now {reply.get('step') or '?'}); "
                   "`cosmigrate ctl status` shows where it stopped")
        return
    _job(None, path, "cutover", {}, report)


@ctl_app.command("verify")
def ctl_verify(ctx: typer.Context, report: ReportOpt = None, max_mismatches: MaxMismatchesOpt = None,
               socket: SocketOpt = None, config: CtlConfigOpt = None) -> None:
    """Run (or join) a verification pass in the running daemon; see `cosmigrate verify`."""
    _job(None, _socket_path(ctx, socket, config), "verify",
         {} if max_mismatches is None else {"max_mismatches": max_mismatches}, report)


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
