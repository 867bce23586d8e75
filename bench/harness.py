"""Processes for the end-to-end suites: sandbox, moto server and `cosmigrate run`, each its own process.

Nothing here is timed against a fixed number: the suites compare what they
measure with references measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cosmigrate.config import Config, to_toml
from cosmigrate.control import request
from cosmigrate.sandbox.tls import ca_file_for_uri

AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
# moto with DynamoDB requests isolated (moto's own server undoes concurrent writes when a transaction is cancelled).
MOTO_SERVER = Path(__file__).resolve().parent.parent / "tests" / "motoserver.py"


def mongo_client(uri: str, **kwargs: Any) -> Any:
    """An AsyncMongoClient for a sandbox URI, given the target's CA when the URI is the TLS target's.

    The sandbox target serves TLS with a CA of its own (published beside its address): a suite's client
    made without it fails server selection, as suites 5 and 6 did.
    """
    from pymongo import AsyncMongoClient

    ca = ca_file_for_uri(uri)
    return AsyncMongoClient(uri, **({"tlsCAFile": ca} if ca else {}), **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sandbox:
    """`cosmigrate sandbox` in its own process: the source and target URIs and the target's CA file.

    `split=True`: the source is one sandbox process's and the target another's, so that each side has a core of
    its own, as two real servers would (suites whose subject reads one side while writing the other: one
    single-threaded process serving both would make the two sides take turns, which no real pair of servers does).
    """

    def __init__(self, split: bool = False) -> None:
        self.split = split

    def __enter__(self) -> Sandbox:
        self.procs: list[subprocess.Popen[str]] = []
        lines = []
        for _ in range(2 if self.split else 1):
            proc = subprocess.Popen([sys.executable, "-m", "cosmigrate", "sandbox"], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
            assert proc.stdout is not None
            # Three lines: the source URI, the target URI, the target's CA file (it serves TLS with its own CA).
            lines.append([proc.stdout.readline().strip() for _ in range(3)])
            self.procs.append(proc)
        self.proc = self.procs[0]  # the source's process
        self.target_proc = self.procs[-1]
        self.source_uri = lines[0][0]
        self.target_uri, self.target_ca_file = lines[-1][1], lines[-1][2]
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait()


class Moto:
    def __enter__(self) -> Moto:
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto server did not start")

    def __exit__(self, *exc: Any) -> None:
        self.proc.terminate()
        self.proc.wait()


def bench_config(sandbox: Sandbox, backend: str, moto: Moto | None = None) -> Config:
    tmp = Path(tempfile.mkdtemp(prefix="cosmigrate-bench-"))
    cfg = Config(cluster_name="bench")
    cfg.source.uri, cfg.target.uri = sandbox.source_uri, sandbox.target_uri
    cfg.target.tls_ca_file = sandbox.target_ca_file
    cfg.control.socket = str(tmp / "control.sock")
    cfg.capture.start_at = "beginning"
    cfg.capture.discovery_interval_s = 1.0
    cfg.log.format = "json"
    cfg.log.level = "warning"
    if backend == "file+sqlite":
        cfg.store.url = f"file://{tmp / 'batches'}"
        cfg.ledger.url = f"sqlite://{tmp / 'ledger.db'}"
    else:
        assert moto is not None
        cfg.store.url = f"s3://bench-{tmp.name.lower().replace('_', '-')[-20:]}/changes"
        cfg.ledger.url = f"dynamodb://bench-{tmp.name[-12:]}"
        cfg.aws.endpoint_url, cfg.aws.region = moto.url, "us-east-1"
    return cfg


async def prepare(cfg: Config) -> None:
    os.environ.update(AWS_ENV)
    if cfg.store.url.startswith("s3://"):
        import aioboto3

        async with aioboto3.Session().client("s3", endpoint_url=cfg.aws.endpoint_url, region_name="us-east-1") as s3:
            await s3.create_bucket(Bucket=cfg.store.url[5:].split("/")[0])
    from cosmigrate.ledger import open_ledger

    ledger = open_ledger(cfg)
    await ledger.init()
    await ledger.close()


class Daemon:
    """`cosmigrate run` in its own process, driven over its control socket."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    async def __aenter__(self) -> Daemon:
        path = Path(self.cfg.control.socket).parent / "cosmigrate.toml"
        path.write_text(to_toml(self.cfg))
        self.log = open(path.parent / "daemon.log", "wb")  # noqa: SIM115
        # COSMIGRATE_BENCH_PROFILE=<file>: the daemon runs under cProfile and writes its profile there on exit.
        profile = os.environ.get("COSMIGRATE_BENCH_PROFILE")
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, *prefix, "-m", "cosmigrate", "run", "--config", str(path), stdout=self.log,
            stderr=self.log, env={**os.environ, **AWS_ENV})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await request(self.cfg.control.socket, {"cmd": "ping"})
                return self
            except Exception:
                await asyncio.sleep(0.2)
        raise RuntimeError("daemon did not start; see " + str(path.parent / "daemon.log"))

    async def __aexit__(self, *exc: Any) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 60)
        except TimeoutError:
            self.proc.kill()
        self.log.close()

    async def status(self) -> dict[str, Any]:
        return dict((await request(self.cfg.control.socket, {"cmd": "status"}))["status"])

    async def writer(self, action: str) -> None:
        await request(self.cfg.control.socket, {"cmd": "writer", "action": action})

    def cpu_s(self) -> float:
        """The daemon process's own CPU time so far (user + system), from /proc."""
        return proc_cpu_s(self.proc.pid)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0


def proc_cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds (/proc/<pid>/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def totals(status: dict[str, Any]) -> dict[str, int]:
    ns = status["namespaces"]
    return {k: sum(n[k] for n in ns) for k in ("captured_events", "applied_events", "pending_events", "deferred")}


async def target_writes(client: Any) -> int:
    return int((await client.admin.command("cosmigrateSandbox"))["writes"])


async def ceiling(target_uri: str, n: int = 30_000, ca_file: str = "") -> float:
    """The sandbox target's own ceiling: a direct bulk-upsert loop (1,000 per write), documents/s."""
    from pymongo import AsyncMongoClient, ReplaceOne

    client: AsyncMongoClient[Any] = AsyncMongoClient(target_uri, **({"tlsCAFile": ca_file} if ca_file else {}))
    docs = [{"_id": i, "v": i, "pad": "x" * 700} for i in range(n)]
    t0 = time.perf_counter()
    for s in range(0, n, 1000):
        await client.ceiling.c.bulk_write([ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs[s:s + 1000]],
                                          ordered=False)
    rate = n / (time.perf_counter() - t0)
    await client.drop_database("ceiling")
    await client.close()
    return rate


async def wait_backfilled(cfg: Config, ns: str, interval_s: float = 0.05) -> dict[str, Any]:
    """Wait until the ledger says `ns`'s backfill is over; its stored item (`started_at`, `completed_at`, ...).

    Read from the ledger, not through `ctl status` (which samples heads and waits for them): the backfill's
    own clock is its stored start (unit created, head sampled) and completion."""
    from cosmigrate.backfill import KEY, KIND
    from cosmigrate.ledger import open_ledger

    ledger = open_ledger(cfg)
    try:
        while True:
            item = await ledger.get_progress(ns, KIND, KEY)
            doc = item.doc() if item is not None else {}
            if doc.get("phase") == "tailing":
                return dict(doc)
            if doc.get("phase") == "dropped":
                raise RuntimeError(f"{ns} was dropped during its backfill")
            await asyncio.sleep(interval_s)
    finally:
        await ledger.close()
