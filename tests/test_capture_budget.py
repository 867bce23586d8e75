"""`capture.max_unflushed_bytes` bounds a namespace whatever its partition count, and
`capture.max_unflushed_bytes_total` the process (issue 23, part 5).

Real parts: the sandbox source with 8 physical partitions, the real capture
(one watcher per partition, one committer), a real local store slowed down
(every put waits) and the SQLite ledger. What a namespace holds is watched
two ways: the bytes sealed but not yet committed (`status.unflushed_bytes`,
sampled: it existed before the budget) and the budget's own peak, which also
counts the driver's pages and the watchers' buffers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from bson.raw_bson import RawBSONDocument

from cosmigrate import capture
from cosmigrate.bytebudget import ByteBudget
from cosmigrate.capture import NamespaceCapture
from cosmigrate.clock import Mono
from cosmigrate.config import Config
from cosmigrate.freshness import Freshness
from cosmigrate.ledger import open_ledger
from cosmigrate.mongo import change_stream_tokens, source_client
from cosmigrate.sandbox import Sandbox
from cosmigrate.stores import open_store
from cosmigrate.timeouts import cancel_and_wait, within
from tests.helpers import make_config, prepare_backends, wait_for

DOCS_PER_NS = 24000
PAD = 10
PUT_DELAY_S = 0.05


class SlowStore:
    """The real local store, every put waiting first: a slow S3."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self.inner = inner
        self.url = inner.url
        self.delay_s = delay_s
        self.puts = 0

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.sleep(self.delay_s)  # the store's latency, not a synchronisation
        self.puts += 1
        await self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def _fill(sandbox: Sandbox, namespaces: list[str], docs_per_ns: int = DOCS_PER_NS, pad: int = PAD,
                first_id: int = 0, chunk: int = 500) -> None:
    client = source_client(sandbox.source_uri)
    try:
        for ns in namespaces:
            db, _, coll = ns.partition(".")
            docs = [{"_id": i, "pad": "x" * pad} for i in range(first_id, first_id + docs_per_ns)]
            for start in range(0, len(docs), chunk):
                await client[db][coll].insert_many(docs[start:start + chunk])
    finally:
        await client.close()


Burst = Callable[[dict[str, NamespaceCapture]], Awaitable[int]]


async def _capture(cfg: Config, sandbox: Sandbox, namespaces: list[str], process: ByteBudget,
                   monkeypatch: pytest.MonkeyPatch, docs_per_ns: int = DOCS_PER_NS,
                   then: Burst | None = None) -> dict[str, Any]:
    """Capture `namespaces` from the beginning until every document is committed (and, with `then`, the
    documents it wrote once that was done); the peaks seen."""
    buffers: dict[str, list[Any]] = {}
    add = capture._Buffer.add

    def counted_add(buf: Any, raw: bytes, token: bytes, now: float) -> None:
        # Instruments the real buffer (the watchers' unsealed events), whichever namespace it belongs to.
        ns = RawBSONDocument(raw)["ns"]
        owner = f"{ns['db']}.{ns['coll']}"
        if not any(b is buf for b in buffers.setdefault(owner, [])):
            buffers[owner].append(buf)
        add(buf, raw, token, now)

    monkeypatch.setattr(capture._Buffer, "add", counted_add)
    source = source_client(sandbox.source_uri)
    ledger = open_ledger(cfg)
    store = SlowStore(open_store(cfg), PUT_DELAY_S)
    caps = {ns: NamespaceCapture(ns, await ledger.claim(ns, "test"), source, store, ledger, cfg, budget=process)
            for ns in namespaces}
    sampled = dict.fromkeys(namespaces, 0)
    done = asyncio.Event()

    async def sample() -> None:
        # A measurement, not a synchronisation: the most bytes seen at once per namespace in its watchers'
        # buffers plus its sealed batches not yet committed.
        while not done.is_set():
            total = 0
            for ns, cap in caps.items():
                held = cap.status.unflushed_bytes + sum(b.nbytes for b in buffers.get(ns, []))
                sampled[ns] = max(sampled[ns], held)
                total += held
            sampled["process"] = max(sampled.get("process", 0), total)
            await asyncio.sleep(0.002)

    tasks = [asyncio.create_task(cap.run()) for cap in caps.values()]
    sampler = asyncio.create_task(sample())
    try:
        async def all_committed() -> bool:
            for cap in caps.values():
                assert cap.status.state not in ("failed", "fenced"), cap.status.last_error
            return all(cap.status.committed_events >= docs_per_ns for cap in caps.values())

        await wait_for(all_committed, 120, interval=0.05, what="every document committed")
        if then is not None:
            docs_per_ns += await then(caps)
            await wait_for(all_committed, 120, interval=0.05, what="every document of the burst committed")
        for cap in caps.values():
            cap.stop()
        await within(asyncio.gather(*tasks), 30)
    finally:
        done.set()
        await cancel_and_wait([*tasks, sampler])
        await store.close()
        await ledger.close()
        await source.close()
    assert store.puts > 8, "the store was not the bottleneck"
    return {"sampled": sampled, "caps": caps}


def _config(tmp_path: Path, sandbox: Sandbox, limit: int, total: int, batch: int) -> Config:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_bytes=batch,
                      max_unflushed_bytes=limit, max_unflushed_bytes_total=total)
    cfg.capture.max_batch_age_s = 5.0  # batches are cut because they are full, as in a backfill
    return cfg


@pytest.mark.parametrize("partitions", [8])
async def test_a_namespace_with_many_partitions_holds_at_most_its_limit_plus_one_page(
    tmp_path: Path, sandbox: Sandbox, partitions: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    sandbox.source.faults.partitions = partitions
    limit = 1024 * 1024
    # Batches of half the limit: before the budget, eight watchers each sealed one with no check (4x the limit).
    cfg = _config(tmp_path, sandbox, limit=limit, total=64 * limit, batch=limit // 2)
    await prepare_backends(cfg)
    await _fill(sandbox, ["app.wide"])
    process = ByteBudget(cfg.capture.max_unflushed_bytes_total)
    seen = await _capture(cfg, sandbox, ["app.wide"], process, monkeypatch)
    budget = seen["caps"]["app.wide"].budget
    bound = limit + budget.largest_page
    assert budget.largest_page < limit / 2, "pages as large as the limit prove nothing"
    # Sampled: the budget gives a batch's bytes back once it is in the store, before its ledger commit.
    assert seen["sampled"]["app.wide"] <= bound + cfg.capture.max_batch_bytes, \
        f"buffers and sealed batches held {seen['sampled']['app.wide']} (limit {limit}, page {budget.largest_page})"
    assert budget.peak <= bound, f"held {budget.peak} (limit {limit}, page {budget.largest_page})"
    assert budget.held_at_close == 0 and process.used == process.reserved == 0, "bytes left counted after the drain"


BURST_DOCS = 6000
"""Written at once to a collection of 8 partitions: about 750 events per partition, one page each (pages hold
up to 1000 events)."""


@pytest.mark.parametrize("pad", [300, 2000], ids=["pages-under-the-limit", "pages-over-the-limit"])
async def test_a_burst_reaching_many_idle_partitions_holds_at_most_the_limit_plus_one_page(
    tmp_path: Path, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, pad: int
) -> None:
    """Every partition idle (its stream's last page empty), then one write reaches them all at once. Before: an
    empty page made the stream's next poll reserve nothing, so every idle poll was outstanding at once and the
    burst brought one page per partition (8 pages of about 0.4 MB for a 1 MiB limit; 8 pages larger than the
    limit in the second case). A page larger than the whole limit must still go through, alone (no deadlock)."""
    partitions = 8
    sandbox.source.faults.partitions = partitions
    limit = 1024 * 1024
    cfg = _config(tmp_path, sandbox, limit=limit, total=64 * limit, batch=limit // 2)
    # The default: a watcher waiting for room seals the tail of a page cut into full batches at this age, and a
    # page over the limit waits for that (the limit must hold nothing else).
    cfg.capture.max_batch_age_s = 1.0
    await prepare_backends(cfg)
    ns = "app.burst"
    await _fill(sandbox, [ns], BURST_DOCS, pad=pad)  # read first: the namespace learns its page size
    last_page: dict[int, int | None] = {}
    fetching = capture.NamespaceCapture._fetching

    async def recorded(self: NamespaceCapture, page: Any, stream: Any, fetch: Any) -> Any:
        # Instruments the real fetch: the size of each watcher's latest page (0: empty, the stream is idle).
        try:
            return await fetching(self, page, stream, fetch)
        finally:
            last_page[id(page)] = page.last

    monkeypatch.setattr(capture.NamespaceCapture, "_fetching", recorded)

    async def burst(caps: dict[str, NamespaceCapture]) -> int:
        async def every_stream_idle() -> bool:
            return sum(size == 0 for size in last_page.values()) >= partitions

        await wait_for(every_stream_idle, 30, interval=0.02, what="every partition's stream idle (last page empty)")
        # One insert command: the sandbox applies it whole, so every waiting poll wakes to a full page at once.
        await _fill(sandbox, [ns], BURST_DOCS, pad=pad, first_id=BURST_DOCS, chunk=BURST_DOCS)
        return BURST_DOCS

    process = ByteBudget(cfg.capture.max_unflushed_bytes_total)
    seen = await _capture(cfg, sandbox, [ns], process, monkeypatch, BURST_DOCS, then=burst)
    budget = seen["caps"][ns].budget
    if pad < 1000:
        assert budget.largest_page < limit / 2, "pages this large prove nothing about several polls at once"
    else:
        assert budget.largest_page > limit, "the page was meant to be larger than the limit"
    bound = limit + budget.largest_page
    print(f"burst over {partitions} idle partitions: budget peak {budget.peak}, buffers and sealed batches "
          f"{seen['sampled'][ns]}, bound {bound} (limit {limit}, page {budget.largest_page})")
    assert seen["sampled"][ns] <= bound + cfg.capture.max_batch_bytes, \
        f"buffers and sealed batches held {seen['sampled'][ns]} (limit {limit}, page {budget.largest_page})"
    assert budget.peak <= bound, f"held {budget.peak} (limit {limit}, page {budget.largest_page})"
    assert budget.held_at_close == 0 and process.used == process.reserved == 0, "bytes left counted after the drain"


async def test_the_process_limit_holds_across_namespaces(tmp_path: Path, sandbox: Sandbox,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.source.faults.partitions = 4
    limit = 1024 * 1024
    total = 1280 * 1024  # less than two namespaces' limits
    cfg = _config(tmp_path, sandbox, limit=limit, total=total, batch=96 * 1024)
    await prepare_backends(cfg)
    namespaces = ["app.one", "app.two"]
    await _fill(sandbox, namespaces)
    process = ByteBudget(cfg.capture.max_unflushed_bytes_total)
    seen = await _capture(cfg, sandbox, namespaces, process, monkeypatch)
    pages = sum(seen["caps"][ns].budget.largest_page for ns in namespaces)
    assert seen["sampled"]["process"] <= total + pages + 2 * cfg.capture.max_batch_bytes, seen["sampled"]
    assert process.peak <= total + pages, f"the process held {process.peak} (limit {total}, pages {pages})"
    assert process.peak > limit, "the process limit was never the one that bound"


async def test_a_page_larger_than_the_limit_still_goes_through_alone(tmp_path: Path, sandbox: Sandbox,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox.source.faults.partitions = 4
    batch = 16 * 1024
    cfg = _config(tmp_path, sandbox, limit=batch, total=batch, batch=batch)  # every page is larger than this
    await prepare_backends(cfg)
    await _fill(sandbox, ["app.big"], 2000)
    process = ByteBudget(cfg.capture.max_unflushed_bytes_total)
    seen = await _capture(cfg, sandbox, ["app.big"], process, monkeypatch, 2000)
    budget = seen["caps"]["app.big"].budget
    assert budget.largest_page > batch
    assert process.peak <= batch + budget.largest_page


class StalledStore:
    """The real local store; the puts of one namespace's batches hang until `resume` (a put retried for ever,
    e.g. a prefix the bucket refuses)."""

    def __init__(self, inner: Any, stalled: str) -> None:
        self.inner = inner
        self.url = inner.url
        self.stalled = "/" + stalled.replace(".", "/") + "/"
        self.resume = asyncio.Event()

    async def put(self, key: str, data: bytes) -> None:
        if self.stalled in key:
            await self.resume.wait()
        await self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_namespace_whose_budget_is_full_never_stops_another_reading(tmp_path: Path, sandbox: Sandbox) -> None:
    """The process budget serves fetches in arrival order; a fetch that waits on its own namespace's full budget
    must not hold up the other namespaces' fetches behind it (before: every other namespace stopped reading
    until that namespace's committer gave bytes back, i.e. for ever when its store puts fail)."""
    limit = 256 * 1024
    cfg = _config(tmp_path, sandbox, limit=limit, total=64 * limit, batch=64 * 1024)
    cfg.capture.max_batch_age_s = 0.3
    await prepare_backends(cfg)
    await _fill(sandbox, ["app.stuck"], 6000)
    await _fill(sandbox, ["app.live"], 1)
    process = ByteBudget(cfg.capture.max_unflushed_bytes_total)
    source = source_client(sandbox.source_uri)
    ledger = open_ledger(cfg)
    store = StalledStore(open_store(cfg), "app.stuck")
    caps = {ns: NamespaceCapture(ns, await ledger.claim(ns, "test"), source, store, ledger, cfg, budget=process)
            for ns in ("app.stuck", "app.live")}
    stuck, live = caps["app.stuck"], caps["app.live"]
    tasks = [asyncio.create_task(cap.run()) for cap in caps.values()]
    try:
        async def stuck_waits() -> bool:
            # Waiting: in its own queue (now) or the process's (before, when there was only that one).
            return stuck.budget.used >= limit and bool(stuck.budget._waiters or process._waiters)

        await wait_for(stuck_waits, 30, interval=0.05, what="app.stuck's budget full, a fetch waiting on it")
        coll = source["app"]["live"]
        for round_ in range(3):  # each round needs a new page of app.live's stream after app.stuck blocked
            await coll.insert_many([{"_id": f"r{round_}-{i}"} for i in range(5)])
            want = 1 + 5 * (round_ + 1)

            async def live_committed(want: int = want) -> bool:
                return live.status.committed_events >= want

            await wait_for(live_committed, 15, interval=0.05, what=f"app.live's round {round_} committed")
        assert stuck.status.committed_events == 0
        store.resume.set()
        for cap in caps.values():
            cap.stop()
        await within(asyncio.gather(*tasks), 30)
        assert process.used == process.reserved == 0
    finally:
        store.resume.set()
        await cancel_and_wait(tasks)
        await store.close()
        await ledger.close()
        await source.close()


async def _seconds_to_head(tmp_path: Path, sandbox: Sandbox, partitions: int, docs: int) -> tuple[float, float]:
    """A collection of `partitions`, most of them empty: (seconds until a backfill of `docs` documents has
    committed a position at or past the head sampled before it started, seconds until `docs` more documents
    written once it is idle are at or past a head sampled after them). Reaching the head is what READY waits for."""
    sandbox.source.faults.partitions = partitions
    ns = f"app.idle{partitions}"
    cfg = _config(tmp_path / ns, sandbox, limit=1024 * 1024, total=4 * 1024 * 1024, batch=64 * 1024)
    cfg.capture.max_await_ms = IDLE_AWAIT_MS
    cfg.capture.max_batch_age_s = 1.0  # the default: an idle cut, not the age, should end each batch
    await prepare_backends(cfg)
    await _fill(sandbox, [ns], docs)
    source = source_client(sandbox.source_uri)
    ledger = open_ledger(cfg)
    store = open_store(cfg)
    fresh = Freshness()
    cap = NamespaceCapture(ns, await ledger.claim(ns, "test"), source, store, ledger, cfg, freshness=fresh,
                           budget=ByteBudget(cfg.capture.max_unflushed_bytes_total))

    async def to_head() -> float:
        fresh.add_sample(Mono.now(), await change_stream_tokens(source, ns))
        started = time.monotonic()
        reached = fresh.captured_at

        async def at_head() -> bool:
            assert cap.status.state not in ("failed", "fenced"), cap.status.last_error
            fresh.update(cap.status.committed_seq, cap.status.committed_seq)
            return fresh.captured_at != reached

        await wait_for(at_head, 60, interval=0.02, what=f"{ns} at its sampled head")
        return time.monotonic() - started

    task = asyncio.create_task(cap.run())
    try:
        backfill = await to_head()
        assert cap.status.committed_events == docs
        db, _, coll = ns.partition(".")
        await source[db][coll].insert_many([{"_id": f"later-{i}"} for i in range(docs)])
        later = await to_head()
        assert cap.status.committed_events == 2 * docs
        cap.stop()
        await within(task, 30)
        return backfill, later
    finally:
        await cancel_and_wait([task])
        await store.close()
        await ledger.close()
        await source.close()


IDLE_AWAIT_MS = 1000


async def test_a_collection_of_many_empty_partitions_reaches_its_head_as_fast_as_one(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    """Until a page size is known a namespace opens one stream at a time; that must never cost a round of
    max_await_ms per partition, in a backfill or for a change written later on idle partitions."""
    one = await _seconds_to_head(tmp_path, sandbox, 1, 3)
    many = await _seconds_to_head(tmp_path, sandbox, 16, 3)
    print(f"to head (backfill, later change): 1 partition {one[0]:.2f}s {one[1]:.2f}s, "
          f"16 partitions {many[0]:.2f}s {many[1]:.2f}s (max_await_ms {IDLE_AWAIT_MS})")
    # In rounds of max_await_ms: a page at a time would cost about one round per empty partition (13).
    for what, o, m in (("backfill", one[0], many[0]), ("later change", one[1], many[1])):
        assert (m - o) * 1000 / IDLE_AWAIT_MS < 4, f"{what}: 16 partitions took {m:.2f}s, one {o:.2f}s"
