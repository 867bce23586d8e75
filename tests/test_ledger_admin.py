"""`cosmigrate ledger reset NAMESPACE` and `ledger drop-cluster` on both ledgers (SQLite, DynamoDB on moto):
refused while a daemon holds the items, confirmed (or --yes), journaled, and a reset namespace copied again
by the next start."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aioboto3
import pytest
from pymongo import AsyncMongoClient

from cosmigrate.ledger import open_ledger
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, wait_for, write_config
from tests.test_apply import Running


async def _cli(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "ledger", *args, "--config", str(config),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _items(cfg, ns: str) -> tuple[int, int, int]:
    """(metas, batches, progress items) the ledger holds for `ns`."""
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.get_namespace(ns)
        progress = sum([len(await ledger.list_progress(ns, kind)) for kind in ("backfill", "verify", "deletes")])
        return int(meta is not None), len(await ledger.list_batches(ns)), progress
    finally:
        await ledger.close()


async def _age_the_owners(cfg) -> None:
    """What time does for a daemon gone from another host: its last ledger update is long past."""
    if not cfg.ledger.url.startswith("dynamodb://"):
        return
    table = cfg.ledger.url.removeprefix("dynamodb://")
    async with aioboto3.Session().client("dynamodb", endpoint_url=cfg.aws.endpoint_url, region_name="us-east-1") as db:
        found = await db.query(TableName=table, KeyConditionExpression="pk = :pk AND begins_with(sk, :ns)",
                               ExpressionAttributeValues={":pk": {"S": cfg.cluster_name}, ":ns": {"S": "ns#"}})
        for item in found["Items"]:
            await db.update_item(TableName=table, Key={"pk": item["pk"], "sk": item["sk"]},
                                 UpdateExpression="SET updated_at = :old", ExpressionAttributeValues={":old": {"N": "1"}})


@pytest.mark.parametrize("backend", ["file+sqlite", "s3+dynamodb"])
async def test_ledger_reset_and_drop_cluster_refuse_while_held_confirm_journal_and_the_next_start_copies_again(
        backend: str, tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient, moto_endpoint: str) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, backend, aws_endpoint=moto_endpoint)
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await source.app.d.insert_many([{"_id": i} for i in range(50)])
    await source.app.keep.insert_one({"_id": 1})

    async with Running(cfg) as run:
        async def captured() -> bool:
            return all([(await _items(cfg, ns))[1] > 0 for ns in ("app.d", "app.keep")])

        await wait_for(captured, 60, what="both namespaces captured")
        code, _, err = await _cli(config, "reset", "app.d", "--yes")
        assert code == 1 and "refusing" in err and "stop it first" in err, err
        code, _, err = await _cli(config, "drop-cluster", "--yes")
        assert code == 1 and "refusing" in err, err
        assert (await _items(cfg, "app.d"))[:2] != (0, 0), "nothing removed while held"
        assert run.daemon.units

    if backend == "s3+dynamodb":  # no lock on this host: the owner's recent update is what holds it
        code, _, err = await _cli(config, "reset", "app.d", "--yes")
        assert code == 1 and "a daemon may still hold it" in err, err
        await _age_the_owners(cfg)
    code, _, err = await _cli(config, "reset", "app.d")  # no terminal, no --yes: nothing happens
    assert code == 1 and "not confirmed" in err and "copies it again from the beginning" in err, err
    assert (await _items(cfg, "app.d"))[0] == 1
    code, out, err = await _cli(config, "reset", "app.d", "--yes")
    assert code == 0, err
    assert "removed 1 namespace meta" in out, out
    journal = [json.loads(line) for line in (out + err).splitlines() if line.startswith("{")]
    assert any(e.get("event") == "ledger namespace reset" and e.get("namespace") == "app.d" and e.get("by")
               for e in journal), out + err
    assert await _items(cfg, "app.d") == (0, 0, 0)
    assert (await _items(cfg, "app.keep"))[0] == 1, "the other namespace is untouched"
    code, _, err = await _cli(config, "reset", "app.d", "--yes")
    assert code == 1 and "no items" in err, err

    async with Running(cfg):  # the next start copies the reset namespace again, from the beginning
        async def copied_again() -> bool:
            ledger = open_ledger(cfg)
            try:
                meta = await ledger.get_namespace("app.d")
                return meta is not None and meta.captured_events >= 50
            finally:
                await ledger.close()

        await wait_for(copied_again, 60, what="app.d copied again")

    await _age_the_owners(cfg)
    code, out, err = await _cli(config, "drop-cluster", "--yes")
    assert code == 0, err
    assert "ledger cluster dropped" in out + err
    ledger = open_ledger(cfg)
    try:
        assert await ledger.list_namespaces() == []
        assert (await ledger.get_control()).writer == "stopped"
        assert await ledger.list_batches("app.keep") == []
    finally:
        await ledger.close()
