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
from bson import Decimal128, Int64
from pymongo import AsyncMongoClient

from cosmigrate.apply import WriterGate
from cosmigrate.ledger import Fenced
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from tests.applyharness import Harness, batch, event
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"


@pytest.fixture
async def raw_target(sandbox: Sandbox) -> AsyncIterator[AsyncMongoClient[Any]]:
    """The applier's client, configured as production configures it."""
    client = target_client(sandbox.target_uri, sandbox.target_ca_file, serverSelectionTimeoutMS=5000)
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


# --- no chunk outlives its round ----------------------------------------------------------


class ProxyCollection:
    """The applier's real collection; `bulk_write` goes through a test's rule (to hold or fail one chunk)."""

    def __init__(self, inner: Any, rule: Any) -> None:
        self.inner = inner
        self.rule = rule

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def bulk_write(self, requests: list[Any], ordered: bool = True) -> Any:
        return await self.rule(self.inner, requests, ordered)


def _ids(requests: list[Any]) -> list[Any]:
    return [r._filter["_id"] for r in requests]


def _chunk_tasks() -> list[asyncio.Task[Any]]:
    """Chunk writers of any applier that have not finished."""
    return [t for t in asyncio.all_tasks() if not t.done() and "_bulk.<locals>.one" in t.get_coro().__qualname__]


def _two_chunks(harness: Harness) -> None:
    harness.cfg.apply.max_ops_per_write = 1
    harness.cfg.apply.write_concurrency = 2


async def test_a_sibling_chunk_already_sent_is_awaited_before_the_round_fails(
    harness: Harness, sandbox: Sandbox, target: AsyncMongoClient[Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bson.code import Code

    _two_chunks(harness)
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 1}), event(2, {"_id": 2, "f": Code("return 1")})])
    in_server, release = asyncio.Event(), asyncio.Event()
    held = 0

    async def hold_first_write(*_: Any) -> None:  # the target keeps chunk 1's command until told
        nonlocal held
        held += 1
        if held == 1:
            in_server.set()
            await release.wait()

    monkeypatch.setattr(sandbox.target, "slow_write", hold_first_write)
    refused = asyncio.Event()

    async def rule(inner: Any, requests: list[Any], ordered: bool) -> Any:
        if _ids(requests) == [2]:
            await in_server.wait()  # chunk 2 goes out only once chunk 1 sits in the server
            try:
                return await inner.bulk_write(requests, ordered=ordered)
            finally:
                refused.set()
        return await inner.bulk_write(requests, ordered=ordered)

    app = harness.applier(NS, epoch)
    app.coll = ProxyCollection(app.coll, rule)  # type: ignore[assignment]
    task = harness.start(app)
    await wait_for(lambda: _true(refused.is_set()), 10, what="chunk 2 refused")
    for _ in range(50):  # every chance to finish early: it must not, chunk 1 is still on the wire
        await asyncio.sleep(0)
    assert not task.done() and app.status.state == "running"
    release.set()
    await asyncio.wait_for(task, 10)
    assert app.status.state == "failed" and "_id=2" in app.status.last_error
    assert sandbox.target.store.writes == 1 and (await _doc(target, 1)) == {"_id": 1, "v": 1}
    assert not _chunk_tasks()


async def test_a_sibling_chunk_retrying_a_transient_error_stops_with_its_round(harness: Harness, sandbox: Sandbox) -> None:
    from bson.code import Code
    from pymongo.errors import AutoReconnect

    _two_chunks(harness)
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 1}), event(2, {"_id": 2, "f": Code("return 1")})])
    attempts = {1: 0, 2: 0}

    async def rule(inner: Any, requests: list[Any], ordered: bool) -> Any:
        (_id,) = _ids(requests)
        attempts[_id] += 1
        if _id == 1:  # chunk 1 is in a transient-retry loop (a failover that has not ended)
            raise AutoReconnect("injected: connection reset")
        await wait_for(lambda: _true(attempts[1] >= 2), 10, what="chunk 1 retrying")
        return await inner.bulk_write(requests, ordered=ordered)  # chunk 2 is refused for good

    app = harness.applier(NS, epoch)
    app.coll = ProxyCollection(app.coll, rule)  # type: ignore[assignment]
    await asyncio.wait_for(harness.start(app), 20)
    assert app.status.state == "failed" and "_id=2" in app.status.last_error
    assert not _chunk_tasks()  # nothing left to retry chunk 1 after its round failed
    assert sandbox.target.store.writes == 0


# --- a command refused as a whole ---------------------------------------------------------


async def test_a_document_refused_as_a_whole_command_fails_the_namespace_with_its_id(
    harness: Harness, sandbox: Sandbox, target: AsyncMongoClient[Any],
) -> None:
    import bson

    # A nested string that is not UTF-8: the target cannot parse the statement, so it refuses the whole
    # update command (ok: 0, InvalidBSON) without saying which of the chunk's documents is at fault.
    raw = bson.encode({"_id": "culprit", "sub": {"s": "PLACEHOLDER"}}).replace(b"PLACEHOLDER", b"\xff" * 11)
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(i, {"_id": i}) for i in range(5)] + [event("culprit", raw)]
                         + [event(i, {"_id": i}) for i in range(6, 8)])
    app = harness.applier(NS, epoch)
    harness.start(app)
    await wait_for(lambda: _true(app.status.state == "failed"), 15, what="namespace failed")
    error = app.status.last_error
    assert '_id="culprit"' in error and "whole command" in error and "code 22" in error
    assert "\ufffd" not in error and "PLACEHOLDER" not in error
    assert await target.app.c.count_documents({"_id": "culprit"}) == 0
    assert app.status.applied_seq == -1


# --- blockers of a unique index on an array path ----------------------------------------------


@pytest.mark.parametrize("key_value", [True, False], ids=["keyValue", "no-keyValue"])
@pytest.mark.parametrize(("path", "holder", "wanted"), [
    ("tags", {"_id": "B", "tags": ["y", 1]}, {"_id": "A", "tags": ["y", 4]}),
    ("a.b", {"_id": "B", "a": [{"b": "z"}, {"b": "y", "c": 1}]}, {"_id": "A", "a": [{"b": "y", "c": 4}]}),
])
async def test_blockers_are_found_through_arrays(harness: Harness, target: AsyncMongoClient[Any], path: str,
                                                 holder: dict[str, Any], wanted: dict[str, Any], key_value: bool) -> None:
    """A wants the unique value "y" that B holds inside an array; B must be named as A's blocker."""
    import bson

    from cosmigrate.apply import collapse

    await target.app.c.create_index(path, unique=True, sparse=True)
    await target.app.c.insert_many([holder, {"_id": "other", "tags": ["q"], "a": [{"b": "q"}]}])
    epoch = await harness.claim(NS, "me")
    app = harness.applier(NS, epoch)
    (op,) = collapse([batch(0, [event("A", wanted)])], {}).values()
    # What MongoDB reports for a multikey index: the one conflicting element, not the document's array.
    err = {"code": 11000, "keyPattern": {path: 1}, "keyValue": {path: "y"}} if key_value else {"code": 11000}
    assert await app._blockers(op, err) == {bson.encode({"_id": "B"})}


async def test_a_command_the_target_never_answers_is_abandoned_after_a_bounded_wait(
    harness: Harness, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A silent target (a partition; no socket timeout) must not hang the round, nor a daemon's shutdown, for ever."""
    from bson.code import Code

    from cosmigrate import apply

    _two_chunks(harness)
    monkeypatch.setattr(apply, "INFLIGHT_GRACE_S", 0.3)
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1}), event(2, {"_id": 2, "f": Code("return 1")})])
    in_server, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def never_answer_the_first(*_: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            in_server.set()
            await release.wait()

    monkeypatch.setattr(sandbox.target, "slow_write", never_answer_the_first)

    async def rule(inner: Any, requests: list[Any], ordered: bool) -> Any:
        if _ids(requests) == [2]:
            await in_server.wait()
        return await inner.bulk_write(requests, ordered=ordered)

    app = harness.applier(NS, epoch)
    app.coll = ProxyCollection(app.coll, rule)  # type: ignore[assignment]
    try:
        await asyncio.wait_for(harness.start(app), 10)
        assert app.status.state == "failed" and "_id=2" in app.status.last_error
        assert not _chunk_tasks()
    finally:
        release.set()


class FlakyStartLedger:
    """The real ledger, failing its first read (a ledger restarting as the daemon starts)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def get_namespace(self, ns: str) -> Any:
        self.reads += 1
        if self.reads == 1:
            from cosmigrate.ledger import LedgerError

            raise LedgerError("database is locked")
        return await self.inner.get_namespace(ns)


async def test_a_ledger_error_at_start_is_retried(harness: Harness, target: AsyncMongoClient[Any]) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1})])
    app = harness.applier(NS, epoch)
    app.ledger = FlakyStartLedger(harness.ledger)  # type: ignore[assignment]
    task = harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 10, what="applied after a failed first read")
    assert not task.done() and (await _doc(target, 1)) == {"_id": 1}


# --- a full load's first versions go as inserts -------------------------------------------------


def _recording(app: Any) -> list[str]:
    """Route the applier's bulk writes through the real collection, noting each request's kind."""
    kinds: list[str] = []

    async def rule(inner: Any, requests: list[Any], ordered: bool) -> Any:
        kinds.extend(type(r).__name__ for r in requests)
        return await inner.bulk_write(requests, ordered=ordered)

    app.coll = ProxyCollection(app.coll, rule)
    return kinds


async def test_a_full_loads_first_versions_are_inserts_and_a_duplicate_upserts_the_batchs_version(
    harness: Harness, target: AsyncMongoClient[Any],
) -> None:
    # Documents 1 and 3 are on the target already, in older versions (an earlier life wrote them): their inserts
    # meet a duplicate key and must then write the batch's version, never keep the target's.
    await target.app.c.insert_many([{"_id": 1, "v": "old"}, {"_id": 3, "v": "old"}])
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(i, {"_id": i, "v": f"new{i}"}) for i in (1, 2, 3)])
    app = harness.applier(NS, epoch)
    app.inserts_first = lambda: True
    kinds = _recording(app)
    harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 15)
    assert [await _doc(target, i) for i in (1, 2, 3)] == [{"_id": i, "v": f"new{i}"} for i in (1, 2, 3)]
    assert kinds.count("InsertOne") == 3 and kinds.count("ReplaceOne") == 2, kinds
    # A later run's newer version of a document inserted by the first run: inserted again, found, upserted.
    await harness.commit(NS, epoch, [event(2, {"_id": 2, "v": "newer"})])
    app.wake.set()
    await wait_for(lambda: _true(app.status.applied_seq == 1), 15)
    assert await _doc(target, 2) == {"_id": 2, "v": "newer"}


async def test_after_the_full_load_writes_are_upserts(harness: Harness, target: AsyncMongoClient[Any]) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(i, {"_id": i, "v": i}) for i in (1, 2)])
    app = harness.applier(NS, epoch)  # inserts_first stays False: a tailing namespace's changes are mostly updates
    kinds = _recording(app)
    harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 15)
    assert kinds == ["ReplaceOne", "ReplaceOne"] and await _doc(target, 2) == {"_id": 2, "v": 2}


async def test_a_full_load_insert_refused_by_a_secondary_unique_index_is_deferred_never_taken_as_there(
    harness: Harness, target: AsyncMongoClient[Any],
) -> None:
    # E11000 on `u`, not on `_id`: document 1 is NOT on the target. Were that duplicate read as "the document is
    # already there", 1 would be skipped and applied_seq would pass it; it must wait until 2 lets go of u=1.
    await target.app.c.create_index("u", unique=True)
    await target.app.c.insert_one({"_id": 2, "u": 1})
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "u": 1})])
    app = harness.applier(NS, epoch)
    app.inserts_first = lambda: True
    harness.start(app)
    await wait_for(lambda: _true(app.status.deferred == 1), 15, what="the insert deferred by the u index")
    assert app.status.applied_seq == -1 and await _doc(target, 1) is None
    await harness.commit(NS, epoch, [event(2, {"_id": 2, "u": 2})])
    app.wake.set()
    await wait_for(lambda: _true(app.status.applied_seq == 1), 15, what="both applied once 2 moved")
    assert [await _doc(target, i) for i in (1, 2)] == [{"_id": 1, "u": 1}, {"_id": 2, "u": 2}]


async def test_a_full_load_collapses_numerically_equal_ids_of_other_types_to_the_latest_version(
    harness: Harness, target: AsyncMongoClient[Any],
) -> None:
    # Int32 7 on the target (an earlier life); the feed then shows the same document keyed as Int64 7 and 7.0:
    # one target document, the last version wins, whichever key form the insert and its upsert carry.
    await target.app.c.insert_one({"_id": 7, "v": "old"})
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(Int64(7), {"_id": Int64(7), "v": "a"})])
    await harness.commit(NS, epoch, [event(7.0, {"_id": 7.0, "v": "b"}), event(Decimal128("7"), {"_id": 7, "v": "c"})])
    app = harness.applier(NS, epoch)
    app.inserts_first = lambda: True
    harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 1), 15)
    assert [d async for d in target.app.c.find({}, {"_id": 0})] == [{"v": "c"}]


async def test_a_fence_wait_whose_sleep_wakes_early_waits_on_instead_of_fencing_the_applier(
        harness: Harness, target: AsyncMongoClient[Any]) -> None:
    """The event loop may end a sleep a little before its deadline on `Mono`'s clock; a fence wait found not quite
    over at the send is a reason to wait on, never a lost lease (it once fenced a new owner's applier for good, and
    its namespace never converged after a restart)."""
    from cosmigrate.clock import Mono
    from cosmigrate.leases.records import Held, LeaseRecord

    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1, "v": 1})])
    now = Mono.now()
    held = Held(LeaseRecord(NS, 1, "me"), renewed_at=now, write_after=now + 0.3, lease_s=30.0)
    app = harness.applier(NS, epoch, lease=held)
    real_sleep = app._sleep

    async def early(seconds: float) -> None:  # wakes 20 ms before the deadline, as a coarse loop clock can
        await real_sleep(max(0.0, seconds - 0.02))

    app._sleep = early  # type: ignore[method-assign]
    harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 15, what="the batch applied after the fence wait")
    assert app.status.state != "fenced" and await _doc(target, 1) == {"_id": 1, "v": 1}
    assert Mono.now() >= held.write_after
