"""One applier driven directly (no daemon): real sandbox target over TCP, real store and ledger.

These tests hold an applier at a chosen point (a pool it waits for, a store
read) to reproduce the interleavings that matter: a stale owner's late write,
sibling chunks still retrying after their round failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.apply import WriterGate
from cosmigrate.ledger import Fenced
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from tests.applyharness import Harness, event
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"


@pytest.fixture
async def raw_target(sandbox: Sandbox) -> AsyncIterator[AsyncMongoClient[Any]]:
    """The applier's client, configured as production configures it."""
    client = target_client(sandbox.target_uri, serverSelectionTimeoutMS=5000)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def harness(tmp_path: Path, sandbox: Sandbox, raw_target: AsyncMongoClient[Any]) -> AsyncIterator[Harness]:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    h = Harness(cfg, raw_target)
    try:
        yield h
    finally:
        await h.close()


class SpyStore:
    """The real store, remembering which keys were read (to know what an applier holds)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.got: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get(self, key: str) -> bytes:
        self.got.append(key)
        return await self.inner.get(key)


async def _true(value: bool) -> bool:
    return value


async def _doc(target: AsyncMongoClient[Any], _id: Any) -> dict[str, Any] | None:
    return await target.app.c.find_one({"_id": _id})


# --- fencing --------------------------------------------------------------------------


async def test_a_stale_owner_held_before_its_write_never_lands_over_the_new_owner(
    harness: Harness, sandbox: Sandbox, target: AsyncMongoClient[Any],
) -> None:
    old = await harness.claim(NS, "old-process")
    await harness.commit(NS, old, [event(1, {"_id": 1, "v": 0})])
    pool = asyncio.Semaphore(1)
    spy = SpyStore(harness.store)
    stale = harness.applier(NS, old, pool=pool, store=spy)
    stale_task = harness.start(stale)
    await wait_for(lambda: _true(stale.status.applied_seq == 0), 10, what="first batch applied")

    # The old owner's next round reads v1, then waits for its pool (a paused VM, a slow host) ...
    await pool.acquire()
    v1 = await harness.commit(NS, old, [event(1, {"_id": 1, "v": 1})])
    stale.wake.set()
    await wait_for(lambda: _true(v1.key in spy.got), 10, what="stale applier holding v1")
    # ... while a new owner takes the namespace over and applies v2.
    new = await harness.claim(NS, "new-process")
    await harness.commit(NS, new, [event(1, {"_id": 1, "v": 2})])
    fresh = harness.applier(NS, new)
    harness.start(fresh)
    await wait_for(lambda: _true(fresh.status.applied_seq == 2), 10, what="new owner applied v2")
    assert (await _doc(target, 1)) == {"_id": 1, "v": 2}
    writes = sandbox.target.store.writes

    pool.release()  # the old owner wakes up holding v1
    await asyncio.wait_for(stale_task, 10)
    assert stale.status.state == "fenced" and stale.fenced
    assert "taken over" in stale.status.last_error
    assert (await _doc(target, 1)) == {"_id": 1, "v": 2}
    assert sandbox.target.store.writes == writes
    assert fresh.status.state == "running"


class FencedOnMark:
    """The real ledger, except that mark_applied reports a takeover (as the epoch-checking ledger does)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.marks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def mark_applied(self, ns: str, epoch: int, *args: Any) -> None:
        self.marks += 1
        raise Fenced(f"{ns}: taken over by another process (epoch {epoch + 1} > mine {epoch})")


async def test_fenced_on_mark_applied_stops_for_good(harness: Harness, sandbox: Sandbox) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 0})])
    ledger = FencedOnMark(harness.ledger)

    async def owns() -> bool:  # the ownership check passes: the takeover shows only at mark_applied
        return True

    app = harness.applier(NS, epoch, owns=owns)
    app.ledger = ledger  # type: ignore[assignment]
    task = harness.start(app)
    await asyncio.wait_for(task, 10)
    assert app.status.state == "fenced" and ledger.marks == 1
    assert app.status.applied_seq == -1
    writes = sandbox.target.store.writes
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 1})])
    app.wake.set()
    assert task.done() and sandbox.target.store.writes == writes


async def test_fence_stops_a_paused_applier_before_it_ever_writes(harness: Harness, sandbox: Sandbox) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 0})])
    gate = WriterGate(started=False)
    app = harness.applier(NS, epoch, gate=gate)
    task = harness.start(app)
    await wait_for(lambda: _true(app.status.state == "paused"), 10, what="paused")
    app.fence()
    await asyncio.wait_for(task, 10)
    gate.start()
    assert app.status.state == "fenced" and sandbox.target.store.writes == 0


async def test_an_applier_whose_epoch_is_already_stale_does_nothing(harness: Harness, sandbox: Sandbox) -> None:
    old = await harness.claim(NS, "old")
    await harness.commit(NS, old, [event(1, {"_id": 1})])
    await harness.claim(NS, "new")
    app = harness.applier(NS, old)
    await asyncio.wait_for(harness.start(app), 10)
    assert app.status.state == "fenced" and sandbox.target.store.writes == 0
