"""Drive one NamespaceApplier directly: batches committed through the real store and ledger, written to a real target.

The daemon-level tests (test_apply.py) cannot hold an applier at a chosen point
or run two owners of one namespace side by side; these helpers can. Batches are
built the way capture builds them (BatchCodec, batch_key, commit_batch), so the
applier reads exactly what production reads.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument

from cosmigrate.apply import NamespaceApplier, WriterGate
from cosmigrate.batchfile import Batch, BatchCodec, BatchHeader
from cosmigrate.config import Config
from cosmigrate.ledger import BatchRecord, Ledger, open_ledger
from cosmigrate.mongo import RAW
from cosmigrate.sandbox.cosmos import make_token
from cosmigrate.stores import BatchStore, batch_key, open_store, store_prefix
from cosmigrate.timeouts import cancel_and_wait

TOKEN = make_token("rid", 7)


def event(key: Any, doc: dict[str, Any] | bytes | None = None) -> bytes:
    """A raw change event in Cosmos DB's layout; `doc` may be raw BSON (for values PyMongo will not encode)."""
    head = bson.encode({"_id": TOKEN})[:-1]
    full = b""
    if doc is not None:
        raw = doc if isinstance(doc, bytes) else bson.encode(doc, codec_options=RAW)
        full = b"\x03fullDocument\x00" + raw
    ns = b"\x03ns\x00" + bson.encode({"db": "d", "coll": "c"})
    dkey = b"\x03documentKey\x00" + bson.encode({"_id": key}, codec_options=RAW)
    body = head[4:] + full + ns + dkey + b"\x00"
    return (len(body) + 4).to_bytes(4, "little") + body


def batch(seq: int, events: list[bytes]) -> Batch:
    """A decoded batch as the applier sees it after fetching (for calling `collapse` directly)."""
    now = dt.datetime.now(dt.UTC)
    header = BatchHeader("c", "d.c", seq, len(events), now, now, RawBSONDocument(bson.encode(TOKEN)), sum(map(len, events)))
    return Batch(header, events, "")


class Harness:
    """A store + ledger pair for one test, and a way to commit batches and start appliers on them."""

    def __init__(self, cfg: Config, target: Any) -> None:
        self.cfg = cfg
        self.target = target
        self.store: BatchStore = open_store(cfg)
        self.ledger: Ledger = open_ledger(cfg)
        self.codec = BatchCodec()
        self.tasks: list[asyncio.Task[None]] = []
        self.appliers: list[NamespaceApplier] = []

    async def close(self) -> None:
        await cancel_and_wait(self.tasks)  # one cancel can be lost in PyMongo's own wait_for (Python 3.11)
        await self.store.close()
        await self.ledger.close()

    async def claim(self, ns: str, owner: str) -> int:
        return (await self.ledger.claim(ns, owner)).epoch

    async def commit(self, ns: str, epoch: int, events: Iterable[bytes]) -> BatchRecord:
        """Put a batch of `events` in the store and commit it as the namespace's next seq."""
        events = list(events)
        meta = await self.ledger.get_namespace(ns)
        assert meta is not None
        seq = meta.next_seq
        now = dt.datetime.now(dt.UTC)
        header = BatchHeader(self.cfg.cluster_name, ns, seq, len(events), now, now,
                             RawBSONDocument(bson.encode(TOKEN)), sum(map(len, events)))
        data, checksum = self.codec.encode(header, events)
        key = batch_key(store_prefix(self.cfg.store.url), self.cfg.cluster_name, ns, seq, epoch)
        await self.store.put(key, data)
        record = BatchRecord(ns=ns, seq=seq, key=key, events=len(events), bytes=len(data), raw_bytes=header.raw_bytes,
                             checksum=checksum, first_captured_at=time.time(), captured_at=time.time())
        await self.ledger.commit_batch(ns, epoch, record, bson.encode(TOKEN))
        for app in self.appliers:  # as the daemon's capture does after each commit (the poll is a safety net)
            if app.ns == ns:
                app.wake.set()
        return record

    def applier(self, ns: str, epoch: int, *, gate: WriterGate | None = None, pool: asyncio.Semaphore | None = None,
                store: BatchStore | None = None, **kwargs: Any) -> NamespaceApplier:
        return NamespaceApplier(ns, self.target, store or self.store, self.ledger, self.cfg, gate or WriterGate(True),
                                pool or asyncio.Semaphore(1), epoch=epoch, **kwargs)

    def start(self, app: NamespaceApplier) -> asyncio.Task[None]:
        task = asyncio.create_task(app.run(), name=f"apply:{app.ns}:e{app.epoch}")
        self.tasks.append(task)
        self.appliers.append(app)
        return task
