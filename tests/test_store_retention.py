"""Only applied batches may expire: store marking, the applier's use of it, a lost batch, and the bucket's rules.

Both backends: a directory + SQLite, and S3 + DynamoDB on a moto server over HTTP.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pymongo import AsyncMongoClient

from cosmigrate.clock import Wall
from cosmigrate.config import Config
from cosmigrate.mongo import target_client
from cosmigrate.sandbox import Sandbox
from cosmigrate.stores import APPLIED_TAG_KEY, APPLIED_TAG_VALUE, ObjectMissing, open_store
from cosmigrate.stores.local import LocalStore
from tests.applyharness import Harness, event
from tests.helpers import make_config, prepare_backends, wait_for

BACKENDS = ["file+sqlite", "s3+dynamodb"]
NS = "app.c"
TEMPLATE = Path(__file__).parent.parent / "deploy" / "cloudformation" / "core-resources.yaml"


def _config(request: pytest.FixtureRequest, tmp_path: Path, source_uri: str, target_uri: str) -> Config:
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3+dynamodb" else None
    return make_config(tmp_path, source_uri, target_uri, request.param, endpoint)


def _bucket(cfg: Config) -> str:
    return cfg.store.url.removeprefix("s3://").split("/")[0]


async def _s3(cfg: Config, method: str, **kwargs: Any) -> Any:
    import aioboto3

    async with aioboto3.Session().client("s3", endpoint_url=cfg.aws.endpoint_url, region_name="us-east-1") as s3:
        return await getattr(s3, method)(Bucket=_bucket(cfg), **kwargs)


async def _marked(cfg: Config, key: str) -> bool:
    """Whether the store lets `key` expire: its S3 tag, or the directory store's marker."""
    if cfg.store.url.startswith("s3://"):
        tags = (await _s3(cfg, "get_object_tagging", Key=key))["TagSet"]
        return {"Key": APPLIED_TAG_KEY, "Value": APPLIED_TAG_VALUE} in tags
    path = Path(cfg.store.url.removeprefix("file://")) / key
    return path.with_name(f".{path.name}.applied").exists()


async def _lose(cfg: Config, key: str) -> bytes:
    """Make an object disappear the way an expiry would (S3: a delete marker on a versioned bucket); return it."""
    store = open_store(cfg)
    try:
        data = await store.get(key)
        if cfg.store.url.startswith("s3://"):
            await _s3(cfg, "put_bucket_versioning", VersioningConfiguration={"Status": "Enabled"})
        await store.delete(key)
        return data
    finally:
        await store.close()


async def _restore(cfg: Config, key: str, data: bytes) -> None:
    """Do what the error message says: S3, delete the delete marker; a directory, put the file back."""
    if cfg.store.url.startswith("s3://"):
        versions = await _s3(cfg, "list_object_versions", Prefix=key)
        (marker,) = [m for m in versions.get("DeleteMarkers", []) if m["Key"] == key and m["IsLatest"]]
        await _s3(cfg, "delete_object", Key=key, VersionId=marker["VersionId"])
        return
    store = open_store(cfg)
    try:
        await store.put(key, data)
    finally:
        await store.close()


# --- the store verb -----------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
async def cfg(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    config = _config(request, tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2")
    await prepare_backends(config)
    return config


async def test_mark_applied_marks_only_that_object(cfg: Config) -> None:
    store = open_store(cfg)
    try:
        await store.put("p/a/000000000001-e1", b"applied")
        await store.put("p/a/000000000002-e1", b"not yet")
        await store.mark_applied("p/a/000000000001-e1")
        assert await _marked(cfg, "p/a/000000000001-e1")
        assert not await _marked(cfg, "p/a/000000000002-e1")
        assert await store.list("p/a/") == ["p/a/000000000001-e1", "p/a/000000000002-e1"]  # no marker files listed
        with pytest.raises(ObjectMissing):
            await store.mark_applied("p/a/000000000003-e1")
    finally:
        await store.close()


async def test_the_directory_store_deletes_applied_files_after_the_retention_only(tmp_path: Path) -> None:
    store = LocalStore("file://x", str(tmp_path), retention_hours=24)
    for name in ("applied-old", "applied-new", "unapplied-old"):
        await store.put(f"c/d/{name}", name.encode())
    await store.mark_applied("c/d/applied-old")
    await store.mark_applied("c/d/applied-new")
    day_ago = time.time() - 25 * 3600
    for name in (".applied-old.applied", "unapplied-old"):
        os.utime(tmp_path / "c" / "d" / name, (day_ago, day_ago))
    assert await store.sweep() == 1
    assert await store.list("c/") == ["c/d/applied-new", "c/d/unapplied-old"]
    assert sorted(p.name for p in (tmp_path / "c" / "d").iterdir()) == [".applied-new.applied", "applied-new", "unapplied-old"]
    assert await store.sweep(now=Wall.now() + 25 * 3600) == 1  # a day later the newer one goes too, never the unapplied
    assert await store.list("c/") == ["c/d/unapplied-old"]


def test_the_retention_comes_from_the_config_when_it_has_one(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "mongodb://h:1", "mongodb://h:2", "file+sqlite")
    store = open_store(cfg)
    assert isinstance(store, LocalStore) and store.retention_s == 24 * 3600
    cfg.store.retention_hours = 0.5  # type: ignore[attr-defined]  # a key of the config schema's owner
    store = open_store(cfg)
    assert isinstance(store, LocalStore) and store.retention_s == 1800


# --- the applier ----------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[Harness]:
    config = _config(request, tmp_path, sandbox.source_uri, sandbox.target_uri)
    await prepare_backends(config)
    client = target_client(sandbox.target_uri, sandbox.target_ca_file, serverSelectionTimeoutMS=5000)
    h = Harness(config, client)
    try:
        yield h
    finally:
        await h.close()
        await client.close()


async def _true(value: bool) -> bool:
    return value


async def test_applied_batches_are_marked_for_expiry_and_unapplied_ones_are_not(harness: Harness) -> None:
    epoch = await harness.claim(NS, "me")
    applied = await harness.commit(NS, epoch, [event(1, {"_id": 1})])
    app = harness.applier(NS, epoch)
    harness.start(app)
    await wait_for(lambda: _true(app.status.applied_seq == 0), 15, what="batch 0 applied")
    await wait_for(lambda: _marked(harness.cfg, applied.key), 10, what="batch 0 marked")
    assert not app._unreleased
    await app.gate.stop()
    pending = await harness.commit(NS, epoch, [event(2, {"_id": 2})])
    assert not await _marked(harness.cfg, pending.key)


async def test_a_lost_unapplied_batch_fails_the_namespace_and_says_how_to_restore_it(
    harness: Harness, target: AsyncMongoClient[Any],
) -> None:
    epoch = await harness.claim(NS, "me")
    await harness.commit(NS, epoch, [event(1, {"_id": 1})])
    lost = await harness.commit(NS, epoch, [event(2, {"_id": 2})])
    data = await _lose(harness.cfg, lost.key)
    app = harness.applier(NS, epoch)
    task = harness.start(app)
    await wait_for(lambda: _true(app.status.state == "failed"), 15, what="namespace failed")
    await asyncio.wait_for(task, 5)
    error = app.status.last_error
    assert f"batch 1 ({lost.key})" in error and "missing" in error and "never applied" in error
    assert ("list-object-versions" in error) == harness.cfg.store.url.startswith("s3://")
    assert "restart" in error
    assert await target.app.c.count_documents({}) == 0  # nothing from the round holding the gap was written
    # What the message says works: restore, start again, and the namespace catches up.
    await _restore(harness.cfg, lost.key, data)
    again = harness.applier(NS, epoch)
    harness.start(again)
    await wait_for(lambda: _true(again.status.applied_seq == 1), 15, what="applied after the restore")
    assert await target.app.c.count_documents({}) == 2


# --- the bucket -----------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags kept as {tag: value}."""


def _cfn(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.ScalarNode):
        return {suffix: loader.construct_scalar(node)}
    if isinstance(node, yaml.SequenceNode):
        return {suffix: loader.construct_sequence(node, deep=True)}
    return {suffix: loader.construct_mapping(node, deep=True)}  # type: ignore[arg-type]


_CfnLoader.add_multi_constructor("!", _cfn)


def test_the_bucket_expires_only_applied_batches_and_keeps_versions_to_restore_from() -> None:
    resources = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)["Resources"]
    bucket = resources["ChangeBatchBucket"]["Properties"]
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = bucket["LifecycleConfiguration"]["Rules"]
    expiring = [r for r in rules if "ExpirationInDays" in r or "ExpirationDate" in r]
    assert expiring, "applied batches must expire"
    for rule in expiring:  # current objects expire only once applied
        assert rule["TagFilters"] == [{"Key": APPLIED_TAG_KEY, "Value": APPLIED_TAG_VALUE}], rule
    assert any("NoncurrentVersionExpiration" in r and "TagFilters" not in r for r in rules)
    statements = [s for p in resources["InstanceRole"]["Properties"]["Policies"] if isinstance(p, dict) and "PolicyDocument" in p
                  for s in p["PolicyDocument"]["Statement"]]
    tagging = [s for s in statements if "s3:PutObjectTagging" in (s["Action"] if isinstance(s["Action"], list) else [s["Action"]])]
    assert len(tagging) == 1 and tagging[0]["Resource"] == {"Sub": "${ChangeBatchBucket.Arn}/${BatchPrefix}/${ClusterName}/*"}
