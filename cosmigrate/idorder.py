"""Walking a collection in `_id` order, page by page, on servers that bracket range queries by type.

Deletes (the sweep) and verification both read both sides range by range in
`_id` order. Two facts shape how:

- `{_id: {$gt: x}}` matches only `_id`s of x's *type bracket* (numbers,
  strings, ObjectIds, ...), on MongoDB, Cosmos DB and DocumentDB alike. A
  walk that pages with `$gt: <last id>` alone stops at the end of the first
  bracket and silently skips every document whose `_id` has another type.
  So the walk goes bracket by bracket, in BSON comparison order, each one
  opened by a `$gte` on the bracket's smallest value (or an equality for the
  one-value brackets: MinKey, null, NaN, MaxKey).
- Comparing the two sides' sorted `_id` lists needs MongoDB's order and
  equality: 1, 1.0, Int64(1) and Decimal128("1") are one `_id`. `order_key`
  gives both, in Python.

Ids travel as raw BSON `{_id: value}` documents (`IdDoc`), sliced out of the
documents without decoding them; only a difference is ever decoded.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import math
import struct
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import bson
from bson.binary import Binary
from bson.datetime_ms import DatetimeMS
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from bson.regex import Regex
from bson.timestamp import Timestamp

from cosmigrate.mongo import RAW

IdDoc = bytes
"""A raw BSON document `{_id: <value>}`: the identity of one document, comparable byte for byte."""

# MongoDB's comparison order of BSON types.
R_MINKEY, R_NULL, R_NUMBER, R_STRING, R_OBJECT, R_ARRAY, R_BINARY, R_OBJECTID, R_BOOL, R_DATE, R_TIMESTAMP, \
    R_REGEX, R_CODE, R_MAXKEY = range(1, 15)

_i32 = struct.Struct("<i").unpack_from
# Size of an element's value by type byte, for the fixed-size types.
_FIXED = {0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x06: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}


def _value_end(raw: bytes, t: int, pos: int) -> int:
    """End offset of the value of type `t` starting at `pos`."""
    size = _FIXED.get(t)
    if size is not None:
        return pos + size
    if t in (0x02, 0x0D, 0x0E):  # string, code, symbol: int32 length + bytes
        return pos + 4 + _i32(raw, pos)[0]
    if t in (0x03, 0x04, 0x0F):  # document, array, code with scope: int32 total size
        return pos + _i32(raw, pos)[0]
    if t == 0x05:  # binary: int32 length, subtype, bytes
        return pos + 5 + _i32(raw, pos)[0]
    if t == 0x0B:  # regex: two cstrings
        end = raw.index(b"\x00", pos) + 1
        return raw.index(b"\x00", end) + 1
    if t == 0x0C:  # DBPointer: string + ObjectId
        return pos + 4 + _i32(raw, pos)[0] + 12
    raise ValueError(f"unknown BSON type 0x{t:02x}")


def id_element(raw: bytes) -> bytes:
    """The raw `_id` element (type byte, name, value) of a raw document; `_id` first is the fast path."""
    pos = 4
    end_of_doc = len(raw) - 1
    while pos < end_of_doc:
        t = raw[pos]
        name_end = raw.index(b"\x00", pos + 1)
        value_end = _value_end(raw, t, name_end + 1)
        if name_end == pos + 4 and raw[pos + 1:name_end] == b"_id":
            return raw[pos:value_end]
        pos = value_end
    raise ValueError("document without _id")


def id_doc(raw: bytes) -> IdDoc:
    """`{_id: value}` of a raw document, as raw BSON (a filter and an identity at once)."""
    element = id_element(raw)
    return struct.pack("<i", len(element) + 5) + element + b"\x00"


def id_value(doc: IdDoc) -> Any:
    """The `_id` value itself, decoded so that it encodes back to the same bytes (Int64 stays Int64)."""
    return bson.decode(doc, codec_options=RAW)["_id"]


def encode_id(value: Any) -> IdDoc:
    return bson.encode({"_id": value}, codec_options=RAW)


def order_key(value: Any) -> tuple[Any, ...]:
    """A tuple that sorts like MongoDB sorts BSON values, and is equal exactly when MongoDB finds them equal.

    Numbers are compared as exact Python numbers (1 == 1.0 == Decimal("1"),
    2**53 + 1 != 2.0**53), every NaN is one value below every other number,
    strings by their UTF-8 bytes, documents field by field (type, name, value).
    """
    t = type(value)
    if t is ObjectId:
        return (R_OBJECTID, value.binary)
    if t is str:
        return (R_STRING, value.encode())
    if t is bool:
        return (R_BOOL, value)
    if t is int or t is Int64:
        return (R_NUMBER, 0, value)
    if t is float:
        return (R_NUMBER, -1) if math.isnan(value) else (R_NUMBER, 0, value)
    if isinstance(value, Decimal128):
        value = value.to_decimal()
    if isinstance(value, Decimal):
        return (R_NUMBER, -1) if value.is_nan() else (R_NUMBER, 0, value)
    if value is None:
        return (R_NULL,)
    if isinstance(value, MinKey):
        return (R_MINKEY,)
    if isinstance(value, MaxKey):
        return (R_MAXKEY,)
    if t is DatetimeMS:
        return (R_DATE, int(value))
    if isinstance(value, dt.datetime):
        return (R_DATE, calendar.timegm(value.utctimetuple()) * 1000 + value.microsecond // 1000)
    if isinstance(value, Timestamp):
        return (R_TIMESTAMP, value.time, value.inc)
    if isinstance(value, bytes | Binary):
        subtype = value.subtype if isinstance(value, Binary) else 0
        return (R_BINARY, len(value), subtype, bytes(value))
    if isinstance(value, RawBSONDocument):
        value = bson.decode(value.raw, codec_options=RAW.with_options(document_class=dict))
    if isinstance(value, Mapping):
        return (R_OBJECT, tuple((order_key(v)[0], k.encode(), order_key(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return (R_ARRAY, tuple(order_key(v) for v in value))
    if isinstance(value, Regex):
        return (R_REGEX, value.pattern, value.flags)
    return (R_CODE, str(value))


def id_order(doc: IdDoc) -> tuple[Any, ...]:
    return order_key(id_value(doc))


def split_batch(data: bytes) -> list[bytes]:
    """The documents of a raw batch (`find_raw_batches`): BSON documents back to back, each led by its length."""
    out = []
    pos, end = 0, len(data)
    while pos < end:
        size = _i32(data, pos)[0]
        out.append(data[pos:pos + size])
        pos += size
    return out


async def raw_docs(cursor: Any) -> list[bytes]:
    """Every document of a raw-batch cursor, as bytes: no driver object per document."""
    out: list[bytes] = []
    async for batch in cursor:
        out.extend(split_batch(batch))
    return out


async def iter_raw(cursor: Any) -> AsyncGenerator[bytes, None]:
    """The documents of a raw-batch cursor one by one, one batch in memory."""
    async for batch in cursor:
        for doc in split_batch(batch):
            yield doc


@dataclass(frozen=True)
class Bracket:
    """One type bracket of `_id` values: how to open it, and whether range operators page through it."""

    name: str
    first: Any  # the smallest value (range brackets) or the only value (one-value brackets)
    ranged: bool = True

    def filter(self, after: IdDoc | None = None, upto: IdDoc | None = None) -> dict[str, Any]:
        """The `_id` filter for the part of this bracket after `after` (exclusive) up to `upto` (inclusive)."""
        if not self.ranged:
            return {"_id": self.first}
        cond: dict[str, Any] = {"$gt": id_value(after)} if after is not None else {"$gte": self.first}
        if upto is not None:
            cond["$lte"] = id_value(upto)
        return {"_id": cond}


BRACKETS: tuple[Bracket, ...] = (
    Bracket("minkey", MinKey(), ranged=False),
    Bracket("null", None, ranged=False),
    Bracket("nan", float("nan"), ranged=False),  # NaN sorts first among numbers; $gte -inf never matches it
    Bracket("number", float("-inf")),
    Bracket("string", ""),
    Bracket("object", {}),
    Bracket("binary", Binary(b"", 0)),
    Bracket("objectid", ObjectId(b"\x00" * 12)),
    Bracket("bool", False),
    Bracket("date", DatetimeMS(-(2**63))),
    Bracket("timestamp", Timestamp(0, 0)),
    Bracket("maxkey", MaxKey(), ranged=False),
)
"""Every bracket an `_id` can be in, in BSON order (an `_id` is never an array, regex or undefined)."""


@dataclass(frozen=True)
class Position:
    """Where a walk stands: inside bracket `bracket`, after `after` (None: at the bracket's start)."""

    bracket: int = 0
    after: IdDoc | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"bracket": self.bracket, "after": Binary(self.after) if self.after is not None else None}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Position:
        if not doc:
            return cls()
        after = doc.get("after")
        return cls(int(doc.get("bracket", 0)), bytes(after) if after is not None else None)


@dataclass
class Page:
    """One range of a walk: `_id`s in (`start.after`, `upto`] of one bracket (`upto` None: to its end)."""

    start: Position
    upto: IdDoc | None
    docs: list[bytes]
    """Raw BSON documents (never decoded on the way)."""

    @property
    def bracket(self) -> Bracket:
        return BRACKETS[self.start.bracket]

    def filter(self) -> dict[str, Any]:
        return self.bracket.filter(self.start.after, self.upto)

    @property
    def end(self) -> Position:
        """Where the walk continues after this range."""
        if self.upto is None:
            return Position(self.start.bracket + 1, None)
        return Position(self.start.bracket, self.upto)


async def walk(coll: Any, start: Position, page_size: int, projection: Mapping[str, Any] | None = None,
               reader: Any = None) -> AsyncGenerator[Page, None]:
    """The pages of `coll` in `_id` order from `start`; a full page ends at its last `_id`, a short one at its bracket's end.

    `reader(coro)` wraps each request (the source's request budget and retries); by default it is awaited as is.
    """
    def fetch(pos: Position) -> asyncio.Task[list[bytes]]:
        flt = BRACKETS[pos.bracket].filter(pos.after)

        async def read() -> list[bytes]:
            return await raw_docs(coll.find_raw_batches(flt, projection, sort=[("_id", 1)], limit=page_size,
                                                        batch_size=page_size))

        return asyncio.ensure_future(reader(read) if reader is not None else read())

    # The next page is read while the caller works on this one (its start is known: this page's last _id).
    pos = start
    pending = fetch(pos) if pos.bracket < len(BRACKETS) else None
    try:
        while pending is not None:
            docs = await pending
            pending = None
            bracket = BRACKETS[pos.bracket]
            full = bracket.ranged and len(docs) >= page_size
            page = Page(pos, id_doc(docs[-1]) if full else None, docs)
            pos = page.end
            if pos.bracket < len(BRACKETS):
                pending = fetch(pos)
            yield page
    finally:
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
