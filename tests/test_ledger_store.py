"""Ledger and batch-store semantics, on SQLite/local files and on DynamoDB/S3 (moto server over HTTP)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cosmigrate.ledger import BatchRecord, Fenced, LedgerError, SeqConflict, open_ledger
from cosmigrate.stores import ObjectMissing, StoreError, open_store
from tests.helpers import make_config, prepare_backends

BACKENDS = ["file+sqlite", "s3+dynamodb"]


@pytest.fixture(params=BACKENDS)
async def cfg(request, tmp_path: Path):
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3+dynamodb" else None
    config = make_config(tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2", request.param, endpoint)
    await prepare_backends(config)
    return config


def record(seq: int, checksum: str = "ab" * 16) -> BatchRecord:
    return BatchRecord(ns="db.c", seq=seq, key=f"k/{seq}", events=10, bytes=100, raw_bytes=200, checksum=checksum,
                       first_captured_at=time.time(), captured_at=time.time())


async def test_commit_requires_next_seq_and_epoch(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.claim("db.c", "me")
        assert (meta.epoch, meta.next_seq, meta.applied_seq, meta.resume_token) == (1, 0, -1, None)
        assert await ledger.set_start_token("db.c", 1, b"start")
        assert not await ledger.set_start_token("db.c", 1, b"other")  # only the first start position sticks
        assert await ledger.set_start_token("db.c", 1, b"start")  # a repeat of the call that set it: done
        await ledger.commit_batch("db.c", 1, record(0), b"t0")
        await ledger.commit_batch("db.c", 1, record(1), b"t1")
        with pytest.raises(SeqConflict):
            await ledger.commit_batch("db.c", 1, record(3), b"t3")
        with pytest.raises(SeqConflict):
            await ledger.commit_batch("db.c", 1, record(1, "cd" * 16), b"t1")
        await ledger.commit_batch("db.c", 1, record(1), b"t1")  # a repeat of a commit that went through: done
        meta = await ledger.get_namespace("db.c")
        assert meta is not None and (meta.next_seq, meta.resume_token, meta.captured_events) == (2, b"t1", 20)
        batches = await ledger.list_batches("db.c")
        assert [(b.seq, b.key, b.epoch) for b in batches] == [(0, "k/0", 1), (1, "k/1", 1)]
        assert [b.seq for b in await ledger.list_batches("db.c", 1, 5)] == [1]
    finally:
        await ledger.close()


async def test_a_newer_owner_fences_the_old_one(cfg) -> None:
    first, second = open_ledger(cfg), open_ledger(cfg)
    try:
        old = await first.claim("db.c", "old")
        await first.commit_batch("db.c", old.epoch, record(0), b"t0")
        new = await second.claim("db.c", "new")
        assert new.epoch == old.epoch + 1 and new.next_seq == 1 and new.resume_token == b"t0"
        with pytest.raises(Fenced):
            await first.commit_batch("db.c", old.epoch, record(1), b"t1")
        with pytest.raises(Fenced):
            await first.set_state("db.c", old.epoch, "failed", "x")
        with pytest.raises(Fenced):
            await first.set_start_token("db.c", old.epoch, b"x")
        await second.commit_batch("db.c", new.epoch, record(1), b"t1")
        assert [b.epoch for b in await second.list_batches("db.c")] == [1, 2]
    finally:
        await first.close()
        await second.close()


async def test_applied_seq_advances_only_from_its_old_value(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.claim("db.c", "me")
        for seq in range(3):
            await ledger.commit_batch("db.c", meta.epoch, record(seq), b"t")
        await ledger.mark_applied("db.c", meta.epoch, -1, 1, 20, time.time())
        await ledger.mark_applied("db.c", meta.epoch, -1, 1, 20, time.time())  # a repeat: done, not counted twice
        with pytest.raises(SeqConflict):
            await ledger.mark_applied("db.c", meta.epoch, -1, 2, 10, time.time())
        await ledger.mark_applied("db.c", meta.epoch, 1, 2, 10, time.time())
        meta = await ledger.get_namespace("db.c")
        assert meta is not None and (meta.applied_seq, meta.applied_events) == (2, 30)
        assert all(b.applied_at for b in await ledger.list_batches("db.c"))
    finally:
        await ledger.close()


async def test_an_applier_with_a_stale_epoch_cannot_move_applied_seq(cfg) -> None:
    first, second = open_ledger(cfg), open_ledger(cfg)
    try:
        old = await first.claim("db.c", "old")
        for seq in range(2):
            await first.commit_batch("db.c", old.epoch, record(seq), b"t")
        new = await second.claim("db.c", "new")
        with pytest.raises(Fenced):
            await first.mark_applied("db.c", old.epoch, -1, 1, 20, time.time())
        with pytest.raises(Fenced):
            await first.mark_applied("db.c", old.epoch + 5, -1, 1, 20, time.time())
        meta = await second.get_namespace("db.c")
        assert meta is not None and (meta.applied_seq, meta.applied_events) == (-1, 0)
        await second.mark_applied("db.c", new.epoch, -1, 1, 20, time.time())
        meta = await second.get_namespace("db.c")
        assert meta is not None and (meta.applied_seq, meta.applied_events) == (1, 20)
    finally:
        await first.close()
        await second.close()


async def test_first_discovery_is_recorded_once(cfg) -> None:
    first, second = open_ledger(cfg), open_ledger(cfg)
    try:
        assert await first.get_first_discovery() == 0.0
        assert await first.set_first_discovery(1700000000.25) == 1700000000.25
        assert await second.set_first_discovery(1800000000.5) == 1700000000.25  # the first value stays
        assert await first.set_first_discovery(1700000000.25) == 1700000000.25  # a repeat is harmless
        await second.set_writer("started", "ops", 123.0)  # the writer switch shares the control record
        assert await second.get_first_discovery() == 1700000000.25
        assert (await first.get_control()).writer == "started"
    finally:
        await first.close()
        await second.close()


async def test_state_writer_switch_and_listing(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        assert (await ledger.get_control()).writer == "stopped"
        await ledger.set_writer("started", "ops", 123.0)
        assert (await ledger.get_control()).writer == "started"
        m1 = await ledger.claim("b.y", "me")
        await ledger.claim("a.x", "me")
        await ledger.set_state("b.y", m1.epoch, "failed", "token rejected")
        metas = await ledger.list_namespaces()
        assert [(m.ns, m.state, m.last_error) for m in metas] == [("a.x", "running", ""), ("b.y", "failed", "token rejected")]
        again = await ledger.claim("b.y", "me")  # a restart clears the failure and retries
        assert again.state == "running" and again.last_error == ""
    finally:
        await ledger.close()


async def test_init_is_idempotent_and_check_passes(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        await ledger.init()
        await ledger.check()
    finally:
        await ledger.close()


async def test_missing_ledger_says_how_to_create_it(tmp_path: Path, moto_endpoint: str) -> None:
    for backend in BACKENDS:
        cfg = make_config(tmp_path, "mongodb://h:1", "mongodb://h:2", backend, moto_endpoint)
        ledger = open_ledger(cfg)
        try:
            with pytest.raises(LedgerError, match="ledger init"):
                await ledger.check()
        finally:
            await ledger.close()


async def test_store_put_get_list_delete(cfg) -> None:
    store = open_store(cfg)
    try:
        await store.check()
        await store.put("p/a/000000000001", b"one")
        await store.put("p/a/000000000002", b"two")
        await store.put("p/a/000000000001", b"uno")  # same key again: overwritten
        assert await store.get("p/a/000000000001") == b"uno"
        assert await store.list("p/a/") == ["p/a/000000000001", "p/a/000000000002"]
        await store.delete("p/a/000000000002")
        with pytest.raises(ObjectMissing):
            await store.get("p/a/000000000002")
    finally:
        await store.close()


async def test_s3_objects_are_encrypted_at_rest(tmp_path: Path, moto_endpoint: str) -> None:
    import aioboto3

    cfg = make_config(tmp_path, "mongodb://h:1", "mongodb://h:2", "s3+dynamodb", moto_endpoint)
    await prepare_backends(cfg)
    store = open_store(cfg)
    try:
        await store.put("x/1", b"data")
    finally:
        await store.close()
    bucket = cfg.store.url.removeprefix("s3://").split("/")[0]
    async with aioboto3.Session().client("s3", endpoint_url=moto_endpoint) as s3:
        head = await s3.head_object(Bucket=bucket, Key="x/1")
    assert head["ServerSideEncryption"] == "AES256"


async def test_missing_bucket_and_unwritable_dir_say_what_to_do(tmp_path: Path, moto_endpoint: str) -> None:
    cfg = make_config(tmp_path, "mongodb://h:1", "mongodb://h:2", "s3+dynamodb", moto_endpoint)
    store = open_store(cfg)
    try:
        with pytest.raises(StoreError, match="create it"):
            await store.check()
    finally:
        await store.close()
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = make_config(tmp_path, "mongodb://h:1", "mongodb://h:2", "file+sqlite")
    cfg.store.url = f"file://{blocker}/sub"
    with pytest.raises(StoreError):
        await open_store(cfg).check()
