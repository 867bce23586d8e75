"""Cosmos collections with a TTL (issue 23, part 3): expiry reconciled by the sweep, a `_ts` TTL decided once.

Expired documents vanish at the source with no change event (the sandbox's
`ttl_clock_advance_s` makes them expire at once). A `_ts` TTL blocks READY
until the config's `[ttl]` table decides it; then READY follows the usual
rules, and the cutover report records the decision. Real `cosmigrate run`
and `cosmigrate cutover` processes where readiness and the report are
judged; an in-process daemon where the sweep is.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

from pymongo import AsyncMongoClient

from cosmigrate.config import Config, TtlDecision, load_config, to_toml
from cosmigrate.sandbox import Sandbox
from cosmigrate.ttl import ttl_state
from tests.helpers import assert_converged, child_env, make_config, prepare_backends, wait_for, write_config
from tests.test_apply import Running
from tests.test_capture_processes import Child
from tests.test_cutover_processes import cli, ctl

TTL_NS, PLAIN_NS = "app.sessions", "app.plain"
BOTH = [TTL_NS, PLAIN_NS]


def _config(tmp_path: Path, sandbox: Sandbox, **ttl: str) -> Config:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.head_sample_interval_s = 0.3
    cfg.deletes.interval_s = 0.5
    cfg.cutover.quiesce_s = 0.5
    cfg.cutover.precheck_timeout_s = 60
    cfg.ttl = {ns.replace("__", "."): TtlDecision(*_parse(v)) for ns, v in ttl.items()}
    return cfg


def _parse(value: str) -> tuple[str, str, int]:
    if value == "none":
        return "none", "", 0
    _, path, seconds = value.split(":")
    return "field", path, int(seconds)


async def _ttl_collection(source: AsyncMongoClient, n: int = 20) -> None:
    await source.app.sessions.create_index("_ts", expireAfterSeconds=3600)
    await source.app.sessions.insert_many([{"_id": i, "expiresAt": None} for i in range(n)])
    await source.app.plain.insert_many([{"_id": i} for i in range(5)])


async def _status(config: Path) -> dict | None:
    code, out, _ = await ctl(config, "status", "--json")
    return json.loads(out) if code in (0, 2, 3) and out.strip() else None


def _ns(st: dict, ns: str) -> dict:
    return next(n for n in st["namespaces"] if n["namespace"] == ns)


async def _read(config: Path) -> dict | None:
    """Status once the TTL namespace's indexes are read (its `expiry` is filled then)."""
    st = await _status(config)
    return st if st and any(n["namespace"] == TTL_NS and n["expiry"] for n in st["namespaces"]) else None


async def _ready(config: Path, source: AsyncMongoClient, target: AsyncMongoClient) -> dict | None:
    st = await _status(config)
    if not (st and st["ready_for_cutover"] and st["gap_in_seconds"] == 0):
        return None
    await assert_converged(source, target, BOTH)  # raises: READY while the target differs
    return st


async def test_an_undecided_ts_ttl_blocks_ready_naming_the_choice_until_a_reload_decides_it(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    await _ttl_collection(source)
    cfg = _config(tmp_path, sandbox)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        await wait_for(lambda: assert_converged(source, target, BOTH), 60, what="the copy")
        st = await wait_for(lambda: _read(config), 60, what="the TTL read")
        # Everything else is caught up; only the decision is missing, and the reason says how to make it.
        for _ in range(3):
            st = await _status(config)
            assert st is not None and not st["ready_for_cutover"], st
            ttl_reasons = [r for r in st["not_ready_reasons"] if "expires by _ts" in r]
            assert ttl_reasons and TTL_NS in ttl_reasons[0], st["not_ready_reasons"]
            assert f'"{TTL_NS}" = "none"' in ttl_reasons[0]
            assert f'"{TTL_NS}" = "field:<date field>:<expireAfterSeconds>"' in ttl_reasons[0]
            assert "[ttl]" in ttl_reasons[0]
            assert _ns(st, TTL_NS)["ttl_decision"] == "undecided" and _ns(st, PLAIN_NS)["ttl_decision"] == ""
            assert _ns(st, PLAIN_NS)["expiry"] == ""
            await asyncio.sleep(0.3)  # polls spread over a few sample rounds (not a synchronisation)
        code, text, _ = await ctl(config, "status")
        assert code == 2 and f"{TTL_NS}: expiry: TTL on the system field _ts" in " ".join(text.split())
        # The decision, made once in the config and reloaded: READY follows the usual rules.
        cfg.ttl = {TTL_NS: TtlDecision("field", "expiresAt", 3600)}
        write_config(cfg, config)
        child.proc.send_signal(signal.SIGHUP)
        st = await wait_for(lambda: _ready(config, source, target), 90, interval=0.3, what="READY after the decision")
        assert _ns(st, TTL_NS)["ttl_decision"] == "field:expiresAt:3600"
        assert "decided field:expiresAt:3600" in _ns(st, TTL_NS)["expiry"]
        code, text, _ = await ctl(config, "status")
        assert code == 0 and "decided field:expiresAt:3600" in " ".join(text.split())
        # The cutover records it; the date field's TTL index is on the target with its expiry.
        code, out, err = await cli(config, "cutover")
        assert code == 0, err[-2000:]
        report = json.loads(out)
        entry = next(n for n in report["namespaces"] if n["namespace"] == TTL_NS)
        assert entry["ttl_decision"] == "field:expiresAt:3600", entry
        assert {"index": "ttl_expiresAt", "ttl": "enabled", "expire_after_seconds": 3600,
                "ttl_decision": "field:expiresAt:3600"} in entry["ttl"], entry["ttl"]
        assert any(t["index"] == "_ts_1" and t["ttl"] == "not built" for t in entry["ttl"])
        assert next(n for n in report["namespaces"] if n["namespace"] == PLAIN_NS)["ttl_decision"] == ""
        indexes = {ix["name"]: ix async for ix in await target.app.sessions.list_indexes()}
        assert indexes["ttl_expiresAt"]["expireAfterSeconds"] == 3600 and "_ts_1" not in indexes
    finally:
        await child.finish(signal.SIGTERM)


async def test_a_ts_ttl_decided_none_reaches_ready_and_the_cutover_report_records_it(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    await _ttl_collection(source)
    cfg = _config(tmp_path, sandbox, app__sessions="none")
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0
        st = await wait_for(lambda: _ready(config, source, target), 90, interval=0.3, what="READY")
        assert _ns(st, TTL_NS)["ttl_decision"] == "none" and "decided none" in _ns(st, TTL_NS)["expiry"]
        code, out, err = await cli(config, "cutover")
        assert code == 0, err[-2000:]
        entry = next(n for n in json.loads(out)["namespaces"] if n["namespace"] == TTL_NS)
        assert entry["ttl_decision"] == "none" and "no expiry on the target" in entry["expiry"]
        assert entry["ttl_on_ts"] == 3600 and entry["custom_ttl"] == []
        assert [t["ttl_decision"] for t in entry["ttl"]] == ["none"]
        assert [ix["name"] async for ix in await target.app.sessions.list_indexes()] == ["_id_"]
    finally:
        await child.finish(signal.SIGTERM)


async def test_expired_documents_are_deleted_on_the_target_by_the_sweep(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    await _ttl_collection(source)
    await source.app.sessions.insert_many([{"_id": "kept", "ttl": -1}, {"_id": "longer", "ttl": 3 * 3600}])
    async with Running(_config(tmp_path, sandbox, app__sessions="none")) as run:
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, BOTH), 60, what="the copy")

        async def ready() -> bool:
            st = await run.status()
            return st["ready_for_cutover"] and st["gap_in_seconds"] == 0

        await wait_for(ready, 60, what="READY before the expiry")
        # The source's clock moves two hours on: its documents expire, no change event says so, no head moves.
        head = run.daemon.units[TTL_NS].freshness.latest_head
        sandbox.source.faults.ttl_lazy_delete = True  # hidden at once, deleted later: the head does not move
        sandbox.source.faults.ttl_clock_advance_s = 7200
        assert await _ids(source) == ["kept", "longer"]
        await run.status()  # samples every head
        assert run.daemon.units[TTL_NS].freshness.latest_head == head
        await wait_for(lambda: _target_ids(target, ["kept", "longer"]), 60, what="the sweep deleting the expired")
        await assert_converged(source, target, BOTH)
        st = await run.status()
        assert run.ns_status(st, TTL_NS)["deletes_applied"] >= 20


async def _ids(client: AsyncMongoClient) -> list[str]:
    return sorted([str(d["_id"]) async for d in client.app.sessions.find({}, {"_id": 1})])


async def _target_ids(target: AsyncMongoClient, want: list[str]) -> bool:
    return await _ids(target) == want


async def test_the_indexes_command_exits_1_for_an_undecided_ts_ttl_and_0_once_decided(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient,
) -> None:
    await _ttl_collection(source, n=2)
    cfg = _config(tmp_path, sandbox)
    config = write_config(cfg, tmp_path / "c.toml")
    results = {}
    for decision in ("", "none", "field:expiresAt:60"):
        cfg.ttl = {TTL_NS: TtlDecision(*_parse(decision))} if decision else {}
        write_config(cfg, config)
        for args in ((), ("--plan",)):
            result = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "cosmigrate", "indexes", "--config", str(config), "--json", *args],
                capture_output=True, text=True, timeout=120, env=child_env())
            assert "Traceback" not in result.stderr, result.stderr
            results[decision, args] = (result.returncode, json.loads(result.stdout))
    for args in ((), ("--plan",)):
        code, rows = results["", args]
        assert code == 1 and [r["ttl_decision"] for r in rows if r["name"] == "_ts_1"] == ["undecided"]
        assert results["none", args][0] == 0
        code, rows = results["field:expiresAt:60", args]
        assert code == 0 and [r["ttl_decision"] for r in rows if r["name"] == "_ts_1"] == ["field:expiresAt:60"]
    planned = {r["name"]: r for r in results["field:expiresAt:60", ("--plan",)][1]}
    assert planned["ttl_expiresAt"]["stage"] == "after backfill" and planned["ttl_expiresAt"]["ttl_at_cutover"]
    assert planned["ttl_expiresAt"]["expire_after_seconds"] == 60 and "ttl_expiresAt" not in {
        r["name"] for r in results["none", ("--plan",)][1]}


def test_ttl_state_and_the_ttl_table_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    cfg = make_config(tmp_path, "mongodb://127.0.0.1:9/", "mongodb://127.0.0.1:9/?retryWrites=false", "file+sqlite")
    cfg.ttl = {"app.a": TtlDecision("none"), "app.b": TtlDecision("field", "meta.expires", 0)}
    path.write_text(to_toml(cfg))
    again = load_config(path, env={})
    assert again.ttl == cfg.ttl
    ts = [{"name": "_id_", "key": {"_id": 1}}, {"name": "_ts_1", "key": {"_ts": 1}, "expireAfterSeconds": 60}]
    assert ttl_state("app.a", ts, again).decision_text == "none" and not ttl_state("app.a", ts, again).blocking
    assert ttl_state("app.b", ts, again).field_index == TtlDecision("field", "meta.expires", 0)
    undecided = ttl_state("app.c", ts, again)
    assert undecided.decision_text == "undecided" and '"app.c" = "none"' in undecided.blocking
    custom = ttl_state("app.d", [{"name": "e_1", "key": {"e": 1}, "expireAfterSeconds": 0}], again)
    assert custom.decision_text == "" and not custom.blocking and custom.expires and "enabled at cutover" in custom.describe()
    ignored = ttl_state("app.a", ts[:1], again)
    assert not ignored.expires and "ignored" in ignored.describe() and not ignored.blocking
    assert ttl_state("app.x", ts[:1], again).describe() == ""


async def test_a_cutover_waits_for_the_ttl_read_instead_of_calling_it_the_operators(
    tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """The TTL indexes are read beside the watchers; a loaded account answers late. Until then expiry is unknown
    and readiness waits, but nothing needs the operator: a cutover started then waits for the read (it failed at
    once with "needs you" when the read came after its first look, under a loaded `make test`). The sandbox
    holds every listIndexes until the test has seen each side wait."""
    await _ttl_collection(source)
    sandbox.source.faults.hold_list_indexes = True
    cfg = _config(tmp_path, sandbox, app__sessions="none")
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    child = await Child.start(config)
    try:
        await wait_for(lambda: _status(config), 60, what="the daemon's control socket")
        assert (await ctl(config, "writer", "start"))[0] == 0

        async def unread() -> dict | None:
            st = await _status(config)
            return st if st and any("expiry (TTL) not read yet" in r for r in st["not_ready_reasons"]) else None

        st = await wait_for(unread, 60, interval=0.2, what="status waiting for the TTL read")
        assert not [r for r in st["needs_operator"] if "expiry" in r], st
        assert _ns(st, TTL_NS)["expiry"].startswith("unknown")
    finally:
        await child.finish(signal.SIGTERM)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "cutover", "--config", str(config),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(None))
    assert proc.stderr is not None
    try:
        async def waiting() -> bool:  # the cutover's precheck says it waits for the read: then it is answered
            line = await proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                raise AssertionError("the cutover exited before it waited for the TTL read")
            return b"cutover precheck waiting" in line and b"not read yet" in line

        await asyncio.wait_for(wait_for(waiting, 120, interval=0.0, what="the cutover waiting for the TTL read"), 150)
        sandbox.source.faults.hold_list_indexes = False
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        sandbox.source.faults.hold_list_indexes = False
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    entry = next(n for n in json.loads(out)["namespaces"] if n["namespace"] == TTL_NS)
    assert entry["ttl_decision"] == "none"
    await assert_converged(source, target, BOTH)
