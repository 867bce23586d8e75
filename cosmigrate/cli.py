"""The `cosmigrate` command line.

Commands import their machinery lazily so that `cosmigrate --help` and the
control client stay fast. Bad input ends in one line on stderr and exit 2,
never a traceback.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer

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
