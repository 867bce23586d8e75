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
- load: a request-unit budget per collection charged by documents read and
  written (`requestunits`), 16500 with RetryAfterMs or, with server-side
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
from dataclasses import dataclass
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
from cosmigrate.sandbox.storage import Collection, TtlRule
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


def make_token(rid: str, lsn: int, kind: int = JSON_KIND) -> dict[str, Any]:
    """A V2 resume token (server versions 4.0 and later): JSON with one continuation per physical partition,
    in `kind` form."""
    data = {
        "V": 2,
        "Rid": rid,
        "Continuation": [
            {
                "FeedRange": {"type": "Effective Partition Key Range", "value": FULL_RANGE},
                "State": {"type": "continuation", "value": json.dumps(str(lsn))},
            }
        ],
    }
    return encode_token(json.dumps(data, separators=(",", ":")).encode(), kind)


def make_list_token(lsn: int) -> dict[str, Any]:
    """The old (list) form of token, the only one 3.6 accounts issue: no collection id, one entry per range."""
    data = [{"token": json.dumps(str(lsn)), "range": FULL_RANGE}]
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


def parse_token(token: Any, rid: str, v2: bool = True, *, refuse_list_form: bool = False) -> int:
    """The LSN a token stands for; raises CommandError for anything Cosmos would refuse.

    Every version takes the old list form (unless `refuse_list_form`: modern
    accounts may refuse the LSN-"0" beginning token); a V2 token only where the
    server issues them (`v2`), that is from server version 4.0 on. Both `_kind`s
    are read (a `_kind: 4` token must hold gzip data).
    """
    try:
        parsed = json.loads(_token_text(token))
        if isinstance(parsed, list):  # old form, no collection id
            if refuse_list_form:
                raise ValueError("old token form")
            (entry,) = parsed
            if entry["range"] != FULL_RANGE:
                raise ValueError("partition range")
            lsn = int(json.loads(entry["token"]))
        else:
            if not v2 or parsed["V"] != 2 or parsed["Rid"] != rid:
                raise ValueError("version or collection")
            (cont,) = parsed["Continuation"]
            if cont["FeedRange"]["value"] != FULL_RANGE:
                raise ValueError("partition range")
            lsn = int(json.loads(cont["State"]["value"]))
        if lsn < 0:
            raise ValueError("negative lsn")
        return lsn
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise CommandError(2, TOKEN_ERROR) from exc


@dataclass
class ChangeStreamCursor:
    coll: Collection
    db: str
    lsn: int
    page: int
    with_op_type: bool

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
        self.throttled: dict[int, int] = {}
        """Throttled answers by error code (16500, 50), for tests."""

    def uri(self) -> str:
        return (
            f"mongodb://{self.address}/?replicaSet={self.set_name}&retryWrites=false"
            "&maxIdleTimeMS=120000"
        )

    def hello_reply(self, conn_id: int, legacy: bool) -> dict[str, Any]:
        reply = super().hello_reply(conn_id, legacy)
        reply.pop("logicalSessionTimeoutMinutes", None)  # Cosmos does not support server sessions
        return reply

    def token(self, rid: str, lsn: int) -> dict[str, Any]:
        """A resume token in this server version's form (list form on 3.6); V2 tokens in the `_kind` the
        switches ask for, by default both kinds, alternating by LSN."""
        if not self.v2_tokens:
            return make_list_token(lsn)
        kind = self.faults.token_kind or (GZIP_KIND if lsn % 2 else JSON_KIND)
        return make_token(rid, lsn, kind)

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

    async def _await_units(self, ns: str, state: dict[str, Any] | None = None) -> None:
        """Proceed when `ns` has request units; otherwise throttle (server-side retry waits first, once)."""
        wait = self.units.wait_s(ns, self.faults.ru_per_s)
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
        self.store.expire(time.time() + self.faults.ttl_clock_advance_s)
        if self.faults.chance(self.faults.throttle_rate):
            await self._throttle()
        ns = self._ns_of(name, body)
        if ns is not None and not (name == "getMore" and self._is_feed(name, body)):
            await self._await_units(ns)  # a throttled change stream answers empty pages instead (below)

    async def before_statement(self, coll: Collection | None, nbytes: int, state: dict[str, Any]) -> None:
        """Charge each written document; an exhausted budget fails this statement and the ones after it,
        after the earlier ones were applied (a bulk write partly succeeds before a 16500)."""
        if coll is None:
            return
        await self._await_units(coll.ns, state)
        self.units.charge(coll.ns, "write", write_cost(nbytes), self.faults.ru_per_s)

    def _charge_docs(self, ns: str | None, kind: str, docs: list[Any]) -> None:
        units = REQUEST_RU + sum(read_cost(len(d.raw)) for d in docs)
        self.units.charge(ns, kind, units, self.faults.ru_per_s)

    async def dispatch(self, request: wire.Request, conn_id: int) -> dict[str, Any]:
        name = request.command_name
        read = name in self.READS and not self._is_feed(name, request.body)
        reply = await super().dispatch(request, conn_id)
        if read and reply.get("ok"):
            ns = self._ns_of(name, request.body)
            cursor = reply.get("cursor") or {}
            docs = cursor.get("firstBatch") or cursor.get("nextBatch") or []
            if name == "count":
                self.units.charge(ns, "read", REQUEST_RU + read_cost(1) * int(reply.get("n", 0)), self.faults.ru_per_s)
            else:
                self._charge_docs(ns, "read", docs)
        return reply

    def cmd_cosmigratesandbox(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        reply = super().cmd_cosmigratesandbox(req, db, body, conn_id)
        reply["requestUnits"] = self.units.snapshot()
        reply["throttled"] = {str(code): n for code, n in self.throttled.items()}
        return reply

    # --- Cosmos's own commands ------------------------------------------------------------

    async def cmd_customaction(self, req: Any, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Cosmos's custom commands: GetChangeStreamTokens (one token per physical partition) and
        CreateCollection (with an optional shardKey)."""
        action = body.get("customAction")
        if action == "CreateCollection":
            return self._create_collection(db, body)
        if action != "GetChangeStreamTokens":
            raise CommandError(2, f"Unsupported customAction {action!r}")
        if self.faults.no_head_tokens:
            raise CommandError(59, "no such command: 'customAction'", "CommandNotFound")
        if self.faults.refuse_head_tokens:
            raise CommandError(13, "not authorized on the account to execute command GetChangeStreamTokens",
                               "Unauthorized")
        if self.faults.chance(self.faults.head_throttle_rate):
            await self._throttle()
        name = body.get("collection")
        coll = self.store.get(db, name) if isinstance(name, str) else None
        if coll is None or coll.feed is None:
            raise CommandError(26, f"Collection {db}.{name} does not exist", "NamespaceNotFound")
        lsn = coll.feed.lsn
        start = body.get("startAtOperationTime")
        if start is not None:
            if not isinstance(start, Timestamp):
                raise CommandError(2, "startAtOperationTime must be a Timestamp")
            if start.time == 0 and start.inc == 0:
                lsn = 0
            elif start.time < int(time.time()):
                raise CommandError(2, "the sandbox emulates startAtOperationTime only for Timestamp(0, 0) and now")
        token = self.token(coll.feed.rid, lsn)
        token["_startAtOperationTime"] = start if start is not None else Timestamp(int(time.time()), 1)
        self.units.charge(coll.ns, "feed", REQUEST_RU, self.faults.ru_per_s)
        return {"resumeAfterTokens": [token], "ok": 1.0}

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
            lsn = parse_token(token, coll.feed.rid, self.v2_tokens, refuse_list_form=self.faults.refuse_beginning_token)
            if lsn > coll.feed.lsn:
                raise CommandError(2, TOKEN_ERROR)
            if self.faults.expire_tokens:
                raise CommandError(72, EXPIRED_ERROR, "InvalidOptions")
        else:
            lsn = coll.feed.lsn
        page = int(body.get("cursor", {}).get("batchSize", DEFAULT_PAGE) or 0)
        cursor = ChangeStreamCursor(coll, db, lsn, DEFAULT_PAGE, with_op_type)
        cid = random.randint(1, 2**62)
        self._cursors[cid] = cursor
        batch = self._page(cursor, page) if page else []
        self._charge_docs(coll.ns, "feed", batch)
        return {"cursor": self._cursor_doc(cursor, cid, batch, "firstBatch"), "ok": 1.0}

    def _cursor_doc(self, cursor: ChangeStreamCursor, cid: int, batch: list[RawBSONDocument], field: str) -> dict[str, Any]:
        doc: dict[str, Any] = {field: batch, "id": Int64(cid), "ns": cursor.ns}
        if not self.faults.no_postbatch_token:
            doc["postBatchResumeToken"] = self.token(cursor.coll.feed.rid, cursor.lsn)  # type: ignore[union-attr]
        return doc

    def _page(self, cursor: ChangeStreamCursor, limit: int) -> list[RawBSONDocument]:
        feed = cursor.coll.feed
        assert feed is not None
        entries, last = feed.read(cursor.lsn, limit)
        cursor.lsn = last
        if not entries:
            return []
        token = self.token(feed.rid, last)
        ns = {"db": cursor.db, "coll": cursor.coll.name}
        out = []
        docs = cursor.coll.docs
        for key, op in entries:
            event: dict[str, Any] = {"_id": token}
            if cursor.with_op_type:
                event["operationType"] = op
            if op != "delete":
                event["fullDocument"] = RawBSONDocument(docs[key])
            event["ns"] = ns
            event["documentKey"] = cursor.coll.document_key(key)
            out.append(RawBSONDocument(bson.encode(event, codec_options=DECODE_OPTIONS)))
        return out

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
        if self.units.wait_s(cursor.ns, self.faults.ru_per_s) > 0 or self.faults.chance(self.faults.empty_page_rate):
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
        self._charge_docs(cursor.ns, "feed", batch)
        return {"cursor": self._cursor_doc(cursor, cid, batch, "nextBatch"), "ok": 1.0}
