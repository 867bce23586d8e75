"""What an operator meets in the first hour: ctl exit codes and JSON lines, `ctl retry`, errors with their time
that clear on recovery, ctl without secrets, CLI consistency, SIGHUP log level, check-config, the 80-column table."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from pymongo import AsyncMongoClient
from rich.console import Console

from cosmigrate.config import ConfigError, load_config, read_env_file
from cosmigrate.daemon import Daemon
from cosmigrate.ledger import open_ledger
from cosmigrate.logs import configure_logging, get_logger
from cosmigrate.sandbox import Sandbox
from cosmigrate.statusview import render
from tests.helpers import AWS_ENV, make_config, prepare_backends, wait_for, write_config
from tests.test_apply import Running, config


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **AWS_ENV, **(env or {}))
    return subprocess.run([sys.executable, "-m", "cosmigrate", *args], capture_output=True, text=True, timeout=timeout,
                          env=full)


async def _acli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_cli, *args, env=env)


async def _true(value: Any) -> bool:
    return bool(value)


def _ns(status: dict[str, Any], ns: str) -> dict[str, Any]:
    return next(n for n in status["namespaces"] if n["namespace"] == ns)


# --- failed namespaces: exit 3, a timed error, `ctl retry`, cleared on recovery --------------------------------------


async def test_a_corrupt_batch_fails_the_namespace_and_ctl_retry_resumes_it_after_the_restore(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient) -> None:
    cfg = config(tmp_path, sandbox)
    socket = cfg.control.socket
    await source.app.a.insert_many([{"_id": i, "v": 0} for i in range(10)])
    async with Running(cfg) as run:
        await wait_for(lambda: _true(run.daemon.units.get("app.a") and
                                     run.daemon.units["app.a"].capture.status.committed_events >= 10), 30, what="capture")
        batch = next(p for p in (tmp_path / "batches").rglob("*") if p.is_file() and not p.name.startswith("."))
        original = batch.read_bytes()
        batch.write_bytes(original[:-8] + b"garbage!")
        await run.writer("start")
        await wait_for(lambda: _true(run.daemon.units["app.a"].applier.status.state == "failed"), 30, what="apply to fail")
        before = await run.status()
        failed = _ns(before, "app.a")
        assert failed["state"] == "failed" and failed["phase"] == "failed" and "corrupt" in failed["last_error"]
        assert failed["last_error_at"] is not None
        result = await _acli("ctl", "status", "--socket", socket)
        assert result.returncode == 3, result.stdout + result.stderr
        assert "corrupt" in result.stdout  # the error is listed under the table

        batch.write_bytes(original)  # the operator restores the object
        result = await _acli("ctl", "retry", "app.a", "--socket", socket)
        assert result.returncode == 0 and result.stdout.strip() == "app.a running", result.stderr
        await wait_for(lambda: _applied(run, target, 10), 30, what="apply after the retry")
        after = _ns(await run.status(), "app.a")
        assert after["state"] == "running" and after["last_error"] == "" and after["last_error_at"] is None
        # The ledger position was kept: nothing captured twice, the same batches.
        assert after["captured_seq"] == failed["captured_seq"] and after["captured_events"] == failed["captured_events"]
        again = await _acli("ctl", "retry", "app.a", "--socket", socket)
        assert again.returncode == 1 and "has not failed" in again.stderr
        unknown = await _acli("ctl", "retry", "no.such", "--socket", socket)
        assert unknown.returncode == 1 and "does not watch" in unknown.stderr
        await source.app.a.insert_one({"_id": 99})
        await wait_for(lambda: _applied(run, target, 11), 30, what="the retried namespace keeps going")


async def _applied(run: Running, target: AsyncMongoClient, n: int) -> bool:
    return await target.app.a.count_documents({}) == n and _ns(await run.status(), "app.a")["pending_events"] == 0


async def test_a_capture_failure_is_reset_in_the_ledger_by_ctl_retry(tmp_path: Path, sandbox: Sandbox,
                                                                     source: AsyncMongoClient) -> None:
    await source.app.b.insert_many([{"_id": i} for i in range(3)])
    sandbox.source.faults.reject_tokens = True
    cfg = config(tmp_path, sandbox)
    async with Running(cfg) as run:
        ledger = open_ledger(cfg)
        try:
            async def ledger_state(state: str) -> bool:
                meta = await ledger.get_namespace("app.b")
                return meta is not None and meta.state == state

            await wait_for(lambda: ledger_state("failed"), 30, what="the ledger to record the failure")
            status = _ns(await run.status(), "app.b")
            assert status["state"] == "failed" and "token" in status["last_error"].lower()
            sandbox.source.faults.reject_tokens = False  # the cause goes away
            result = await _acli("ctl", "retry", "app.b", "--socket", cfg.control.socket)
            assert result.returncode == 0, result.stderr
            await wait_for(lambda: ledger_state("running"), 30, what="the ledger's failed state reset")
            await wait_for(lambda: _true(run.daemon.units["app.b"].capture.status.committed_events >= 3), 30,
                           what="capture after the retry")
            meta = await ledger.get_namespace("app.b")
            assert meta is not None and meta.last_error == ""
        finally:
            await ledger.close()
            sandbox.source.faults.reject_tokens = False


async def test_a_store_error_shows_with_its_time_and_clears_when_the_store_recovers(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, moto_endpoint: str) -> None:
    import aioboto3

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint)
    bucket = cfg.store.url.removeprefix("s3://").split("/")[0]
    async with Running(cfg) as run, aioboto3.Session().client("s3", endpoint_url=moto_endpoint,
                                                              region_name="us-east-1") as s3:
        await source.app.c.insert_one({"_id": 0})
        await wait_for(lambda: _true(run.daemon.units.get("app.c") and
                                     run.daemon.units["app.c"].capture.status.committed_events >= 1), 30, what="capture")
        for page in (await s3.list_objects_v2(Bucket=bucket)).get("Contents", []):
            await s3.delete_object(Bucket=bucket, Key=page["Key"])
        await s3.delete_bucket(Bucket=bucket)  # the store goes away
        await source.app.c.insert_one({"_id": 1})

        async def erred() -> bool:
            n = _ns(await run.status(), "app.c")
            return bool(n["last_error"]) and n["last_error_at"] is not None and n["state"] == "paused"

        await wait_for(erred, 60, what="the put failure in status")
        await s3.create_bucket(Bucket=bucket)  # and comes back

        async def cleared() -> bool:
            n = _ns(await run.status(), "app.c")
            return n["last_error"] == "" and n["last_error_at"] is None and n["captured_events"] >= 2

        await wait_for(cleared, 90, what="the error to clear")


# --- ctl: exit codes, JSON lines, no secrets, options after the subcommand ------------------------------------------


async def test_ctl_reads_only_the_socket_from_the_config_and_accepts_options_after_the_subcommand(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = config(tmp_path, sandbox)
    await source.app.d.insert_one({"_id": 1})
    # What an operator's shell sees: the config names secrets in an environment file it cannot read.
    operator_view = tmp_path / "operator.toml"
    operator_view.write_text(f'cluster_name = "test"\n[source]\nuri = "env:NOT_SET_ANYWHERE"\n'
                             f'[target]\nuri = "credential:target-uri"\n[control]\nsocket = "{cfg.control.socket}"\n')
    async with Running(cfg) as run:
        await wait_for(lambda: _true(run.daemon.units), 30, what="a namespace")
        for args, env in ((("ctl", "status", "--json", "-c", str(operator_view)), None),
                          (("ctl", "-c", str(operator_view), "status", "--json"), None),
                          (("ctl", "status", "--json"), {"COSMIGRATE_CONFIG": str(operator_view)})):
            result = await _acli(*args, env=env)
            assert result.returncode == 2, result.stderr  # writer stopped: not ready
            status = json.loads(result.stdout)
            assert status["ready_for_cutover"] is False and status["version"] == "0.1.0" and status["uptime_s"] >= 0
        # JSON lines with --watch: one object per line.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", "ctl", "status", "--json", "--watch", "--interval", "0.2",
            "--socket", cfg.control.socket, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        try:
            lines = [await asyncio.wait_for(proc.stdout.readline(), 30) for _ in range(3)]
        finally:
            proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(proc.wait(), 30)
        assert [json.loads(line)["cluster_name"] for line in lines] == ["test"] * 3
        assert proc.returncode == 0


def test_status_exit_codes() -> None:
    from cosmigrate.cli import status_exit_code

    assert status_exit_code({"ready_for_cutover": True, "namespaces": [{"state": "running"}]}) == 0
    assert status_exit_code({"ready_for_cutover": False, "namespaces": [{"state": "running"}]}) == 2
    assert status_exit_code({"ready_for_cutover": False, "namespaces": [{"state": "failed"}, {"state": "running"}]}) == 3


def test_version_everywhere_and_help_without_type_artefacts() -> None:
    for args in (["--version"], ["ctl", "--version"], ["ctl", "status", "--version"], ["run", "--version"],
                 ["ledger", "init", "--version"], ["batches", "dump", "--version"]):
        result = _cli(*args)
        assert result.returncode == 0 and result.stdout.strip() == "cosmigrate 0.1.0", (args, result.stderr)
    for args in (["--help"], ["ctl", "--help"], ["ctl", "status", "--help"], ["ctl", "writer", "--help"],
                 ["batches", "list", "--help"], ["batches", "dump", "--help"], ["ctl", "retry", "--help"],
                 ["preflight", "--help"], ["sandbox", "--help"]):
        result = _cli(*args, env={"COLUMNS": "100"})
        assert result.returncode == 0, result.stderr
        for artefact in ("<bool>", "<str>", "<float>", "<int>", "<path>", "{namespace}", "{action}", "[[", "--no-"):
            assert artefact not in result.stdout, (args, artefact, result.stdout)
        assert "--version" in result.stdout


def test_writer_action_is_a_choice() -> None:
    result = _cli("ctl", "--socket", "/nonexistent.sock", "writer", "sideways")
    assert result.returncode == 2 and "'start', 'stop'" in result.stderr
    result = _cli("ctl", "writer", "--help")
    assert "{start|stop}" in result.stdout


def test_a_mistyped_environment_variable_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('cluster_name = "x"\n[source]\nuri = "mongodb://h:1/"\n[target]\nuri = "mongodb://t:1/?retryWrites=false&tls=true"\n'
                    '[ledger]\nurl = "sqlite:///tmp/l.db"\n')
    for typo, meant in (("COSMIGRATE_CAPTURE_EXLUDE", "COSMIGRATE_CAPTURE_EXCLUDE"),
                        ("COSMIGRATE_SOURCE_URL", "COSMIGRATE_SOURCE_URI"), ("COSMIGRATE_LOG_LEVL", "COSMIGRATE_LOG_LEVEL")):
        with pytest.raises(ConfigError, match=f"{typo}.*did you mean {meant}"):
            load_config(path, env={typo: "x"})
    with pytest.raises(ConfigError, match="COSMIGRATE_CAPTURE_SOMETHING"):
        load_config(path, env={"COSMIGRATE_CAPTURE_SOMETHING": "x"})
    # Not typos: the process's own knobs, test-suite knobs, unrelated names, and variables the file reads as secrets.
    load_config(path, env={"COSMIGRATE_CONFIG": "/x", "COSMIGRATE_CRASH_POINTS": "", "COSMIGRATE_E2E_CHANGES": "1",
                           "COSMIGRATE_SOMETHING_ELSE": "1"})
    path.write_text(path.read_text().replace('uri = "mongodb://h:1/"', 'uri = "env:COSMIGRATE_SOURCE_SECRET"'))
    load_config(path, env={"COSMIGRATE_SOURCE_SECRET": "mongodb://h:1/"})
    result = _cli("check-config", "--config", str(path), env={"COSMIGRATE_SOURCE_SECRET": "mongodb://h:1/",
                                                              "COSMIGRATE_CAPTURE_EXLUDE": "a.*"})
    assert result.returncode == 2 and "did you mean COSMIGRATE_CAPTURE_EXCLUDE" in result.stderr


def test_check_config_and_env_file(tmp_path: Path) -> None:
    envfile = tmp_path / "cosmigrate.env"
    envfile.write_text("# secrets\nCOSMIGRATE_SOURCE_URI=mongodb://u:p@cosmos:10255/?ssl=true&replicaSet=globaldb\n"
                       'COSMIGRATE_TARGET_URI="mongodb://t:p@docdb:27017/?tls=true&retryWrites=false"\n')
    assert read_env_file(envfile)["COSMIGRATE_TARGET_URI"].startswith("mongodb://t:p@docdb")
    path = tmp_path / "c.toml"
    path.write_text('cluster_name = "x"\n[source]\nuri = "env:COSMIGRATE_SOURCE_URI"\n[target]\n'
                    'uri = "env:COSMIGRATE_TARGET_URI"\n')
    ok = _cli("check-config", "--config", str(path), "--env-file", str(envfile))
    assert ok.returncode == 0 and "config ok" in ok.stdout, ok.stderr
    missing = _cli("check-config", "--config", str(path))
    assert missing.returncode == 2 and "COSMIGRATE_SOURCE_URI is not set" in missing.stderr
    assert "p@" not in missing.stderr
    path.write_text(path.read_text() + '[capture]\nstart_at = "yesterday"\n')
    bad = _cli("check-config", "--config", str(path), "--env-file", str(envfile))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "capture.start_at" in bad.stderr
    # The default path, overridable by COSMIGRATE_CONFIG.
    result = _cli("check-config", "--env-file", str(envfile), env={"COSMIGRATE_CONFIG": str(path)})
    assert result.returncode == 2 and "capture.start_at" in result.stderr


def test_ledger_init_and_batches_need_no_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'cluster_name = "x"\n[source]\nuri = "env:NOT_SET"\n[target]\nuri = "env:NOT_SET_EITHER"\n'
                    f'[store]\nurl = "file://{tmp_path}/batches"\n[ledger]\nurl = "sqlite://{tmp_path}/ledger.db"\n')
    first = _cli("ledger", "init", "--config", str(path))
    assert first.returncode == 0 and "created" in first.stdout and "probe object" in first.stdout, first.stderr
    second = _cli("ledger", "init", "-c", str(path))
    assert second.returncode == 0 and "exists, 0 namespaces" in second.stdout, second.stderr
    listing = _cli("batches", "list", "-c", str(path))
    assert listing.returncode == 0, listing.stderr


# --- logs ------------------------------------------------------------------------------------------------------------


def test_a_new_level_reaches_loggers_bound_before(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    try:
        configure_logging("info", "json", env={})
        bound = get_logger(namespace="a.b")  # as every part of the daemon binds its logger at start
        bound.debug("before")
        configure_logging("debug", "json", env={})  # what a SIGHUP with log.level = "debug" does
        bound.debug("after")
        configure_logging("error", "json", env={})
        bound.warning("hidden")
        bound.error("shown")
    finally:
        structlog.reset_defaults()
    events = [json.loads(line)["event"] for line in buf.getvalue().splitlines()]
    assert events == ["after", "shown"]


async def test_sighup_log_level_changes_what_the_running_parts_log(tmp_path: Path, sandbox: Sandbox,
                                                                   source: AsyncMongoClient,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    cfg = config(tmp_path, sandbox)
    path = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    configure_logging("info", "json", env={})
    daemon = Daemon(cfg, env={}, config_path=str(path))
    task = asyncio.create_task(daemon.serve())
    try:
        await source.app.e.insert_one({"_id": 1})
        await wait_for(lambda: _true(daemon.units.get("app.e") and
                                     daemon.units["app.e"].capture.status.committed_events >= 1), 30, what="capture")
        assert "batch committed" not in buf.getvalue()  # a debug line
        path.write_text(path.read_text().replace('level = "info"', 'level = "debug"'))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: _true(daemon.cfg.log.level == "debug"), 30, what="the reload")
        await source.app.e.insert_one({"_id": 2})
        await wait_for(lambda: _true("batch committed" in buf.getvalue()), 30, what="debug lines from capture")
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)
        structlog.reset_defaults()


# --- the table at 80 columns ------------------------------------------------------------------------------------------


def _row(name: str, **kw: Any) -> dict[str, Any]:
    return {"namespace": name, "state": "running", "captured_seq": -1, "captured_events": 0, "applied_seq": -1,
            "applied_events": 0, "pending_batches": 0, "pending_events": 0, "lag_seconds": 12.5, "caught_up_at": None,
            "freshness": "behind", "last_capture_contact": "2026-01-01T00:00:00.000Z", "empty_pages": 0, "deferred": 0,
            "throughput_eps": 0.0, "last_error": "", "last_error_at": None, "phase": "catching up", **kw}


def test_the_watch_table_fits_80_columns_and_never_cuts_a_name() -> None:
    long = "warehouse_inventory_management.stock_movements_by_location_2024"
    status = {"cluster_name": "prod", "version": "0.1.0", "uptime_s": 4000.0, "current_time": "2026-01-01T00:00:07.000Z",
              "writer": "started", "gap_in_seconds": 12.5, "cutover_threshold_seconds": 30.0, "ready_for_cutover": False,
              "not_ready_reasons": ["gap 12.5s is not under 30s"],
              "namespaces": [_row(long), _row("app.[b]markup[/b]", captured_seq=4, captured_events=1234, applied_seq=2,
                                              applied_events=1000, pending_batches=2, pending_events=234,
                                              state="failed", phase="failed", last_error="batch 3 is corrupt",
                                              last_error_at="2026-01-01T00:00:02.000Z")]}
    console = Console(width=80, record=True)
    console.print(render(status, width=80))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    assert any(long in line for line in lines), text  # whole, on one line: the other columns gave way
    assert "catching up" in text and "batch 3 is corrupt (5s ago)" in text
    # Names of a usual length leave room for every column that matters at 80 columns.
    status["namespaces"][0] = _row("sales.orders_2024", captured_seq=0, captured_events=7)
    console = Console(width=80, record=True, color_system="truecolor", force_terminal=True)
    console.print(render(status, width=80))
    text = console.export_text(styles=False, clear=False)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines), text
    assert "app.[b]markup[/b]" in text  # text, never markup
    header = next(line for line in lines if line.startswith("namespace"))
    for column in ("phase", "lag", "pending", "captured", "applied", "seen"):
        assert column in header, header
    assert "(#-1)" not in text and "0 in 0" not in text and " none yet" in text and " none " in text
    assert "7s ago" in text and "catching up" in text
    # Colours follow the configured threshold (30s): 12.5s is under half of it, so green, not red.
    assert "\x1b[32m12.5s" in console.export_text(styles=True)
    status["cutover_threshold_seconds"] = 10.0
    red = Console(width=80, record=True, color_system="truecolor", force_terminal=True)
    red.print(render(status, width=80))
    assert "\x1b[1;31m12.5s" in red.export_text(styles=True)


def test_the_demo_fits_80_columns_and_its_table_never_runs_into_the_next_line(tmp_path: Path) -> None:
    result = _cli("demo", "--duration", "3", "--workdir", str(tmp_path), env={"COLUMNS": "80"}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert any(line.startswith("5. cutover") for line in lines), result.stdout[-2000:]
