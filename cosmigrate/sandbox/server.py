"""The emulated MongoDB server: connections, command dispatch, CRUD and cursors.

`MongoServer` speaks enough of MongoDB for PyMongo and the migrator; the two
personalities (`cosmos.CosmosSource`, `documentdb.DocumentDBTarget`) add their
own rules through a few hooks. A malformed message never takes the server
down: bad BSON gets an error reply, a bad frame closes that one connection.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import random
import ssl
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import bson
from bson.int64 import Int64
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument

from cosmigrate.sandbox import wire
from cosmigrate.sandbox.bsonvalues import (
    DECODE_OPTIONS,
    RAW_OPTIONS,
    first_field_is_id,
    is_nan_key,
    prepend_id,
    raw_bytes,
    sort_key,
    values_equal,
)
from cosmigrate.sandbox.faults import Faults, FaultSpecError
from cosmigrate.sandbox.query import (
    QueryError,
    apply_update,
    equality_fields,
    is_operator_update,
    matches,
    project,
    sort_documents,
)
from cosmigrate.sandbox.storage import Collection, DuplicateKey, IndexSpec, Store

MAX_BSON_SIZE = 16 * 1024 * 1024
MAX_WRITE_BATCH = 100_000
REPLY_BATCH_BYTES = 16 * 1024 * 1024 - 64 * 1024


class CommandError(Exception):
    """A command that fails as a whole: `{ok: 0, code, codeName, errmsg}`."""

    def __init__(self, code: int, message: str, code_name: str = "BadValue", labels: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.code_name = code_name
        self.labels = labels or []

    def reply(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": 0.0, "errmsg": str(self), "code": self.code, "codeName": self.code_name}
        if self.labels:
            out["errorLabels"] = self.labels
        return out


class DropConnection(Exception):
    """Close the connection without answering (a fault, or an unreadable frame)."""


def _raw(doc: Any) -> RawBSONDocument:
    if isinstance(doc, RawBSONDocument):
        return doc
    return RawBSONDocument(bson.encode(doc, codec_options=DECODE_OPTIONS), RAW_OPTIONS)


def _to_py(value: Any) -> Any:
    if isinstance(value, RawBSONDocument):
        return bson.decode(value.raw, codec_options=DECODE_OPTIONS)
    return value


@dataclass
class Cursor:
    """A server-side cursor over raw documents (find, aggregate, listCollections, ...)."""

    ns: str
    docs: Iterator[RawBSONDocument]
    held: RawBSONDocument | None = None

    def next_batch(self, size: int) -> tuple[list[RawBSONDocument], bool]:
        """Up to `size` documents (0: no count limit), and whether the cursor is exhausted.

        Like mongod, a batch holds at least one document and otherwise stops
        before the document that would take it past REPLY_BATCH_BYTES; that
        document opens the next batch. A reply therefore never carries two
        near-16 MiB documents, which a real server would never send.
        """
        out: list[RawBSONDocument] = []
        total = 0
        docs: Iterator[RawBSONDocument] = self.docs
        if self.held is not None:
            docs = itertools.chain([self.held], docs)
            self.held = None
        for doc in docs:
            n = len(doc.raw)
            if out and total + n > REPLY_BATCH_BYTES:
                self.held = doc
                return out, False
            out.append(doc)
            total += n
            if size and len(out) >= size:
                return out, False
        return out, True


class MongoServer:
    """A loopback MongoDB-protocol server over an in-memory `Store`."""

    server_version = "6.0.0"
    max_wire_version = 17
    set_name = "rs0"
    with_feed = False
    reject_retryable_writes = False

    def __init__(self, faults: Faults | None = None, host: str = "127.0.0.1") -> None:
        self.store = Store(with_feed=self.with_feed)
        self.faults = faults or Faults()
        self.host = host
        self.port = 0
        self.commands = 0
        self.writes_delayed = 0
        """Write commands the slow-write fault held (tests wait for one to be in flight)."""
        self._server: asyncio.Server | None = None
        self._cursors: dict[int, Any] = {}
        self._conn_ids = itertools.count(1)
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def uri(self) -> str:
        return f"mongodb://{self.address}/?replicaSet={self.set_name}&retryWrites=false"

    async def start(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, port, limit=2**20, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.drop_connections()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def drop_connections(self) -> int:
        """Close every open client connection (a network blip)."""
        n = 0
        for w in list(self._writers):
            w.transport.abort()
            n += 1
        return n

    # --- connection loop -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(self._conn_ids)
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            while True:
                idle = self.faults.idle_timeout_s or None
                try:
                    header = await asyncio.wait_for(reader.readexactly(16), idle)
                except TimeoutError:
                    return
                length, request_id, _, op_code = wire.parse_header(header)
                payload = await reader.readexactly(length - 16)
                reply = await self._answer(conn_id, request_id, op_code, payload)
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, wire.ProtocolError, DropConnection):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._handlers.discard(task)
            writer.transport.abort()
            self.connection_closed(conn_id)

    def connection_closed(self, conn_id: int) -> None:
        """Personality hook: forget what was kept per connection."""

    async def _answer(self, conn_id: int, request_id: int, op_code: int, payload: bytes) -> bytes | None:
        try:
            request = wire.parse_request(request_id, op_code, payload)
        except wire.BadCommand as exc:
            request = wire.Request(request_id, op_code if op_code in (wire.OP_MSG, wire.OP_QUERY) else wire.OP_MSG, {})
            reply: dict[str, Any] = {"ok": 0.0, "errmsg": str(exc), "code": 22, "codeName": "InvalidBSON"}
            return wire.encode_reply(request, reply, random.randint(1, 2**31 - 1))
        self.commands += 1
        try:
            reply = await self.dispatch(request, conn_id)
        except CommandError as exc:
            reply = exc.reply()
        except QueryError as exc:
            reply = {"ok": 0.0, "errmsg": str(exc), "code": exc.code, "codeName": exc.code_name}
        except DropConnection:
            raise
        except bson.errors.InvalidBSON as exc:
            reply = {"ok": 0.0, "errmsg": f"invalid BSON: {exc}", "code": 22, "codeName": "InvalidBSON"}
        except Exception as exc:  # an emulator bug must not kill the server
            reply = {"ok": 0.0, "errmsg": f"internal sandbox error: {exc!r}", "code": 1, "codeName": "InternalError"}
        if request.more_to_come:
            return None
        try:
            return wire.encode_reply(request, reply, random.randint(1, 2**31 - 1))
        except Exception as exc:
            fallback = {"ok": 0.0, "errmsg": f"reply not encodable: {exc}", "code": 1, "codeName": "InternalError"}
            return wire.encode_reply(request, fallback, random.randint(1, 2**31 - 1))

    # --- dispatch ---------------------------------------------------------------------

    UNTHROTTLED = frozenset(
        {"hello", "ismaster", "isMaster", "ping", "buildInfo", "buildinfo", "endSessions",
         "killCursors", "cosmigrateSandbox", "saslStart", "saslContinue", "getLastError",
         "getLastRequestStatistics"}
    )

    async def dispatch(self, request: wire.Request, conn_id: int) -> dict[str, Any]:
        name = request.command_name
        body = request.body
        db = body.get("$db", "admin")
        if name not in self.UNTHROTTLED:
            await self.before_command(name, body)
        handler = getattr(self, f"cmd_{name.lower()}", None)
        if handler is None:
            raise CommandError(59, f"no such command: '{name}'", "CommandNotFound")
        result = handler(request, db, body, conn_id)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def before_command(self, name: str, body: dict[str, Any]) -> None:
        """Personality hook: throttling, failovers, dropped connections."""
        if self.faults.chance(self.faults.drop_rate):
            raise DropConnection()

    # --- handshake and admin -----------------------------------------------------------

    def hello_reply(self, conn_id: int, legacy: bool) -> dict[str, Any]:
        primary = self.is_primary()
        reply: dict[str, Any] = {
            "helloOk": True,
            "isWritablePrimary": primary,
            "secondary": False,
            "setName": self.set_name,
            "setVersion": 1,
            "hosts": [self.address],
            "me": self.address,
            "maxBsonObjectSize": MAX_BSON_SIZE,
            "maxMessageSizeBytes": wire.MAX_MESSAGE_SIZE,
            "maxWriteBatchSize": MAX_WRITE_BATCH,
            "localTime": dt.datetime.now(dt.UTC).replace(tzinfo=None),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn_id,
            "minWireVersion": 0,
            "maxWireVersion": self.max_wire_version,
            "readOnly": False,
            "ok": 1.0,
        }
        if primary:
            reply["primary"] = self.address
        if legacy:
            reply["ismaster"] = primary
        return reply

    def is_primary(self) -> bool:
        return True

    def cmd_hello(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        return self.hello_reply(conn_id, legacy=False)

    def cmd_ismaster(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        return self.hello_reply(conn_id, legacy=True)

    def cmd_ping(self, *_: Any) -> dict[str, Any]:
        return {"ok": 1.0}

    def cmd_buildinfo(self, *_: Any) -> dict[str, Any]:
        parts = [int(p) for p in self.server_version.split(".")] + [0]
        return {"version": self.server_version, "versionArray": parts[:4], "ok": 1.0}

    def cmd_endsessions(self, *_: Any) -> dict[str, Any]:
        return {"ok": 1.0}

    def cmd_getlasterror(self, *_: Any) -> dict[str, Any]:
        return {"ok": 1.0, "err": None, "n": 0}

    def cmd_cosmigratesandbox(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Test-only admin command: read counters, set faults, drop connections."""
        if "faults" in body:
            try:
                self.faults.update(dict(body["faults"]))
            except FaultSpecError as exc:
                raise CommandError(2, str(exc)) from exc
        if body.get("dropConnections"):
            asyncio.get_running_loop().call_soon(self.drop_connections)
        return {"ok": 1.0, "writes": Int64(self.store.writes), "commands": Int64(self.commands),
                "faults": {k: v for k, v in self.faults.snapshot().items() if v is not None}}

    def cmd_listdatabases(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        dbs = []
        total = 0
        for name, colls in sorted(self.store.databases.items()):
            size = sum(len(raw) for c in colls.values() for raw in c.docs.values())
            total += size
            entry: dict[str, Any] = {"name": name}
            if not body.get("nameOnly"):
                entry.update({"sizeOnDisk": Int64(size), "empty": size == 0})
            dbs.append(entry)
        flt = body.get("filter")
        if flt:
            dbs = [d for d in dbs if matches(d, flt)]
        return {"databases": dbs, "totalSize": Int64(total), "ok": 1.0}

    def cmd_listcollections(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        out = []
        for name, coll in sorted(self.store.databases.get(db, {}).items()):
            info = {"name": name, "type": "collection", "options": dict(coll.options), "info": {"readOnly": False},
                    "idIndex": {"v": 2, "key": {"_id": 1}, "name": "_id_"}}
            out.append(info)
        flt = body.get("filter")
        if flt:
            out = [c for c in out if matches(c, flt)]
        return self._cursor_reply(f"{db}.$cmd.listCollections", iter([_raw(d) for d in out]), body.get("cursor", {}).get("batchSize", 0))

    def cmd_create(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        name = body["create"]
        if self.store.get(db, name) is not None:
            raise CommandError(48, f"Collection {db}.{name} already exists.", "NamespaceExists")
        if body.get("capped"):
            self.check_capped()
        coll = self.store.get_or_create(db, name)
        coll.options = {k: body[k] for k in ("capped", "size", "max") if k in body}
        return {"ok": 1.0}

    def check_capped(self) -> None:
        """Personality hook: DocumentDB refuses capped collections."""

    def cmd_drop(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        if not self.store.drop(db, body["drop"]):
            raise CommandError(26, "ns not found", "NamespaceNotFound")
        return {"ok": 1.0, "ns": f"{db}.{body['drop']}"}

    def cmd_dropdatabase(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        self.store.drop_database(db)
        return {"ok": 1.0, "dropped": db}

    # --- indexes ---------------------------------------------------------------------

    def cmd_listindexes(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        coll = self.store.get(db, body["listIndexes"])
        if coll is None:
            raise CommandError(26, f"ns does not exist: {db}.{body['listIndexes']}", "NamespaceNotFound")
        docs = [_raw(ix.describe()) for ix in coll.indexes.values()]
        return self._cursor_reply(f"{db}.{coll.name}", iter(docs), body.get("cursor", {}).get("batchSize", 0))

    def validate_index(self, spec: dict[str, Any]) -> None:
        """Personality hook: refuse index kinds the server does not support."""

    def cmd_createindexes(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        coll = self.store.get_or_create(db, body["createIndexes"])
        before = len(coll.indexes)
        for raw_spec in body.get("indexes", []):
            spec = dict(raw_spec)
            self.validate_index(spec)
            key = dict(spec.pop("key"))
            name = spec.pop("name", None) or "_".join(f"{k}_{v}" for k, v in key.items())
            spec.pop("v", None)
            ix = IndexSpec(name=name, key=key, unique=bool(spec.pop("unique", False)),
                           sparse=bool(spec.pop("sparse", False)),
                           partial=spec.pop("partialFilterExpression", None), extra=spec)
            try:
                coll.add_index(ix)
            except DuplicateKey as exc:
                raise CommandError(11000, str(exc), "DuplicateKey") from exc
        return {"ok": 1.0, "numIndexesBefore": before, "numIndexesAfter": len(coll.indexes),
                "createdCollectionAutomatically": before == 1 and not coll.docs}

    def cmd_dropindexes(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        coll = self.store.get(db, body["dropIndexes"])
        if coll is None:
            raise CommandError(26, "ns not found", "NamespaceNotFound")
        which = body.get("index")
        names = [n for n in coll.indexes if n != "_id_"] if which == "*" else [which] if isinstance(which, str) else [
            n for n, ix in coll.indexes.items() if ix.key == dict(which or {})]
        for n in names:
            if n == "_id_":
                raise CommandError(72, "cannot drop _id index", "InvalidOptions")
            if n not in coll.indexes:
                raise CommandError(27, f"index not found with name [{n}]", "IndexNotFound")
            del coll.indexes[n]
        return {"ok": 1.0, "nIndexesWas": len(coll.indexes) + len(names)}

    # --- reads ------------------------------------------------------------------------

    def select(self, coll: Collection | None, flt: dict[str, Any], sort: dict[str, Any] | None) -> Iterator[tuple[Hashable, dict[str, Any] | None]]:
        """Matching keys in the requested order, with the decoded doc where it was needed."""
        if coll is None:
            return
        only_id = set(flt) <= {"_id"}
        if "_id" in flt:
            cond = flt["_id"]
            if not (isinstance(cond, dict) and cond and next(iter(cond)).startswith("$")):
                # An exact `_id`: at most one document (several in a sharded Cosmos collection), then the rest
                # of the filter (an applier's documentKey filter carries the shard key too).
                for key in coll.keys_for_id(cond):
                    if only_id:
                        yield key, None
                    else:
                        doc = coll.decode(key)
                        if matches(doc, flt):
                            yield key, doc
                return
            if isinstance(cond, dict) and set(cond) == {"$in"} and isinstance(cond["$in"], list) and not sort \
                    and not any(isinstance(v, (dict, list)) or hasattr(v, "pattern") for v in cond["$in"]):
                # Point lookups along the _id index, as a real server does for $in on _id.
                seen: set[Hashable] = set()
                for value in cond["$in"]:
                    for key in coll.keys_for_id(value):
                        if key not in seen:
                            seen.add(key)
                            yield key, None
                return
        if sort and set(sort) != {"_id"}:
            docs = [coll.decode(k) for k in list(coll.docs)]
            docs = [d for d in docs if matches(d, flt)]
            for d in sort_documents(docs, sort):
                yield coll.identity(d["_id"], doc=d), d
            return
        if sort:
            lower, inclusive = _lower_bound(flt.get("_id"))
            keys: Iterator[Hashable] = coll.ordered_keys(lower, inclusive)
            if sort["_id"] < 0:
                keys = iter(list(coll.ordered_keys())[::-1])
            elif only_id and _range_ops(flt.get("_id")):
                # Index bounds alone decide a pure _id range (start by bisection, stop at the bound or the
                # bracket's end), as on a real server: no per-document matching.
                yield from ((key, None) for key in _until_bound(coll.ordered_items(lower, inclusive), flt["_id"]))
                return
        else:
            keys = iter(list(coll.docs))
        for key in keys:
            if key not in coll.docs:
                continue
            if not flt:
                yield key, None
            elif only_id:
                if matches({"_id": coll.id_values[key]}, flt):
                    yield key, None
            else:
                doc = coll.decode(key)
                if matches(doc, flt):
                    yield key, doc

    def _find_docs(self, coll: Collection | None, body: dict[str, Any]) -> Iterator[RawBSONDocument]:
        flt = dict(body.get("filter") or {})
        sort = dict(body.get("sort") or {}) or None
        projection = body.get("projection")
        skip = int(body.get("skip") or 0)
        limit = abs(int(body.get("limit") or 0))
        n = 0
        for i, (key, doc) in enumerate(self.select(coll, flt, sort)):
            if i < skip:
                continue
            if limit and n >= limit:
                return
            n += 1
            assert coll is not None
            raw = coll.docs.get(key)
            if raw is None:
                continue
            if projection:
                yield _raw(project(doc if doc is not None else coll.decode(key), projection))
            else:
                yield RawBSONDocument(raw)

    def cmd_find(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        coll = self.store.get(db, body["find"])
        docs = self._find_docs(coll, body)
        size = int(body.get("batchSize", 101))
        if body.get("singleBatch") or (body.get("limit") or 0) < 0:
            batch, _ = Cursor("", docs).next_batch(size or abs(int(body.get("limit") or 0)))
            return {"cursor": {"firstBatch": batch, "id": Int64(0), "ns": f"{db}.{body['find']}"}, "ok": 1.0}
        return self._cursor_reply(f"{db}.{body['find']}", docs, size)

    def _cursor_reply(self, ns: str, docs: Iterator[RawBSONDocument], batch_size: int) -> dict[str, Any]:
        cursor = Cursor(ns, docs)
        batch, done = cursor.next_batch(batch_size)
        cid = 0
        if not done:
            cid = random.randint(1, 2**62)
            self._cursors[cid] = cursor
        return {"cursor": {"firstBatch": batch, "id": Int64(cid), "ns": ns}, "ok": 1.0}

    async def cmd_getmore(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        cid = int(body["getMore"])
        cursor = self._cursors.get(cid)
        if cursor is None:
            raise CommandError(43, f"cursor id {cid} not found", "CursorNotFound")
        size = int(body.get("batchSize") or 0)
        if isinstance(cursor, Cursor):
            batch, done = cursor.next_batch(size)
            if done:
                self._cursors.pop(cid, None)
            return {"cursor": {"nextBatch": batch, "id": Int64(0 if done else cid), "ns": cursor.ns}, "ok": 1.0}
        return await self.change_stream_getmore(cid, cursor, body)

    async def change_stream_getmore(self, cid: int, cursor: Any, body: dict[str, Any]) -> dict[str, Any]:
        raise CommandError(2, "not a change stream server")

    def cmd_killcursors(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        killed = []
        for cid in body.get("cursors", []):
            if self._cursors.pop(int(cid), None) is not None:
                killed.append(cid)
        return {"cursorsKilled": killed, "cursorsNotFound": [], "cursorsAlive": [], "cursorsUnknown": [], "ok": 1.0}

    def cmd_count(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        coll = self.store.get(db, body["count"])
        flt = dict(body.get("query") or {})
        if not flt and coll is not None:
            n = len(coll.docs)
        else:
            # An _id range is counted along the _id index (bounded), like a real server does.
            order = {"_id": 1} if set(flt) == {"_id"} and _range_ops(flt["_id"]) else None
            n = sum(1 for _ in self.select(coll, flt, order))
        n = max(0, n - int(body.get("skip") or 0))
        if body.get("limit"):
            n = min(n, abs(int(body["limit"])))
        return {"n": n, "ok": 1.0}

    def cmd_collstats(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Counts as both servers report them (the full load's estimate reads `count`)."""
        coll = self.store.get(db, body["collStats"])
        if coll is None:
            raise CommandError(26, f"Collection {db}.{body['collStats']} does not exist", "NamespaceNotFound")
        size = sum(len(d) for d in coll.docs.values())
        n = len(coll.docs)
        return {"ns": f"{db}.{coll.name}", "count": n, "size": size, "avgObjSize": size // n if n else 0,
                "storageSize": size, "nindexes": len(coll.indexes), "ok": 1.0}

    def cmd_aggregate(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        pipeline = list(body.get("pipeline") or [])
        if pipeline and "$changeStream" in pipeline[0]:
            return self.open_change_stream(db, body, pipeline)
        target = body["aggregate"]
        if not isinstance(target, str):
            raise CommandError(2, "the sandbox only aggregates over a collection")
        coll = self.store.get(db, target)
        docs: list[dict[str, Any]] = [coll.decode(k) for k in coll.docs] if coll else []
        for stage in pipeline:
            docs = self._stage(docs, stage)
        size = int(body.get("cursor", {}).get("batchSize", 101))
        return self._cursor_reply(f"{db}.{target}", iter([_raw(d) for d in docs]), size)

    def open_change_stream(self, db: str, body: dict[str, Any], pipeline: list[Any]) -> dict[str, Any]:
        raise CommandError(40573, "The $changeStream stage is only supported on replica sets", "Location40573")

    def _stage(self, docs: list[dict[str, Any]], stage: dict[str, Any]) -> list[dict[str, Any]]:
        (op, arg), = stage.items()
        if op == "$match":
            return [d for d in docs if matches(d, arg)]
        if op == "$sort":
            return sort_documents(docs, arg)
        if op == "$limit":
            return docs[: int(arg)]
        if op == "$skip":
            return docs[int(arg):]
        if op == "$project":
            return [project(d, arg) for d in docs]
        if op == "$sample":
            n = int(arg.get("size", 0))
            return random.sample(docs, min(n, len(docs)))
        if op == "$count":
            return [{str(arg): len(docs)}] if docs else []
        if op == "$group":
            return self._group(docs, arg)
        raise CommandError(40324, f"Unrecognized pipeline stage name: '{op}'", "Location40324")

    def _group(self, docs: list[dict[str, Any]], spec: dict[str, Any]) -> list[dict[str, Any]]:
        group_id = spec.get("_id")
        if isinstance(group_id, str) and group_id.startswith("$"):
            raise CommandError(2, "the sandbox's $group only groups everything into one (_id: constant)")
        if not docs:
            return []
        out: dict[str, Any] = {"_id": group_id}
        for name, acc in spec.items():
            if name == "_id":
                continue
            if not (isinstance(acc, dict) and set(acc) == {"$sum"}):
                raise CommandError(2, "the sandbox's $group supports only {$sum: <number>} or {$sum: '$field'}")
            arg = acc["$sum"]
            if isinstance(arg, str) and arg.startswith("$"):
                field = arg[1:]
                out[name] = sum(d.get(field, 0) for d in docs if isinstance(d.get(field, 0), (int, float)))
            else:
                out[name] = arg * len(docs)
        return [out]

    # --- writes ---------------------------------------------------------------------

    def check_write_command(self, name: str, body: dict[str, Any], count: int) -> None:
        """Personality hook: batch limits, retryable-write refusal."""
        if count > MAX_WRITE_BATCH or count < 1:
            raise CommandError(
                16, f"Write batch sizes must be between 1 and {MAX_WRITE_BATCH}. Got {count} operations.",
                "InvalidLength",
            )
        if self.reject_retryable_writes and "txnNumber" in body:
            raise CommandError(9, "Unrecognized field: 'txnNumber'", "FailedToParse")

    def validate_document(self, raw: bytes) -> None:
        """Personality hook: refuse documents the server cannot store."""

    def _statements(self, req: wire.Request, body: dict[str, Any], field: str) -> list[RawBSONDocument]:
        if field in req.sequences:
            return req.sequences[field]
        return [_raw(d) for d in body.get(field) or []]

    @staticmethod
    def _write_error(index: int, exc: Exception) -> dict[str, Any]:
        if isinstance(exc, DuplicateKey):
            return {"index": index, "code": 11000, "errmsg": str(exc),
                    "keyPattern": exc.key_pattern, "keyValue": exc.key_value}
        if isinstance(exc, (QueryError, CommandError)):
            return {"index": index, "code": exc.code, "errmsg": str(exc)}
        return {"index": index, "code": 1, "errmsg": f"internal sandbox error: {exc!r}"}

    def _store_doc(
        self, coll: Collection, key: Hashable, id_value: Any, raw: bytes, doc: dict[str, Any] | None, write: str
    ) -> None:
        """Validate and store one document; `write` is insert, upsert or update (for the size error)."""
        if len(raw) > MAX_BSON_SIZE:
            raise _too_large(write, len(raw))
        self.validate_document(raw)
        if coll.shard_key is not None and write != "insert" and coll.identity(id_value, raw, doc) != key:
            raise QueryError(66, f"After applying the update, the shard key field '{coll.shard_key}' was found to have "
                             "been altered: a document's shard key value is immutable", "ImmutableField")
        coll.put(key, id_value, raw, doc)
        self.store.writes += 1

    async def cmd_insert(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        docs = self._statements(req, body, "documents")
        self.check_write_command("insert", body, len(docs))
        await self.slow_write(req)
        coll = self.store.get_or_create(db, body["insert"])
        ordered = body.get("ordered", True)
        n = 0
        errors = []
        state: dict[str, Any] = {}
        for i, doc in enumerate(docs):
            try:
                raw = raw_bytes(doc)
                try:
                    id_value = doc["_id"]
                except KeyError:
                    id_value = ObjectId()
                    raw = prepend_id(raw, id_value)
                if not first_field_is_id(raw):
                    raw = prepend_id(raw, id_value)
                id_value = _to_py(id_value)
                key = coll.identity(id_value, raw)
                if key in coll.docs:
                    raise DuplicateKey(coll.ns, coll.indexes["_id_"], {"_id": id_value})
                await self.before_statement(coll, len(raw), state)
                self._store_doc(coll, key, id_value, raw, None, "insert")
                n += 1
            except (DuplicateKey, QueryError, CommandError) as exc:
                errors.append(self._write_error(i, exc))
                if ordered:
                    break
        reply: dict[str, Any] = {"n": n, "ok": 1.0}
        if errors:
            reply["writeErrors"] = errors
        return reply

    async def slow_write(self, req: wire.Request) -> None:
        """The slow-write fault, honouring the command's `maxTimeMS` as mongod does on writes.

        A write that cannot start before its `maxTimeMS` (counted from when the command was
        received) is aborted with MaxTimeMSExpired (50) and changes nothing: it is never
        executed late. This is what the target fence relies on (docs/design.md, bounded writes).
        """
        if not self.faults.slow_write_ms:
            return
        delay = self.faults.slow_write_ms / 1000
        self.writes_delayed += 1
        limit = req.body.get("maxTimeMS")
        if isinstance(limit, (int, float)) and limit > 0:
            left = req.received_at + limit / 1000 - time.monotonic()
            if delay > left:
                await asyncio.sleep(max(0.0, left))
                raise CommandError(50, "operation exceeded time limit", "MaxTimeMSExpired")
        await asyncio.sleep(delay)

    async def cmd_update(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        stmts = self._statements(req, body, "updates")
        self.check_write_command("update", body, len(stmts))
        await self.slow_write(req)
        coll = self.store.get_or_create(db, body["update"])
        ordered = body.get("ordered", True)
        matched = modified = 0
        upserted: list[dict[str, Any]] = []
        errors = []
        state: dict[str, Any] = {}
        for i, stmt in enumerate(stmts):
            try:
                await self.before_statement(coll, len(stmt.raw), state)
                m, mod, up = self._update_one_stmt(coll, stmt)
                matched += m
                modified += mod
                if up is not None:
                    upserted.append({"index": i, "_id": up})
            except (DuplicateKey, QueryError, CommandError) as exc:
                errors.append(self._write_error(i, exc))
                if ordered:
                    break
        reply: dict[str, Any] = {"n": matched + len(upserted), "nModified": modified, "ok": 1.0}
        if upserted:
            reply["upserted"] = upserted
        if errors:
            reply["writeErrors"] = errors
        return reply

    def _update_one_stmt(self, coll: Collection, stmt: RawBSONDocument) -> tuple[int, int, Any]:
        q = _to_py(stmt["q"])
        u = stmt["u"]
        if isinstance(u, list):
            raise QueryError(2, "the sandbox does not support pipeline updates")
        upsert = bool(stmt.get("upsert", False))
        multi = bool(stmt.get("multi", False))
        u_doc = _to_py(u)
        operator = is_operator_update(u_doc)
        if multi and not operator:
            raise QueryError(9, "multi update is not supported for replacement-style update", "FailedToParse")
        keys = [k for k, _ in self.select(coll, q, None)]
        if not multi:
            keys = keys[:1]
        if not keys:
            if not upsert:
                return 0, 0, None
            if operator:
                seed = equality_fields(q)
                new = apply_update(seed, u_doc, inserting=True)
                id_value = new.get("_id", ObjectId())
                new = {"_id": id_value, **{k: v for k, v in new.items() if k != "_id"}}
                raw = bson.encode(new, codec_options=DECODE_OPTIONS)
                doc: dict[str, Any] | None = new
            else:
                if "_id" in u_doc:
                    id_value = u_doc["_id"]
                else:
                    id_value = equality_fields(q).get("_id", ObjectId())
                raw = raw_bytes(u)
                if not first_field_is_id(raw):
                    raw = prepend_id(raw, id_value)
                doc = None
            key = coll.identity(id_value, raw, doc)
            if key in coll.docs:
                # The filter matched nothing, yet a document with this identity exists (the filter named other
                # fields too): the insert half of the upsert breaks the _id index, as on mongod.
                raise DuplicateKey(coll.ns, coll.indexes["_id_"], {"_id": id_value})
            self._store_doc(coll, key, id_value, raw, doc, "upsert")
            return 0, 0, id_value
        modified = 0
        for key in keys:
            id_value = coll.id_values[key]
            if operator:
                new = apply_update(coll.decode(key), u_doc, inserting=False)
                raw = bson.encode(new, codec_options=DECODE_OPTIONS)
                if raw == coll.docs[key]:
                    continue  # mongod's no-op test is binary: {$set: {a: 1.0}} on a: 1 is a change
                self._store_doc(coll, key, id_value, raw, new, "update")
            else:
                if "_id" in u_doc:
                    # mongod checks the immutable _id by value (1.0 may replace 1) and
                    # then stores the replacement as given, _id included.
                    if not values_equal(u_doc["_id"], id_value):
                        raise QueryError(66, "After applying the update, the (immutable) field '_id' was found to have been altered", "ImmutableField")
                    id_value = u_doc["_id"]
                raw = raw_bytes(u)
                if not first_field_is_id(raw):
                    raw = prepend_id(raw, id_value)
                self._store_doc(coll, key, id_value, raw, u_doc, "update")
            modified += 1
        return len(keys), modified, None

    async def cmd_delete(self, req: wire.Request, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        stmts = self._statements(req, body, "deletes")
        self.check_write_command("delete", body, len(stmts))
        await self.slow_write(req)
        coll = self.store.get(db, body["delete"])
        ordered = body.get("ordered", True)
        n = 0
        errors = []
        state: dict[str, Any] = {}
        for i, stmt in enumerate(stmts):
            try:
                q = _to_py(stmt["q"])
                limit = int(stmt.get("limit", 0))
                keys = [k for k, _ in self.select(coll, q, None)]
                if limit:
                    keys = keys[:limit]
                assert coll is not None or not keys
                for key in keys:
                    await self.before_statement(coll, len(coll.docs[key]), state)  # type: ignore[union-attr]
                    self.remove_doc(coll, key)  # type: ignore[arg-type]
                    self.store.writes += 1
                    n += 1
            except (QueryError, CommandError) as exc:
                errors.append(self._write_error(i, exc))
                if ordered:
                    break
        reply: dict[str, Any] = {"n": n, "ok": 1.0}
        if errors:
            reply["writeErrors"] = errors
        return reply

    async def before_statement(self, coll: Collection | None, nbytes: int, state: dict[str, Any]) -> None:
        """Personality hook, before each statement of a write command: a CommandError fails that statement
        only (Cosmos throttles in the middle of a bulk write). `state` lives for one command."""

    def remove_doc(self, coll: Collection, key: Hashable) -> None:
        coll.remove(key)


def _too_large(write: str, size: int) -> CommandError:
    """The write error mongod gives for a document over 16 MiB; the code depends on the write path.

    From mongod (jstests/core/max_doc_size.js): an insert fails with BadValue
    (2), an upsert's new document with 17420, an update or replacement of an
    existing document with 17419. Each is a per-statement write error.
    """
    if write == "insert":
        return CommandError(2, f"object to insert too large. size in bytes: {size}, max size: {MAX_BSON_SIZE}")
    if write == "upsert":
        return CommandError(17420, f"Document to upsert is larger than {MAX_BSON_SIZE}", "Location17420")
    return CommandError(17419, f"Resulting document after update is larger than {MAX_BSON_SIZE}", "Location17419")


def _range_ops(cond: Any) -> bool:
    return isinstance(cond, dict) and bool(cond) and set(cond) <= {"$gt", "$gte", "$lt", "$lte"}


def _until_bound(items: Iterator[tuple[tuple[Any, ...], Hashable]], cond: dict[str, Any]) -> Iterator[Hashable]:
    """An ascending `_id` scan cut at the range's end: range operators match one type bracket only, so the
    scan stops past the upper bound or past the bracket, as a real server's index bounds do."""
    bracket = sort_key(next(iter(cond.values())))[0]
    upper = cond.get("$lte", cond.get("$lt"))
    upper_key = sort_key(upper) if ("$lte" in cond or "$lt" in cond) else None
    strict = "$lt" in cond
    for k, key in items:
        if k[0] > bracket:
            return
        if upper_key is not None and not is_nan_key(k) and (k > upper_key or (strict and k == upper_key)):
            return
        yield key


def _lower_bound(cond: Any) -> tuple[Any, bool]:
    """The lower `_id` bound of a range filter, to start an ordered scan by bisection."""
    if isinstance(cond, dict):
        if "$gt" in cond:
            return cond["$gt"], False
        if "$gte" in cond:
            return cond["$gte"], True
    return None, True
