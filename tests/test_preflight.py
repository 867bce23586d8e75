"""`cosmigrate preflight` against the sandbox and moto: passes when all is well, names what is wrong."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.preflight import unsupported_index
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, write_config


async def _preflight(config: Path) -> tuple[int, list[str]]:
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cosmigrate", "preflight", "--config", str(config)],
        capture_output=True, text=True, timeout=120, env=child_env(),
    )
    assert "Traceback" not in result.stderr
    return result.returncode, result.stdout.splitlines()


@pytest.fixture
async def ready(tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, moto_endpoint: str):
    await source.app.users.create_index("email", unique=True)  # Cosmos: unique indexes only on an empty collection
    await source.app.users.insert_many([{"_id": i, "email": f"u{i}@x"} for i in range(3)])
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "s3+dynamodb", moto_endpoint)
    await prepare_backends(cfg)
    return cfg


async def test_preflight_passes_on_a_good_setup(tmp_path: Path, ready) -> None:
    code, lines = await _preflight(write_config(ready, tmp_path / "c.toml"))
    assert code == 0, lines
    assert all(line.startswith("ok") for line in lines[:-1]), lines
    assert any("source namespaces: 1 to migrate: app.users (3 docs)" in line for line in lines)
    assert lines[-1].endswith("0 failed")


async def _expect_fail(config: Path, check: str, fix_words: str) -> None:
    code, lines = await _preflight(config)
    assert code == 1
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1, lines
    assert failed[0].startswith(f"FAIL  {check}:") and fix_words in failed[0], failed[0]


async def test_source_refusing_the_pipeline(tmp_path: Path, ready, sandbox: Sandbox) -> None:
    sandbox.source.faults.refuse_change_streams = True
    await _expect_fail(write_config(ready, tmp_path / "c.toml"), "source change stream", "change streams")


async def test_target_without_retry_writes_false(tmp_path: Path, ready) -> None:
    ready.target.uri = ready.target.uri.replace("&retryWrites=false", "")
    await _expect_fail(write_config(ready, tmp_path / "c.toml"), "target retryWrites=false", "add retryWrites=false")


async def test_missing_bucket(tmp_path: Path, ready) -> None:
    ready.store.url = "s3://no-such-bucket-here/prefix"
    await _expect_fail(write_config(ready, tmp_path / "c.toml"), "batch store", "create the bucket")


async def test_missing_table(tmp_path: Path, ready) -> None:
    ready.ledger.url = "dynamodb://no-such-table"
    await _expect_fail(write_config(ready, tmp_path / "c.toml"), "ledger", "ledger init")


async def test_unsupported_source_indexes_are_named(tmp_path: Path, ready, source: AsyncMongoClient) -> None:
    await source.app.users.create_index([("attrs.$**", 1)])  # Cosmos has wildcard indexes, DocumentDB does not
    await _expect_fail(write_config(ready, tmp_path / "c.toml"), "target index compatibility", "wildcard")


def test_index_rules() -> None:
    assert unsupported_index({"key": {"h": "hashed"}}, 8) == "hashed index"
    assert unsupported_index({"key": {"a.$**": 1}}, 8) == "wildcard index"
    assert unsupported_index({"key": {"t": "text"}}, 4) and not unsupported_index({"key": {"t": "text"}}, 5)
    assert unsupported_index({"key": {"a": 1}, "collation": {"locale": "fr"}}, 5)
    assert unsupported_index({"key": {"a": 1}, "unique": True}, 4) is None


async def test_an_unreachable_source_skips_what_depends_on_it_in_one_readable_line(tmp_path: Path, ready) -> None:
    ready.source.uri = "mongodb://u:secret-pw@127.0.0.1:1/?ssl=false&replicaSet=globaldb&retrywrites=false"
    code, lines = await _preflight(write_config(ready, tmp_path / "c.toml"))
    assert code == 1, lines
    failed = [line for line in lines if line.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL  source reachable:"), lines
    assert "Topology Description" not in failed[0] and "configured timeouts" not in failed[0], failed[0]
    assert "nothing listens there" in failed[0] and "secret-pw" not in "\n".join(lines), failed[0]
    for check in ("source namespaces", "source change stream", "target index compatibility",
                  "unique indexes under DocumentDB semantics", "source TTL"):
        assert f"SKIP  {check}: (source unreachable)" in lines, (check, lines)
    assert not any(line.startswith("ok") and ("index" in line or "TTL" in line) for line in lines), lines
    assert lines[-1].endswith("1 failed, 5 skipped"), lines[-1]


async def test_a_certificate_failure_is_not_called_tls_verified_and_advice_is_given_once(tmp_path: Path, ready) -> None:
    import certifi

    ready.target.tls_ca_file = certifi.where()  # public CAs: the sandbox's own certificate does not verify
    ready.source.uri = "mongodb://127.0.0.1:1/?ssl=false&replicaSet=globaldb&retrywrites=false"
    code, lines = await _preflight(write_config(ready, tmp_path / "c.toml"))
    assert code == 1, lines
    tls = next(line for line in lines if "target TLS:" in line)
    assert tls.startswith("FAIL") and "not verified" in tls and "verified against" not in tls, lines
    reached = next(line for line in lines if "target reachable:" in line)
    assert reached.startswith("FAIL") and "Topology Description" not in reached, reached
    assert "SKIP  target write permission: (target unreachable)" in lines, lines
    advice = [line.split(" -> ", 1)[1] for line in lines if " -> " in line]
    assert len(advice) == len(set(advice)), lines


async def test_a_migration_already_running_on_the_ledger_is_noticed(tmp_path: Path, sandbox: Sandbox,
                                                                    source: AsyncMongoClient) -> None:
    from tests.test_apply import Running, config

    cfg = config(tmp_path, sandbox)
    await source.app.d.insert_one({"_id": 1})
    async with Running(cfg):
        code, lines = await _preflight(write_config(cfg, tmp_path / "c.toml"))
    assert code == 1, lines
    line = next(line for line in lines if "no migration running" in line)
    assert line.startswith("FAIL") and "another cosmigrate daemon already runs cluster test" in line, lines
