"""The Cosmos DB for MongoDB (RU) personality: change streams as Cosmos serves them.

Rules emulated (see the README, "The sandbox"):
- only collection-level change streams; the pipeline must be exactly the
  $match on insert/update/replace then the $project of _id, fullDocument, ns,
  documentKey, with fullDocument "updateLookup";
- events carry the document as it is when the page is served, no
  operationType, no clusterTime; deletes only with the delete preview on;
- every event of a page carries the same opaque token (the page's end);
- replies carry no operationTime; 16500 throttling with RetryAfterMs, empty
  pages while throttled, dropped and idle-closed connections.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import bson
from bson.binary import Binary
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp

from cosmigrate.sandbox.bsonvalues import DECODE_OPTIONS
from cosmigrate.sandbox.server import CommandError, DropConnection, MongoServer
from cosmigrate.sandbox.storage import Collection

PIPELINE_ERROR = "Change stream must be followed by a match and then a project stage"
TOKEN_ERROR = "Change feed token format is invalid"
FULL_RANGE = {"min": "", "max": "FF"}
DEFAULT_PAGE = 1000


def make_token(rid: str, lsn: int) -> dict[str, Any]:
    """A V2 resume token: JSON with one continuation per physical partition."""
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
    return {"_data": Binary(json.dumps(data, separators=(",", ":")).encode())}


def beginning_token() -> dict[str, Any]:
    """The old-form token with LSN "0" over the full range: replay from the start of the feed."""
    data = [{"token": json.dumps("0"), "range": FULL_RANGE}]
    return {"_data": Binary(json.dumps(data, separators=(",", ":")).encode())}


def parse_token(token: Any, rid: str) -> int:
    """The LSN a token stands for; raises CommandError for anything Cosmos would refuse."""
    try:
        data = token["_data"]
        text = bytes(data).decode() if isinstance(data, (bytes, Binary)) else str(data)
        parsed = json.loads(text)
        if isinstance(parsed, list):  # old form, no collection id
            (entry,) = parsed
            if entry["range"] != FULL_RANGE:
                raise ValueError("partition range")
            lsn = int(json.loads(entry["token"]))
        else:
            if parsed["V"] != 2 or parsed["Rid"] != rid:
                raise ValueError("version or collection")
            (cont,) = parsed["Continuation"]
            if cont["FeedRange"]["value"] != FULL_RANGE:
                raise ValueError("partition range")
            lsn = int(json.loads(cont["State"]["value"]))
        if lsn < 0:
            raise ValueError("negative lsn")
        return lsn
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
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
    """Emulated Azure Cosmos DB for MongoDB (RU-based) account."""

    server_version = "6.0.0"
    max_wire_version = 17
    set_name = "globaldb"
    with_feed = True

    def uri(self) -> str:
        return (
            f"mongodb://{self.address}/?replicaSet={self.set_name}&retryWrites=false"
            "&maxIdleTimeMS=120000"
        )

    async def before_command(self, name: str, body: dict[str, Any]) -> None:
        await super().before_command(name, body)
        if self.faults.chance(self.faults.throttle_rate):
            ms = self.faults.retry_after_ms
            raise CommandError(
                16500,
                f"Error=16500, RetryAfterMs={ms}, Details='Response status code does not indicate "
                "success: TooManyRequests (429); Substatus: 3200; Reason: (Request rate is large. "
                "More Request Units may be needed, so no changes were made. Please retry this "
                "request later.)'",
                "TooManyRequests",
            )

    def cmd_customaction(self, req: Any, db: str, body: dict[str, Any], conn_id: int) -> dict[str, Any]:
        """Cosmos's custom commands; only GetChangeStreamTokens is emulated (one token per physical partition)."""
        action = body.get("customAction")
        if action != "GetChangeStreamTokens":
            raise CommandError(2, f"Unsupported customAction {action!r}")
        if self.faults.no_head_tokens:
            raise CommandError(59, "no such command: 'customAction'", "CommandNotFound")
        if self.faults.refuse_head_tokens:
            raise CommandError(13, "not authorized on the account to execute command GetChangeStreamTokens",
                               "Unauthorized")
        if self.faults.chance(self.faults.head_throttle_rate):
            raise CommandError(16500, f"Error=16500, RetryAfterMs={self.faults.retry_after_ms}, Details='Request "
                               "rate is large'", "TooManyRequests")
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
        token = make_token(coll.feed.rid, lsn)
        if start is not None:
            token["_startAtOperationTime"] = start
        return {"resumeAfterTokens": [token], "ok": 1.0}

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
            lsn = parse_token(token, coll.feed.rid)
            if lsn > coll.feed.lsn:
                raise CommandError(2, TOKEN_ERROR)
        else:
            lsn = coll.feed.lsn
        page = int(body.get("cursor", {}).get("batchSize", DEFAULT_PAGE) or 0)
        cursor = ChangeStreamCursor(coll, db, lsn, DEFAULT_PAGE, with_op_type)
        cid = random.randint(1, 2**62)
        self._cursors[cid] = cursor
        batch = self._page(cursor, page) if page else []
        return {"cursor": self._cursor_doc(cursor, cid, batch, "firstBatch"), "ok": 1.0}

    def _cursor_doc(self, cursor: ChangeStreamCursor, cid: int, batch: list[RawBSONDocument], field: str) -> dict[str, Any]:
        doc: dict[str, Any] = {field: batch, "id": Int64(cid), "ns": cursor.ns}
        if not self.faults.no_postbatch_token:
            doc["postBatchResumeToken"] = make_token(cursor.coll.feed.rid, cursor.lsn)  # type: ignore[union-attr]
        return doc

    def _page(self, cursor: ChangeStreamCursor, limit: int) -> list[RawBSONDocument]:
        feed = cursor.coll.feed
        assert feed is not None
        entries, last = feed.read(cursor.lsn, limit)
        cursor.lsn = last
        if not entries:
            return []
        token = make_token(feed.rid, last)
        ns = {"db": cursor.db, "coll": cursor.coll.name}
        out = []
        docs = cursor.coll.docs
        ids = cursor.coll.id_values
        for key, op in entries:
            event: dict[str, Any] = {"_id": token}
            if cursor.with_op_type:
                event["operationType"] = op
            if op != "delete":
                event["fullDocument"] = RawBSONDocument(docs[key])
            event["ns"] = ns
            event["documentKey"] = {"_id": ids[key]}
            out.append(RawBSONDocument(bson.encode(event, codec_options=DECODE_OPTIONS)))
        return out

    async def change_stream_getmore(self, cid: int, cursor: Any, body: dict[str, Any]) -> dict[str, Any]:
        assert isinstance(cursor, ChangeStreamCursor)
        if self.store.get(cursor.db, cursor.coll.name) is not cursor.coll:
            self._cursors.pop(cid, None)
            raise CommandError(43, f"cursor id {cid} not found", "CursorNotFound")
        limit = int(body.get("batchSize") or cursor.page)
        wait_ms = body.get("maxTimeMS", 1000)
        if self.faults.chance(self.faults.empty_page_rate):
            return {"cursor": self._cursor_doc(cursor, cid, [], "nextBatch"), "ok": 1.0}
        batch = self._page(cursor, limit)
        if not batch and wait_ms:
            changed = cursor.coll.changed_event()
            try:
                await asyncio.wait_for(changed.wait(), wait_ms / 1000)
            except TimeoutError:
                pass
            if cid not in self._cursors:
                raise DropConnection()
            batch = self._page(cursor, limit)
        return {"cursor": self._cursor_doc(cursor, cid, batch, "nextBatch"), "ok": 1.0}
