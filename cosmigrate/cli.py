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
app.add_typer(ledger_app, name="ledger")
app.add_typer(batches_app, name="batches")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to the TOML config file.")]


def _load(config: Path) -> Config:
    from cosmigrate.config import ConfigError, load_config

    try:
        return load_config(config)
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

    cfg = _load(config)
    configure_logging(cfg.log.level, cfg.log.format)
    try:
        _run_async(Daemon(cfg).serve())
    except StartupError as exc:
        raise fail(str(exc), code=1) from None


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
