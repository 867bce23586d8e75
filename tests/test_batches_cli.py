"""`cosmigrate batches list` and `batches dump`: what operators use to look inside the log."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from bson import Int64, json_util
from pymongo import AsyncMongoClient

from cosmigrate.daemon import Daemon
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from tests.helpers import make_config, prepare_backends, read_committed, wait_for, write_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosmigrate", "batches", *args], capture_output=True, text=True,
                          timeout=60)


async def test_list_and_dump_show_the_captured_events(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    sandbox.source.faults.partitions = 1  # one stream: 25 events make exactly three batches of at most 10
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_events=10)
    config = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    await source.app.users.insert_many([{"_id": i, "n": Int64(i)} for i in range(25)])
    daemon = Daemon(cfg, env={})
    task = asyncio.create_task(daemon.serve())
    try:
        async def captured() -> bool:
            c = (await read_committed(cfg)).get("app.users")
            return c is not None and sum(len(b.events) for b in c.batches) == 25

        await wait_for(captured, 30, what="capture")
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)
    listing = await asyncio.to_thread(_cli, "list", "--config", str(config))
    assert listing.returncode == 0, listing.stderr
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    assert [r[1] for r in rows] == ["0", "1", "2"] and sum(int(r[2]) for r in rows) == 25
    assert all(r[-1] == "no" for r in rows)  # not applied: the writer never started
    dump = await asyncio.to_thread(_cli, "dump", "--config", str(config), "app.users", "1")
    assert dump.returncode == 0, dump.stderr
    events = [json.loads(line) for line in dump.stdout.splitlines()]
    assert len(events) == int(rows[1][2])
    assert events[0]["fullDocument"]["n"] == {"$numberLong": str(events[0]["fullDocument"]["_id"]["$numberInt"])}
    assert json_util.loads(dump.stdout.splitlines()[0])["fullDocument"]["n"].__class__ is Int64
    # A corrupt object is refused with one line, never dumped.
    ledger = open_ledger(cfg)
    record = (await ledger.list_batches("app.users", 1, 1))[0]
    await ledger.close()
    await asyncio.to_thread(_corrupt, Path(cfg.store.url.removeprefix("file://")) / record.key)
    bad = await asyncio.to_thread(_cli, "dump", "--config", str(config), "app.users", "1")
    assert bad.returncode == 1 and "corrupt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    missing = await asyncio.to_thread(_cli, "dump", "--config", str(config), "app.users", "99")
    assert missing.returncode == 1 and "no committed batch 99" in missing.stderr


def _corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
