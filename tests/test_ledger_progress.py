"""Progress items (sweep progress, verification results, the cutover step) on SQLite and on DynamoDB (moto)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import bson
import pytest

from cosmigrate.ledger import Fenced, ProgressConflict, open_ledger
from tests.helpers import make_config, prepare_backends

BACKENDS = ["file+sqlite", "s3+dynamodb"]


@pytest.fixture(params=BACKENDS)
async def cfg(request, tmp_path: Path):
    endpoint = request.getfixturevalue("moto_endpoint") if request.param == "s3+dynamodb" else None
    config = make_config(tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2", request.param, endpoint)
    await prepare_backends(config)
    return config


def data(**kw: object) -> bytes:
    return bson.encode(kw)


async def test_progress_items_are_fenced_by_the_namespace_owner(cfg) -> None:
    first, second = open_ledger(cfg), open_ledger(cfg)
    try:
        old = await first.claim("db.c", "old")
        await first.put_progress("db.c", "verify", "range#000000001", data(docs=10), epoch=old.epoch)
        await first.put_progress("db.c", "verify", "range#000000000", data(docs=5), epoch=old.epoch)
        await first.put_progress("db.c", "verify", "range#000000001", data(docs=11), epoch=old.epoch)
        await first.put_progress("db.c", "deletes", "sweep", data(cursor=b"\x01"), epoch=old.epoch)
        got = await first.get_progress("db.c", "verify", "range#000000001")
        assert got is not None and got.doc() == {"docs": 11} and got.version == 2
        listed = await first.list_progress("db.c", "verify", "range#")
        assert [(p.key, p.doc()["docs"]) for p in listed] == [("range#000000000", 5), ("range#000000001", 11)]
        assert [p.key for p in await first.list_progress("db.c", "verify", "range#", limit=1)] == ["range#000000000"]
        assert [p.kind for p in await first.list_progress("db.c", "deletes")] == ["deletes"]
        assert await first.get_progress("db.c", "verify", "nothing") is None
        new = await second.claim("db.c", "new")
        with pytest.raises(Fenced):
            await first.put_progress("db.c", "verify", "range#000000002", data(docs=1), epoch=old.epoch)
        with pytest.raises(Fenced):
            await first.delete_progress("db.c", "verify", "range#000000000", epoch=old.epoch)
        assert await second.get_progress("db.c", "verify", "range#000000002") is None
        await second.delete_progress("db.c", "verify", "range#000000000", epoch=new.epoch)
        await second.delete_progress("db.c", "verify", "range#000000000", epoch=new.epoch)  # absent is fine
        assert [p.key for p in await second.list_progress("db.c", "verify")] == ["range#000000001"]
    finally:
        await first.close()
        await second.close()


async def test_cluster_items_are_compare_and_set(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        await ledger.put_progress("", "cutover", "state", data(step="quiesce"), epoch=None, expect_version=0)
        with pytest.raises(ProgressConflict):
            await ledger.put_progress("", "cutover", "state", data(step="other"), epoch=None, expect_version=0)
        # A repeat of the write that went through (its answer lost) is done, not a conflict.
        await ledger.put_progress("", "cutover", "state", data(step="quiesce"), epoch=None, expect_version=0)
        await ledger.put_progress("", "cutover", "state", data(step="apply"), epoch=None, expect_version=1)
        with pytest.raises(ProgressConflict):
            await ledger.put_progress("", "cutover", "state", data(step="sweep"), epoch=None, expect_version=1)
        got = await ledger.get_progress("", "cutover", "state")
        assert got is not None and (got.doc()["step"], got.version) == ("apply", 2)
        with pytest.raises(Exception, match="owner"):
            await ledger.put_progress("db.c", "verify", "x", data(), epoch=None)
    finally:
        await ledger.close()


async def test_an_old_sqlite_ledger_gains_the_progress_table(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "mongodb://127.0.0.1:1", "mongodb://127.0.0.1:2", "file+sqlite")
    await prepare_backends(cfg)
    path = cfg.ledger.url.removeprefix("sqlite://")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE progress")
    conn.commit()
    conn.close()
    ledger = open_ledger(cfg)
    try:
        await ledger.check()
        meta = await ledger.claim("db.c", "me")
        await ledger.put_progress("db.c", "deletes", "sweep", data(n=1), epoch=meta.epoch)
        assert (await ledger.get_progress("db.c", "deletes", "sweep")) is not None
    finally:
        await ledger.close()


async def test_progress_items_never_show_up_as_batches(cfg) -> None:
    ledger = open_ledger(cfg)
    try:
        meta = await ledger.claim("db.c", "me")
        await ledger.put_progress("db.c", "verify", "range#000000001", data(docs=1), epoch=meta.epoch)
        await ledger.put_progress("db.c", "deletes", "sweep", data(n=1), epoch=meta.epoch)
        assert await ledger.list_batches("db.c") == []
        assert [m.ns for m in await ledger.list_namespaces()] == ["db.c"]
    finally:
        await ledger.close()
