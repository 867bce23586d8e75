"""What `cosmigrate plan` reads from the source: sizes, partitions, provisioned RU/s, and the RU probe.

The RU probe reads each physical partition's change feed from its beginning
(GetChangeStreamTokens at Timestamp(0, 0)), exactly as the full load will, and
asks Cosmos what each request cost (`getLastRequestStatistics`, which answers
for the previous request on the same connection: the probe's client has a
pool of one connection and sends one request at a time). It stops at the first
of its three bounds (documents, RU, seconds), split evenly over the
partitions; each page is sized so that, at the cost per document seen so
far, it stays inside the RU bound. A throttled partition answers empty pages
(or 16500): the probe waits, inside its time bound, and says so.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo.errors import ConnectionFailure, OperationFailure

from cosmigrate.backoff import retry_after_s
from cosmigrate.clock import Mono
from cosmigrate.mongo import RAW, change_pipeline, change_stream_tokens, source_client
from cosmigrate.timeouts import within
from cosmigrate.tokens import Positions, TokenFormatError, positions, reached

THROTTLED, EXCEEDED_TIME_LIMIT, UNAUTHORIZED, NOT_FOUND = 16500, 50, 13, 59
FIRST_PAGE = 20
"""The first page of each partition is small: its charge tells what a document costs before a larger page."""
MAX_PAGE = 1000
SAMPLES = 200
"""Documents kept (raw) from the probe: the target probe writes documents shaped like these."""
EMPTY_WAIT_S = (0.05, 1.0)
T = TypeVar("T")


@dataclass
class ProbeBounds:
    docs: int = 2000
    ru: float = 4000.0
    seconds: float = 10.0

    def as_dict(self) -> dict[str, Any]:
        return {"docs": self.docs, "ru": self.ru, "seconds": self.seconds}


@dataclass
class FeedProbe:
    """What the probe of one collection read and what Cosmos charged for it."""

    bounds: ProbeBounds
    docs: int = 0
    ru: float = 0.0
    seconds: float = 0.0
    requests: int = 0
    charged_requests: int = 0
    event_bytes: int = 0
    throttled: int = 0
    partitions: int = 0
    partitions_read_to_head: int = 0
    stopped_by: str = ""
    """Which bound ended the probe: `documents`, `ru`, `seconds`, or `head` (every partition read through)."""
    problem: str = ""
    samples: list[bytes] = field(default_factory=list)

    @property
    def ru_per_doc(self) -> float | None:
        return self.ru / self.docs if self.docs and self.charged_requests and not self.problem else None

    @property
    def event_bytes_per_doc(self) -> float | None:
        return self.event_bytes / self.docs if self.docs else None

    def as_dict(self) -> dict[str, Any]:
        per = self.ru_per_doc
        return {"bounds": self.bounds.as_dict(), "docs": self.docs, "ru": round(self.ru, 2),
                "seconds": round(self.seconds, 3), "requests": self.requests, "throttled": self.throttled,
                "partitions_read_to_head": self.partitions_read_to_head, "stopped_by": self.stopped_by,
                "ru_per_doc": None if per is None else round(per, 4), "problem": self.problem}


class ChargeUnknown(Exception):
    """The account does not report request charges (getLastRequestStatistics refused)."""


async def collection_stats(source: Any, ns: str) -> tuple[int, int]:
    """(documents, bytes) from collStats; raises OperationFailure (e.g. Unauthorized) / ConnectionFailure."""
    db, _, coll = ns.partition(".")
    stats = await source[db].command({"collStats": coll})
    return int(stats.get("count", 0)), int(stats.get("size", 0))


async def provisioned_ru(source: Any, ns: str) -> float | None:
    """The RU/s Cosmos reports for the collection (GetCollection), else for its database (shared throughput);
    autoscale reports its maximum. None when neither says (serverless, or the custom action is refused)."""
    db, _, coll = ns.partition(".")
    for cmd in ({"customAction": "GetCollection", "collection": coll}, {"customAction": "GetDatabase"}):
        try:
            reply = await source[db].command(cmd)
        except OperationFailure:
            continue
        if reply.get("provisionedThroughput"):
            return float(reply["provisionedThroughput"])
        auto = reply.get("autoScaleSettings") or {}
        if auto.get("maxThroughput"):
            return float(auto["maxThroughput"])
    return None


async def _charge(db: Any) -> float:
    try:
        stats = await db.command("getLastRequestStatistics")
    except OperationFailure as exc:
        if exc.code in (NOT_FOUND, UNAUTHORIZED):
            raise ChargeUnknown(f"the account refuses getLastRequestStatistics ({(exc.details or {}).get('codeName') or exc.code})") from None
        raise
    return float(stats.get("RequestCharge", 0.0))


class _Run:
    """One collection's probe, request by request on a one-connection client."""

    def __init__(self, client: Any, ns: str, bounds: ProbeBounds, deletes_preview: bool) -> None:
        self.db_name, _, self.coll = ns.partition(".")
        self.db = client[self.db_name]
        self.client = client
        self.ns = ns
        self.bounds = bounds
        self.pipeline = change_pipeline(deletes_preview)
        self.result = FeedProbe(bounds)
        self.deadline = Mono.now() + bounds.seconds
        self.charges_known = True

    async def send(self, cmd: dict[str, Any]) -> Any:
        return await self.request(lambda: self.db.command(cmd, codec_options=RAW))

    async def request(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One request and its charge; throttling is waited out inside the time bound (then TimeoutError)."""
        while True:
            if Mono.now() >= self.deadline:
                raise TimeoutError
            try:
                reply = await fn()
            except OperationFailure as exc:
                if exc.code not in (THROTTLED, EXCEEDED_TIME_LIMIT):
                    raise
                self.result.throttled += 1
                await self.pause(retry_after_s(exc) if exc.code == THROTTLED else EMPTY_WAIT_S[1])
                continue
            self.result.requests += 1
            if self.charges_known:
                try:
                    self.result.ru += await _charge(self.db)
                    self.result.charged_requests += 1
                except ChargeUnknown as exc:
                    self.charges_known = False
                    self.result.problem = str(exc)
            return reply

    async def pause(self, seconds: float) -> None:
        left = self.deadline - Mono.now()
        if left <= 0:
            raise TimeoutError
        await asyncio.sleep(min(seconds, left))

    async def tokens(self, start: Timestamp | None) -> list[bytes]:
        return await self.request(lambda: change_stream_tokens(self.client, self.ns, start))

    def page_size(self, docs_left: int, ru_left: float) -> int:
        seen = self.result.ru / self.result.docs if self.result.docs and self.charges_known else None
        if seen is None:
            return max(0, min(FIRST_PAGE, docs_left))
        # Room for the request's own charge, and 25% over the cost seen so far per document.
        fits = math.floor((ru_left - 2.0) / (seen * 1.25)) if seen > 0 else docs_left
        return max(0, min(docs_left, MAX_PAGE, fits))

    async def partition(self, token: bytes, head: Positions, docs_each: int, ru_each: float) -> None:
        start_docs, start_ru = self.result.docs, self.result.ru
        left = lambda: (docs_each - (self.result.docs - start_docs), ru_each - (self.result.ru - start_ru))  # noqa: E731
        size = self.page_size(*left())
        if size < 1:
            return
        reply = await self.send({"aggregate": self.coll, "pipeline": [
            {"$changeStream": {"fullDocument": "updateLookup", "resumeAfter": RawBSONDocument(token)}}, *self.pipeline],
            "cursor": {"batchSize": size}})
        cursor = reply["cursor"]
        cid = int(cursor["id"])
        batch = cursor.get("firstBatch") or []
        empty, asked = 0, False
        try:
            while True:
                self.take(batch)
                at = cursor.get("postBatchResumeToken")
                done = False
                if at is not None and head:
                    try:
                        done = reached(positions(bytes(at.raw)), head)
                    except TokenFormatError:
                        done = False
                if done:
                    self.result.partitions_read_to_head += 1
                    return
                docs_left, ru_left = left()
                if docs_left <= 0:
                    self.result.stopped_by = self.result.stopped_by or "documents"
                    return
                size = self.page_size(docs_left, ru_left)
                if size < 1:
                    self.result.stopped_by = self.result.stopped_by or "ru"
                    return
                if batch:
                    empty = 0
                elif asked:
                    empty += 1  # an empty page although the head is ahead: a throttled partition
                    self.result.throttled += 1
                    await self.pause(min(EMPTY_WAIT_S[1], EMPTY_WAIT_S[0] * 2 ** min(empty, 5)))
                asked = True
                reply = await self.send({"getMore": Int64(cid), "collection": self.coll, "batchSize": size,
                                         "maxTimeMS": 100})
                cursor = reply["cursor"]
                batch = cursor.get("nextBatch") or []
        finally:
            try:
                await self.db.command({"killCursors": self.coll, "cursors": [Int64(cid)]})
            except (OperationFailure, ConnectionFailure):
                pass  # the cursor times out on the server anyway

    def take(self, batch: list[Any]) -> None:
        for event in batch:
            raw = bytes(event.raw)
            self.result.docs += 1
            self.result.event_bytes += len(raw)
            doc = event.get("fullDocument")
            if doc is not None and len(self.result.samples) < SAMPLES:
                self.result.samples.append(bytes(doc.raw))


async def probe_feed(uri: str, ns: str, bounds: ProbeBounds, *, deletes_preview: bool = False) -> FeedProbe:
    """Read the collection's feed from the beginning within `bounds`; what it read and what it cost.

    Raises OperationFailure (refused: permission, unsupported) and ConnectionFailure (unreachable); a
    throttled or slow probe ends at its time bound with what it has (`stopped_by = "seconds"`)."""
    client = source_client(uri, maxPoolSize=1, serverSelectionTimeoutMS=10_000)
    run = _Run(client, ns, bounds, deletes_preview)
    started = Mono.now()
    try:
        try:
            await within(_probe(run), bounds.seconds + 10.0)
        except TimeoutError:
            run.result.stopped_by = "seconds"
        if not run.result.stopped_by:
            run.result.stopped_by = "head"
    finally:
        run.result.seconds = Mono.now() - started
        await client.close()
    return run.result


async def _probe(run: _Run) -> None:
    head: Positions = {}
    for token in await run.tokens(None):
        head.update(positions(token))
    beginning = await run.tokens(Timestamp(0, 0))
    run.result.partitions = len(beginning)
    n = max(1, len(beginning))
    docs_each = max(1, run.bounds.docs // n)
    ru_each = run.bounds.ru / n - (run.result.ru / n)  # the two token requests come out of the RU bound too
    for token in beginning:
        own = {r: lsn for r, lsn in head.items() if r in positions(token)} or head
        await run.partition(token, own, docs_each, ru_each)
