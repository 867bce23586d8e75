"""TLS to the target: required and verified unless explicitly allowed, read from the driver's parsed options."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from pymongo import AsyncMongoClient
from pymongo.errors import ServerSelectionTimeoutError

from cosmigrate.config import Config, ConfigError, validate
from cosmigrate.logs import configure_logging
from cosmigrate.sandbox import Sandbox
from cosmigrate.tls import connection_tls
from tests.helpers import child_env, make_config, prepare_backends, wait_for, write_config

SECRET = "Qs3cretPassw0rd"
SECURE = [
    ("mongodb://u:{pw}@docdb.example:27017/?tls=true&replicaSet=rs0", ""),
    ("mongodb://u:{pw}@docdb.example:27017/?TLS=true", ""),  # option names are case-insensitive
    ("mongodb://u:{pw}@docdb.example:27017/?ssl=true", ""),
    ("mongodb://u:{pw}@docdb.example:27017/", "{ca}"),  # target.tls_ca_file implies TLS (the driver's rule)
    ("mongodb://u:{pw}@docdb.example:27017/?tlsCAFile={ca}", ""),
    ("mongodb+srv://u:{pw}@docdb.example/?replicaSet=rs0", ""),  # +srv implies TLS
]
INSECURE = [
    ("mongodb://u:{pw}@docdb.example:27017/?replicaSet=rs0", "", "TLS is off"),
    ("mongodb://u:{pw}@docdb.example:27017/?tls=false", "", "TLS is off (tls=false)"),
    # Values are not: the driver drops "True" with a warning and connects in clear. A substring test said TLS.
    ("mongodb://u:{pw}@docdb.example:27017/?tls=True", "", "TLS is off"),
    ("mongodb+srv://u:{pw}@docdb.example/?ssl=false", "", "TLS is off (tls=false)"),
    ("mongodb://u:{pw}@docdb.example:27017/?tls=true&tlsInsecure=true", "", "(tlsInsecure=true)"),
    ("mongodb://u:{pw}@docdb.example:27017/?tls=true&tlsAllowInvalidCertificates=true", "",
     "(tlsAllowInvalidCertificates=true)"),
    ("mongodb://u:{pw}@docdb.example:27017/?tlsCAFile={ca}&tlsAllowInvalidHostnames=true", "",
     "(tlsAllowInvalidHostnames=true)"),
    ("mongodb://u:{pw}@docdb.example:27017/?TLSINSECURE=true", "{ca}", "(TLSINSECURE=true)"),
]


def _config(uri: str, ca: str) -> Config:
    cfg = Config(cluster_name="c")
    cfg.source.uri = "mongodb://cosmos.example:10255/?ssl=true"
    cfg.target.uri = uri
    cfg.target.tls_ca_file = ca
    return cfg


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "bundle.pem"
    path.write_text("not read by the config check\n")
    return str(path)


@pytest.mark.parametrize("uri,ca", SECURE)
def test_tls_with_verification_is_accepted(uri: str, ca: str, ca_file: str) -> None:
    uri, ca = uri.format(pw=SECRET, ca=ca_file), ca.format(ca=ca_file)
    assert connection_tls(uri, ca).secure
    validate(_config(uri, ca))


@pytest.mark.parametrize("uri,ca,problem", INSECURE)
def test_no_tls_or_no_verification_is_refused_unless_allowed(uri: str, ca: str, problem: str, ca_file: str) -> None:
    uri, ca = uri.format(pw=SECRET, ca=ca_file), ca.format(ca=ca_file)
    with pytest.raises(ConfigError) as caught:
        validate(_config(uri, ca))
    message = str(caught.value)
    assert message.startswith("target.uri: ") and problem in message and "allow_insecure_tls" in message, message
    assert SECRET not in message and "docdb.example" not in message  # options only, never the string
    allowed = _config(uri, ca)
    allowed.target.allow_insecure_tls = True
    validate(allowed)


async def test_the_sandbox_target_serves_tls_with_its_own_ca(sandbox: Sandbox) -> None:
    assert "tls=true" in sandbox.target_uri and await asyncio.to_thread(os.path.isfile, sandbox.target_ca_file)
    good: AsyncMongoClient = AsyncMongoClient(sandbox.target_uri, tlsCAFile=sandbox.target_ca_file,
                                              serverSelectionTimeoutMS=5000)
    assert (await good.admin.command("ping"))["ok"] == 1
    await good.close()
    # The system's CAs do not know the sandbox's CA; and a plain connection is not answered.
    for uri in (sandbox.target_uri, sandbox.target_uri.replace("&tls=true", "")):
        bad: AsyncMongoClient = AsyncMongoClient(uri, serverSelectionTimeoutMS=1500)
        with pytest.raises(ServerSelectionTimeoutError):
            await bad.admin.command("ping")
        await bad.close()


async def _preflight(config: Path) -> tuple[int, list[str], str]:
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cosmigrate", "preflight", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=child_env())
    assert "Traceback" not in result.stdout + result.stderr
    return result.returncode, result.stdout.splitlines(), result.stderr


def _line(lines: list[str], check: str) -> str:
    return next(line for line in lines if line[6:].startswith(f"{check}:"))


async def test_preflight_reads_tls_from_the_parsed_options(tmp_path: Path, sandbox: Sandbox, source) -> None:
    await source.app.users.insert_one({"_id": 1})
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    # The CA in the connection string (tlsCAFile, no tls=true) rather than target.tls_ca_file: still TLS.
    cfg.target.uri = sandbox.target_uri.replace("&tls=true", f"&tlsCAFile={cfg.target.tls_ca_file}")
    cfg.target.tls_ca_file = ""
    code, lines, _ = await _preflight(write_config(cfg, tmp_path / "c.toml"))
    assert code == 0, lines
    assert "over TLS, certificate verified" in _line(lines, "target reachable")
    assert _line(lines, "target TLS").startswith("ok") and sandbox.target_ca_file in _line(lines, "target TLS")
    # Verification off: refused at load (exit 2, one line); allowed, preflight still names it and fails.
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.target.uri += "&tlsInsecure=true"
    code, lines, err = await _preflight(write_config(cfg, tmp_path / "c.toml"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "tlsInsecure=true" in err, err
    cfg.target.allow_insecure_tls = True
    code, lines, _ = await _preflight(write_config(cfg, tmp_path / "c.toml"))
    assert code == 1, lines
    assert _line(lines, "target TLS").startswith("FAIL") and "tlsInsecure=true" in _line(lines, "target TLS")
    assert "certificate verification is off" in _line(lines, "target reachable")
    assert all(line.startswith("ok") for line in lines[:-1] if "target TLS" not in line), lines


async def test_an_allowed_plain_target_is_shown_in_status_and_warned_about(tmp_path: Path) -> None:
    from cosmigrate.daemon import Daemon
    from cosmigrate.status import build_status, one_line

    saved = structlog.get_config()
    configure_logging("info", "json", env={})
    out = io.StringIO()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=out))
    try:
        async with Sandbox(target_tls=False) as plain:
            cfg = make_config(tmp_path, plain.source_uri, plain.target_uri, "file+sqlite")
            assert cfg.target.allow_insecure_tls  # (make_config opts out only for a target without TLS)
            await prepare_backends(cfg)
            daemon = Daemon(cfg)
            task = asyncio.create_task(daemon.serve())

            async def up() -> bool:
                return daemon.control is not None

            await wait_for(up, 30, what="daemon up")
            status = await build_status(daemon.worker)
            daemon.request_stop()
            assert await asyncio.wait_for(task, 60) == 0
    finally:
        structlog.configure(**saved)
    assert status["insecure_target_tls"] is True and "TARGET TLS OFF" in one_line(status)
    warnings = [json.loads(line) for line in out.getvalue().splitlines() if "allow_insecure_tls" in line]
    assert warnings and warnings[0]["level"] == "warning" and "TLS is off" in warnings[0]["problem"], warnings


async def test_status_says_false_for_a_verified_target(tmp_path: Path, sandbox: Sandbox) -> None:
    from tests.test_apply import Running, config

    async with Running(config(tmp_path, sandbox)) as run:
        assert (await run.status())["insecure_target_tls"] is False
