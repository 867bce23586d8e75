"""Suite 1, pipeline cost: in process, no network.

Pre-encoded raw change-event pages (~1 KB documents, exactly the bytes the
wire delivers) go through the real code: watcher buffer and page boundaries ->
batch encoding (zstd + checksum) -> local store (fsync) -> SQLite ledger
commit -> applier (fetch, verify, collapse) -> a sink that BSON-encodes the
bulk write command as PyMongo would. Two references measured in the same run:
(a) decode every event and re-encode its document with PyMongo's C BSON;
(b) the old recipe's data path: per-event `json_util.dumps` lines, a file per
window, per-line `json_util.loads`, one ReplaceOne per event (no collapsing),
ordered bulk write (encoded by the same sink).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import resource
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import bson
from bson import Binary, Decimal128, Int64, ObjectId, json_util
from bson.raw_bson import RawBSONDocument

from cosmigrate.sandbox.cosmos import make_token

PAGE = 100  # events per change-stream page


def make_events(n: int, keys: int, seed: int = 1) -> list[list[bytes]]:
    """Pages of raw change events as Cosmos sends them; 20% of events on 1% of the keys."""
    rng = random.Random(seed)
    pages: list[list[bytes]] = []
    lsn = 0
    hot = max(1, keys // 100)
    for start in range(0, n, PAGE):
        lsn += 1
        token = make_token("benchrid", lsn)
        page = []
        for _ in range(min(PAGE, n - start)):
            k = rng.randrange(hot) if rng.random() < 0.2 else rng.randrange(keys)
            doc = {
                "_id": k, "v": Int64(rng.randint(0, 50)), "qty": Int64(rng.randint(0, 9)),
                "price": Decimal128(Decimal(rng.randint(0, 99999)) / 100), "when": dt.datetime(2026, 1, 1),
                "oid": ObjectId(), "bin": Binary(rng.randbytes(16), 4), "tags": ["a", "b", "c"],
                "nested": {"x": rng.random(), "y": "z" * 40}, "pad": "p" * 700,
            }
            page.append(bson.encode({"_id": token, "fullDocument": doc, "ns": {"db": "bench", "coll": "events"},
                                     "documentKey": {"_id": k}}))
        pages.append(page)
    return pages


class FakeStream:
    """Serves pre-encoded pages like PyMongo's change stream: events one after the other, the next page fetched
    when the current one is used up (`_cursor._data` empty: what `cosmigrate.mongo.page_drained` reads), and
    None only once every page was served (an idle stream)."""

    class _Cursor:
        _data: range = range(0)

    def __init__(self, pages: list[list[bytes]], done: asyncio.Event) -> None:
        self.pages = pages
        self.page = 0
        self.pos = 0
        self.done = done
        self.resume_token: Any = None
        self._cursor = FakeStream._Cursor()

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        return None

    async def try_next(self) -> RawBSONDocument | None:
        if self.page >= len(self.pages):
            self.done.set()
            await asyncio.sleep(0.01)
            return None
        page = self.pages[self.page]
        if self.pos == 0:
            await asyncio.sleep(0)  # a real getMore awaits the network here, letting other tasks run
        raw = page[self.pos]
        self.pos += 1
        self._cursor._data = range(len(page) - self.pos)
        if self.pos == len(page):
            self.resume_token = RawBSONDocument(page[-1])["_id"]
            self.page += 1
            self.pos = 0
        return RawBSONDocument(raw)


class Sink:
    """Stands in for the target collection: encodes each bulk write as PyMongo's update command."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    async def bulk_write(self, requests: list[Any], ordered: bool = True) -> None:
        updates = []
        for r in requests:
            doc = r._doc  # ReplaceOne
            updates.append({"q": r._filter, "u": doc, "upsert": True})
        self.bytes += len(bson.encode({"update": "events", "ordered": ordered, "updates": updates}))
        self.writes += len(requests)

    async def list_indexes(self) -> Any:
        async def none() -> Any:
            if False:
                yield None

        return none()


async def cosmigrate_path(pages: list[list[bytes]], n: int) -> dict[str, float]:
    import cosmigrate.apply as apply_mod
    import cosmigrate.capture as capture_mod
    from cosmigrate.apply import NamespaceApplier, WriterGate
    from cosmigrate.capture import NamespaceCapture
    from cosmigrate.config import Config
    from cosmigrate.ledger import open_ledger
    from cosmigrate.stores import open_store

    tmp = Path(tempfile.mkdtemp(prefix="cosmigrate-pipeline-"))
    cfg = Config(cluster_name="bench")
    cfg.source.uri = cfg.target.uri = "mongodb://unused:1"
    cfg.store.url = f"file://{tmp / 'batches'}"
    cfg.ledger.url = f"sqlite://{tmp / 'ledger.db'}"
    cfg.capture.start_at = "beginning"
    # The batching window is a latency knob (at most one batch per second per quiet namespace); shortened here
    # so that the final partial batch does not sit out a second that costs no work.
    cfg.capture.max_batch_age_s = 0.05
    cfg.capture.min_batch_age_s = 0.0  # the idle cut's wait is for a live source; here every page is there at once
    ledger = open_ledger(cfg)
    await ledger.init()
    store = open_store(cfg)
    meta = await ledger.claim("bench.events", "bench")
    done = asyncio.Event()
    stream = FakeStream(pages, done)
    sink = Sink()

    async def fake_open(*_: Any, **__: Any) -> FakeStream:
        return stream

    async def fake_tokens(*_: Any, **__: Any) -> list[bytes]:
        return [bson.encode(make_token("benchrid", 0))]  # the beginning: one partition, before every page

    capture_mod.open_change_stream = fake_open  # type: ignore[assignment]
    capture_mod.change_stream_tokens = fake_tokens  # type: ignore[assignment]

    async def no_expiry(*_: Any) -> str:
        return ""

    capture_mod.expiry_or_unknown = no_expiry  # type: ignore[assignment]
    capture_mod.raw_collection = lambda *_: None  # type: ignore[assignment]
    apply_mod.raw_collection = lambda *_: sink  # type: ignore[assignment]
    cap = NamespaceCapture("bench.events", meta, None, store, ledger, cfg)
    app = NamespaceApplier("bench.events", None, store, ledger, cfg, WriterGate(True), asyncio.Semaphore(1))
    cap.on_commit = app.wake.set
    wall0, cpu0 = time.perf_counter(), time.process_time()
    tasks = [asyncio.create_task(cap.run()), asyncio.create_task(app.run())]
    deadline = time.monotonic() + 600
    while app.status.events_applied < n:
        if any(t.done() for t in tasks) or time.monotonic() > deadline:
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()  # type: ignore[misc]
            raise RuntimeError(f"pipeline stalled at {app.status.events_applied} of {n} events")
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    cap.stop()
    app.stop()
    await asyncio.gather(*tasks)
    await ledger.close()
    return {"events_per_s": n / wall, "cpu_us_per_event": cpu / n * 1e6, "target_writes": sink.writes}


def reference_bson(pages: list[list[bytes]]) -> float:
    """(a) decode every event, re-encode its document: the floor of any decoding pipeline."""
    n = 0
    t0 = time.perf_counter()
    for page in pages:
        for raw in page:
            event = bson.decode(raw)
            bson.encode(event["fullDocument"])
            n += 1
    return n / (time.perf_counter() - t0)


def reference_old_recipe(pages: list[list[bytes]], tmp: Path) -> tuple[float, int, int]:
    """(b) the old data path, and how many small Int64 values it turned into Int32."""
    sink = Sink()
    n = 0
    t0 = time.perf_counter()
    path = tmp / "window-0.json"
    with path.open("w") as f:  # the capture script: one JSON line per event, a file per window
        for page in pages:
            for raw in page:
                f.write(json_util.dumps(bson.decode(raw)) + "\n")
                n += 1
    from pymongo import ReplaceOne

    ops = []
    with path.open() as f:  # the Lambda: per-line loads, one ReplaceOne per event, ordered
        for line in f:
            event = json_util.loads(line)
            doc = event["fullDocument"]
            ops.append(ReplaceOne({"_id": doc["_id"]}, doc, upsert=True))
            if len(ops) >= 1000:
                asyncio.run(sink.bulk_write(ops, ordered=True))
                ops = []
    if ops:
        asyncio.run(sink.bulk_write(ops, ordered=True))
    rate = n / (time.perf_counter() - t0)
    # Fidelity: the same document through the old path's JSON round trip.
    original = bson.decode(pages[0][0])["fullDocument"]
    back = json_util.loads(json_util.dumps(original))
    longs = [k for k, v in original.items() if isinstance(v, Int64)]
    demoted = [k for k in longs if not isinstance(back[k], Int64)]
    return rate, len(longs), len(demoted)


def run_suite(quick: bool) -> dict[str, Any]:
    n = 50_000 if quick else 200_000
    repeats = 2 if quick else 3
    pages = make_events(n, keys=n // 5)
    ours, ref_a, ref_b = [], [], []
    cpu = []
    fidelity = (0, 0)
    for _ in range(repeats):
        result = asyncio.run(cosmigrate_path(pages, n))
        ours.append(result["events_per_s"])
        cpu.append(result["cpu_us_per_event"])
        ref_a.append(reference_bson(pages))
        rate, longs, demoted = reference_old_recipe(pages, Path(tempfile.mkdtemp()))
        ref_b.append(rate)
        fidelity = (longs, demoted)
    med = sorted(ours)[len(ours) // 2]
    med_a = sorted(ref_a)[len(ref_a) // 2]
    med_b = sorted(ref_b)[len(ref_b) // 2]
    return {
        "pipeline.events": n,
        "pipeline.repeats": repeats,
        "pipeline.events_per_s": round(med),
        "pipeline.events_per_s_spread": [round(min(ours)), round(max(ours))],
        "pipeline.cpu_us_per_event": round(sorted(cpu)[len(cpu) // 2], 2),
        "pipeline.peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "pipeline.reference_bson_events_per_s": round(med_a),
        "pipeline.reference_seed_events_per_s": round(med_b),
        "pipeline.ratio_vs_bson_reference": round(med / med_a, 2),
        "pipeline.ratio_vs_seed_path": round(med / med_b, 2),
        "pipeline.seed_path_fidelity": f"{fidelity[1]} of {fidelity[0]} Int64 fields came back as Int32 through the old recipe's JSON",
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_suite("--quick" in sys.argv), indent=2))
