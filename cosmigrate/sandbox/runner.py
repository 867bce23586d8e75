"""`cosmigrate sandbox`: both emulators as one foreground process until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys

from cosmigrate.sandbox import Faults, Sandbox, parse_spec


def build_faults(spec: str | None, seed: int | None = None) -> tuple[Faults, Faults]:
    """One spec configures both servers: each takes the switches that concern it."""
    values = parse_spec(spec or "")
    source, target = Faults(seed=seed), Faults(seed=seed)
    source.update(values)
    target.update({k: v for k, v in values.items() if k in ("drop_rate", "idle_timeout_s", "slow_write_ms", "slow_index_ms", "failover_s")})
    return source, target


async def serve(source_port: int, target_port: int, faults: str | None, target_version: str,
                source_version: str = "6.0", target_tls: bool = True) -> None:
    """Start both servers, print the source URI, the target URI and the target's CA file (one line each; the
    last is empty without TLS), run until a stop signal."""
    source_faults, target_faults = build_faults(faults)
    sandbox = Sandbox(source_faults=source_faults, target_faults=target_faults, source_port=source_port,
                      target_port=target_port, target_version=target_version, source_version=source_version,
                      target_tls=target_tls)
    await sandbox.start()
    print(sandbox.source_uri, flush=True)
    print(sandbox.target_uri, flush=True)
    print(sandbox.target_ca_file, flush=True)
    print(f"sandbox: Cosmos {sandbox.source.version.name} source on {sandbox.source.address}, DocumentDB "
          f"{sandbox.target.version.name} target on {sandbox.target.address}; Ctrl+C to stop", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sandbox.stop()
