"""Everything that touches the MongoDB driver, in one place.

PyMongo's native asyncio client (`AsyncMongoClient`, PyMongo >= 4.13) is the
driver; Motor reached end of life and wraps the synchronous driver in
threads. Keeping client creation and the few driver calls here makes the
choice a one-file change.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import struct
from collections.abc import Sequence
from typing import Any

import bson
from bson.binary import Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.raw_bson import RawBSONDocument
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient, common
from pymongo.asynchronous.change_stream import AsyncCollectionChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.monitor import Monitor
from pymongo.errors import InvalidName
from pymongo.topology_description import TopologyDescription

# The data path's codec options. DATETIME_AUTO: a BSON datetime outside years 1-9999 is valid BSON (Cosmos
# stores it), but the default conversion raises InvalidBSON the moment a RawBSONDocument field is read;
# with AUTO such a value stays a DatetimeMS (milliseconds, re-encoded byte for byte).
RAW: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)


class RawDoc(RawBSONDocument):
    """A RawBSONDocument that answers, without decoding itself, the two questions PyMongo asks of every document
    the data path moves.

    PyMongo before 4.18 inflates a RawBSONDocument in Python on first access to any field (about 45 us for a
    1 KB change event, measured in bench/README.md): ReplaceOne's validation asks `if replacement:` (length,
    so a full inflate per written document), and the change stream reads `event["_id"]` (the resume token, a
    full inflate per event read). Truthiness is read from the byte length here, and an embedded-document `_id`
    in first place (Cosmos's event layout) is sliced; anything else takes RawBSONDocument's own path.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return len(self.raw) > 5  # an empty BSON document is 5 bytes

    def __getitem__(self, item: str) -> Any:
        raw = self.raw
        if item == "_id" and len(raw) > 13 and raw[4] == 0x03 and raw[5:9] == b"_id\x00":
            end = 9 + _unpack_i32(raw, 9)[0]
            if end < len(raw):
                return RawDoc(bytes(raw[9:end]), self._RawBSONDocument__codec_options)  # type: ignore[attr-defined]
        return super().__getitem__(item)


RAW_DOCS: CodecOptions[RawBSONDocument] = RAW.with_options(document_class=RawDoc)
"""RAW with RawDoc as the document class: for the change stream's events (see open_change_stream)."""

_CLIENT_CODEC = {"document_class": RawBSONDocument, "datetime_conversion": DatetimeConversion.DATETIME_AUTO}
SYSTEM_DATABASES = frozenset({"admin", "local", "config"})
SCRATCH_DB = "cosmigrate_plan"
"""The target database of `cosmigrate plan`'s scratch collection: never discovered, migrated or verified."""
SKIPPED_DATABASES = SYSTEM_DATABASES | {SCRATCH_DB}

CAPTURE_OPS = ["insert", "update", "replace"]
CAPTURE_FIELDS = {"_id": 1, "fullDocument": 1, "ns": 1, "documentKey": 1}


def change_pipeline(deletes_preview: bool) -> list[dict[str, Any]]:
    """The only pipeline Cosmos DB accepts (plus deletes when the preview is enabled)."""
    if deletes_preview:
        return [
            {"$match": {"operationType": {"$in": [*CAPTURE_OPS, "delete"]}}},
            {"$project": {**CAPTURE_FIELDS, "operationType": 1}},
        ]
    return [{"$match": {"operationType": {"$in": CAPTURE_OPS}}}, {"$project": dict(CAPTURE_FIELDS)}]


def beginning_token() -> dict[str, Any]:
    """The resume token meaning "from the beginning of the change feed": the old token form, LSN "0"
    over the full partition range. Cosmos replays the latest version of every document from it."""
    data = [{"token": '"0"', "range": {"min": "", "max": "FF"}}]
    return {"_data": Binary(json.dumps(data, separators=(",", ":")).encode())}


# --- Cosmos DB 4.2 (wire version 8) with a driver that requires 9 ---------------------------------------------
#
# PyMongo 4.18 raised MIN_SUPPORTED_WIRE_VERSION from 8 (MongoDB 4.2) to 9 (4.4). Cosmos DB for MongoDB accounts on
# server version 4.2, which many still run, report wire version 8, so the newest driver refuses them at server
# selection ("reports wire version 8, but this version of PyMongo requires at least 9"). Pinning an older driver
# instead meant shipping one the release never tested (and one whose C decoder refuses odd-length UUID binaries).
#
# The shim lowers the floor to 8 for the source client only. The refusal is computed in one place:
# `pymongo.topology_description.TopologyDescription._init_incompatible_err`, which compares every known server's
# `max_wire_version` with the module constant `pymongo.common.MIN_SUPPORTED_WIRE_VERSION`. The shim wraps that
# method (once, at import): after the driver's own check, a description whose topology settings carry the source
# client's monitor class (`TopologyDescription._topology_settings.monitor_class`, set through the client's
# `_monitor_class` option, PyMongo's hook for such customisation; it survives the re-initialisation that follows
# an SRV lookup) has the error cleared when every known server reports at least wire 8 and none is too new. Every
# other client, the target's included, keeps the driver's floor; a wire-7 server stays refused.
#
# What wire 8 loses with this driver, checked against its source (4.20.1): getMore sends `comment` without asking
# the wire version (cosmigrate sets none), and a change stream resumes by itself only after network errors or
# errors labelled ResumableChangeStreamError (4.2 servers label none); capture reopens the stream from its own
# position after any OperationFailure (cosmigrate.capture), so that loss is covered. tests/test_driver_shim.py
# fails when a driver upgrade moves or renames what the shim touches, or when the driver stops refusing wire 8
# (the shim is then obsolete).

SOURCE_MIN_WIRE = 8
"""The oldest wire version the source client accepts: Cosmos DB for MongoDB 4.2."""


class _SourceMonitor(Monitor):
    """PyMongo's server monitor, unchanged: its class marks a client's topology as the source's (see above)."""

    cosmigrate_min_wire = SOURCE_MIN_WIRE


def _install_wire8_shim() -> None:
    """Wrap TopologyDescription._init_incompatible_err (idempotent); a driver without it fails here, loudly."""
    original = getattr(TopologyDescription, "_init_incompatible_err", None)
    if not callable(original):
        raise RuntimeError("this PyMongo has no TopologyDescription._init_incompatible_err: the Cosmos DB 4.2 shim "
                           "in cosmigrate/mongo.py needs updating for it")
    if getattr(original, "cosmigrate_shim", False):
        return

    def _init_incompatible_err(self: TopologyDescription) -> None:
        original(self)
        settings = getattr(self, "_topology_settings", None)
        floor = getattr(getattr(settings, "monitor_class", None), "cosmigrate_min_wire", None)
        if floor is None or not self._incompatible_err:
            return
        for s in self._server_descriptions.values():
            if s.is_server_type_known and not (
                s.max_wire_version >= floor and s.min_wire_version <= common.MAX_SUPPORTED_WIRE_VERSION
            ):
                return
        self._incompatible_err = None

    _init_incompatible_err.cosmigrate_shim = True  # type: ignore[attr-defined]
    _init_incompatible_err.__wrapped__ = original  # type: ignore[attr-defined]
    TopologyDescription._init_incompatible_err = _init_incompatible_err  # type: ignore[method-assign]


_install_wire8_shim()


def source_client(uri: str, **overrides: Any) -> AsyncMongoClient[RawBSONDocument]:
    """A client for Cosmos DB: no retryable writes, idle connections recycled before Cosmos drops them, and wire
    version 8 (Cosmos DB 4.2) accepted (see the shim above)."""
    opts: dict[str, Any] = {"retryWrites": False, "appname": "cosmigrate", "_monitor_class": _SourceMonitor,
                            **_CLIENT_CODEC}
    if "maxidletimems" not in uri.lower():
        opts["maxIdleTimeMS"] = 120_000
    opts.update(overrides)
    return AsyncMongoClient(uri, **opts)


def target_client(uri: str, tls_ca_file: str = "", **overrides: Any) -> AsyncMongoClient[RawBSONDocument]:
    """A client for DocumentDB: retryable writes are unsupported there, so always off."""
    opts: dict[str, Any] = {"retryWrites": False, "appname": "cosmigrate", **_CLIENT_CODEC}
    if "sockettimeoutms" not in uri.lower():
        # A target gone silent must not hold a bulk write (and `ctl writer stop`, and a drain) until TCP gives
        # up after ~15 minutes; a 16 MB bulk write takes seconds on a healthy cluster.
        opts["socketTimeoutMS"] = 120_000
    if tls_ca_file:
        opts["tlsCAFile"] = tls_ca_file
    opts.update(overrides)
    return AsyncMongoClient(uri, **opts)


def raw_collection(client: AsyncMongoClient[Any], ns: str) -> AsyncCollection[RawBSONDocument]:
    db, _, coll = ns.partition(".")
    return client[db].get_collection(coll, codec_options=RAW)


async def open_change_stream(
    coll: AsyncCollection[RawBSONDocument], resume_after: RawBSONDocument | None, *, deletes_preview: bool,
    max_await_ms: int, batch_size: int | None = None,
) -> AsyncCollectionChangeStream[RawBSONDocument]:
    """Open the Cosmos change stream; events come back as RawDoc (never decoded, not even for their token)."""
    coll = coll.with_options(codec_options=RAW_DOCS)
    return await coll.watch(
        change_pipeline(deletes_preview), full_document="updateLookup", resume_after=resume_after,
        max_await_time_ms=max_await_ms, batch_size=batch_size,
    )


def page_drained(stream: Any) -> bool:
    """True when the change stream's current page is used up: the next `try_next()` asks the server (a getMore).

    PyMongo has no public way to ask; its cursor keeps the page in `_data` (a deque) in every 4.x release.
    Should that ever change, this answers False and capture falls back to cutting batches by age and size.
    """
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    try:
        return data is not None and len(data) == 0
    except TypeError:
        return False


def take_page(stream: Any) -> list[bytes]:
    """The rest of the change stream's current page as raw events, taken at once instead of by `try_next()`.

    Called right after `try_next()` returned an event: the other events of its page are already in memory, and
    going through `try_next()` for each costs more than the event's whole share of a full load's capture (the
    driver's timeout wrapper, its cursor step, a resume-token read per event). The stream's resume token ends
    where `try_next()` would have left it after the page's last event: the page's post-batch token, else that
    event's `_id`. PyMongo keeps the page in the cursor's `_data` deque in every 4.x release (as
    `page_drained` relies on); anything else answers [] and capture goes on event by event.
    """
    cursor = getattr(stream, "_cursor", None)
    data = getattr(cursor, "_data", None)
    if type(data) is not collections.deque or not data or not hasattr(stream, "_resume_token"):
        return []
    out = [bytes(doc.raw) for doc in data]
    data.clear()
    token = getattr(cursor, "_post_batch_resume_token", None)
    stream._resume_token = token if token is not None else RawDoc(out[-1], RAW)["_id"]
    return out


def page_events(stream: Any) -> int | None:
    """How many events are left in the change stream's current page; None when PyMongo's internals are not
    the expected ones (see `page_drained`)."""
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    try:
        return len(data) if data is not None else None
    except TypeError:
        return None


def page_bytes(stream: Any) -> int | None:
    """Raw bytes of the events still in the change stream's current page (the driver holds them); None when
    PyMongo's internals are not the expected ones (see `page_drained`)."""
    data = getattr(getattr(stream, "_cursor", None), "_data", None)
    try:
        return sum(len(doc.raw) for doc in data) if data is not None else None
    except (TypeError, AttributeError):
        return None


def matches_patterns(ns: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """`db.*`-style include/exclude patterns; exclude wins."""
    return any(fnmatch.fnmatchcase(ns, p) for p in include) and not any(fnmatch.fnmatchcase(ns, p) for p in exclude)


async def list_namespaces(client: AsyncMongoClient[Any], include: Sequence[str], exclude: Sequence[str]) -> list[str]:
    """Every user collection as `db.coll`, skipping system databases and `system.*` (and names the driver refuses)."""
    return (await discover_namespaces(client, include, exclude))[0]


async def discover_namespaces(
    client: AsyncMongoClient[Any], include: Sequence[str], exclude: Sequence[str],
) -> tuple[list[str], dict[str, str]]:
    """(every user collection to migrate as `db.coll`, {name: why it cannot be migrated}).

    MongoDB takes names that PyMongo refuses to address (`a..b`, a leading or
    trailing dot, `$`, NUL): such a collection cannot be watched, and it must
    neither stop the listing of the others nor be skipped silently. A database
    the driver refuses is reported as `<db>.*`.
    """
    out: list[str] = []
    refused: dict[str, str] = {}
    for db in await client.list_database_names():
        if db in SKIPPED_DATABASES:
            continue
        try:
            database = client[db]
        except InvalidName as exc:
            if matches_patterns(f"{db}.*", include, exclude):
                refused[f"{db}.*"] = f"the driver refuses this database name ({exc})"
            continue
        for coll in await database.list_collection_names():
            if coll.startswith("system."):
                continue
            ns = f"{db}.{coll}"
            if not matches_patterns(ns, include, exclude):
                continue
            try:
                database.get_collection(coll)
            except InvalidName as exc:
                refused[ns] = f"the driver refuses this collection name ({exc})"
                continue
            out.append(ns)
    return sorted(out), refused


def event_token(raw: bytes) -> bytes:
    """The raw `_id` (resume token) of a raw change event, without decoding the event.

    Cosmos puts `_id` first; the fast path slices it out. Anything else falls
    back to a real decode of the top level.
    """
    if raw[4] == 0x03 and raw[5:9] == b"_id\x00":
        size = int.from_bytes(raw[9:13], "little")
        return raw[9 : 9 + size]
    doc = RawBSONDocument(raw, RAW)
    token = doc["_id"]
    return bytes(token.raw) if isinstance(token, RawBSONDocument) else bson.encode(token)


_FULL_DOC = b"\x03fullDocument\x00"
_NS = b"\x03ns\x00"
_DOC_KEY = b"\x03documentKey\x00"


_unpack_i32 = struct.Struct("<i").unpack_from


def event_parts(raw: bytes) -> tuple[bytes, bytes | None]:
    """(raw documentKey, raw fullDocument or None for a delete) of a raw change event, without decoding it.

    Cosmos lays events out as `_id, fullDocument, ns, documentKey`; that layout
    is sliced directly (a few integer reads, on the hot path of every event).
    Anything else (the delete preview's `operationType`, another order) takes
    the general path.
    """
    if raw[4] == 0x03 and raw.startswith(b"_id\x00", 5):
        pos = 9 + _unpack_i32(raw, 9)[0]
        if raw.startswith(_FULL_DOC, pos):
            start = pos + 14  # len(_FULL_DOC)
            end = start + _unpack_i32(raw, start)[0]
            if raw.startswith(_NS, end):
                pos = end + 4  # len(_NS)
                pos += _unpack_i32(raw, pos)[0]
                if raw.startswith(_DOC_KEY, pos):
                    key_start = pos + 13  # len(_DOC_KEY)
                    key_end = key_start + _unpack_i32(raw, key_start)[0]
                    if key_end == len(raw) - 1:
                        return raw[key_start:key_end], raw[start:end]
    event = RawBSONDocument(raw, RAW)
    key = bytes(event["documentKey"].raw)
    full = event.get("fullDocument")
    if event.get("operationType") == "delete" or full is None:
        return key, None
    return key, bytes(full.raw)


def shared_id_part(key: bytes) -> bytes | None:
    """For a documentKey that carries more than `_id` (a sharded collection: shard key fields, then `_id`), the
    encoded `{_id: ...}`; None for a plain `{_id: ...}`, which Cosmos lays out with `_id` first.

    In a sharded Cosmos collection `_id` is unique only per shard key value, so two documentKeys can share an
    `_id`; DocumentDB (non-elastic) keeps one document per `_id`.
    """
    if key.startswith(b"_id\x00", 5):
        return None
    doc = RawBSONDocument(key, RAW)
    if "_id" not in doc or len(doc) == 1:
        return None
    return bson.encode({"_id": doc["_id"]}, codec_options=RAW)
def is_delete_event(raw: bytes) -> bool:
    """True for a delete-preview event (`operationType: "delete"`); False for any other event.

    Only asked about events without a document (rare): an event whose lookup
    found nothing is not a delete by itself (see `cosmigrate.deletes.lookup`).
    """
    return RawBSONDocument(raw, RAW).get("operationType") == "delete"


async def change_stream_tokens(
    client: AsyncMongoClient[Any], ns: str, start_at: Timestamp | None = None,
) -> list[bytes]:
    """Cosmos DB's `GetChangeStreamTokens`: one resume token per physical partition, as raw BSON.

    Without `start_at` the tokens are the partitions' heads at the moment the
    command runs; `Timestamp(0, 0)` gives each partition's beginning.
    """
    db, _, coll = ns.partition(".")
    cmd: dict[str, Any] = {"customAction": "GetChangeStreamTokens", "collection": coll}
    if start_at is not None:
        cmd["startAtOperationTime"] = start_at
    reply = await client[db].command(cmd, codec_options=RAW)
    tokens = reply.get("resumeAfterTokens")
    if tokens is None:
        raise ValueError("GetChangeStreamTokens answered without resumeAfterTokens")
    return [bytes(t.raw) if isinstance(t, RawBSONDocument) else bson.encode(t) for t in tokens]
