"""Set-up mistakes that used to end in a traceback: now one line on stderr and exit 2 (config) or 1 (dependency).

Every case runs the real CLI in a subprocess; where the mistake is only
reached after connecting (the CA file, the socket directory) the daemon runs
against the sandbox with a prepared ledger, as an operator's would.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cosmigrate.config import Config
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, write_config

COSMOS_KEY = "Zm9vYmFy/c2VjcmV0+a2V5Cg8q=="  # the shape of a Cosmos account key: base64 with / + =


def cli(*args: str, env: dict[str, str] | None = None, **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosmigrate", *args], capture_output=True, text=True, timeout=120,
                          env=env if env is not None else child_env(), **popen)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *words: str, secrets: tuple[str, ...] = ()) -> str:
    """Exit `code`, exactly one line on stderr holding `words`, no traceback, no secret anywhere."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == code, (result.returncode, output[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    for secret in secrets:
        assert secret not in output, f"{secret!r} leaked: {output[-3000:]}"
    return lines[0]


def _config(tmp_path: Path, sandbox: Sandbox | None = None) -> Config:
    """A valid file+sqlite config: on the sandbox when given, else on ports where nothing listens."""
    if sandbox is not None:
        return make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    return make_config(tmp_path, "mongodb://127.0.0.1:9/", "mongodb://127.0.0.1:9/?retryWrites=false", "file+sqlite")


async def _run_and_preflight(config: Path, env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    return list(await asyncio.gather(asyncio.to_thread(cli, "run", "--config", str(config), env=env),
                                     asyncio.to_thread(cli, "preflight", "--config", str(config), env=env)))


async def test_a_cosmos_key_with_slash_plus_equals_must_be_percent_encoded(tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = _config(tmp_path, sandbox)
    await prepare_backends(cfg)  # today's `run` got past the ledger and died in the driver's URI parser
    cfg.source.uri = f"mongodb://cosmos-acct:{COSMOS_KEY}@cosmos-acct.mongo.cosmos.azure.com:10255/?ssl=true"
    for result in await _run_and_preflight(write_config(cfg, tmp_path / "c.toml")):
        assert_one_line(result, 2, "source.uri", "percent-encoded", "quote_plus",
                        secrets=(COSMOS_KEY, "Zm9vYmFy", "c2VjcmV0", "a2V5Cg8q"))


async def test_a_missing_tls_ca_file(tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = _config(tmp_path, sandbox)
    await prepare_backends(cfg)
    cfg.target.tls_ca_file = str(tmp_path / "global-bundle.pem")
    for result in await _run_and_preflight(write_config(cfg, tmp_path / "c.toml")):
        assert_one_line(result, 2, "target.tls_ca_file", "does not exist", "global-bundle.pem")
    (tmp_path / "global-bundle.pem").write_text("not a certificate\n")
    for result in await _run_and_preflight(write_config(cfg, tmp_path / "c.toml")):
        assert_one_line(result, 2, "target.tls_ca_file", "no PEM certificate")
    # The same file named in the URI instead: the driver loaded it while building the client.
    cfg.target.tls_ca_file = ""
    cfg.target.uri += f"&tls=true&tlsCAFile={tmp_path / 'global-bundle.pem'}"
    for result in await _run_and_preflight(write_config(cfg, tmp_path / "c.toml")):
        assert_one_line(result, 2, "target.uri tlsCAFile", "no PEM certificate")


async def test_a_dynamodb_ledger_without_a_region(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.ledger.url = "dynamodb://cosmigrate-ledger"
    config = write_config(cfg, tmp_path / "c.toml")
    env = {k: v for k, v in child_env().items() if k not in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")}
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
    for result in await _run_and_preflight(config, env):
        assert_one_line(result, 2, "aws.region", "AWS_REGION")
    # AWS_REGION is honoured (botocore alone ignores it): the same config now loads.
    env["AWS_REGION"] = "eu-west-1"
    result = await asyncio.to_thread(cli, "ctl", "--config", str(config), "status", env=env)
    assert_one_line(result, 1, "no cosmigrate daemon is running")


def _without_privileges() -> list[str]:
    """A command prefix under which mode bits apply: root keeps its uid but drops every capability."""
    if os.getuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux's setpriv is not installed: cannot drop privileges")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # a socket file nobody listens on, as a crashed daemon leaves behind


@pytest.mark.parametrize("case", ["unsearchable", "read-only with a stale socket", "uncreatable"])
async def test_a_socket_directory_that_cannot_be_written(case: str, tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = _config(tmp_path, sandbox)
    await prepare_backends(cfg)
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    cfg.control.socket = str(sockets / ("missing/control.sock" if case == "uncreatable" else "control.sock"))
    if case == "read-only with a stale socket":
        _stale_socket(sockets / "control.sock")
    config = write_config(cfg, tmp_path / "c.toml")
    os.chmod(sockets, 0 if case == "unsearchable" else stat.S_IRUSR | stat.S_IXUSR)
    try:
        result = await asyncio.to_thread(
            subprocess.run, [*_without_privileges(), sys.executable, "-m", "cosmigrate", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=120, env=child_env())
    finally:
        os.chmod(sockets, 0o700)
    line = assert_one_line(result, 1, str(sockets))
    assert {"unsearchable": "write and search access", "read-only with a stale socket": "cannot remove the stale",
            "uncreatable": "cannot create it"}[case] in line


async def test_run_with_a_wrong_source_uri_says_so_in_seconds_in_one_line_with_preflights_advice(
        tmp_path: Path, sandbox: Sandbox) -> None:
    import time

    cfg = _config(tmp_path, sandbox)
    await prepare_backends(cfg)
    cfg.source.uri = "mongodb://u:pw-not-shown@127.0.0.1:9/?ssl=false&replicaSet=globaldb&retrywrites=false"
    config = write_config(cfg, tmp_path / "c.toml")
    began = time.monotonic()
    result = await asyncio.to_thread(cli, "run", "--config", str(config))
    took = time.monotonic() - began
    line = assert_one_line(result, 1, "source", "did not answer", "nothing listens there", secrets=("pw-not-shown",))
    assert "Topology Description" not in line and "configured timeouts" not in line, line
    assert took < 15, f"{took:.0f}s before the first contact failed (the selection timeout is 15 s)"
    preflight = await asyncio.to_thread(cli, "preflight", "--config", str(config))
    advice = line.split(" -> ", 1)[1]
    assert advice in preflight.stdout, preflight.stdout
