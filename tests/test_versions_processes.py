"""`cosmigrate run` and `cosmigrate preflight` as processes against a server version cosmigrate refuses:
one line naming the version found, the oldest supported and what to do; never a driver traceback. And the oldest
supported one (Cosmos DB 4.2, wire 8) migrated by a real process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, write_config


async def _cosmigrate(*args: str) -> subprocess.CompletedProcess[str]:
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cosmigrate", *args],
                                     capture_output=True, text=True, timeout=120, env=child_env())
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


async def _config(tmp_path: Path, sb: Sandbox) -> Path:
    cfg = make_config(tmp_path, sb.source_uri, sb.target_uri, "file+sqlite")
    await prepare_backends(cfg)
    return write_config(cfg, tmp_path / "c.toml")


CASES = [  # (source version, target version, role refused, version named, oldest supported named, what to do)
    ("3.6", "5.0", "source", "3.6", "4.2", "upgrade the account's server version in the Azure portal"),
    ("4.0", "8.0", "source", "4.0", "4.2", "upgrade the account's server version in the Azure portal"),
    ("7.0", "4.0", "target", "4.0", "5.0", "deploy/cloudformation/documentdb.yaml"),
]


@pytest.mark.parametrize(("source", "target", "role", "found", "oldest", "todo"), CASES)
async def test_run_exits_2_with_one_line(tmp_path: Path, source: str, target: str, role: str, found: str,
                                         oldest: str, todo: str) -> None:
    async with Sandbox(source_version=source, target_version=target) as sb:
        result = await _cosmigrate("run", "--config", str(await _config(tmp_path, sb)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"cosmigrate: error: {role}: ")
    assert f" {found} (wire version" in line and f"the oldest supported is {oldest} " in line and todo in line
    assert "PyMongo requires" not in line  # our words, not the driver's


@pytest.mark.parametrize(("source", "target", "role", "found", "oldest", "todo"), CASES)
async def test_preflight_fails_on_one_line(tmp_path: Path, source: str, target: str, role: str, found: str,
                                           oldest: str, todo: str) -> None:
    async with Sandbox(source_version=source, target_version=target) as sb:
        await _seed(sb)
        result = await _cosmigrate("preflight", "--config", str(await _config(tmp_path, sb)))
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, result.stdout
    assert failed[0].startswith(f"FAIL  {role} server version: ")
    assert f" {found} (wire version" in failed[0] and f"the oldest supported is {oldest} " in failed[0]
    assert todo in failed[0].split(" -> ", 1)[1]


async def _seed(sb: Sandbox) -> None:
    """One collection on the source, written without the driver (which may refuse the server)."""
    from cosmigrate.versions import command

    await command(sb.source.host, sb.source.port,
                  [{"isMaster": 1}, {"insert": "users", "documents": [{"_id": 1}], "$db": "app"}])


async def test_preflight_names_the_supported_version(tmp_path: Path) -> None:
    async with Sandbox(source_version="4.2", target_version="8.0") as sb:
        await _seed(sb)
        result = await _cosmigrate("preflight", "--config", str(await _config(tmp_path, sb)))
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok    source reachable: server version 4.2.0") for line in lines), lines
    assert any(line.startswith("ok    target reachable: server version 8.0.0") for line in lines), lines


async def test_run_migrates_cosmos_42_odd_documents_as_a_process(tmp_path: Path) -> None:
    # End to end with a real `cosmigrate run` on the oldest supported source: the wire-8 shim is active in the
    # daemon process, and the odd documents arrive byte for byte.
    import signal

    from bson.raw_bson import RawBSONDocument
    from pymongo import AsyncMongoClient

    from cosmigrate.mongo import RAW, source_client
    from tests.helpers import assert_converged, wait_for
    from tests.test_capture_processes import Child
    from tests.test_e2e_processes import _ctl_ready, ctl
    from tests.test_odd_bson_roundtrip import NS, ODD

    async with Sandbox(source_version="4.2", target_version="5.0") as sb:
        source = source_client(sb.source_uri, serverSelectionTimeoutMS=5000)
        target: AsyncMongoClient = AsyncMongoClient(sb.target_uri, serverSelectionTimeoutMS=5000,
                                                    tlsCAFile=sb.target_ca_file)
        try:
            await source.app.get_collection("odd", codec_options=RAW).insert_many(
                [RawBSONDocument(raw, RAW) for raw in ODD.values()])
            config = await _config(tmp_path, sb)
            child = await Child.start(config)
            try:
                await wait_for(lambda: _ctl_ready(config), 60, what="the daemon's control socket")
                assert (await ctl(config, "writer", "start")).strip() == "writer started"
                await wait_for(lambda: assert_converged(source, target, [NS]), 90, what="odd documents applied")
            finally:
                code = await child.finish(signal.SIGTERM)
            assert code == 0, "\n".join(child.stderr[-20:])
            assert not any("Traceback" in line for line in child.stdout + child.stderr)
        finally:
            await source.close()
            await target.close()
