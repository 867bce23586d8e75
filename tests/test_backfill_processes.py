"""The full load under SIGKILL with real `cosmigrate run` processes: never back to zero, converges byte for byte.

Both backends. Quick by default (a few thousand documents, the target slowed so that kills land during the backfill);
`COSMIGRATE_BACKFILL_DOCS=200000 COSMIGRATE_BACKFILL_KILLS=60` for the soak.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.backfill import BACKFILL, KEY, KIND, TAILING
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from cosmigrate.sandbox.cosmos import DEFAULT_PAGE
from tests.helpers import assert_converged, backends, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

NS = "app.big"
DOCS = int(os.environ.get("COSMIGRATE_BACKFILL_DOCS", "6000"))
KILLS = int(os.environ.get("COSMIGRATE_BACKFILL_KILLS", "3"))


async def _ledger_state(cfg) -> tuple[dict, int, int, int]:
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress(NS, KIND, KEY)
        meta = await ledger.get_namespace(NS)
        return (item.doc() if item else {}, meta.next_seq if meta else 0, meta.applied_seq if meta else -1,
                meta.captured_events if meta else 0)
    finally:
        await ledger.close()


@pytest.mark.parametrize("backend", backends("file+sqlite"))
async def test_sigkill_through_a_backfill_never_restarts_from_zero(request, backend: str, tmp_path: Path,
                                                                  sandbox: Sandbox, source: AsyncMongoClient,
                                                                  target) -> None:
    endpoint = request.getfixturevalue("moto_endpoint") if backend == "s3+dynamodb" else None
    filler = "x" * 200
    for start in range(0, DOCS, 10_000):
        await source.app.big.insert_many([{"_id": i, "n": i, "pad": filler}
                                          for i in range(start, min(DOCS, start + 10_000))])
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, endpoint, max_batch_events=250)
    cfg.apply.max_ops_per_write = 250
    cfg.apply.write_concurrency = 1
    cfg.apply.max_batches_per_round = 1
    cfg.apply.collapse_max_bytes = 64 * 1024  # small merged runs: the applied position moves often, kills land inside
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    ledger = open_ledger(cfg)
    try:
        await ledger.set_writer("started", "test", time.time())
    finally:
        await ledger.close()
    # Slow the target so that the backfill outlives several kills (each write waits; the soak needs no help).
    sandbox.target.faults.slow_write_ms = 60 if DOCS < 50_000 else 0
    rng = random.Random(10)
    first: dict = {}
    kills = 0
    lives: list[Child] = []
    last = (0, -1)
    while kills < KILLS:
        child = await Child.start(config)
        lives.append(child)

        async def progressed(before: tuple[int, int] = last) -> bool:
            stored, next_seq, applied_seq, _ = await _ledger_state(cfg)
            # Applied more in this life, or nothing was left to apply and this life ended the backfill.
            return bool(stored) and (applied_seq > before[1] or stored.get("phase") != BACKFILL)

        await wait_for(progressed, 60, interval=0.05, what="progress in this life")
        await asyncio.sleep(rng.uniform(0.2, 1.5))  # the kill schedule: a random moment after that progress
        assert await child.finish(signal.SIGKILL) == -signal.SIGKILL
        kills += 1
        stored, next_seq, applied_seq, _ = await _ledger_state(cfg)
        first = first or stored
        assert stored["head"] == first["head"] and stored["started_at"] == first["started_at"], "the head is kept"
        assert (next_seq, applied_seq) >= last, "the ledger never goes back"
        last = (next_seq, applied_seq)
        if stored["phase"] != BACKFILL:
            break
    assert first.get("phase") == BACKFILL, "the first kill landed after the backfill: nothing was tested"
    final = await Child.start(config)
    try:
        async def watching() -> bool:
            return any(e.get("event") == "watching namespace" for e in final.events())

        await wait_for(watching, 60, what="the last process running")

        async def done() -> bool:
            stored, *_ = await _ledger_state(cfg)
            return stored.get("phase") == TAILING and await assert_converged(source, target, [NS])

        await wait_for(done, 300, what="tailing and the target equal to the source")
    finally:
        code = await final.finish(signal.SIGTERM)
        assert code == 0, (code, final.stderr[-5:], final.stdout[-5:])
    _, _, _, captured = await _ledger_state(cfg)
    # Read once from the beginning: a restart from zero would capture the documents again.
    assert captured <= DOCS + (kills + 1) * DEFAULT_PAGE, (captured, DOCS)  # at most a page re-read per restart
    recorded = [e for child in [*lives, final] for e in child.events() if e.get("event") == "capture start position recorded"]
    assert len(recorded) == 1, "the start position is recorded once, by the first life"
    print(f"{kills} kills through a backfill of {DOCS} documents; {captured} events captured")
