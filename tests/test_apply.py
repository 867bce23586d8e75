"""Apply in one process: sandbox source and target over TCP, file store + SQLite ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from bson.code import Code
from pymongo import AsyncMongoClient

from cosmigrate.clock import Wall
from cosmigrate.daemon import Daemon
from cosmigrate.sandbox import Sandbox
from tests.helpers import Workload, assert_converged, make_config, prepare_backends, read_committed, wait_for


async def _true(value: bool) -> bool:
    return value


class Running:
    """An in-process daemon for one test."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.daemon = Daemon(cfg)
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Running:
        await prepare_backends(self.cfg)
        self.task = asyncio.create_task(self.daemon.serve())
        await wait_for(lambda: _true(self.daemon.control is not None), 30, what="daemon up")
        return self

    async def __aexit__(self, *exc) -> None:
        self.daemon.request_stop()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)

    async def writer(self, action: str) -> dict:
        reply = await self.daemon.handle_control({"cmd": "writer", "action": action})
        assert reply["ok"], reply
        return reply

    async def status(self) -> dict:
        return (await self.daemon.handle_control({"cmd": "status"}))["status"]

    def ns_status(self, status: dict, ns: str) -> dict:
        return next((n for n in status["namespaces"] if n["namespace"] == ns), {})


def config(tmp_path: Path, sandbox: Sandbox, **capture):
    return make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", **capture)


async def _unique_users(source: AsyncMongoClient, target: AsyncMongoClient, n: int) -> None:
    for client in (source, target):
        await client.app.users.create_index("email", unique=True)
    await source.app.users.insert_many([{"_id": i, "email": f"u{i}@x"} for i in range(n)])


async def test_writes_converge_with_every_type_and_field_order(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    namespaces = ["app.a", "app.b", "shop.c"]
    async with Running(config(tmp_path, sandbox, max_batch_events=50)) as run:
        workload = Workload(source, namespaces, keys_per_ns=200, seed=21)
        await workload.run(1500)
        await run.writer("start")
        await workload.run(500)
        await wait_for(lambda: assert_converged(source, target, namespaces), 60, what="convergence")
        status = await run.status()
        assert status["writer"] == "started"
        assert all(n["pending_events"] == 0 and n["state"] == "running" for n in status["namespaces"])
        # Collapsing: the target saw fewer writes than there were events.
        events = sum(n["applied_events"] for n in status["namespaces"])
        assert sandbox.target.store.writes < events


async def test_a_takes_b_old_value_while_b_changes_in_the_same_run(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    await _unique_users(source, target, 2)
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await run.writer("stop")
        users = source.app.users
        await users.update_one({"_id": 1}, {"$set": {"email": "u1-new@x"}})
        await users.update_one({"_id": 0}, {"$set": {"email": "u1@x"}})  # A takes B's old value
        await users.update_one({"_id": 1}, {"$set": {"seen": True}})  # B moves after A in the latest-version feed
        await wait_for(_captured_to_now(run, "app.users"), 30, what="capture up to a head sampled after the updates")
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="convergence")
        assert run.ns_status(await run.status(), "app.users")["deferred"] == 0


async def test_a_takes_b_old_value_and_b_changes_in_the_next_batch(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    await _unique_users(source, target, 2)
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        # On the source B already moved, but its change reaches us only in a later batch: emulate that by
        # writing straight to the target what the target would hold, then letting A's batch arrive first.
        await target.app.users.update_one({"_id": 1}, {"$set": {"email": "u1@x"}})  # stale B still holds the value
        await target.app.users.update_one({"_id": 0}, {"$set": {"email": "u0-old@x"}})
        await source.app.users.update_one({"_id": 0}, {"$set": {"email": "u1@x-taken"}})
        await source.app.users.update_one({"_id": 0}, {"$set": {"email": "u9@x"}})
        await source.app.users.update_one({"_id": 1}, {"$set": {"email": "u1b@x"}})
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="convergence")


def _captured_to_now(run: Running, ns: str) -> Any:
    """A predicate: capture reached a source head sampled after this call (every change made before it is captured).

    Counting events would not do: a feed read after two quick updates of one document may serve only the latest
    version (as Cosmos does), so a count can stay short for ever on a loaded machine."""
    after = Wall.now()

    async def reached() -> bool:
        await run.status()  # samples the head now
        captured = run.daemon.units[ns].freshness.captured_at
        return captured is not None and captured >= after

    return reached


async def _captured(run: Running, ns: str, events: int) -> bool:
    status = await run.status()
    return any(n["namespace"] == ns and n["captured_events"] >= events for n in status["namespaces"])


@pytest.mark.parametrize("size", [2, 3])
async def test_unique_value_cycles_are_broken(tmp_path: Path, sandbox: Sandbox, source, target, size: int) -> None:
    await _unique_users(source, target, size)
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await run.writer("stop")
        users = source.app.users
        for i in range(size):  # rotate the emails through temporary values, as an application would
            await users.update_one({"_id": i}, {"$set": {"email": f"tmp{i}"}})
        for i in range(size):
            await users.update_one({"_id": i}, {"$set": {"email": f"u{(i + 1) % size}@x"}})
        # Every final version is captured before the writer starts, so one applied run holds the whole cycle.
        await wait_for(_captured_to_now(run, "app.users"), 30, what="capture up to a head sampled after the updates")
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="cycle resolved")
        assert run.daemon.units["app.users"].applier.status.cycles_broken >= 1
        assert run.ns_status(await run.status(), "app.users")["deferred"] == 0


async def test_a_true_conflict_stays_deferred_and_blocks_cutover(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    await _unique_users(source, target, 2)
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await target.app.users.insert_one({"_id": "stray", "email": "taken@x"})  # only on the target
        await source.app.users.update_one({"_id": 0}, {"$set": {"email": "taken@x"}})

        async def deferred() -> bool:
            return run.ns_status(await run.status(), "app.users").get("deferred") == 1

        await wait_for(deferred, 30, what="deferred write")
        status = await run.status()
        assert not status["ready_for_cutover"]
        assert any("deferred" in r for r in status["not_ready_reasons"])
        assert run.ns_status(status, "app.users")["applied_seq"] < run.ns_status(status, "app.users")["captured_seq"]
        # Never dropped: once the operator removes the stray document, the write lands.
        await target.app.users.delete_one({"_id": "stray"})
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="deferred write applied")

        async def ready() -> bool:
            return (await run.status())["ready_for_cutover"]

        await wait_for(ready, 30, what="ready for cutover")


async def test_no_write_reaches_the_target_after_writer_stop_returns(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    namespaces = ["app.a", "app.b"]
    async with Running(config(tmp_path, sandbox, max_batch_events=20)) as run:
        await run.writer("start")
        workload = Workload(source, namespaces, keys_per_ns=300, seed=5)
        stop = asyncio.Event()
        writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.0005))
        await wait_for(lambda: _true(sandbox.target.store.writes > 200), 30, what="applying")
        sandbox.target.faults.slow_write_ms = 50  # keep bulk writes in flight while we stop
        await run.writer("stop")
        frozen = sandbox.target.store.writes
        before = (await run.status())
        captured = sum(n["captured_events"] for n in before["namespaces"])

        async def more_captured() -> bool:
            now = await run.status()
            return sum(n["captured_events"] for n in now["namespaces"]) > captured + 300

        await wait_for(more_captured, 30, what="capture to continue while the writer is stopped")
        assert sandbox.target.store.writes == frozen
        assert all(n["state"] == "paused" for n in (await run.status())["namespaces"])
        stop.set()
        await writer
        sandbox.target.faults.slow_write_ms = 0
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, namespaces), 60, what="resume after start")


async def test_writer_switch_survives_a_restart(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await run.writer("start")
    async with Running(cfg) as run:
        assert (await run.status())["writer"] == "started"
        await source.app.x.insert_one({"_id": 1})
        await wait_for(lambda: assert_converged(source, target, ["app.x"]), 30, what="applied after restart")


async def test_corrupt_batch_stops_its_namespace_loudly(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await source.app.bad.insert_many([{"_id": i} for i in range(10)])
        await source.app.good.insert_many([{"_id": i} for i in range(10)])
        await wait_for(lambda: _captured(run, "app.bad", 10), 30, what="capture")
        record = (await run.daemon.worker.ledger.list_batches("app.bad"))[0]  # type: ignore[union-attr]
        path = Path(cfg.store.url.removeprefix("file://")) / record.key
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        await run.writer("start")

        async def failed() -> bool:
            return run.ns_status(await run.status(), "app.bad").get("state") == "failed"

        await wait_for(failed, 30, what="corrupt batch detected")
        assert "corrupt" in run.ns_status(await run.status(), "app.bad")["last_error"]
        assert await target.app.bad.count_documents({}) == 0  # nothing skipped past it
        await wait_for(lambda: assert_converged(source, target, ["app.good"]), 30, what="other namespace applied")


async def test_refused_document_fails_the_namespace_with_its_id(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    async with Running(config(tmp_path, sandbox)) as run:
        await source.app.js.insert_many([{"_id": "fine"}, {"_id": "culprit", "f": Code("return 1")}])
        await run.writer("start")

        async def failed() -> bool:
            return run.ns_status(await run.status(), "app.js").get("state") == "failed"

        await wait_for(failed, 30, what="refused document")
        error = run.ns_status(await run.status(), "app.js")["last_error"]
        assert "culprit" in error and "JavaScript" in error


async def test_delete_events_become_deletes(tmp_path: Path, sandbox: Sandbox, source, target) -> None:
    sandbox.source.faults.deletes_preview = True
    cfg = config(tmp_path, sandbox, deletes_preview=True)
    async with Running(cfg) as run:
        await run.writer("start")
        await source.app.d.insert_many([{"_id": i} for i in range(20)])
        await wait_for(lambda: assert_converged(source, target, ["app.d"]), 30, what="inserts")
        await source.app.d.delete_many({"_id": {"$lt": 10}})
        await wait_for(lambda: assert_converged(source, target, ["app.d"]), 30, what="deletes")
    committed = await read_committed(cfg)
    assert committed["app.d"].batches


def _array_doc(path: str, i: int, value: str, extra: int) -> dict:
    """A document whose unique value sits inside an array of subdocuments."""
    return {"_id": i, "a": [{"b": value, "c": extra}]}


# Only `a.b` end to end: the sandbox's unique index keys a leaf array (`tags: [..]`) as one value instead of one
# entry per element, so a swap on `tags` never conflicts there; test_apply_direct covers `tags` blockers.
@pytest.mark.parametrize("key_value", [True, False], ids=["keyValue", "no-keyValue"])
@pytest.mark.parametrize("path", ["a.b"])
async def test_unique_values_inside_arrays_are_swapped(tmp_path: Path, sandbox: Sandbox, source, target, path: str,
                                                       key_value: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not key_value:  # a server whose E11000 does not name the conflicting entry: blockers come from the document
        from cosmigrate.sandbox.server import MongoServer

        plain = MongoServer._write_error

        def without_key_value(index: int, exc: Exception) -> dict:
            err = plain(index, exc)
            err.pop("keyPattern", None)
            err.pop("keyValue", None)
            return err

        monkeypatch.setattr(MongoServer, "_write_error", staticmethod(without_key_value))
    for client in (source, target):
        await client.app.arr.create_index(path, unique=True)
    await source.app.arr.insert_many([_array_doc(path, 0, "x", 0), _array_doc(path, 1, "y", 1)])
    async with Running(config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.arr"]), 30, what="initial copy")
        await run.writer("stop")
        arr = source.app.arr
        for i in range(2):  # swap through temporary values; the arrays change around the unique value too
            await arr.replace_one({"_id": i}, _array_doc(path, i, f"tmp{i}", 2 + i))
        await arr.replace_one({"_id": 0}, _array_doc(path, 0, "y", 4))
        await arr.replace_one({"_id": 1}, _array_doc(path, 1, "x", 5))
        await wait_for(_captured_to_now(run, "app.arr"), 30, what="capture up to a head sampled after the swap")
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.arr"]), 20, what="swap inside arrays applied")
        assert run.daemon.units["app.arr"].applier.status.cycles_broken >= 1
        assert run.ns_status(await run.status(), "app.arr")["deferred"] == 0
