"""Names MongoDB allows and nothing downstream expected: store keys, discovery, capture, rendering."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmigrate.config import Config, ConfigError, validate
from cosmigrate.stores import batch_key
from cosmigrate.stores.base import MAX_COMPONENT_BYTES, key_component
from cosmigrate.stores.local import LocalStore
from cosmigrate.stores.s3 import S3Store

SPECIAL = ["", ".", "..", "...", ".hidden", "a..b", "app...", "x" * 300, "é" * 120, "a~b", "%2E", "%2E.", "~",
           "a/b", "a\\b", "mk[/b]up", "\x1b[31mred", "sp ace", "tab\there", "nul\x00", "$cmd", "日本語" * 40]
# Every character class that has bitten a key mapping somewhere: separators, escapes, markers, multi-byte.
ALPHABET = st.sampled_from(list("ab.%~/-_ $\\é日\x00\x1b") + ["\U0001f600"])
NAME = st.one_of(st.sampled_from(SPECIAL), st.text(ALPHABET, max_size=40), st.text(ALPHABET, min_size=100, max_size=300))
DB = NAME.map(lambda n: n.replace(".", "_"))  # a database name never holds a dot: `ns` splits at the first one
NAMESPACES = st.lists(st.builds(lambda db, coll: f"{db}.{coll}", DB, NAME), min_size=1, max_size=8, unique=True)
PREFIX = "p" * 500  # near the longest prefix the config accepts (config.MAX_PREFIX_BYTES)


def _check_key(key: str, prefix: str) -> None:
    assert len(key.encode()) <= 1024, f"S3 keys end at 1024 bytes: {len(key.encode())}"
    parts = key.removeprefix(prefix + "/").split("/") if prefix else key.split("/")
    assert len(parts) == 4, parts  # cluster, db, coll, seq: no name adds or removes a level
    for part in parts:
        assert part and part not in (".", "..") and not part.startswith("."), part
        assert len(part.encode()) <= MAX_COMPONENT_BYTES <= 255, part


@settings(max_examples=300, deadline=None)
@given(NAMESPACES)
def test_batch_keys_are_distinct_bounded_and_never_climb(names: list[str]) -> None:
    keys = [batch_key(PREFIX, "cluster.name", ns, 7, 3) for ns in names]
    assert len(set(keys)) == len(keys), [k[-80:] for k in keys]
    for key in keys:
        _check_key(key, PREFIX)


def test_the_reported_collisions_and_limits() -> None:
    assert batch_key("p", "c", "app...", 1, 1) != batch_key("p", "c", "shop...", 1, 1)
    assert batch_key("p", "c", "a..", 1, 1) != batch_key("p", "c", "a.%2E", 1, 1) != batch_key("p", "c", "a.", 1, 1)
    long_a, long_b = "x" * 300, "x" * 299 + "y"  # same head, different names
    assert key_component(long_a) != key_component(long_b)
    assert len(key_component("é" * 120)) <= MAX_COMPONENT_BYTES
    assert key_component("plain_name-1.x") == "plain_name-1.x"  # ordinary names keep their old keys


async def _round_trip(store: LocalStore | S3Store, names: list[str], prefix: str) -> None:
    keys = {ns: batch_key(prefix, "c", ns, 0, 1) for ns in names}
    for ns, key in keys.items():
        _check_key(key, prefix)  # moto takes keys over S3's 1,024-byte limit: checked here instead
        await store.put(key, ns.encode("utf-8", "surrogatepass"))
    for ns, key in keys.items():
        assert await store.get(key) == ns.encode("utf-8", "surrogatepass"), ns  # nobody overwrote it
    assert await store.list(prefix) == sorted(keys.values())
    for key in keys.values():
        await store.mark_applied(key)
        await store.delete(key)
    assert await store.list(prefix) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMESPACES)
def test_hostile_names_round_trip_through_a_directory_store(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(f"file://{tmp}", tmp)
        asyncio.run(_round_trip(store, names, ""))


@pytest.fixture(scope="module")
def s3_bucket(moto_endpoint: str) -> str:
    import boto3

    bucket = f"names-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(NAMESPACES)
def test_hostile_names_round_trip_through_s3(moto_endpoint: str, s3_bucket: str, names: list[str]) -> None:
    prefix = f"pre/{uuid.uuid4().hex}"

    async def run() -> None:
        store = S3Store(f"s3://{s3_bucket}/{prefix}", s3_bucket, prefix, region="us-east-1", endpoint_url=moto_endpoint)
        try:
            await _round_trip(store, names, prefix)
        finally:
            await store.close()

    asyncio.run(run())


async def test_the_directory_store_refuses_keys_that_climb(tmp_path: Path) -> None:
    from cosmigrate.stores import StoreError

    store = LocalStore(f"file://{tmp_path}", str(tmp_path))
    for key in ("c/app/../000000000001-e1", "c/./x", "c//x", ""):
        with pytest.raises(StoreError):
            await store.put(key, b"x")


@pytest.mark.parametrize("name", [".", "..", "x" * 101])
def test_cluster_names_that_are_not_names_are_refused(name: str) -> None:
    cfg = Config(cluster_name=name)
    cfg.source.uri = "mongodb://h:10255/?tls=true"
    cfg.target.uri = "mongodb://h:27017/?tls=true"
    with pytest.raises(ConfigError, match="cluster_name"):
        validate(cfg)


def test_an_s3_prefix_too_long_for_the_keys_is_refused() -> None:
    cfg = Config(cluster_name="c")
    cfg.source.uri = "mongodb://h:10255/?tls=true"
    cfg.target.uri = "mongodb://h:27017/?tls=true"
    cfg.store.url = "s3://bucket/" + "p" * 600
    with pytest.raises(ConfigError, match="store.url"):
        validate(cfg)


# --- discovery and capture through a real daemon ----------------------------------------------------------


async def _running(daemon) -> asyncio.Task[int]:
    from tests.helpers import wait_for

    task = asyncio.create_task(daemon.serve())

    async def up() -> bool:
        return daemon.control is not None

    await wait_for(up, 30, what="daemon up")
    return task


async def _captured(daemon, ns: str, events: int) -> bool:
    from cosmigrate.status import build_status

    status = await build_status(daemon.worker)
    return any(n["namespace"] == ns and n["captured_events"] >= events for n in status["namespaces"])


async def test_a_name_the_driver_refuses_is_reported_and_discovery_goes_on(tmp_path: Path, sandbox, source) -> None:
    from cosmigrate.daemon import Daemon
    from cosmigrate.status import build_status
    from tests.helpers import make_config, prepare_backends, wait_for

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    await source.app.command({"create": "a..b"})  # MongoDB takes it; PyMongo refuses to address it
    await source.app.command({"insert": "a..b", "documents": [{"_id": 1}]})
    await source.app.aa.insert_one({"_id": 1})  # sorts before it
    daemon = Daemon(cfg)
    task = await _running(daemon)
    try:
        await wait_for(lambda: _captured(daemon, "app.aa", 1), 30, what="app.aa captured")
        # Created after the odd one was met: still discovered (and sorted after it).
        await source.app.zz.insert_many([{"_id": i} for i in range(3)])
        await wait_for(lambda: _captured(daemon, "app.zz", 3), 30, what="app.zz captured")
        status = await build_status(daemon.worker)
        reasons = " ".join(status["not_ready_reasons"])
        assert "app.a..b" in reasons and "refuses this collection name" in reasons, reasons
        assert not status["ready_for_cutover"]
        assert {n["namespace"] for n in status["namespaces"]} == {"app.aa", "app.zz"}
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


@pytest.mark.parametrize("coll", ["x" * 300, "é" * 120], ids=["300 chars", "120 é"])
async def test_a_long_collection_name_is_discovered_and_captured(tmp_path: Path, sandbox, source, coll: str) -> None:
    import time

    from cosmigrate.daemon import Daemon
    from tests.helpers import check_committed, make_config, prepare_backends, read_committed, source_docs, wait_for

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.daemon.drain_timeout_s = 20
    await prepare_backends(cfg)
    ns = f"app.{coll}"
    await source.app[coll].insert_many([{"_id": i, "v": 1} for i in range(20)])
    daemon = Daemon(cfg)
    task = await _running(daemon)
    try:
        await wait_for(lambda: _captured(daemon, ns, 20), 30, what="the long name captured")
        cap = daemon.units[ns].capture
        assert cap.status.state == "running" and not cap.status.last_error, cap.status.last_error
    finally:
        daemon.request_stop()
        began = time.monotonic()
        assert await asyncio.wait_for(task, 60) == 0
        assert time.monotonic() - began < cfg.daemon.drain_timeout_s / 2  # nothing stuck retrying a put
    committed = await read_committed(cfg)
    check_committed(committed[ns], (await source_docs(source, [ns]))[ns])


# --- names on the operator's terminal --------------------------------------------------------------------

MARKUP = "mk[/b]up"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07red\u202etxt"  # clear screen, set the window title, a bidi override


def test_render_shows_markup_and_escapes_as_text() -> None:
    from rich.console import Console

    from cosmigrate.statusview import render

    ns = {"namespace": f"app.{MARKUP}", "state": "running", "captured_seq": 1, "captured_events": 2, "applied_seq": 1,
          "applied_events": 2, "pending_batches": 0, "pending_events": 0, "lag_seconds": 0.0, "deferred": 0,
          "throughput_eps": 0.0, "last_error": f"[bold]x[/] {ESCAPES}", "last_capture_contact": None,
          "freshness": "current", "phase": "in sync", "last_error_at": None}
    status = {"cluster_name": "c", "current_time": "t", "writer": "started", "gap_in_seconds": 0.0,
              "ready_for_cutover": False, "not_ready_reasons": [f"app.{ESCAPES} (x)"],
              "namespaces": [ns, {**ns, "namespace": f"app.{ESCAPES}"}]}
    console = Console(width=300, color_system=None, force_terminal=False)
    with console.capture() as captured:
        console.print(render(status))
    out = captured.get()
    assert f"app.{MARKUP}" in out and "[bold]x[/]" in out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out  # shown, not obeyed


async def test_ctl_status_and_batches_list_survive_hostile_names(tmp_path: Path, sandbox, source) -> None:
    import json
    import subprocess
    import sys

    from cosmigrate.daemon import Daemon
    from tests.helpers import make_config, prepare_backends, wait_for, write_config

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    config = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    for coll in (MARKUP, ESCAPES):
        await source.app[coll].insert_one({"_id": 1})
    daemon = Daemon(cfg)
    task = await _running(daemon)
    try:
        for coll in (MARKUP, ESCAPES):
            await wait_for(lambda c=coll: _captured(daemon, f"app.{c}", 1), 30, what=f"{coll!r} captured")

        def cosmigrate(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "cosmigrate", *args], capture_output=True, text=True,
                                  timeout=60)

        for args in (["ctl", "--config", str(config), "status"], ["ctl", "--config", str(config), "status", "--json"],
                     ["batches", "list", "--config", str(config)]):
            result = await asyncio.to_thread(cosmigrate, *args)
            out = result.stdout + result.stderr
            assert result.returncode in (0, 2) and "Traceback" not in out, out[-2000:]  # status: 2 = not ready
            assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, args
            assert MARKUP in out, args
            if "--json" in args:
                names = {n["namespace"] for n in json.loads(result.stdout)["namespaces"]}
                assert names == {f"app.{MARKUP}", f"app.{ESCAPES}"}  # the JSON keeps the exact name, escaped
            else:
                assert "\\x1b[2J" in out, args
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


def test_console_logs_show_escapes_instead_of_sending_them(capsys) -> None:
    import structlog

    from cosmigrate.logs import configure_logging, get_logger

    saved = structlog.get_config()
    configure_logging("info", "console", env={})
    try:
        get_logger(namespace=f"app.{ESCAPES}").info("watching namespace")
    finally:
        structlog.configure(**saved)  # never leave later tests a logger bound to this test's captured stdout
    out = capsys.readouterr().out
    assert "watching namespace" in out and "\\x1b[2J" in out
    assert "\x07" not in out and "\u202e" not in out and "\x1b[2J" not in out


async def test_a_namespace_that_cannot_start_does_not_stop_the_others(tmp_path: Path, sandbox, source,
                                                                       monkeypatch) -> None:
    from cosmigrate.daemon import Daemon
    from cosmigrate.ledger import LedgerError
    from cosmigrate.ledger.sqlite import SqliteLedger
    from cosmigrate.status import build_status
    from tests.helpers import make_config, prepare_backends, wait_for

    claim = SqliteLedger.claim

    async def refusing_claim(self, ns: str, owner: str):
        if ns == "app.bad":
            raise LedgerError("ledger item too large for this namespace")
        return await claim(self, ns, owner)

    monkeypatch.setattr(SqliteLedger, "claim", refusing_claim)
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    await source.app.bad.insert_one({"_id": 1})
    await source.app.good.insert_one({"_id": 1})  # sorts after the one that fails
    daemon = Daemon(cfg)
    task = await _running(daemon)
    try:
        await wait_for(lambda: _captured(daemon, "app.good", 1), 30, what="app.good captured")
        reasons = " ".join((await build_status(daemon.worker))["not_ready_reasons"])
        assert "app.bad (could not start: ledger item too large" in reasons, reasons
    finally:
        daemon.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
