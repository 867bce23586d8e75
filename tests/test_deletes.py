"""Deletes without the delete preview (the realistic case): every point of a migration, the ordered path, the tiers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import bson
from bson import Int64
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from cosmigrate.budget import SourceBudget
from cosmigrate.clock import Mono, Wall
from cosmigrate.config import TtlDecision
from cosmigrate.deletes.ordered import OrderedDeletes
from cosmigrate.deletes.sweep import DeleteSweep
from cosmigrate.idorder import encode_id
from cosmigrate.mongo import raw_collection
from cosmigrate.nslink import NamespaceLink
from cosmigrate.sandbox import Sandbox
from cosmigrate.timeouts import cancel_and_wait, within
from tests.helpers import assert_converged, make_config, wait_for
from tests.test_apply import Running

NS = ["app.users", "shop.items"]


def config(tmp_path: Path, sandbox: Sandbox, **capture):
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", **capture)
    cfg.capture.head_sample_interval_s = 0.3
    cfg.deletes.interval_s = 0.3
    cfg.deletes.page_size = 50
    cfg.verify.page_size = 50
    cfg.cutover.quiesce_s = 0.5
    cfg.cutover.precheck_timeout_s = 30
    return cfg


def docs(n: int, tag: str = "") -> list[dict]:
    return [{"_id": i if i % 4 else f"s{i}", "v": 1, "tag": tag, "long": Int64(i)} for i in range(n)]


async def _swept_since(run: Running, ns: str, after: float) -> bool:
    sweep = run.daemon.proof.deletes.sweeps[ns]  # type: ignore[union-attr]
    return sweep.state.completed and sweep.state.last_started_at.s > after


async def test_deletes_at_every_point_reach_the_target_and_cutover_proves_it(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    # Before capture starts: the bulk copy (here: a plain copy) holds documents the source deletes afterwards.
    for ns in NS:
        db, _, coll = ns.partition(".")
        await source[db][coll].insert_many(docs(300))
        await target[db][coll].insert_many(docs(300))
        await source[db][coll].delete_many({"_id": {"$in": [1, 2, "s4", 299]}})
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        # During catch-up: capture runs with the writer stopped (a backlog), deletes land meanwhile.
        await source.app.users.insert_many([{"_id": 1000 + i, "v": 2} for i in range(200)])
        await source.app.users.delete_many({"_id": {"$in": [1001, 1002, 10, "s8"]}})
        await run.writer("start")
        await source.shop.items.delete_many({"_id": {"$in": [11, 13]}})
        await wait_for(lambda: assert_converged(source, target, NS), 60, what="convergence after catch-up")
        # During tailing: deletes, and an insert and a delete that balance within one range.
        mark = time.time()
        await source.app.users.delete_one({"_id": 13})
        await source.app.users.insert_one({"_id": 13.5, "v": 3})
        await source.shop.items.delete_many({"_id": {"$gte": 100, "$lt": 110}})
        await wait_for(lambda: assert_converged(source, target, NS), 60, what="convergence while tailing")
        for ns in NS:  # every namespace's last deletes swept: then status says ready
            await wait_for(lambda: _swept_since(run, ns, mark), 30, what=f"a sweep of {ns} after the last deletes")  # noqa: B023
        status = await run.status()
        assert status["ready_for_cutover"], status["not_ready_reasons"]
        users = run.ns_status(status, "app.users")
        assert users["deletes_tier"] == "sweep" and users["deletes_applied"] >= 7 and users["sweep_progress"] == 100.0
        assert users["deletes_reconciled_at"] is not None
        # Between the last sweep and cutover: no background pass runs any more; the final sweep must find these.
        proof = run.daemon.proof
        assert proof is not None and proof.deletes is not None
        await proof.deletes.stop()
        await source.app.users.delete_many({"_id": {"$in": [21, 22, "s24"]}})
        await asyncio.sleep(1.0)
        assert await target.app.users.count_documents({"_id": {"$in": [21, 22, "s24"]}}) == 3
        sandbox.source.faults.ttl_custom_path = True  # an account with EnableTtlOnCustomPath
        await source.app.users.create_index("expires", expireAfterSeconds=60)  # built on the target by cutover
        await source.app.users.create_index("_ts", expireAfterSeconds=60)  # cannot be: needs a decision
        run.daemon.cfg.cutover.precheck_timeout_s = 2.0
        result = await proof.run_cutover()  # created after capture started: the precheck reads it again
        run.daemon.cfg.cutover.precheck_timeout_s = 30.0
        assert result.code == 5 and "expires by _ts" in result.message and '"app.users" = "none"' in result.message
        run.daemon.cfg.ttl = {"app.users": TtlDecision("none")}  # what a reload of [ttl] does
        result = await proof.run_cutover()
        assert result.code == 0, result.message
        await assert_converged(source, target, NS)
        report = result.report
        assert report is not None and report["equal"], report
        by_ns = {n["namespace"]: n for n in report["namespaces"]}
        assert by_ns["app.users"]["documents"] == await source.app.users.count_documents({})
        assert by_ns["app.users"]["verified"] == by_ns["app.users"]["documents"]
        indexes = by_ns["app.users"]["indexes"]
        assert indexes["built"] == ["expires_1"] and [i["index"] for i in indexes["not_built"]] == ["_ts_1"]
        assert by_ns["app.users"]["ttl_decision"] == "none"
        ttl = [ix async for ix in await target.app.users.list_indexes() if ix["name"] == "expires_1"]
        assert ttl and ttl[0]["expireAfterSeconds"] == 60
        status = await run.status()
        assert status["cutover"] == "cutover complete" and status["writer"] == "stopped"
        refused = await run.daemon.handle_control({"cmd": "writer", "action": "start"})
        assert not refused["ok"] and "--force" in refused["error"]
        assert (await run.daemon.handle_control({"cmd": "writer", "action": "start", "force": True}))["ok"]


class _Pipeline:
    """The link's view of a pipeline with nothing pending: every head sample is caught up at once.

    The first sample is the pass's wait for its starting head; the second, the count mode's catch-up after
    the source count, first runs `then` (what the pipeline applies in between).
    """

    def __init__(self, then: Callable[[], Awaitable[None]]) -> None:
        self.then = then
        self.at: Mono | None = None
        self.samples = 0
        self.deletes = 0

    async def sample(self) -> None:
        self.samples += 1
        if self.samples == 2:
            await self.then()
        self.at = Mono.now()

    def link(self) -> NamespaceLink:
        return NamespaceLink("db.c", 1, caught_up=lambda: self.at, sample=self.sample,
                             deletes_applied=lambda: self.deletes)


class _Port:
    """The applier's side of the ordered path, for narrow unit tests: a lock and a direct bulk write."""

    def __init__(self, coll) -> None:
        self.coll = coll
        self.lock = asyncio.Lock()

    def exclusive(self) -> asyncio.Lock:
        return self.lock

    async def send(self, requests: list) -> None:
        await self.coll.bulk_write(requests, ordered=False)


async def test_inserts_and_deletes_that_balance_within_a_range_are_found(
    sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Counting both sides naively would see 100 = 100: the insert is counted at the source before apply copies it.

    The sweep counts the target only after apply caught up past the source count, so the insert is there too.
    """
    await source.db.c.insert_many([{"_id": i} for i in range(100)])
    await target.db.c.insert_many([{"_id": i} for i in range(100)])
    await source.db.c.delete_one({"_id": 5})
    await source.db.c.insert_one({"_id": 50.5})  # same range, not applied yet
    assert await source.db.c.count_documents({}) == await target.db.c.count_documents({}) == 100

    async def insert_lands() -> None:  # what the pipeline does: the insert lands, then the head sample says so
        await target.db.c.insert_one({"_id": 50.5})

    link = _Pipeline(insert_lands).link()
    src, tgt = raw_collection(source, "db.c"), raw_collection(target, "db.c")
    budget = SourceBudget()
    sweep = DeleteSweep(link, src, tgt, None, OrderedDeletes(link, src, _Port(tgt), budget), 1000, budget)
    await sweep.run_pass()
    assert [d["_id"] async for d in target.db.c.find({"_id": 5})] == []
    assert sweep.state.counted_ranges >= 1 and sweep.state.deleted == 1
    assert await source.db.c.count_documents({}) == await target.db.c.count_documents({})


async def test_a_reinsert_between_the_source_check_and_the_delete_wins(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """The delete is decided, then the application inserts the same _id again before the delete is sent.

    The re-insert is captured while the delete waits (delayed on purpose); the applier cannot write it until the
    delete is done (it holds the round lock), so the upsert lands last and the document survives.
    """
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(10)])
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        sweep = run.daemon.proof.deletes.sweeps["app.users"]  # type: ignore[union-attr]
        cap = run.daemon.units["app.users"].capture
        seen: dict[str, bool] = {}

        async def reinsert_meanwhile(absent: list[bytes]) -> None:
            assert absent == [encode_id(7)]
            committed = cap.status.committed_seq
            await source.app.users.insert_one({"_id": 7, "v": 2})  # the application writes it again
            await wait_for(lambda: _true(cap.status.committed_seq > committed), 10, interval=0.02,
                           what="the re-insert captured")
            # The delete side is slow; the applier would have had time to write the re-insert by now.
            await asyncio.sleep(0.6)
            seen["applied early"] = bool(await target.app.users.find_one({"_id": 7, "v": 2}))

        sweep.deleter.after_check = reinsert_meanwhile
        await source.app.users.delete_one({"_id": 7})
        await wait_for(lambda: _true("applied early" in seen), 30, what="the sweep to decide the delete")
        sweep.deleter.after_check = None
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="convergence")
        assert not seen["applied early"], "the applier wrote while the ordered delete held the round"
        doc = await target.app.users.find_one({"_id": 7})
        assert doc == {"_id": 7, "v": 2}


async def test_reinserting_a_deleted_id_with_a_different_type(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """_id 7 (Int32) comes back as Int64(7): one document to MongoDB, never deleted; 8 comes back as "8": another one."""
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(20)])
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await source.app.users.delete_many({"_id": {"$in": [7, 8]}})
        await source.app.users.insert_many([{"_id": Int64(7), "v": 2}, {"_id": "8", "v": 2}])
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="convergence")
        await wait_for(lambda: _reconciled_now(run, "app.users"), 30, what="a sweep since the last change")
        await assert_converged(source, target, ["app.users"])
        raw = await raw_collection(target, "app.users").find_one({"_id": 7})
        assert raw is not None and bson.decode(raw.raw)["_id"].__class__ is Int64
        assert isinstance(raw, RawBSONDocument)


async def _reconciled_now(run: Running, ns: str) -> bool:
    """A sweep pass completed that started at the source's current head (nothing written since)."""
    sweep = run.daemon.proof.deletes.sweeps[ns]  # type: ignore[union-attr]
    return sweep.state.completed and sweep.state.last_head == sweep.link.latest_head()


async def _true(value: bool) -> bool:
    return value


async def test_an_event_without_a_document_is_checked_at_the_source_not_taken_as_a_delete(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Tier 2. Old behaviour: a null document became a delete, so a spurious lookup miss lost a live document."""
    from cosmigrate.deletes.lookup import LookupMisses
    from tests.applyharness import Harness, event
    from tests.helpers import prepare_backends

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    await source.d.c.insert_many([{"_id": "live", "v": 2}, {"_id": "other", "v": 1}])
    await target.d.c.insert_many([{"_id": "gone", "v": 1}, {"_id": "live", "v": 1}, {"_id": "other", "v": 1}])
    preview_delete = bson.encode({"_id": {"_data": "x"}, "operationType": "delete", "ns": {"db": "d", "coll": "c"},
                                  "documentKey": {"_id": "other"}})
    harness = Harness(cfg, target)
    try:
        epoch = await harness.claim("d.c", "me")
        await harness.commit("d.c", epoch, [event("gone", {"_id": "gone", "v": 1}), event("gone"), event("live"),
                                            preview_delete])
        app = harness.applier("d.c", epoch)
        lookups = LookupMisses("d.c", source)
        app.lookup_misses = lookups.resolve
        harness.start(app)
        await wait_for(lambda: _true(app.status.applied_seq == 0), 30, what="the batch applied")
        assert [d async for d in target.d.c.find({}, {"_id": 0})] == [{"v": 2}]  # gone deleted, live rewritten
        assert await target.d.c.find_one({"_id": "live"}) == {"_id": "live", "v": 2}
        assert (lookups.deleted, lookups.rewritten) == (1, 1)
    finally:
        await harness.close()


async def test_the_delete_preview_is_detected_and_used(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    sandbox.source.faults.deletes_preview = True
    await source.app.users.insert_many([{"_id": i} for i in range(30)])
    cfg = config(tmp_path, sandbox)
    cfg.deletes.enabled = False  # no sweep: the feed alone must carry the deletes
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        await source.app.users.delete_many({"_id": {"$lt": 10}})
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="deletes from the feed")
        status = await run.status()
        users = run.ns_status(status, "app.users")
        assert users["deletes_tier"] == "preview" and cfg.capture.deletes_preview
        assert not any("deletes" in r for r in status["not_ready_reasons"]), status["not_ready_reasons"]


async def test_the_sweep_keeps_to_its_share_of_the_source_and_waits_out_throttling(
    sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    await source.db.c.insert_many([{"_id": i} for i in range(0, 600, 2)])
    await target.db.c.insert_many([{"_id": i} for i in range(600)])  # every odd _id is gone from the source
    sandbox.source.faults.throttle_rate = 0.3
    sandbox.source.faults.retry_after_ms = 5
    link = NamespaceLink("db.c", 1, caught_up=Mono.now)
    src, tgt = raw_collection(source, "db.c"), raw_collection(target, "db.c")
    budget = SourceBudget(share=0.2)
    sweep = DeleteSweep(link, src, tgt, None, OrderedDeletes(link, src, _Port(tgt), budget), 40, budget)
    t0 = time.monotonic()
    await sweep.run_pass()
    elapsed = time.monotonic() - t0
    sandbox.source.faults.throttle_rate = 0.0
    assert await target.db.c.count_documents({}) == 300 and sweep.state.deleted == 300
    assert budget.throttled > 0
    assert budget.busy_s / elapsed <= 0.2 * 1.05, (budget.busy_s, elapsed)
    # Every range differs: after a few, the sweep stops counting first and merges directly.
    assert sweep.state.merged_ranges >= 10 and sweep.state.counted_ranges < 15


def test_the_new_config_sections_are_validated_key_by_key(tmp_path: Path) -> None:
    import pytest

    from cosmigrate.config import ConfigError, load_config

    base = ('cluster_name = "c"\n[source]\nuri = "mongodb://a:1"\n[target]\nuri = "mongodb://b:1/?tls=true"\n')
    for section, body, key in [
        ("deletes", "max_source_share = 0", "deletes.max_source_share"),
        ("verify", "page_size = 0", "verify.page_size"),
        ("deletes", "interval_s = -1", "deletes.interval_s"),
        ("cutover", "recheck_rounds = 0", "cutover.recheck_rounds"),
        ("verify", "enabled = 3", "verify.enabled"),
    ]:
        path = tmp_path / "c.toml"
        path.write_text(base + f"[{section}]\n{body}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path, env={})
    path.write_text(base + "[deletes]\nenabled = false\n[verify]\nenabled = true\npage_size = 10\n")
    cfg = load_config(path, env={"COSMIGRATE_CUTOVER_QUIESCE_S": "2.5"})
    assert (cfg.deletes.enabled, cfg.verify.enabled, cfg.verify.page_size, cfg.cutover.quiesce_s) == (False, True, 10, 2.5)


def test_readiness_says_deletes_not_reconciled_until_a_sweep_covered_the_last_change(tmp_path: Path) -> None:
    from cosmigrate.config import Config
    from cosmigrate.deletes.service import Deletes

    cfg = Config(cluster_name="c")
    heads = {"now": {("", "FF"): 10}}
    deletes = Deletes(cfg, None, None, None)  # type: ignore[arg-type]
    link = NamespaceLink("db.c", 1, latest_head=lambda: heads["now"])
    budget = SourceBudget()
    sweep = DeleteSweep(link, None, None, None, OrderedDeletes(link, None, _Port(None), budget), 10, budget)
    deletes.sweeps["db.c"] = sweep
    assert deletes.reasons(["db.c"]) == [
        "deletes not reconciled since the last change: db.c (no delete sweep has completed yet)"]
    now = Wall.now()
    sweep.state.last_started_at, sweep.state.last_finished_at = now.minus(60), now.minus(50)
    sweep.state.last_head = {("", "FF"): 10}
    assert deletes.reasons(["db.c"]) == []  # nothing written since that pass's head
    heads["now"] = {("", "FF"): 11}  # a write (a delete moves the head too)
    stale = ("deletes not reconciled since the last change: db.c (the source changed since the last completed "
             f"sweep pass started at {now.minus(60).iso()})")
    assert deletes.reasons(["db.c"]) == [stale]
    sweep.state.last_started_at = now.minus(1)  # no allowance in time: the delete is not swept by that pass
    assert deletes.reasons(["db.c"]) == [stale.replace(now.minus(60).iso(), now.minus(1).iso())]
    sweep.state.last_head = {("", "FF"): 11}
    assert deletes.reasons(["db.c"]) == []
    deletes.preview, deletes.preview_since = True, Mono.now()  # the preview came on after that pass: one more needed
    assert "no delete sweep has completed yet" in deletes.reasons(["db.c"])[0]
    sweep.last_started_mono = Mono.now()
    assert deletes.reasons(["db.c"]) == []


async def test_a_delete_applied_between_the_two_counts_does_not_hide_a_stale_document(
    sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Count mode: the source is counted, then apply catches up, then the target is counted.

    Apply can *remove* documents meanwhile (a delete-preview event, a lookup miss re-read as gone): 60 is
    deleted at the source after its count and the delete is applied before the target's count. The stale 5
    (deleted at the source before the pass started, which the pass claims) then balances it: 99 = 99.
    """
    await source.db.c.insert_many([{"_id": i} for i in range(100)])
    await target.db.c.insert_many([{"_id": i} for i in range(100)])
    await source.db.c.delete_one({"_id": 5})  # before the pass: the pass must find it
    pipeline: _Pipeline

    async def feed_delete_applied() -> None:  # after the source count: 60 deleted, the feed's delete applied
        await source.db.c.delete_one({"_id": 60})
        await target.db.c.delete_one({"_id": 60})
        pipeline.deletes += 1

    pipeline = _Pipeline(feed_delete_applied)
    link = pipeline.link()
    src, tgt = raw_collection(source, "db.c"), raw_collection(target, "db.c")
    budget = SourceBudget()
    sweep = DeleteSweep(link, src, tgt, None, OrderedDeletes(link, src, _Port(tgt), budget), 1000, budget)
    await sweep.run_pass()
    assert [d["_id"] async for d in target.db.c.find({"_id": 5})] == []
    assert await source.db.c.count_documents({}) == await target.db.c.count_documents({})


async def test_the_cutover_sweeps_deletes_when_background_sweeps_are_off(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """`deletes.enabled = false`, no delete preview, and a full verification pass completed before the deletes.

    The deletes are in no batch log, so the recheck step never looks at them, and the final sweep is the only
    part of the cutover that can find them. It once ran only where background sweeps ran: the report said
    `equal` with every document verified while the target still held the documents the source had deleted.
    """
    await source.app.users.insert_many([{"_id": i, "v": 1} for i in range(60)])
    cfg = config(tmp_path, sandbox)
    cfg.deletes.enabled = False
    async with Running(cfg) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.users"]), 30, what="initial copy")
        proof = run.daemon.proof
        assert proof is not None and proof.verification is not None
        await proof.verification.one_pass(["app.users"])  # every document equal, then
        await source.app.users.delete_many({"_id": {"$in": [3, 41]}})
        result = await proof.run_cutover()
        assert result.code == 0, result.message
        assert result.report is not None and result.report["equal"], result.report
        assert await target.app.users.count_documents({"_id": {"$in": [3, 41]}}) == 0, "stale on the target"
        await assert_converged(source, target, ["app.users"])
        by_ns = {n["namespace"]: n for n in result.report["namespaces"]}
        assert by_ns["app.users"]["final_sweep_deletes"] == 2


async def test_a_head_sampled_while_the_source_count_is_throttled_does_not_settle_the_range(
    sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """Count mode settles a range once a head sampled after the source count is applied.

    "After" must mean after the count's answer, not before its request: the budget retries a throttled count
    (16500, RetryAfterMs), and the periodic sampler keeps sampling meanwhile. Here a head is sampled (and is
    caught up) while the count waits out its throttling, then the application inserts 50.5: the count sees it,
    the target does not have it yet, and the stale 5 (deleted before the pass) balances it out, 100 = 100.
    A pass whose start the preview tier trusts for good would leave 5 on the target for ever.
    """
    await source.db.c.insert_many([{"_id": i} for i in range(100)])
    await target.db.c.insert_many([{"_id": i} for i in range(100)])
    await source.db.c.delete_one({"_id": 5})  # before the pass: the pass must find it

    async def insert_lands() -> None:  # the pipeline applies the insert, then its head sample is caught up
        await target.db.c.insert_one({"_id": 50.5})

    pipeline = _Pipeline(insert_lands)
    link = pipeline.link()
    src, tgt = raw_collection(source, "db.c"), raw_collection(target, "db.c")
    budget = SourceBudget()
    sweep = DeleteSweep(link, src, tgt, None, OrderedDeletes(link, src, _Port(tgt), budget), 1000, budget)
    sandbox.source.faults.retry_after_ms = 1000
    sandbox.source.faults.throttle_rate = 1.0
    task = asyncio.create_task(sweep.run_pass())
    try:
        await wait_for(lambda: _true(budget.throttled > 0), 10, interval=0.01, what="the source count throttled")
        pipeline.at = Mono.now()  # the periodic sampler: a head sampled now, nothing pending, caught up at once
        sandbox.source.faults.throttle_rate = 0.0
        await source.db.c.insert_one({"_id": 50.5})  # after that sample, before the count's retry
        await within(task, 30)
    finally:
        await cancel_and_wait([task])
    assert [d["_id"] async for d in target.db.c.find({"_id": 5})] == [], "the stale document was balanced out"
    assert await source.db.c.count_documents({}) == await target.db.c.count_documents({})
