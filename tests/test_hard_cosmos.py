"""What the tool does under each hard switch of the Cosmos emulator (issue 15); the switches themselves are shown
in tests/test_sandbox_hard.py. In-process daemons over TCP; the real-process run with every switch on is in
tests/test_hard_e2e_processes.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from cosmigrate.partitions import decode
from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    Workload,
    assert_converged,
    child_env,
    make_config,
    prepare_backends,
    read_committed,
    wait_for,
    write_config,
)
from tests.test_apply import Running
from tests.test_sandbox_hard import _with_duplicate_fields


def _config(tmp_path: Path, sandbox: Sandbox, **capture):
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", **capture)
    cfg.capture.head_sample_interval_s = 0.3
    return cfg


async def _ns(run: Running, ns: str) -> dict:
    return run.ns_status(await run.status(), ns)


async def _ready(run: Running) -> bool:
    st = await run.status()
    return st["ready_for_cutover"] and st["gap_in_seconds"] == 0


async def _state(run: Running, ns: str, state: str) -> bool:
    return (await _ns(run, ns)).get("state") == state


# --- expired positions: fatal for the namespace, said plainly ---------------------------------------


async def test_an_expired_position_fails_the_namespace_with_re_copy(tmp_path: Path, sandbox: Sandbox, source) -> None:
    await source.app.c.insert_many([{"_id": i} for i in range(20)])
    async with Running(_config(tmp_path, sandbox)) as run:
        await wait_for(lambda: _captured_events(run, "app.c", 20), 30, what="capture")
        sandbox.source.faults.expire_tokens = True
        await source.app.c.insert_one({"_id": "after"})
        await wait_for(lambda: _state(run, "app.c", "failed"), 30, what="the namespace failed")
        st = await _ns(run, "app.c")
        assert "re-copy this collection" in st["last_error"] and "72" in st["last_error"], st
        assert not (await run.status())["ready_for_cutover"]
        assert run.daemon.units["app.c"].tasks[0].done()  # the watcher ended: no silent reopen loop


async def _captured_events(run: Running, ns: str, n: int) -> bool:
    return (await _ns(run, ns)).get("captured_events", 0) >= n


# --- start-position set-up under ExceededTimeLimit (server-side retry) -----------------------------


@pytest.mark.parametrize("start_at", ["beginning", "now"])
async def test_start_position_set_up_survives_a_run_of_50s(tmp_path: Path, sandbox: Sandbox, source,
                                                           start_at: str) -> None:
    await source.app.c.insert_many([{"_id": i} for i in range(10)])
    # A spent request-unit budget: every command on app.c waits 50 ms at the server, then answers 50.
    sandbox.source.faults.update({"ru_per_s": 1, "server_side_retry_ms": 50, "refuse_beginning_token": True})
    await source.app.c.insert_one({"_id": "spend", "pad": "x" * 3000})  # 20 RU out of a budget of 1
    async with Running(_config(tmp_path, sandbox, start_at=start_at)) as run:
        await wait_for(lambda: _async(sandbox.source.throttled.get(50, 0) >= 3), 30, what="three 50s at start-up")
        await wait_for(lambda: _async("app.c" in run.daemon.units), 30, what="discovery")
        assert run.daemon.units["app.c"].capture.status.state == "starting"  # still trying, not failed
        sandbox.source.faults.ru_per_s = 0
        await wait_for(lambda: _async(run.daemon.units["app.c"].capture.status.state == "running"), 30,
                       what="capture running")
        await source.app.c.insert_one({"_id": "later"})
        want = 12 if start_at == "beginning" else 1  # from the beginning through GetChangeStreamTokens only
        await wait_for(lambda: _captured_events(run, "app.c", want), 30, what="events captured")


async def _async(value: bool) -> bool:
    return value


# --- the beginning of the feed -----------------------------------------------------------------


@pytest.mark.parametrize("old_token,head_tokens", [(False, False), (True, False), (False, True)],
                         ids=["no-route", "old-token-only", "get-change-stream-tokens-only"])
async def test_beginning_comes_from_get_change_stream_tokens_or_the_old_token_or_fails_with_both_reasons(
    tmp_path: Path, sandbox: Sandbox, source, target, old_token: bool, head_tokens: bool,
) -> None:
    await source.app.c.insert_many([{"_id": i, "v": i} for i in range(30)])
    sandbox.source.faults.update({"refuse_beginning_token": not old_token, "no_head_tokens": not head_tokens})
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        if old_token or head_tokens:
            await wait_for(lambda: assert_converged(source, target, ["app.c"]), 30, what="copied from the beginning")
            return
        await wait_for(lambda: _state(run, "app.c", "failed"), 30, what="no route to the beginning")
        error = (await _ns(run, "app.c"))["last_error"]
        assert "GetChangeStreamTokens" in error and "refuses the old beginning token" in error, error
        committed = (await read_committed(run.cfg)).get("app.c")
        assert committed is None or committed.resume_token is None  # no start position that can never be opened


# --- token kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 4])
async def test_capture_apply_and_the_head_barrier_read_either_token_kind(tmp_path: Path, sandbox: Sandbox, source,
                                                                         target, kind: int) -> None:
    sandbox.source.faults.token_kind = kind
    namespaces = ["app.a", "app.b"]
    workload = Workload(source, namespaces, keys_per_ns=100, seed=kind)
    await workload.run_bulk(400)
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await workload.run(100)
        await wait_for(lambda: _ready(run), 60, what="ready (head barrier reached through the tokens' LSNs)")
        await assert_converged(source, target, namespaces)
        committed = await read_committed(run.cfg)
        # Per-partition capture stores one unit per partition: every unit's token is of the account's kind.
        assert {RawBSONDocument(u.token)["_kind"] for c in committed.values() for u in decode(c.resume_token)} == {kind}


# --- load: request-unit budgets and idle getMores ---------------------------------------------------


async def test_a_throttled_stream_is_read_at_a_bounded_pace_and_converges(tmp_path: Path, sandbox: Sandbox, source,
                                                                         target) -> None:
    namespaces = ["app.a"]
    workload = Workload(source, namespaces, keys_per_ns=50, seed=3)
    await workload.run_bulk(200)
    async with Running(_config(tmp_path, sandbox, max_await_ms=400)) as run:
        await run.writer("start")
        await wait_for(lambda: _ready(run), 60, what="ready")
        sandbox.source.faults.ru_per_s = 5
        await source.app.a.insert_one({"_id": "spend", "pad": "x" * 4000})  # 20 RU: spent for three seconds
        before, t0 = sandbox.source.commands, time.monotonic()
        await wait_for(lambda: _async(time.monotonic() - t0 > 2.0), 5, interval=0.1, what="a throttled window")
        rate = (sandbox.source.commands - before) / (time.monotonic() - t0)
        assert (await _ns(run, "app.a"))["empty_pages"] > 0
        # Asking again at once would spin (thousands of empty pages a second); the watcher backs off instead.
        assert rate < 60, rate
        sandbox.source.faults.ru_per_s = 0
        await wait_for(lambda: assert_converged(source, target, namespaces), 30, what="convergence")


async def test_idle_get_mores_that_return_at_once_do_not_spin(tmp_path: Path, sandbox: Sandbox, source) -> None:
    sandbox.source.faults.idle_getmore_immediate = True
    await source.app.a.insert_one({"_id": 1})
    async with Running(_config(tmp_path, sandbox, max_await_ms=400)) as run:
        await wait_for(lambda: _captured_events(run, "app.a", 1), 30, what="capture")
        before, t0 = sandbox.source.commands, time.monotonic()
        await wait_for(lambda: _async(time.monotonic() - t0 > 1.5), 5, interval=0.1, what="an idle window")
        rate = (sandbox.source.commands - before) / (time.monotonic() - t0)
        assert rate < 60, rate  # the server does not pace the watcher: it paces itself
        await source.app.a.insert_one({"_id": 2})
        await wait_for(lambda: _captured_events(run, "app.a", 2), 30, what="a later change")


# --- sharded collections: shared _ids -------------------------------------------------------------


async def test_sharded_collections_converge_by_shard_key_and_id(tmp_path: Path, sandbox: Sandbox, source,
                                                               target) -> None:
    await source.admin.command("shardCollection", "app.s", key={"tenant": "hashed"})
    await source.app.s.insert_many([{"_id": i, "tenant": f"t{i % 3}", "v": 0} for i in range(50)])
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        for v in range(1, 4):
            await source.app.s.update_many({"tenant": "t1"}, {"$set": {"v": v}})
        await wait_for(lambda: assert_converged(source, target, ["app.s"]), 30, what="convergence")
        await wait_for(lambda: _ready(run), 30, what="ready")


@pytest.mark.parametrize("when", ["same run", "later run"])
async def test_two_documents_sharing_an_id_fail_the_namespace_naming_both_keys(
    tmp_path: Path, sandbox: Sandbox, source, target, when: str,
) -> None:
    await source.admin.command("shardCollection", "app.s", key={"tenant": "hashed"})
    await source.app.s.insert_many([{"_id": i, "tenant": "a"} for i in range(5)])
    async with Running(_config(tmp_path, sandbox)) as run:
        if when == "later run":
            await run.writer("start")
            await wait_for(lambda: assert_converged(source, target, ["app.s"]), 30, what="first copy")
        await source.app.s.insert_one({"_id": 3, "tenant": "b"})
        await run.writer("start")
        await wait_for(lambda: _state(run, "app.s", "failed"), 30, what="the namespace failed")
        error = (await _ns(run, "app.s"))["last_error"]
        assert '{"tenant": "a", "_id": 3}' in error and '{"tenant": "b", "_id": 3}' in error, error
        assert "share an _id" in error
    # Never merged: the target still holds the first document, untouched by the second.
    assert await target.app.s.find_one({"_id": 3}) in (None, {"_id": 3, "tenant": "a"})


# --- unique indexes and TTL under Cosmos semantics ------------------------------------------------------


async def _array_duplicates(source: AsyncMongoClient, target: AsyncMongoClient) -> None:
    for client in (source, target):
        await client.app.u.create_index("a.b", unique=True)
    await source.app.u.insert_many([{"_id": 1, "a": [{"b": "x"}]}, {"_id": 2, "a": [{"b": "x"}]},
                                    {"_id": 3, "a": [{"b": "y"}]}])


async def test_a_cosmos_unique_mismatch_is_named_in_status_not_just_deferred(tmp_path: Path, sandbox: Sandbox, source,
                                                                            target) -> None:
    await _array_duplicates(source, target)
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: _deferred(run, "app.u"), 30, what="a deferred write")
        st = await run.status()
        ns = run.ns_status(st, "app.u")
        assert "inside an array" in ns["deferred_reason"] and "Cosmos DB does not hold" in ns["deferred_reason"]
        assert "_id=1" in ns["deferred_reason"] or "_id=2" in ns["deferred_reason"]
        assert any("inside an array" in r for r in st["not_ready_reasons"]) and not st["ready_for_cutover"]


async def _deferred(run: Running, ns: str) -> bool:
    return (await _ns(run, ns)).get("deferred", 0) > 0


async def _cli(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cosmigrate", *args],
                                     capture_output=True, text=True, timeout=120, env=child_env())
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout


async def test_indexes_command_and_preflight_report_unique_violations_and_ttl(tmp_path: Path, sandbox: Sandbox,
                                                                          source, target, moto_endpoint) -> None:
    await _array_duplicates(source, AsyncMongoClient(sandbox.target_uri, tlsCAFile=sandbox.target_ca_file))
    await source.app.t.create_index("_ts", expireAfterSeconds=3600)
    await source.app.t.insert_one({"_id": 1})
    sandbox.source.faults.ttl_custom_path = True
    await source.app.c.create_index("expires", expireAfterSeconds=0)
    await source.app.c.create_index([("attrs.$**", 1)])
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint)
    await prepare_backends(cfg)
    config = write_config(cfg, tmp_path / "c.toml")
    code, out = await _cli("indexes", "--config", str(config), "--json")
    assert code == 1
    reports = {(r["namespace"], r["name"]): r for r in json.loads(out)}
    check = reports[("app.u", "a.b_1")]["unique_check"]
    assert check["violations"] == [["1", "2"]] and check["complete"] and "indexed lookups" in check["cost"]
    assert reports[("app.t", "_ts_1")]["action"] == "cannot build" and reports[("app.t", "_ts_1")]["ttl"] == "_ts"
    custom = reports[("app.c", "expires_1")]
    assert custom["action"] == "build" and custom["ttl"] == "custom" and "expireAfterSeconds" not in custom["target"]
    assert reports[("app.c", "attrs.$**_1")]["action"] == "cannot build"
    code, out = await _cli("preflight", "--config", str(config))
    assert code == 1
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    assert "_id 1 and 2" in lines["FAIL  unique indexes under DocumentDB semantics"]
    assert "_ts" in lines["FAIL  source TTL"] and "decide in [ttl]" in lines["FAIL  source TTL"]


async def test_a_ttl_collection_says_its_expiry_needs_a_decision(tmp_path: Path, sandbox: Sandbox, source,
                                                               target) -> None:
    await source.app.t.create_index("_ts", expireAfterSeconds=3600)
    await source.app.t.insert_many([{"_id": i} for i in range(5)])
    await source.app.plain.insert_one({"_id": 1})
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.t", "app.plain"]), 30, what="copy")
        await wait_for(lambda: _async(all(run.daemon.units[ns].capture.status.ttl_indexes is not None
                                          for ns in ("app.t", "app.plain"))), 30, what="expiry read")
        st = await run.status()
        assert "undecided" in run.ns_status(st, "app.t")["expiry"] and run.ns_status(st, "app.plain")["expiry"] == ""
        assert any("app.t" in r and "expires by _ts" in r for r in st["not_ready_reasons"]) and not st["ready_for_cutover"]
        # Expired at the source, never in the feed: the delete sweep removes them from the target (tests/test_ttl.py).
        sandbox.source.faults.ttl_clock_advance_s = 7200
        assert await source.app.t.count_documents({}) == 0
        await wait_for(lambda: assert_converged(source, target, ["app.t"]), 30, what="expired documents swept")


# --- duplicate field names ------------------------------------------------------------------------------


async def test_documents_with_duplicate_field_names_arrive_byte_for_byte(tmp_path: Path, sandbox: Sandbox, source,
                                                                        target) -> None:
    raw = _with_duplicate_fields({"_id": 1, "a": 1, "b": "x"}, "a", 2)
    await source.app.d.insert_one(RawBSONDocument(raw))
    async with Running(_config(tmp_path, sandbox)) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.d"]), 30, what="convergence")
    coll = target.app.get_collection("d", codec_options=CodecOptions(document_class=RawBSONDocument))
    assert bytes((await coll.find_one({"_id": 1})).raw) == raw  # both `a` elements, in their order
