"""The Cosmos DB for MongoDB (RU) personality: change streams as Cosmos serves them.

Rules emulated (see the README, "The sandbox"):
- only collection-level change streams; the pipeline must be exactly the
  $match on insert/update/replace then the $project of _id, fullDocument, ns,
  documentKey, with fullDocument "updateLookup";
- events carry the document as it is when the page is served, no
  operationType, no clusterTime; deletes only with the delete preview on;
- every event of a page carries the same opaque token (the page's end), as
  `_kind: 1` (JSON) or `_kind: 4` (gzip), both mixed by default; tokens from
  GetChangeStreamTokens carry `_startAtOperationTime`; the old LSN-"0"
  beginning token can be refused; an expired position answers 72;
- replies carry no operationTime and no session support is advertised;
- physical partitions (`partitions`, `collection_partitions`): documents
  placed by a hash of the shard key (or `_id`), one LSN log and one token
  per partition from GetChangeStreamTokens, partition streams and
  whole-collection streams (one continuation per range), and a split fault
  whose parent stream fails with Gone (410/1002) while the children continue;
- load: a request-unit budget per collection, split evenly among its
  partitions, charged by documents read and written (`requestunits`), 16500 with RetryAfterMs or, with server-side
  retry, a delayed 50; empty pages at once while throttled; bulk writes that
  partly succeed before a 16500; idle getMores that may return at once;
- sharded collections (`_id` unique per shard key value, documentKey with the
  shard key); unique indexes only on empty collections and blind to values
  under arrays; TTL on `_ts` (per-document `ttl`) whose expiry never reaches
  the feed; no sparse, text, 2d or hashed indexes.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.binary import Binary
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp

from cosmigrate.sandbox import wire
from cosmigrate.sandbox.bsonvalues import DECODE_OPTIONS
from cosmigrate.sandbox.faults import Faults
from cosmigrate.sandbox.requestunits import REQUEST_RU, RequestUnits, read_cost, write_cost
from cosmigrate.sandbox.server import CommandError, DropConnection, MongoServer
from cosmigrate.sandbox.storage import ChangeFeed, Collection, TtlRule
from cosmigrate.versions import SOURCE, lookup

PIPELINE_ERROR = "Change stream must be followed by a match and then a project stage"
TOKEN_ERROR = "Change feed token format is invalid"
EXPIRED_ERROR = "Expired resume token or cursor, reinitialize the change stream cursor"
UNIQUE_NOT_EMPTY = ("The unique index cannot be modified. To change the unique index, remove the collection and "
                    "re-create a new one.")
FULL_RANGE = {"min": "", "max": "FF"}
DEFAULT_PAGE = 1000
JSON_KIND = 1
GZIP_KIND = 4


def encode_token(data: bytes, kind: int = JSON_KIND) -> dict[str, Any]:
    """`{_data: BinData(JSON), _kind: 1}` or `{_data: BinData(gzip of the JSON), _kind: 4}`."""
    if kind == GZIP_KIND:
        return {"_data": Binary(gzip.compress(data, mtime=0)), "_kind": GZIP_KIND}
    return {"_data": Binary(data), "_kind": JSON_KIND}


Continuations = dict[tuple[str, str], int]
"""LSN per partition range (min, max) of effective partition key, as a token carries them."""


def make_token(rid: str, lsn: int | Continuations, kind: int = JSON_KIND) -> dict[str, Any]:
    """A V2 resume token (server versions 4.0 and later): JSON with one continuation per physical partition
    range (an int `lsn` is the full range), in `kind` form."""
    conts = {(FULL_RANGE["min"], FULL_RANGE["max"]): lsn} if isinstance(lsn, int) else lsn
    data = {
        "V": 2,
        "Rid": rid,
        "Continuation": [
            {
                "FeedRange": {"type": "Effective Partition Key Range", "value": {"min": lo, "max": hi}},
                "State": {"type": "continuation", "value": json.dumps(str(n))},
            }
            for (lo, hi), n in sorted(conts.items())
        ],
    }
    return encode_token(json.dumps(data, separators=(",", ":")).encode(), kind)


def make_list_token(lsn: int | Continuations) -> dict[str, Any]:
    """The old (list) form of token, the only one 3.6 accounts issue: no collection id, one entry per range."""
    conts = {(FULL_RANGE["min"], FULL_RANGE["max"]): lsn} if isinstance(lsn, int) else lsn
    data = [{"token": json.dumps(str(n)), "range": {"min": lo, "max": hi}} for (lo, hi), n in sorted(conts.items())]
    return {"_data": Binary(json.dumps(data, separators=(",", ":")).encode())}


def beginning_token() -> dict[str, Any]:
    """The old-form token with LSN "0" over the full range: replay from the start of the feed."""
    return make_list_token(0)


def _token_text(token: Any) -> str:
    data = token["_data"]
    if isinstance(data, (bytes, Binary)):
        raw = bytes(data)
        if token.get("_kind") == GZIP_KIND:
            raw = gzip.decompress(raw)
        return raw.decode()
    return str(data)


def _range(value: Any) -> tuple[str, str]:
    lo, hi = value["min"], value["max"]
    if not isinstance(lo, str) or not isinstance(hi, str) or (hi != "FF" and lo >= hi):
        raise ValueError("partition range")
    return lo, hi


def parse_token(token: Any, rid: str, v2: bool = True, *, refuse_list_form: bool = False) -> Continuations:
    """The LSN per partition range a token stands for; raises CommandError for anything Cosmos would refuse.

    Every version takes the old list form (unless `refuse_list_form`: modern
    accounts may refuse the LSN-"0" beginning token); a V2 token only where the
    server issues them (`v2`), that is from server version 4.0 on. Both `_kind`s
    are read (a `_kind: 4` token must hold gzip data).
    """
    try:
        parsed = json.loads(_token_text(token))
        out: Continuations = {}
        if isinstance(parsed, list):  # old form, no collection id
            if refuse_list_form:
                raise ValueError("old token form")
            for entry in parsed:
                out[_range(entry["range"])] = int(json.loads(entry["token"]))
        else:
            if not v2 or parsed["V"] != 2 or parsed["Rid"] != rid:
                raise ValueError("version or collection")
            for cont in parsed["Continuation"]:
                out[_range(cont["FeedRange"]["value"])] = int(json.loads(cont["State"]["value"]))
        if not out or any(lsn < 0 for lsn in out.values()):
            raise ValueError("no range or negative lsn")
        return out
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise CommandError(2, TOKEN_ERROR) from exc


def _contains(outer: tuple[str, str], inner: tuple[str, str]) -> bool:
    return outer[0] <= inner[0] and (outer[1] == "FF" or (inner[1] != "FF" and inner[1] <= outer[1]))


def gone_error(pid: int) -> CommandError:
    """What a stream on a partition that split meets. Cosmos's backend answers such a read with Gone (410),
    substatus 1002 (PartitionKeyRangeGone: "PartitionKeyRange with id 'N' in collection '' doesn't exist", as
    the Cosmos SDKs report it); how the MongoDB API wraps it is not documented, so the sandbox carries it the way
    it carries other backend errors (`Error=..., Details='Response status code does not indicate success: ...'`)
    and a client must not rely on the code: it asks GetChangeStreamTokens which partitions exist now."""
    return CommandError(2, f"Error=2, Details='Response status code does not indicate success: Gone (410); "
                        f"Substatus: 1002; Reason: (PartitionKeyRange with id '{pid}' in collection '' "
                        "doesn't exist.)'", "BadValue")


@dataclass
class ChangeStreamCursor:
    """A change stream: on one partition (`pid`, opened with that partition's token) or on the whole collection
    (`pid` None: the partitions interleaved in write order, the position one LSN per range)."""

    coll: Collection
    db: str
    positions: Continuations
    page: int
    with_op_type: bool
    pid: int | None = None
    spent: dict[int, float] = field(default_factory=dict)
    """Request units of the events served since the last charge, by partition id."""
    read_from: list[int] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.coll.ns


class CosmosSource(MongoServer):
    """Emulated Azure Cosmos DB for MongoDB (RU-based) account, at one of the server versions of
    `cosmigrate.versions.COSMOS_VERSIONS` (6.0 by default): its `buildInfo.version`, `hello.maxWireVersion`
    and token form (list form on 3.6, V2 from 4.0 on)."""

    set_name = "globaldb"
    with_feed = True
    READS = frozenset({"find", "aggregate", "count", "distinct", "getMore", "listIndexes"})
    ON_COLLECTION = frozenset({"find", "aggregate", "count", "distinct", "insert", "update", "delete", "listIndexes",
                               "createIndexes", "findAndModify"})

    def __init__(self, faults: Faults | None = None, host: str = "127.0.0.1", version: str = "6.0") -> None:
        super().__init__(faults, host=host)
        self.version = lookup(SOURCE, version)
        self.server_version = self.version.build_version
        self.max_wire_version = self.version.max_wire
        self.v2_tokens = self.version.token_form == "v2"
        self.units = RequestUnits()
        self.store.partitions = lambda ns: self.faults.partitions_of(ns)
        self.throttled: dict[int, int] = {}
        """Throttled answers by error code (16500, 50), for tests."""
        self.feed_events = 0
        """Change events served by every change stream so far (a probe's documents bound is checked on it)."""
        self.last_request: dict[int, dict[str, Any]] = {}
        """Per connection, what `getLastRequestStatistics` answers: the previous request's name and charge."""

    def uri(self) -> str:
        return (
            f"mongodb://{self.address}/?replicaSet={self.set_name}&retryWrites=false"
            "&maxIdleTimeMS=120000"
        )

    def hello_reply(self, conn_id: int, legacy: bool) -> dict[str, Any]:
        reply = super().hello_reply(conn_id, legacy)
        reply.pop("logicalSessionTimeoutMinutes", None)  # Cosmos does not support server sessions
        return reply

    def token(self, rid: str, positions: Continuations) -> dict[str, Any]:
        """A resume token in this server version's form (list form on 3.6); V2 tokens in the `_kind` the
        switches ask for, by default both kinds, alternating by LSN."""
        if not self.v2_tokens:
            return make_list_token(positions)
        kind = self.faults.token_kind or (GZIP_KIND if sum(positions.values()) % 2 else JSON_KIND)
        return make_token(rid, positions, kind)

    # --- physical partitions -------------------------------------------------------------

    def split_partition(self, db: str, name: str, index: int = 0) -> tuple[tuple[str, str], tuple[str, str]]:
        """A fault: split the `index`-th partition (in range order) of `db.name` in two, as Cosmos does when a
        partition grows. Streams on the parent fail (`gone_error`) from their next page on; whole-collection
        streams go on over the children; the children continue the parent's LSNs."""
        coll = self.store.get(db, name)
        if coll is None or coll.feed is None:
            raise CommandError(26, f"Collection {db}.{name} does not exist", "NamespaceNotFound")
        if not 0 <= index < len(coll.feed.partitions):
            raise CommandError(2, f"{db}.{name} has {len(coll.feed.partitions)} partitions; no partition {index}")
        try:
            left, right = coll.feed.split(index)
        except ValueError as exc:
            raise CommandError(2, str(exc)) from exc
        coll._notify()  # waiting getMores wake up and meet the split
        return left.range, right.range

    def _coll(self, ns: str) -> Collection | None:
        db, _, name = ns.partition(".")
        return self.store.get(db, name)

    def _shares(self, ns: str) -> list[tuple[str, float]]:
        """Request-unit budgets of a collection: one per physical partition, the provisioned rate split evenly
        (a single partition keeps the collection's own budget)."""
        rate = self.faults.ru_per_s
        coll = self._coll(ns)
        if coll is None or coll.feed is None or len(coll.feed.partitions) == 1:
            return [(ns, rate)]
        n = len(coll.feed.partitions)
        return [(f"{ns}#{p.pid}", rate / n) for p in coll.feed.partitions]

    def _share(self, coll: Collection, part: ChangeFeed) -> tuple[str, float]:
        assert coll.feed is not None
        n = len(coll.feed.partitions)
        rate = self.faults.ru_per_s
        return (coll.ns, rate) if n == 1 else (f"{coll.ns}#{part.pid}", rate / n)

    def _open_wait_s(self, ns: str, body: dict[str, Any]) -> float:
        """A change stream opened with one partition's token waits for that partition's share only."""
        coll = self._coll(ns)
        try:
            options = dict(body["pipeline"][0]["$changeStream"])
            token = options.get("resumeAfter") or options.get("startAfter")
            if coll is None or coll.feed is None or token is None:
                raise ValueError
            pid, _ = self._resolve(coll, parse_token(token, coll.feed.rid, self.v2_tokens))
            part = coll.feed.by_pid(pid) if pid is not None else None
            if part is None:
                raise ValueError
        except (CommandError, ValueError, KeyError, TypeError, IndexError):
            return self._wait_s(ns)  # whole collection, or a token open_change_stream refuses
        key, rate = self._share(coll, part)
        return self.units.wait_s(key, rate)

    def _wait_s(self, ns: str) -> float:
        """Seconds until every partition of `ns` has units (a request not routed to one partition needs all)."""
        return max(self.units.wait_s(key, rate) for key, rate in self._shares(ns))

    def _spend(self, ns: str | None, kind: str, units: float) -> None:
        """Count `units` of `kind`; a request not routed to one partition spends them evenly from all."""
        self.units.charge(None, kind, units, self.faults.ru_per_s)
        if ns is None:
            return
        shares = self._shares(ns)
        for key, rate in shares:
            self.units.spend(key, units / len(shares), rate)

    # --- throttling and request units --------------------------------------------------

    def _ns_of(self, name: str, body: dict[str, Any]) -> str | None:
        """The collection a command works on, `db.coll` (None for commands on no collection)."""
        if name in self.ON_COLLECTION:
            target = body.get(name)
        elif name in ("getMore", "customAction"):
            target = body.get("collection")
        else:
            return None
        return f"{body.get('$db', 'admin')}.{target}" if isinstance(target, str) else None

    def _is_feed(self, name: str, body: dict[str, Any]) -> bool:
        if name == "getMore":
            return isinstance(self._cursors.get(int(body.get("getMore") or 0)), ChangeStreamCursor)
        if name == "aggregate":
            pipeline = body.get("pipeline") or []
            return bool(pipeline) and isinstance(pipeline[0], dict) and "$changeStream" in pipeline[0]
        return name == "customAction"

    def _too_many(self, retry_after_ms: int) -> CommandError:
        self.throttled[16500] = self.throttled.get(16500, 0) + 1
        return CommandError(
            16500,
            f"Error=16500, RetryAfterMs={retry_after_ms}, Details='Response status code does not indicate "
            "success: TooManyRequests (429); Substatus: 3200; Reason: (Request rate is large. "
            "More Request Units may be needed, so no changes were made. Please retry this "
            "request later.)'",
            "TooManyRequests",
        )

    def _exceeded(self) -> CommandError:
        self.throttled[50] = self.throttled.get(50, 0) + 1
        return CommandError(50, "Request timed out. Retries due to rate limiting exceeded the max request timeout "
                            "(server-side retry)", "ExceededTimeLimit")

    async def _throttle(self) -> None:
        """A throttled request (a fault): 16500 at once, or with server-side retry 50 after the wait."""
        if self.faults.server_side_retry_ms:
            await asyncio.sleep(self.faults.server_side_retry_ms / 1000)
            raise self._exceeded()
        raise self._too_many(self.faults.retry_after_ms)

    async def _await_units(self, ns: str, state: dict[str, Any] | None = None, wait: float | None = None) -> None:
        """Proceed when `ns` has request units; otherwise throttle (server-side retry waits first, once)."""
        wait = self._wait_s(ns) if wait is None else wait
        if wait <= 0:
            return
        limit = self.faults.server_side_retry_ms / 1000
        if not limit:
            raise self._too_many(max(1, math.ceil(wait * 1000)))
        if state is not None and state.get("waited"):
            raise self._exceeded()
        if state is not None:
            state["waited"] = True
        if wait <= limit:
            await asyncio.sleep(wait)  # absorbed by the server's retries: slow, but it succeeds
            return
        await asyncio.sleep(limit)
        raise self._exceeded()

    async def before_command(self, name: str, body: dict[str, Any]) -> None:
        await super().before_command(name, body)
        self.store.expire(time.time() + self.faults.ttl_clock_advance_s, self.faults.ttl_lazy_delete)
        if self.faults.chance(self.faults.throttle_rate):
            await self._throttle()
        if name == "listIndexes" and self.faults.slow_list_indexes_ms:
            await asyncio.sleep(self.faults.slow_list_indexes_ms / 1000)
        # A plain switch (set by tests and by the sandbox's admin command), so polled rather than an Event.
        while name == "listIndexes" and self.faults.hold_list_indexes:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        ns = self._ns_of(name, body)
        if ns is not None and name == "aggregate" and self._is_feed(name, body):
            await self._await_units(ns, wait=self._open_wait_s(ns, body))  # the partition it opens on
        elif ns is not None and not (name == "getMore" and self._is_feed(name, body)):
            await self._await_units(ns)  # a throttled change stream answers empty pages instead (below)

    async def before_statement(self, coll: Collection | None, nbytes: int, state: dict[str, Any]) -> None:
        """Charge each written document; an exhausted budget fails this statement and the ones after it,
        after the earlier ones were applied (a bulk write partly succeeds before a 16500)."""
        if coll is None:
            return
        await self._await_units(coll.ns, state)
        self._spend(coll.ns, "write", write_cost(nbytes))

    def _charge_docs(self, ns: str | None, kind: str, docs: list[Any]) -> None:
        units = REQUEST_RU + sum(read_cost(len(d.raw)) for d in docs)
        self._spend(ns, kind, units)

    async def dispatch(self, request: wire.Request, conn_id: int) -> dict[str, Any]:
        """Answer one request and remember its charge for the connection's `getLastRequestStatistics`."""
        name = request.command_name
        if name.lower() == "getlastrequeststatistics":
            return await super().dispatch(request, conn_id)
        started = time.monotonic()
        self.units.begin()
        try:
            return await self._dispatch_charged(request, conn_id)
        finally:
            charge = self.units.end()
            if name not in self.UNTHROTTLED:
                self.last_request[conn_id] = {
                    "CommandName": name, "RequestCharge": round(charge, 2),
                    "RequestDurationInMilliSeconds": Int64(round((time.monotonic() - started) * 1000)),
                    "ActivityId": f"{conn_id:08x}-{self.commands:012x}"}

    def connection_closed(self, conn_id: int) -> None:
        self.last_request.pop(conn_id, None)

    def cmd_getlastrequeststatistics(self, req: wire.Request, db: str, body: dict[str, Any],
                                     conn_id: int) -> dict[str, Any]:
        """Cosmos's `getLastRequestStatistics`: the request charge of this connection's previous request."""
        last = self.last_request.get(conn_id)
        if last is None:
            raise CommandError(2, "no previous request on this connection")
        return {**last, "ok": 1.0}

    async def _dispatch_charged(self, request: wire.Request, conn_id: int) -> dict[str, Any]:
        name = request.command_name
        read = name in self.READS and not self._is_feed(name, request.body)
        reply = await super().dispatch(request, conn_id)
        if read and reply.get("ok"):
            ns = self._ns_of(name, request.body)
            cursor = reply.get("cursor") or {}
            docs = cursor.get("firstBatch") or cursor.get("nextBatch") or []
            if name == "count":
                self._spend(ns, "read", REQUEST_RU + read_cost(1) * int(reply.get("n", 0)))
            else:
                self._charge_docs(ns, "read", docs)
        return reply

    def cmd_cosmigratesandbox(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        reply = super().cmd_cosmigratesandbox(req, db, body, conn_id)
        split = body.get("split")
        if split is not None:  # {split: {ns: "db.coll", index: i}}: the split fault over the wire
            db_name, _, coll_name = str(split.get("ns", "")).partition(".")
            left, right = self.split_partition(db_name, coll_name, int(split.get("index", 0)))
            reply["children"] = [list(left), list(right)]
        reply["requestUnits"] = self.units.snapshot()
        reply["throttled"] = {str(code): n for code, n in self.throttled.items()}
        reply["feedEvents"] = Int64(self.feed_events)
        return reply

    # --- Cosmos's own commands ------------------------------------------------------------

    async def cmd_customaction(self, req: Any, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Cosmos's custom commands: GetChangeStreamTokens (one token per physical partition) and
        CreateCollection (with an optional shardKey)."""
        action = body.get("customAction")
        if action == "CreateCollection":
            return self._create_collection(db, body)
        if action in ("GetCollection", "GetDatabase"):
            return self._describe(db, action, body)
        if action != "GetChangeStreamTokens":
            raise CommandError(2, f"Unsupported customAction {action!r}")
        if self.faults.no_head_tokens:
            raise CommandError(59, "no such command: 'customAction'", "CommandNotFound")
        if self.faults.refuse_head_tokens:
            raise CommandError(13, "not authorized on the account to execute command GetChangeStreamTokens",
                               "Unauthorized")
        if self.faults.chance(self.faults.head_throttle_rate):
            await self._throttle()
        if self.faults.slow_head_ms:
            await asyncio.sleep(self.faults.slow_head_ms / 1000)
        name = body.get("collection")
        coll = self.store.get(db, name) if isinstance(name, str) else None
        if coll is None or coll.feed is None:
            raise CommandError(26, f"Collection {db}.{name} does not exist", "NamespaceNotFound")
        beginning = False
        start = body.get("startAtOperationTime")
        if start is not None:
            if not isinstance(start, Timestamp):
                raise CommandError(2, "startAtOperationTime must be a Timestamp")
            if start.time == 0 and start.inc == 0:
                beginning = True
            elif start.time < int(time.time()):
                raise CommandError(2, "the sandbox emulates startAtOperationTime only for Timestamp(0, 0) and now")
        tokens = []
        for part in coll.feed.partitions:  # one token per physical partition, its range and LSN
            token = self.token(coll.feed.rid, {part.range: 0 if beginning else part.lsn})
            token["_startAtOperationTime"] = start if start is not None else Timestamp(int(time.time()), 1)
            tokens.append(token)
        self._spend(coll.ns, "feed", REQUEST_RU)
        return {"resumeAfterTokens": tokens, "ok": 1.0}

    def cmd_collstats(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        if self.faults.refuse_collstats:
            raise CommandError(13, f"not authorized on {db} to execute command collStats", "Unauthorized")
        return super().cmd_collstats(req, db, body, conn_id)

    def _describe(self, db: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """GetCollection / GetDatabase: the provisioned RU/s (`ru_per_s`, dedicated to each collection), as Cosmos
        reports it; an unlimited sandbox (ru_per_s 0) reports none, like a serverless account."""
        reply: dict[str, Any] = {"database": db, "ok": 1.0}
        if action == "GetCollection":
            name = body.get("collection")
            if not isinstance(name, str) or self.store.get(db, name) is None:
                raise CommandError(26, f"Collection {db}.{name} does not exist", "NamespaceNotFound")
            reply["collection"] = name
            if self.faults.ru_per_s > 0:
                reply["provisionedThroughput"] = int(self.faults.ru_per_s)
        return reply

    def _create_collection(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("collection")
        if not isinstance(name, str) or not name:
            raise CommandError(2, "CreateCollection needs a collection name")
        if self.store.get(db, name) is not None:
            raise CommandError(48, f"Collection {db}.{name} already exists.", "NamespaceExists")
        shard_key = body.get("shardKey")
        if shard_key is not None and (not isinstance(shard_key, str) or not shard_key):
            raise CommandError(2, "shardKey must be a field name")
        self.store.get_or_create(db, name).shard_key = shard_key
        return {"ok": 1.0}

    def cmd_shardcollection(self, req: Any, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """`{shardCollection: "db.coll", key: {field: "hashed"}}`: `_id` is then unique only per shard key value."""
        ns = body.get("shardCollection")
        key = body.get("key")
        if not isinstance(ns, str) or "." not in ns or not isinstance(key, dict) or len(key) != 1:
            raise CommandError(2, "shardCollection needs 'db.collection' and a key of one field")
        dbname, _, name = ns.partition(".")
        ((field, _),) = key.items()
        coll = self.store.get(dbname, name)
        if coll is not None and (coll.docs or coll.shard_key is not None):
            raise CommandError(2, f"{ns} already exists with data or a shard key; shard a new collection")
        self.store.get_or_create(dbname, name).shard_key = field
        return {"collectionsharded": ns, "ok": 1.0}

    def cmd_createindexes(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Cosmos's index rules (server 6.0): no sparse, text, 2d or hashed indexes; unique indexes only on an
        empty collection (and, when sharded, including the shard key); TTL only on `_ts` unless the account has
        EnableTtlOnCustomPath. Unique indexes ignore values under arrays unless EnableUniqueCompoundNestedDocs."""
        coll = self.store.get(db, body["createIndexes"])
        specs = [dict(raw) for raw in body.get("indexes", [])]
        for spec in specs:
            name = spec.get("name", "?")
            key = dict(spec.get("key", {}))
            for kind in key.values():
                if kind in ("text", "2d", "hashed", "geoHaystack"):
                    raise CommandError(67, f"index {name}: {kind} indexes are not supported", "CannotCreateIndex")
            if spec.get("sparse"):
                raise CommandError(67, f"index {name}: sparse indexes are not supported", "CannotCreateIndex")
            if "expireAfterSeconds" in spec and list(key) != ["_ts"]:
                if not self.faults.ttl_custom_path or len(key) != 1:
                    raise CommandError(67, f"index {name}: TTL indexes are supported only on the _ts field "
                                       "(a single custom field needs the EnableTtlOnCustomPath capability)",
                                       "CannotCreateIndex")
            if spec.get("unique"):
                if coll is not None and coll.docs:
                    raise CommandError(67, UNIQUE_NOT_EMPTY, "CannotCreateIndex")
                if coll is not None and coll.shard_key is not None and coll.shard_key not in key:
                    raise CommandError(67, f"index {name}: a unique index of a sharded collection must include the "
                                       f"shard key {coll.shard_key!r}", "CannotCreateIndex")
        reply = super().cmd_createindexes(req, db, body, conn_id)
        coll = self.store.get(db, body["createIndexes"])
        assert coll is not None
        for spec in specs:
            key = dict(spec.get("key", {}))
            ix = next((i for i in coll.indexes.values() if i.key == key), None)
            if ix is not None and ix.unique:
                ix.ignore_arrays = not self.faults.unique_nested_docs
            if "expireAfterSeconds" in spec:
                coll.set_ttl(TtlRule(next(iter(key)), float(spec["expireAfterSeconds"])))
        return reply

    def remove_doc(self, coll: Collection, key: Any) -> None:
        coll.remove(key, emit_delete=self.faults.deletes_preview)

    # --- change streams -------------------------------------------------------------

    def _check_pipeline(self, stages: list[Any]) -> bool:
        """Validate the stages after $changeStream; returns whether operationType is projected."""
        preview = self.faults.deletes_preview
        ops = {"insert", "update", "replace"}
        fields = {"_id", "fullDocument", "ns", "documentKey"}
        try:
            match, proj = stages
            if len(match) != 1 or len(proj) != 1:
                raise ValueError
            if set(match["$match"]) != {"operationType"} or set(match["$match"]["operationType"]) != {"$in"}:
                raise ValueError
            got_ops = set(match["$match"]["operationType"]["$in"])
            spec = proj["$project"]
            if any(v not in (1, True) for v in spec.values()):
                raise ValueError
            got_fields = set(spec)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CommandError(2, PIPELINE_ERROR) from exc
        if preview and got_ops == ops | {"delete"} and got_fields == fields | {"operationType"}:
            return True
        if got_ops == ops and got_fields == fields:
            return False
        raise CommandError(2, PIPELINE_ERROR)

    def open_change_stream(self, db: str, body: dict[str, Any], pipeline: list[Any]) -> dict[str, Any]:
        if self.faults.refuse_change_streams:
            raise CommandError(2, PIPELINE_ERROR)
        target = body["aggregate"]
        options = dict(pipeline[0]["$changeStream"])
        if not isinstance(target, str) or options.get("allChangesForCluster"):
            raise CommandError(
                2, "Change streams are only supported on collections: watch() a collection, "
                "not a database or the whole account",
            )
        if options.get("fullDocument") != "updateLookup":
            raise CommandError(2, "Change stream fullDocument must be 'updateLookup'")
        if "startAtOperationTime" in options:
            raise CommandError(2, "startAtOperationTime is not supported; resume from a token")
        with_op_type = self._check_pipeline(pipeline[1:])
        coll = self.store.get(db, target)
        if coll is None or coll.feed is None:
            raise CommandError(26, f"Collection {db}.{target} does not exist", "NamespaceNotFound")
        token = options.get("resumeAfter") or options.get("startAfter")
        if token is not None:
            if self.faults.reject_tokens:
                raise CommandError(2, TOKEN_ERROR)
            conts = parse_token(token, coll.feed.rid, self.v2_tokens, refuse_list_form=self.faults.refuse_beginning_token)
            pid, positions = self._resolve(coll, conts)
            if self.faults.expire_tokens:
                raise CommandError(72, EXPIRED_ERROR, "InvalidOptions")
        else:
            pid, positions = None, {p.range: p.lsn for p in coll.feed.partitions}
        page = int(body.get("cursor", {}).get("batchSize", DEFAULT_PAGE) or 0)
        cursor = ChangeStreamCursor(coll, db, positions, DEFAULT_PAGE, with_op_type, pid)
        cid = random.randint(1, 2**62)
        self._cursors[cid] = cursor
        try:
            batch = self._page(cursor, page) if page else []
        except CommandError:
            self._cursors.pop(cid, None)
            raise
        self._charge_feed(cursor)
        return {"cursor": self._cursor_doc(cursor, cid, batch, "firstBatch"), "ok": 1.0}

    def _resolve(self, coll: Collection, conts: Continuations) -> tuple[int | None, Continuations]:
        """Where a token resumes: one partition (a token of exactly one partition's range, when the collection
        has several) or the whole collection (the full range, or one continuation per range). A token of a
        partition that split fails as the split parent's stream does; anything else unknown is refused."""
        feed = coll.feed
        assert feed is not None
        by_range = {p.range: p for p in feed.partitions}
        full = (FULL_RANGE["min"], FULL_RANGE["max"])
        if len(conts) == 1 and full not in conts:
            ((rng, lsn),) = conts.items()
            part = by_range.get(rng)
            if part is None:
                gone = feed.gone.get(rng)
                if gone is not None:
                    raise gone_error(gone)
                raise CommandError(2, TOKEN_ERROR)
            if lsn > part.lsn:
                raise CommandError(2, TOKEN_ERROR)
            return part.pid, {rng: lsn}
        positions: Continuations = {}
        for part in feed.partitions:
            found = next((n for r, n in conts.items() if _contains(r, part.range)), None)
            if found is None or found > part.lsn:
                raise CommandError(2, TOKEN_ERROR)
            positions[part.range] = found
        return None, positions

    def _cursor_doc(self, cursor: ChangeStreamCursor, cid: int, batch: list[RawBSONDocument], field: str) -> dict[str, Any]:
        doc: dict[str, Any] = {field: batch, "id": Int64(cid), "ns": cursor.ns}
        if not self.faults.no_postbatch_token:
            doc["postBatchResumeToken"] = self.token(cursor.coll.feed.rid, cursor.positions)  # type: ignore[union-attr]
        return doc

    def _sources(self, cursor: ChangeStreamCursor) -> list[tuple[ChangeFeed, int]]:
        """The partitions a cursor reads and its position in each (a split parent's position holds in its
        children); a partition cursor whose partition split meets the split."""
        feed = cursor.coll.feed
        assert feed is not None
        if cursor.pid is not None:
            part = feed.by_pid(cursor.pid)
            if part is None:
                raise gone_error(cursor.pid)
            return [(part, cursor.positions[part.range])]
        out = []
        for part in feed.partitions:
            lsn = cursor.positions.get(part.range)
            if lsn is None:
                lsn = next((n for r, n in cursor.positions.items() if _contains(r, part.range)), None)
            if lsn is None:
                raise CommandError(2, TOKEN_ERROR)
            out.append((part, lsn))
        return out

    def _page(self, cursor: ChangeStreamCursor, limit: int) -> list[RawBSONDocument]:
        """The next page: each partition's entries after the cursor's position there, interleaved in write
        order (one partition for a partition cursor); the position moves per partition."""
        feed = cursor.coll.feed
        assert feed is not None
        reads = []
        for part, after in self._sources(cursor):
            got, last = part.read(after, limit)
            reads.append((part, after, got, last))
        if len(reads) == 1:
            part, _, taken_entries, last = reads[0]
            picked = taken_entries
            positions = {part.range: last}
        else:
            merged = sorted(((e[1], i) for i, (_, _, got, _) in enumerate(reads) for e in got))[:limit]
            counts = [0] * len(reads)
            for _, i in merged:
                counts[i] += 1
            picked = []
            positions = {}
            for i, (part, after, got, last) in enumerate(reads):
                n = counts[i]
                positions[part.range] = last if n == len(got) else (got[n - 1][0] if n else after)
            picked = sorted((e for i, (_, _, got, _) in enumerate(reads) for e in got[:counts[i]]), key=lambda e: e[1])
        cursor.positions = positions
        cursor.read_from = [part.pid for part, _, _, _ in reads]
        if not picked:
            return []
        docs = cursor.coll.docs
        token = self.token(feed.rid, positions)
        ns = {"db": cursor.db, "coll": cursor.coll.name}
        out = []
        for _, _, key, op in picked:
            event: dict[str, Any] = {"_id": token}
            if cursor.with_op_type:
                event["operationType"] = op
            if op != "delete":
                event["fullDocument"] = RawBSONDocument(docs[key])
            event["ns"] = ns
            event["documentKey"] = cursor.coll.document_key(key)
            raw = bson.encode(event, codec_options=DECODE_OPTIONS)
            pid = cursor.pid if cursor.pid is not None else feed.partition_of(key).pid
            cursor.spent[pid] = cursor.spent.get(pid, 0.0) + read_cost(len(raw))
            out.append(RawBSONDocument(raw))
        self.feed_events += len(out)
        return out

    def _charge_feed(self, cursor: ChangeStreamCursor) -> None:
        """Charge one change-stream request: its base cost shared by the partitions it read, each event to its
        partition's budget."""
        feed = cursor.coll.feed
        assert feed is not None
        spent, cursor.spent = cursor.spent, {}
        pids = cursor.read_from or list(spent)
        self.units.charge(None, "feed", REQUEST_RU + sum(spent.values()), self.faults.ru_per_s)
        for pid in set(pids) | set(spent):
            part = feed.by_pid(pid)
            if part is None:
                continue
            key, rate = self._share(cursor.coll, part)
            self.units.spend(key, (REQUEST_RU / len(pids) if pid in pids else 0.0) + spent.get(pid, 0.0), rate)

    async def change_stream_getmore(self, cid: int, cursor: Any, body: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(cursor, ChangeStreamCursor)
        if self.store.get(cursor.db, cursor.coll.name) is not cursor.coll:
            self._cursors.pop(cid, None)
            raise CommandError(43, f"cursor id {cid} not found", "CursorNotFound")
        if self.faults.expire_tokens:
            self._cursors.pop(cid, None)
            raise CommandError(72, EXPIRED_ERROR, "InvalidOptions")
        limit = int(body.get("batchSize") or cursor.page)
        wait_ms = body.get("maxTimeMS", 1000)
        try:
            if self._stream_wait_s(cursor) > 0 or self.faults.chance(self.faults.empty_page_rate):
                # A throttled change stream answers an empty page at once, although changes are waiting.
                return {"cursor": self._cursor_doc(cursor, cid, [], "nextBatch"), "ok": 1.0}
            batch = self._page(cursor, limit)
            if not batch and wait_ms and not self.faults.idle_getmore_immediate:
                changed = cursor.coll.changed_event()
                try:
                    await asyncio.wait_for(changed.wait(), wait_ms / 1000)
                except TimeoutError:
                    pass
                if cid not in self._cursors:
                    raise DropConnection()
                batch = self._page(cursor, limit)
        except CommandError:
            self._cursors.pop(cid, None)  # a stream on a partition that split is over
            raise
        self._charge_feed(cursor)
        return {"cursor": self._cursor_doc(cursor, cid, batch, "nextBatch"), "ok": 1.0}

    def _stream_wait_s(self, cursor: ChangeStreamCursor) -> float:
        """A partition stream is throttled by its partition's share; a whole-collection one by any partition."""
        if cursor.pid is None:
            return self._wait_s(cursor.ns)
        feed = cursor.coll.feed
        assert feed is not None
        part = feed.by_pid(cursor.pid)
        if part is None:
            raise gone_error(cursor.pid)
        key, rate = self._share(cursor.coll, part)
        return self.units.wait_s(key, rate)
