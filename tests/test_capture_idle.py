"""The idle cut: a batch is cut when the stream goes idle at a page boundary, not when `max_batch_age_s` is up.

One NamespaceCapture against the sandbox source over TCP (real PyMongo client), the real local store and
SQLite ledger. `max_batch_age_s` is set far beyond every wait below, so only the idle cut can seal a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cosmigrate.capture import NamespaceCapture
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import source_client
from cosmigrate.sandbox import Sandbox
from cosmigrate.stores import open_store
from tests.helpers import make_config, prepare_backends, wait_for

NS = "app.c"


class HeldStore:
    """The real store, whose puts wait while `held` is clear: a committer kept busy on purpose."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.held = asyncio.Event()
        self.held.set()
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        await self.held.wait()
        await self.inner.put(key, data)


@pytest.fixture
async def capture(tmp_path: Path, sandbox: Sandbox) -> AsyncIterator[tuple[NamespaceCapture, HeldStore, Any]]:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", start_at="now",
                      max_batch_age_s=600.0, min_batch_age_s=0.1, max_await_ms=200)  # the default wait
    await prepare_backends(cfg)
    sandbox.source.faults.partitions = 1  # one watcher: the batches counted below are all of one stream
    source = source_client(sandbox.source_uri)
    await source.app.c.insert_one({"_id": "exists"})  # the collection exists before the watcher starts
    store, ledger = HeldStore(open_store(cfg)), open_ledger(cfg)
    meta = await ledger.claim(NS, "me")
    cap = NamespaceCapture(NS, meta, source, store, ledger, cfg)  # type: ignore[arg-type]
    task = asyncio.create_task(cap.run())
    try:
        await wait_for(lambda: _true(cap.status.state == "running" and cap.status.last_contact is not None), 20,
                       what="the watcher reading")
        yield cap, store, source
    finally:
        store.held.set()
        cap.stop()
        await asyncio.wait_for(task, 30)
        await source.close()
        await store.close()
        await ledger.close()


async def _true(value: bool) -> bool:
    return value


async def test_a_single_write_is_committed_as_soon_as_the_stream_is_idle(capture: Any) -> None:
    cap, _, source = capture
    await source.app.c.insert_one({"_id": 1, "v": 1})
    await wait_for(lambda: _true(cap.status.committed_seq == 0), 20, what="the write committed")
    assert cap.status.idle_cuts == 1 and cap.status.committed_events == 1


async def test_writes_while_the_committer_is_busy_grow_the_next_batch(capture: Any) -> None:
    cap, store, source = capture
    store.held.clear()
    await source.app.c.insert_one({"_id": 0})
    await wait_for(lambda: _true(store.puts == 1), 20, what="the first batch's put")
    for i in range(1, 31):  # the committer is busy with batch 0: no idle cut for these, however idle the stream
        await source.app.c.insert_one({"_id": i})
    await wait_for(lambda: _true(cap.status.events_read == 31), 20, what="every event read")
    assert store.puts == 1 and cap.status.idle_cuts == 1
    store.held.set()
    await wait_for(lambda: _true(cap.status.committed_seq == 1), 20, what="the second batch committed")
    assert cap.status.committed_events == 31 and cap.status.idle_cuts == 2  # one batch of 30, not 30 of one
