"""The full load: phase backfill -> tailing from the stored head, progress, indexes, a dropped collection.

In-process daemons over the sandbox's TCP servers with the real PyMongo client; the SIGKILL soak is in
tests/test_backfill_processes.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import bson
from pymongo import AsyncMongoClient
from rich.console import Console

from cosmigrate.backfill import BACKFILL, DROPPED, KEY, KIND, TAILING
from cosmigrate.cutover.machine import STEPS
from cosmigrate.indexplan import enable_ttl
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from cosmigrate.status import one_line
from cosmigrate.statusview import render
from tests.helpers import make_config, wait_for
from tests.test_apply import Running

NS = "app.users"


def config(tmp_path: Path, sandbox: Sandbox, **capture):
    return make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", **capture)


async def _stored(cfg) -> dict:
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress(NS, KIND, KEY)
        return item.doc() if item is not None else {}
    finally:
        await ledger.close()


async def _target_indexes(target: AsyncMongoClient) -> dict[str, dict]:
    return {ix["name"]: dict(ix) async for ix in await target.app.users.list_indexes()}


async def _users(source: AsyncMongoClient, n: int) -> None:
    await source.app.users.create_index("email", unique=True)  # Cosmos: unique only on an empty collection
    await source.app.users.create_index("total")
    await source.app.users.insert_many([{"_id": i, "email": f"u{i}@x", "total": i} for i in range(n)])


async def test_phase_moves_from_backfill_to_tailing_and_ready_only_after(tmp_path: Path, sandbox: Sandbox,
                                                                         source, target) -> None:
    await _users(source, 3000)
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        async def loading() -> dict:
            n = run.ns_status(await run.status(), NS)
            return n if n.get("phase") == BACKFILL and n.get("docs_estimated") == 3000 else {}

        n = await wait_for(loading, 30, what="the namespace in backfill with its estimate")
        assert n["load_phase"] == BACKFILL and n["percent"] < 100 and n["docs_copied"] == 0
        stored = await _stored(cfg)
        assert stored["phase"] == BACKFILL and stored["head"] and stored["started_at"] > 0
        status = await run.status()
        assert not status["ready_for_cutover"]
        assert any("backfill not complete" in r and NS in r for r in status["not_ready_reasons"])
        assert status["backfill"]["namespaces_in_backfill"] == 1 and status["backfill"]["docs_estimated"] == 3000
        assert "not ready, backfill " in one_line(status) and "/3000 docs" in one_line(status)
        console = Console(width=80, record=True)
        console.print(render(status, 80))
        table = console.export_text()
        assert "backfill" in table and "of 3,000" in table and max(len(line) for line in table.splitlines()) <= 80
        # Unique indexes exist on the target before anything is applied; the others wait for the backfill.
        indexes = await wait_for(lambda: _has(target, "email_1"), 20, what="the unique index on the target")
        assert indexes["email_1"].get("unique") and "total_1" not in indexes
        assert await target.app.users.count_documents({}) == 0

        seen: list[tuple[bool, str]] = []

        async def ready() -> bool:
            status = await run.status()
            seen.append((status["ready_for_cutover"], run.ns_status(status, NS)["load_phase"]))
            return status["ready_for_cutover"]

        await run.writer("start")
        await wait_for(ready, 60, what="ready for cutover")
        # (Not ready during the backfill was seen above, before the writer started: after it, a loaded machine
        # may finish these 3,000 documents before the first poll.)
        assert (True, BACKFILL) not in seen
        n = run.ns_status(await run.status(), NS)
        assert n["load_phase"] == TAILING and n["percent"] == 100 and n["docs_copied"] >= 3000 and n["eta_s"] == 0
        assert (await _stored(cfg))["phase"] == TAILING
        indexes = await wait_for(lambda: _has(target, "total_1"), 20, what="the other indexes after the backfill")
        n = await wait_for(lambda: _indexes_built(run, 2), 20, what="the status to count both built")
        assert n["indexes"] == "2 built"
    # A restart never goes back to backfill.
    async with Running(cfg) as run:
        await wait_for(lambda: _phase(run, TAILING), 20, what="tailing after a restart")
        assert (await _stored(cfg))["phase"] == TAILING


async def _indexes_built(run: Running, n: int) -> dict:
    ns = run.ns_status(await run.status(), NS)
    return ns if ns.get("indexes") == f"{n} built" else {}


async def _has(target: AsyncMongoClient, name: str) -> dict:
    indexes = await _target_indexes(target)
    return indexes if name in indexes else {}


async def _phase(run: Running, want: str) -> bool:
    return run.ns_status(await run.status(), NS).get("load_phase") == want


async def test_a_restart_during_backfill_keeps_the_stored_head(tmp_path: Path, sandbox: Sandbox, source) -> None:
    await _users(source, 500)
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await wait_for(lambda: _phase(run, BACKFILL), 20, what="backfill")
    first = await _stored(cfg)
    await source.app.users.insert_many([{"_id": 10_000 + i, "email": f"v{i}@x", "total": i} for i in range(50)])
    async with Running(cfg) as run:
        await wait_for(lambda: _phase(run, BACKFILL), 20, what="still backfill after a restart")
        again = await _stored(cfg)
        assert again["head"] == first["head"] and again["started_at"] == first["started_at"]
        await run.writer("start")
        await wait_for(lambda: _phase(run, TAILING), 60, what="tailing")


async def test_start_at_now_is_tailing_at_once(tmp_path: Path, sandbox: Sandbox, source) -> None:
    await _users(source, 100)
    cfg = config(tmp_path, sandbox, start_at="now")
    async with Running(cfg) as run:
        await wait_for(lambda: _phase(run, TAILING), 20, what="tailing")
        status = await run.status()
        assert not any("backfill" in r for r in status["not_ready_reasons"])
        assert status["backfill"]["namespaces_in_backfill"] == 0


async def test_a_collection_dropped_during_its_backfill_is_dropped_not_ready(tmp_path: Path, sandbox: Sandbox,
                                                                            source) -> None:
    await _users(source, 300)
    await source.app.keep.insert_many([{"_id": i} for i in range(10)])
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await wait_for(lambda: _phase(run, BACKFILL), 20, what="backfill")
        await source.app.drop_collection("users")
        await wait_for(lambda: _phase(run, DROPPED), 30, what="phase dropped")
        await run.writer("start")
        status = await run.status()
        n = run.ns_status(status, NS)
        assert n["phase"] == DROPPED and "dropped at the source" in n["backfill_reason"]
        assert not status["ready_for_cutover"]
        assert any("dropped at the source during their backfill" in r for r in status["not_ready_reasons"])
        assert (await _stored(cfg))["phase"] == DROPPED
        await wait_for(lambda: _ns_phase(run, "app.keep", TAILING), 30, what="the other namespace goes on")


async def _ns_phase(run: Running, ns: str, want: str) -> bool:
    return run.ns_status(await run.status(), ns).get("load_phase") == want


async def test_ttl_index_is_built_disabled_and_enabled_by_the_cutover_step(tmp_path: Path, sandbox: Sandbox,
                                                                          source, target, capsys) -> None:
    sandbox.source.faults.ttl_custom_path = True  # an account with EnableTtlOnCustomPath
    await source.app.users.create_index("expires", expireAfterSeconds=3600)
    await source.app.users.create_index("_ts", expireAfterSeconds=60, name="ts_ttl")
    await source.app.users.insert_many([{"_id": i, "expires": None} for i in range(20)])
    cfg = config(tmp_path, sandbox)
    import structlog

    from cosmigrate.logs import configure_logging

    saved = structlog.get_config()
    configure_logging("info", "json", env={})  # the journal's lines, on this test's captured stdout
    try:
        await _ttl_disabled_until_cutover(cfg, run_target=target)
    finally:
        structlog.configure(**saved)  # never leave later tests a logger bound to this test's captured stdout
    journal = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "index cannot be built on DocumentDB; it is not migrated" and e.get("index") == "ts_ttl"
               and "decide in [ttl]" in e.get("reason", "") for e in journal)
    assert "ttl" in [s.name for s in STEPS]
    done = await enable_ttl(source, target, NS, cfg)
    assert {"index": "expires_1", "ttl": "enabled", "expire_after_seconds": 3600} in done
    assert any(d["index"] == "ts_ttl" and d["ttl"] == "not built" for d in done)
    assert (await _target_indexes(target))["expires_1"]["expireAfterSeconds"] == 3600
    assert [d for d in await enable_ttl(source, target, NS, cfg) if d.get("ttl") == "enabled"] == []  # idempotent


async def _ttl_disabled_until_cutover(cfg, run_target: AsyncMongoClient) -> None:
    target = run_target
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: _phase(run, TAILING), 60, what="tailing")
        indexes = await wait_for(lambda: _has(target, "expires_1"), 20, what="the TTL index, disabled")
        assert "expireAfterSeconds" not in indexes["expires_1"]
        assert "ts_ttl" not in indexes
        n = run.ns_status(await run.status(), NS)
        assert "TTL enabled at cutover: expires_1" in n["indexes"] and "ts_ttl (TTL on the system field _ts" in n["indexes"]


def test_stored_head_round_trips() -> None:
    from cosmigrate.backfill import NamespaceBackfill
    from cosmigrate.clock import Wall

    state = NamespaceBackfill("a.b", BACKFILL, {("", "7F"): 5, ("7F", "FF"): 9}, started_at=Wall(1.0), estimated=3)
    again = NamespaceBackfill.from_doc("a.b", bson.decode(state.data()))
    assert again.head == state.head and again.phase == BACKFILL and again.estimated == 3
    assert again.started_at == Wall(1.0) and bson.decode(state.data())["started_at"] == 1.0  # seconds on disk


async def test_indexes_plan_command_shows_stages_and_target_state(tmp_path: Path, sandbox: Sandbox, source,
                                                                   target) -> None:
    from tests.helpers import write_config
    from tests.test_hard_cosmos import _cli

    await _users(source, 10)
    await source.app.users.create_index([("attrs.$**", 1)])
    await target.app.users.create_index("email", unique=True, name="email_1")
    cfg = config(tmp_path, sandbox)
    path = write_config(cfg, tmp_path / "c.toml")
    code, out = await _cli("indexes", "--config", str(path), "--plan", "--json")
    assert code == 1  # the wildcard index is never built
    plan = {p["name"]: p for p in json.loads(out)}
    assert plan["email_1"]["stage"] == "before backfill" and plan["email_1"]["state"] == "built"
    assert plan["total_1"]["stage"] == "after backfill" and plan["total_1"]["state"] == "pending"
    assert plan["attrs.$**_1"]["stage"] == "never" and "wildcard" in plan["attrs.$**_1"]["reason"]
    code, out = await _cli("indexes", "--config", str(path), "--plan")
    assert "app.users total_1 {total: 1}: after backfill, pending" in out and "3 indexes planned, 1 never built" in out


async def test_the_unique_index_exists_before_the_first_applied_document(tmp_path: Path, sandbox: Sandbox, source,
                                                                        target) -> None:
    """Writer started from the first moment, and a slow index build: no document lands before the unique index."""
    await _users(source, 2000)
    cfg = config(tmp_path, sandbox)
    sandbox.target.faults.slow_index_ms = 1500
    async with Running(cfg) as run:
        await run.writer("start")
        seen_docs_without_index = 0
        indexed_at_first_doc: list[bool] = []

        async def copied() -> bool:
            nonlocal seen_docs_without_index
            count = await target.app.users.count_documents({})
            indexes = await _target_indexes(target)
            if count and not indexed_at_first_doc:
                indexed_at_first_doc.append("email_1" in indexes)
            if count and "email_1" not in indexes:
                seen_docs_without_index += 1
            return count == 2000

        await wait_for(copied, 60, interval=0.05, what="the backfill applied")
        assert indexed_at_first_doc == [True] and seen_docs_without_index == 0


def test_progress_fields_rate_eta_and_totals() -> None:
    from cosmigrate.backfill import NamespaceBackfill, totals
    from cosmigrate.clock import Mono, Wall

    state = NamespaceBackfill("a.b", BACKFILL, {("", "FF"): 9}, started_at=Wall(1.0), estimated=1000)
    assert state.fields(0, now=Mono(100.0))["eta_s"] is None  # no rate yet: unknown, never 0
    f = state.fields(400, now=Mono(110.0))
    assert (f["docs_copied"], f["percent"], f["rate_docs_per_s"], f["eta_s"]) == (400, 40.0, 40.0, 15.0)
    assert state.fields(1200, now=Mono(111.0))["percent"] == 99.9  # more events than the estimate: never 100 in backfill
    done = NamespaceBackfill("a.c", TAILING).fields(7, now=Mono(0.0))
    assert (done["percent"], done["eta_s"]) == (100.0, 0.0)
    total = totals([f, done])
    assert total["namespaces_in_backfill"] == 1 and total["docs_estimated"] == 1000 and total["eta_s"] == 15.0
    assert totals([done]) == {"namespaces_in_backfill": 0, "docs_copied": 0, "docs_estimated": 0, "percent": 100.0,
                              "rate_docs_per_s": 0.0, "eta_s": 0.0}
