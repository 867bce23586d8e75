"""Adversarial model check of catch-up collapse: random histories, compared with what the source holds.

Histories over one document written under numeric-equal `_id`s (1, 1.0, Int64 1: one target document), a
holder contesting its unique value (the source keeps the value unique at every moment, so every conflict on
the target is one the merge must resolve or defer, never lose), deletes and re-inserts spread over pages, and
fillers; batches of random sizes, merged with random page sizes and byte budgets; half the runs restart the
applier mid-backlog (deferred writes are lost with it: only the ledger's applied_seq says where to replay). The
end state must be the source's last version of every document, with nothing deferred and every batch marked
applied. COSMIGRATE_MODEL_SEEDS runs more histories.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bson import Int64

from cosmigrate.apply import WriterGate
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from cosmigrate.timeouts import cancel_and_wait
from tests.applyharness import Harness, event
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"
X_FORMS: list[Any] = [1, 1.0, Int64(1)]


@pytest.fixture
async def harness(tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[Harness]:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    client = target_client(sandbox.target_uri, sandbox.target_ca_file, serverSelectionTimeoutMS=5000)
    h = Harness(cfg, client)
    try:
        yield h
    finally:
        await h.close()
        await client.close()


def _history(rng: random.Random, batches: int) -> tuple[list[list[bytes]], dict[Any, int | None]]:
    """Batches of events and the source's final state (normalised `_id` -> version, None when deleted)."""
    state: dict[Any, dict[str, Any] | None] = {}
    out: list[list[bytes]] = []
    v = 0
    for _ in range(batches):
        events = []
        for _ in range(rng.randint(1, 3)):
            v += 1
            who = rng.choice(["x", "x", "h", "f1", "f2"])
            norm = 1 if who == "x" else who
            other = "h" if who == "x" else 1
            if who.startswith("f"):
                doc: dict[str, Any] | None = {"_id": who, "v": v}
            elif rng.random() < 0.25:
                doc = None
            else:
                held = (state.get(other) or {}).get("u") == 1
                doc = {"_id": rng.choice(X_FORMS) if who == "x" else "h", "v": v}
                if not held and rng.random() < 0.7:
                    doc["u"] = 1  # the unique value, free at the source right now
                if who == "x" and rng.random() < 0.5:
                    doc["w"] = 1  # held on the target by a document the feed never shows, until the test drops it
            key = doc["_id"] if doc is not None else (rng.choice(X_FORMS) if who == "x" else who)
            state[norm] = doc
            events.append(event(key, doc))
        out.append(events)
    return out, {k: (d["v"] if d is not None else None) for k, d in state.items()}


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("COSMIGRATE_MODEL_SEEDS", "8"))))
async def test_random_histories_converge_to_the_source(harness: Harness, seed: int) -> None:
    rng = random.Random(seed)
    harness.cfg.apply.max_batches_per_round = rng.choice([1, 2, 3])
    harness.cfg.apply.collapse_max_bytes = rng.choice([1, 600, 1500, 64 << 20])
    await harness.target.app.c.create_index("u", unique=True, sparse=True)
    await harness.target.app.c.create_index("w", unique=True, sparse=True)
    await harness.target.app.c.insert_one({"_id": "stale", "w": 1})  # a lasting conflict: writes are deferred
    epoch = await harness.claim(NS, "me")
    batches, final = _history(rng, 30)
    for events in batches:
        await harness.commit(NS, epoch, events)
    app = harness.applier(NS, epoch, gate=WriterGate(started=False))
    task = harness.start(app)
    app.gate.start()

    async def half_written() -> bool:
        return app.status.written_seq >= len(batches) // 2 or app.status.state == "failed"

    await wait_for(half_written, 30, what="half the backlog written")
    if seed % 2:  # the process dies here: deferred writes live in memory only, the next one replays from the ledger
        await cancel_and_wait([task])  # one cancel can be lost in PyMongo's own wait_for (Python 3.11)
        app = harness.applier(NS, epoch)
        harness.start(app)
    await harness.target.app.c.delete_one({"_id": "stale"})  # the conflict ends: deferred writes may land now
    app.wake.set()

    async def done() -> bool:
        return app.status.applied_seq == len(batches) - 1 or app.status.state == "failed"

    await wait_for(done, 30, what="every batch applied")
    assert app.status.state != "failed", app.status.last_error
    assert app.status.deferred == 0
    got = {(1 if d["_id"] == 1 else d["_id"]): d["v"] async for d in harness.target.app.c.find({})}
    assert got == {k: v for k, v in final.items() if v is not None}
