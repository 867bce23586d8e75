"""Cutover night with a running daemon, as an operator meets it: the config taken from COSMIGRATE_CONFIG without
the service's secrets, a cutover that fails at once on what needs the operator, Ctrl+C that says the cutover goes
on, `ctl cutover --cancel`, a report file on every ending, `ctl verify` with progress, `ctl status --watch` across a
daemon restart, and the completed state's own exit code and header."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import signal
import sys
import time
from pathlib import Path

from pymongo import AsyncMongoClient
from rich.console import Console

from cosmigrate.cli import EXIT_CUTOVER_COMPLETE, status_exit_code
from cosmigrate.cutover.machine import EXIT_CANCELLED, EXIT_NOT_READY
from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from cosmigrate.statusview import render
from tests.helpers import child_env, wait_for
from tests.test_apply import Running, config


def _operator_view(tmp_path: Path, socket: str) -> Path:
    """The config as an operator's shell reads it: the secrets live in an environment file it cannot read."""
    path = tmp_path / "operator.toml"
    path.write_text(f'cluster_name = "test"\n[source]\nuri = "env:NOT_SET_ANYWHERE"\n'
                    f'[target]\nuri = "env:NOT_SET_EITHER"\n[control]\nsocket = "{socket}"\n')
    return path


class Client:
    """A `cosmigrate ...` client process whose stderr is read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.err: list[str] = []
        self.out = b""
        self._pump = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Client:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "cosmigrate", *args,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    env=child_env(env))
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None and self.proc.stdout is not None
        out = asyncio.create_task(self.proc.stdout.read())
        async for line in self.proc.stderr:
            self.err.append(line.decode(errors="replace").rstrip())
        self.out = await out

    async def said(self, text: str) -> bool:
        return any(text in line for line in self.err)

    async def finish(self, limit_s: float = 60) -> int:
        code = await asyncio.wait_for(self.proc.wait(), limit_s)
        await asyncio.wait_for(self._pump, limit_s)
        return code


async def _stored_cutover(cfg) -> dict:
    ledger = open_ledger(cfg)
    try:
        item = await ledger.get_progress("", "cutover", "state")
        return item.doc() if item else {}
    finally:
        await ledger.close()


def _recent(iso: str, since: float) -> bool:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() >= since - 1


async def test_a_cutover_with_the_writer_stopped_fails_at_once_through_cosmigrate_config_and_leaves_a_report(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = config(tmp_path, sandbox)
    cfg.cutover.precheck_timeout_s = 120
    await source.app.d.insert_many([{"_id": i} for i in range(20)])
    view = _operator_view(tmp_path, cfg.control.socket)
    report = tmp_path / "cutover.json"
    async with Running(cfg) as run:
        await wait_for(lambda: asyncio.sleep(0, bool(run.daemon.units)), 30, what="a namespace")
        began = time.time()
        client = await Client.start("cutover", "--report", str(report), env={"COSMIGRATE_CONFIG": str(view)})
        code = await client.finish(90)
        took = time.time() - began
        err = "\n".join(client.err)
        assert code == EXIT_NOT_READY, err
        assert "writer is stopped" in err and "needs you" in err, err
        assert took < 30, f"waited {took:.0f}s for a condition only the operator clears"
        assert "Traceback" not in err and "NOT_SET" not in err, err
        written = json.loads(report.read_text())
        assert written["outcome"] == "stopped" and written["step"] == "precheck", written
        assert written["exit_code"] == EXIT_NOT_READY and _recent(written["started_at"], began), written


async def test_ctrl_c_detaches_and_says_so_cancel_stops_at_a_step_and_is_recorded_and_verify_shows_progress(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = config(tmp_path, sandbox)
    cfg.capture.head_sample_interval_s = 0.3
    cfg.cutover.quiesce_s = 20.0  # long enough for the clients below to meet the cutover in this step
    cfg.cutover.precheck_timeout_s = 120
    await source.app.d.insert_many([{"_id": i, "v": "x" * 100} for i in range(300)])
    view = _operator_view(tmp_path, cfg.control.socket)
    env = {"COSMIGRATE_CONFIG": str(view)}
    async with Running(cfg) as run:
        await run.writer("start")

        async def in_sync() -> bool:
            return bool((await run.status())["ready_for_cutover"])

        await wait_for(in_sync, 60, what="ready for cutover")
        verify = await Client.start("ctl", "verify", env=env)
        assert await verify.finish(120) == 0, verify.err
        assert any(line.startswith("verify: 300 documents checked") for line in verify.err), verify.err
        assert json.loads(verify.out)["equal"] is True

        first = await Client.start("ctl", "cutover", env=env)
        await wait_for(lambda: first.said("cutover: quiesce"), 60, what="the cutover in its quiesce step")
        first.proc.send_signal(signal.SIGINT)
        assert await first.finish() == 130
        detached = "\n".join(first.err)
        assert "goes on in the daemon" in detached and "ctl cutover --cancel" in detached, detached
        assert "Traceback" not in detached, detached
        assert run.daemon.proof is not None and run.daemon.proof.cutover_status() == "cutover running: quiesce"

        report = tmp_path / "cancelled.json"
        began = time.time()
        joined = await Client.start("ctl", "cutover", "--report", str(report), env=env)
        await wait_for(lambda: joined.said("cutover: quiesce"), 60, what="the second client to join")
        cancel = await Client.start("ctl", "cutover", "--cancel", env=env)
        assert await cancel.finish() == 0, cancel.err
        assert await joined.finish(90) == EXIT_CANCELLED, joined.err
        written = json.loads(report.read_text())
        assert written["outcome"] == "cancelled" and written["step"] == "apply", written
        assert _recent(written["started_at"], began - 30), written
        stored = await _stored_cutover(cfg)
        assert stored["step"] == "apply" and stored["cancelled"]["step"] == "apply", stored
        assert run.daemon.proof.cutover_status() == "cutover stopped at apply"


async def test_status_watch_shows_the_daemon_unreachable_and_reconnects(tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = config(tmp_path, sandbox)
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ctl", "status", "--json", "--watch", "--interval", "0.2",
        "--socket", cfg.control.socket, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert watch.stdout is not None
    try:
        line = json.loads(await asyncio.wait_for(watch.stdout.readline(), 30))
        assert "daemon_unreachable_since" in line, line
        since = line["daemon_unreachable_since"]
        async with Running(cfg):
            while "daemon_unreachable_since" in line:
                line = json.loads(await asyncio.wait_for(watch.stdout.readline(), 60))
                assert line.get("daemon_unreachable_since", since) == since, "the outage keeps its first moment"
            assert line["cluster_name"] == "test"
    finally:
        watch.send_signal(signal.SIGINT)
        await asyncio.wait_for(watch.wait(), 30)


def test_a_completed_cutover_has_its_own_exit_code_and_header() -> None:
    status = {"cluster_name": "c", "writer": "stopped", "gap_in_seconds": 0.0, "cutover_threshold_seconds": 10.0,
              "ready_for_cutover": False, "current_time": "2026-01-01T00:00:00.000Z",
              "not_ready_reasons": ["writer is stopped", "cutover complete: the applications use the target now"],
              "namespaces": [{"state": "paused"}], "cutover": "cutover complete"}
    assert status_exit_code(status) == EXIT_CUTOVER_COMPLETE == 4
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(render({**status, "namespaces": []}))
    text = out.getvalue()
    assert "CUTOVER COMPLETE" in text and "not ready" not in text and "why not" not in text, text


async def test_ctrl_c_on_a_cutover_run_in_process_stops_it_resumably_and_still_writes_the_report(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    from tests.helpers import prepare_backends, write_config

    cfg = config(tmp_path, sandbox)
    cfg.capture.head_sample_interval_s = 0.3
    cfg.cutover.quiesce_s = 30.0  # the step Ctrl+C meets
    cfg.cutover.precheck_timeout_s = 120
    await source.app.d.insert_many([{"_id": i} for i in range(50)])
    await prepare_backends(cfg)
    ledger = open_ledger(cfg)
    await ledger.set_writer("started", "test", 0.0)
    await ledger.close()
    path = write_config(cfg, tmp_path / "c.toml")
    report = tmp_path / "cutover.json"
    client = await Client.start("cutover", "--report", str(report), env={"COSMIGRATE_CONFIG": str(path)})
    await wait_for(lambda: client.said('"step": "quiesce"'), 90, what="the in-process cutover in its quiesce step")
    client.proc.send_signal(signal.SIGINT)
    assert await client.finish(90) == 1
    last = client.err[-1]
    assert "interrupted at step quiesce" in last and "resume" in last, client.err[-5:]
    written = json.loads(report.read_text())
    assert written["outcome"] == "interrupted" and written["step"] == "quiesce", written
    assert (await _stored_cutover(cfg))["step"] == "quiesce"
