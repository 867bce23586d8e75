"""Running as a systemd service: notify protocol, watchdog, drain on SIGTERM, journal fields."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import time
from pathlib import Path

import structlog
from pymongo import AsyncMongoClient

from cosmigrate.logs import configure_logging, get_logger
from cosmigrate.sandbox import Sandbox
from tests.helpers import Workload, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import NAMESPACES, Child, _check_all


async def test_notify_ready_status_watchdog_and_clean_drain(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_age_s=5.0)
    cfg.daemon.status_interval_s = 0.3
    cfg.daemon.drain_timeout_s = 10.0
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    messages: list[str] = []
    loop = asyncio.get_running_loop()

    async def collect() -> None:
        while True:
            messages.append((await loop.sock_recv(sock, 65536)).decode())

    collector = asyncio.create_task(collect())
    workload = Workload(source, NAMESPACES, keys_per_ns=200, seed=12)
    stop = asyncio.Event()
    writer = asyncio.create_task(workload.run(10**9, stop, pace_s=0.001))
    child = await Child.start(config, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    try:
        await wait_for(lambda: _has(messages, "READY=1"), 60, what="READY=1")
        await wait_for(lambda: _count(messages, "WATCHDOG=1", 4), 30, what="watchdog pings")
        await wait_for(lambda: _count(messages, "STATUS=writer", 2), 30, what="STATUS= lines")
        status_line = next(m for m in messages if m.startswith("STATUS=writer"))
        assert "gap" in status_line and "namespaces" in status_line
        # Batches are cut only every 5 s here: SIGTERM arrives with open, uncommitted events.
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        code = await child.finish(limit_s=cfg.daemon.drain_timeout_s + 10)
        took = time.monotonic() - t0
    finally:
        stop.set()
        await writer
        collector.cancel()
        sock.close()
    assert code == 0, child.stderr[-5:]
    assert took < cfg.daemon.drain_timeout_s + 5
    assert any("STOPPING=1" in m for m in messages)
    assert any(e.get("event") == "cosmigrate stopped" for e in child.events())
    # Nothing lost: the next start resumes exactly where the drain left off.
    final = await Child.start(config)
    try:
        await wait_for(lambda: _check_all(cfg, source), 60, what="resume after the drain")
    finally:
        assert await final.finish(signal.SIGTERM) == 0


async def _has(messages: list[str], needle: str) -> bool:
    return any(needle in m for m in messages)


async def _count(messages: list[str], needle: str, n: int) -> bool:
    return sum(needle in m for m in messages) >= n


def _parse_journal(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(datagram):
        end = datagram.index(b"\n", pos)
        line = datagram[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            pos = end + 1
        else:
            (size,) = struct.unpack_from("<Q", datagram, end + 1)
            start = end + 9
            fields[line.decode()] = datagram[start : start + size].decode()
            pos = start + size + 1
    return fields


def test_journal_native_fields(tmp_path: Path, monkeypatch) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "journal.sock")
    journal.bind(path)
    journal.settimeout(5)
    stdout = open(tmp_path / "stdout", "w")  # noqa: SIM115 - stands in for the journal's stdout stream
    monkeypatch.setattr("sys.stdout", stdout)
    st = os.fstat(stdout.fileno())
    try:
        configure_logging("info", "auto", env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
                                               "COSMIGRATE_JOURNAL_SOCKET": path})
        log = get_logger(namespace="sales.orders")
        log.info("batch committed", seq=42, events=17)
        log.error("source refused", error="mongodb://user:hunter2@cosmos:10255/ said\nno")
        first = _parse_journal(journal.recv(65536))
        second = _parse_journal(journal.recv(65536))
    finally:
        structlog.reset_defaults()
        journal.close()
        stdout.close()
    assert first["MESSAGE"] == "batch committed"
    assert first["PRIORITY"] == "6" and first["SYSLOG_IDENTIFIER"] == "cosmigrate"
    assert first["COSMIGRATE_NAMESPACE"] == "sales.orders"
    assert first["COSMIGRATE_SEQ"] == "42" and first["COSMIGRATE_EVENTS"] == "17"
    assert second["PRIORITY"] == "3"
    assert second["COSMIGRATE_ERROR"] == "mongodb://user:***@cosmos:10255/ said\nno"  # redacted, binary-safe
    assert (tmp_path / "stdout").read_text() == ""  # records went to the journal, not stdout


def test_without_journal_stream_logs_are_json_lines(monkeypatch) -> None:
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    try:
        configure_logging("info", "json", env={})
        get_logger(namespace="a.b").info("hello", password_uri="mongodb://u:pw@h/")
    finally:
        structlog.reset_defaults()
    import json

    record = json.loads(buf.getvalue())
    assert record["event"] == "hello" and record["namespace"] == "a.b" and "pw@" not in buf.getvalue()


async def test_sighup_reloads_patterns_and_refuses_a_broken_file(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    from cosmigrate.daemon import Daemon

    for ns in ("app.a", "app.b", "shop.c"):
        db, _, coll = ns.partition(".")
        await source[db][coll].insert_one({"_id": 1})
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.capture.include = ["app.*"]
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    daemon = Daemon(cfg, env={}, config_path=str(config))
    task = asyncio.create_task(daemon.serve())
    try:
        await wait_for(lambda: _is(set(daemon.units), {"app.a", "app.b"}), 30, what="initial namespaces")
        config.write_text(config.read_text().replace('include = ["app.*"]', 'include = ["app.*", "shop.*"]')
                          .replace("exclude = []", 'exclude = ["app.b"]').replace('level = "info"', 'level = "debug"'))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: _is(set(daemon.units), {"app.a", "shop.c"}), 30, what="reloaded namespaces")
        assert daemon.cfg.log.level == "debug"
        config.write_text("this is not toml [[[")
        os.kill(os.getpid(), signal.SIGHUP)  # refused: the daemon keeps running with what it has
        await source.shop.c.insert_one({"_id": 2})
        await wait_for(lambda: _is(daemon.units["shop.c"].capture.status.committed_events >= 2, True), 30, what="still capturing")
        assert set(daemon.units) == {"app.a", "shop.c"}
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)
        structlog.reset_defaults()


async def _is(a, b) -> bool:
    return a == b
