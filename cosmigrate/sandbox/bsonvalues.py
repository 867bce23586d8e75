"""BSON value semantics the emulators need: type order, equality, hashing, raw scans.

MongoDB compares values across types by a fixed "type bracket" order and
treats 1, 1.0, Int64(1) and Decimal128("1.0") as the same `_id`, every NaN as
equal to every NaN and -0.0 as equal to 0.0; Python does none of that (and
thinks True == 1). `sort_key` and `canonical_key` give the emulators MongoDB's
answers, so that `_id` lookups, range scans, unique indexes, query equality
and the change feed all agree on which values are "the same".
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
import struct
from collections.abc import Hashable, Mapping
from decimal import Decimal
from typing import Any

import bson
from bson.binary import Binary
from bson.code import Code
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from bson.dbref import DBRef
from bson.decimal128 import Decimal128
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.raw_bson import RawBSONDocument
from bson.regex import Regex
from bson.timestamp import Timestamp

# MongoDB's comparison order of BSON types (lower sorts first).
RANK_MINKEY = 1
RANK_NULL = 2
RANK_NUMBER = 3
RANK_STRING = 4
RANK_OBJECT = 5
RANK_ARRAY = 6
RANK_BINARY = 7
RANK_OBJECTID = 8
RANK_BOOL = 9
RANK_DATE = 10
RANK_TIMESTAMP = 11
RANK_REGEX = 12
RANK_CODE = 13
RANK_MAXKEY = 14


class _NaNKey:
    """Stands in for every NaN (Double or Decimal128) inside keys.

    MongoDB treats all NaNs as one value that equals itself and sorts below
    every other number. Python's NaN equals nothing, so a NaN `_id` would never
    be found again, and it orders with nothing. Stateless; one shared instance.
    """

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return 0x4E614E

    def __lt__(self, other: object) -> bool:
        return other is not self

    def __le__(self, other: object) -> bool:
        return True

    def __gt__(self, other: object) -> bool:
        return False

    def __ge__(self, other: object) -> bool:
        return other is self

    def __repr__(self) -> str:
        return "NaN"


NAN_KEY = _NaNKey()


def _millis(value: dt.datetime) -> int:
    return calendar.timegm(value.utctimetuple()) * 1000 + value.microsecond // 1000


def sort_key(value: Any) -> tuple[Any, ...]:
    """A hashable tuple that orders like MongoDB orders BSON values, equal exactly when they are.

    A number becomes (RANK_NUMBER, n) with n the Python int, float or Decimal:
    Python compares and hashes those exactly across types (1 == 1.0 ==
    Decimal("1.0") with equal hashes, 2**53 + 1 != 2.0**53, Decimal("0.1") !=
    0.1), as mongod compares Int32/Int64/Double/Decimal128; -0.0 == 0 already,
    and every NaN becomes NAN_KEY. Strings compare by code point, which is the
    order of their UTF-8 bytes, as in mongod.
    """
    t = type(value)
    if t is str:
        return (RANK_STRING, value)
    if t is int or t is Int64:
        return (RANK_NUMBER, value)
    if t is ObjectId:
        return (RANK_OBJECTID, value.binary)
    if t is float:
        return (RANK_NUMBER, value if value == value else NAN_KEY)
    if t is bool:
        return (RANK_BOOL, value)
    if value is None:
        return (RANK_NULL,)
    if t is DatetimeMS:
        return (RANK_DATE, int(value))
    if isinstance(value, Decimal128):
        value = value.to_decimal()
    if isinstance(value, Decimal):
        return (RANK_NUMBER, NAN_KEY if value.is_nan() else value)
    if isinstance(value, (int, float)):
        return (RANK_NUMBER, value if value == value else NAN_KEY)
    if isinstance(value, dt.datetime):
        return (RANK_DATE, _millis(value))
    if isinstance(value, Timestamp):
        return (RANK_TIMESTAMP, value.time, value.inc)
    if isinstance(value, (bytes, Binary)):
        subtype = value.subtype if isinstance(value, Binary) else 0
        return (RANK_BINARY, len(value), subtype, bytes(value))
    if isinstance(value, DBRef):
        return (RANK_OBJECT, _doc_key(value.as_doc()))
    if isinstance(value, Mapping):
        return (RANK_OBJECT, _doc_key(value))
    if isinstance(value, (list, tuple)):
        return (RANK_ARRAY, tuple(sort_key(v) for v in value))
    if isinstance(value, MinKey):
        return (RANK_MINKEY,)
    if isinstance(value, MaxKey):
        return (RANK_MAXKEY,)
    if isinstance(value, Regex):
        return (RANK_REGEX, value.pattern, value.flags)
    if isinstance(value, re.Pattern):
        return (RANK_REGEX, value.pattern, value.flags)
    if isinstance(value, Code):
        return (RANK_CODE, str(value))
    return (RANK_OBJECT, (repr(value),))


def _doc_key(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    # Objects compare field by field: the value's type, then the name, then the value.
    out = []
    for name, val in doc.items():
        k = sort_key(val)
        out.append((k[0], name, k))
    return tuple(out)


def rank(value: Any) -> int:
    """The type bracket of a value (range operators only match within one)."""
    return sort_key(value)[0]


def is_nan_key(key: tuple[Any, ...]) -> bool:
    """True for the sort key of a NaN ($lt/$gt never match it; $lte/$gte only NaN to NaN)."""
    return len(key) == 2 and key[1] is NAN_KEY


def canonical_key(value: Any) -> Hashable:
    """The one hashable identity of a BSON value: equal exactly when MongoDB finds the values equal.

    Storage and the change feed key documents by it, unique indexes key their
    entries by it and query equality (`values_equal`) compares by it, so none
    of them can disagree on which `_id`s are one document. ObjectId and str,
    the common `_id`s, are their own key (cheap; neither equals the other nor
    any `sort_key` tuple); everything else is its `sort_key`, inlined for
    integers, the other common `_id`.
    """
    t = type(value)
    if t is ObjectId or t is str:
        return value
    if t is int or t is Int64:
        return (RANK_NUMBER, value)
    return sort_key(value)


def values_equal(a: Any, b: Any) -> bool:
    """MongoDB equality: 1 == 1.0 == Int64(1) == Decimal128("1.0"), NaN == NaN, but True != 1."""
    return canonical_key(a) == canonical_key(b)


# --- raw BSON scans ------------------------------------------------------------

UNSUPPORTED_TYPES = {
    0x06: "Undefined",
    0x0C: "DBPointer",
    0x0D: "JavaScript",
    0x0E: "Symbol",
    0x0F: "JavaScript (with scope)",
}
_MAYBE_UNSUPPORTED = re.compile(rb"[\x06\x0c-\x0f]")
_FIXED_SIZE = {
    0x01: 8, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8,
    0x13: 16, 0x7F: 0, 0xFF: 0, 0x06: 0,
}
_INT32 = struct.Struct("<i")


def find_unsupported_type(raw: bytes) -> tuple[str, str] | None:
    """Return (field path, type name) of the first element whose type DocumentDB refuses.

    Decoding would hide them (Symbol decodes to str, Undefined to None), so the
    raw element types are walked. A regex pre-check skips the walk for most
    documents, which hold none of the suspicious type bytes at all.
    """
    if _MAYBE_UNSUPPORTED.search(raw) is None:
        return None
    return _walk(raw, 4, "")


def _walk(raw: bytes, pos: int, prefix: str) -> tuple[str, str] | None:
    while raw[pos] != 0:
        etype = raw[pos]
        name_end = raw.index(0, pos + 1)
        name = raw[pos + 1 : name_end].decode("utf-8", "replace")
        pos = name_end + 1
        path = f"{prefix}{name}"
        if etype in UNSUPPORTED_TYPES:
            return path, UNSUPPORTED_TYPES[etype]
        if etype in (0x03, 0x04):
            (length,) = _INT32.unpack_from(raw, pos)
            found = _walk(raw, pos + 4, path + ".")
            if found:
                return found
            pos += length
        elif etype == 0x02:
            (length,) = _INT32.unpack_from(raw, pos)
            pos += 4 + length
        elif etype == 0x05:
            (length,) = _INT32.unpack_from(raw, pos)
            pos += 5 + length
        elif etype == 0x0B:
            pos = raw.index(0, raw.index(0, pos) + 1) + 1
        elif etype in _FIXED_SIZE:
            pos += _FIXED_SIZE[etype]
        else:
            raise bson.errors.InvalidBSON(f"unknown BSON element type 0x{etype:02x}")
    return None


def first_field_is_id(raw: bytes) -> bool:
    """True when the document's first element is named `_id` (MongoDB stores it first)."""
    return len(raw) > 9 and raw[5:9] == b"_id\x00"


def prepend_id(raw: bytes, id_value: Any) -> bytes:
    """Return the document with `_id` as its first field, dropping any later `_id`."""
    doc = bson.decode(raw, codec_options=DECODE_OPTIONS)
    doc.pop("_id", None)
    return bson.encode({"_id": id_value, **doc}, codec_options=DECODE_OPTIONS)


def raw_bytes(doc: RawBSONDocument) -> bytes:
    """The BSON bytes of a raw document, as `bytes`.

    PyMongo exposes a nested raw document of 4 KiB or more (a replacement inside
    an update statement, say) as a read-only memoryview slice of the enclosing
    buffer, not as bytes. Storage must own plain bytes: a memoryview has no
    .index()/.decode(), and it would pin the whole request buffer for as long
    as the document lives.
    """
    raw = doc.raw
    return raw if type(raw) is bytes else bytes(raw)


# Dates decode as DatetimeMS (raw int64 milliseconds): BSON allows any int64,
# Python's datetime only years 1-9999, and a server must neither refuse nor
# alter a date a client could write. `sort_key` orders both kinds alike.
DECODE_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(
    document_class=dict, tz_aware=False, datetime_conversion=DatetimeConversion.DATETIME_MS
)
RAW_OPTIONS: CodecOptions[RawBSONDocument] = CodecOptions(
    document_class=RawBSONDocument, datetime_conversion=DatetimeConversion.DATETIME_MS
)
