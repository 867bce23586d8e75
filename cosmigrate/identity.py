"""Document identity for collapsing: which change events are about the same target document.

Collapsing keeps the last event per document, and chunks of one run are
written concurrently, so two events about ONE target document must never end
up as two writes: they would race, and the older version could land last.
MongoDB (and DocumentDB) match `_id` by value: Int32 1, Int64 1, Double 1.0
and Decimal128 "1" are one document, NaN equals NaN, -0.0 equals 0. The raw
bytes of the `documentKey` differ between those forms, so the raw bytes are
the identity only when no number can hide inside; otherwise the key is put
in a canonical form.

The fast path (an `_id` that is an ObjectId, a string, a binary, a date, an
Int32 ...) costs a few byte comparisons and returns the raw key unchanged; any
other integral number alone is re-keyed as the equal Int32 (else Int64) key.
"""

from __future__ import annotations

import math
import struct
from decimal import Decimal
from fractions import Fraction
from typing import Any

import bson
from bson.decimal128 import Decimal128
from bson.int64 import Int64

from cosmigrate.mongo import RAW

# BSON element types whose equality is byte equality (no collation in play): ObjectId, string, binary,
# boolean, datetime, null, regex, timestamp, min/max key.
_BYTEWISE = frozenset({0x07, 0x02, 0x05, 0x08, 0x09, 0x0A, 0x0B, 0x11, 0xFF, 0x7F})
_ID = b"_id\x00"
_CANONICAL_FIELD = "#canonical"  # never a field of a real documentKey


_DECODE = RAW.with_options(document_class=dict)


def identity(key: bytes) -> bytes:
    """A byte string equal for two documentKeys exactly when MongoDB matches them as one document."""
    if len(key) > 9 and key.startswith(_ID, 5):
        kind = key[4]
        if kind in _BYTEWISE and _single_field(key):
            return key
        # A number `_id` alone: an integer value is keyed by its smallest integer documentKey ({_id: Int32}, else
        # {_id: Int64}), so Int32 1, Int64 1, 1.0 and Decimal128("1") are one key, and an Int32 `_id` (the common
        # numeric one: every event of a full load comes through here) is its own raw key, like an ObjectId.
        # Only a single-field key takes this form, and the general form below never starts with `_id`: the two
        # cannot collide. Other numbers (1.5, NaN, beyond Int64) take the general path.
        n: int | None = None
        if kind == 0x10 and len(key) == 14:
            return key
        if kind == 0x12 and len(key) == 18:
            n = int.from_bytes(key[9:17], "little", signed=True)
        elif kind == 0x01 and len(key) == 18:
            f = struct.unpack_from("<d", key, 9)[0]
            n = int(f) if math.isfinite(f) and f.is_integer() else None
        elif kind == 0x13 and len(key) == 26:
            dec = Decimal128.from_bid(key[9:25]).to_decimal()
            n = int(dec) if dec.is_finite() and dec == dec.to_integral_value() else None
        if n is not None:
            if -(2**31) <= n < 2**31:
                return _INT32_KEY + n.to_bytes(4, "little", signed=True) + b"\x00"
            if -(2**63) <= n < 2**63:
                return _INT64_KEY + n.to_bytes(8, "little", signed=True) + b"\x00"
    doc = bson.decode(key, codec_options=_DECODE)
    return bson.encode({_CANONICAL_FIELD: [[name, _canonical(v)] for name, v in doc.items()]})


_INT32_KEY = b"\x0e\x00\x00\x00\x10_id\x00"  # {_id: Int32}: 14 bytes, before the value and the terminator
_INT64_KEY = b"\x12\x00\x00\x00\x12_id\x00"  # {_id: Int64}: 18 bytes


def _single_field(key: bytes) -> bool:
    """True when `_id` is the documentKey's only field (no shard key), read from the element sizes."""
    kind = key[4]
    pos = 9
    if kind == 0x07:
        pos += 12
    elif kind in (0x02, 0x0D, 0x0E):
        pos += 4 + struct.unpack_from("<i", key, pos)[0]
    elif kind == 0x05:
        pos += 5 + struct.unpack_from("<i", key, pos)[0]
    elif kind in (0x09, 0x11):
        pos += 8
    elif kind == 0x08:
        pos += 1
    elif kind in (0x0A, 0xFF, 0x7F):
        pass
    else:
        return False  # regex and anything else: take the general path
    return pos == len(key) - 1


def _canonical(value: Any) -> Any:
    """Numbers become one exact form; containers are walked; everything else stays as it is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | Int64 | float | Decimal128):
        return {"#n": _number(value)}
    if isinstance(value, dict):
        return {"#d": [[k, _canonical(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"#a": [_canonical(v) for v in value]}
    return value


def _number(value: int | Int64 | float | Decimal128) -> str:
    if isinstance(value, Decimal128):
        dec: Decimal = value.to_decimal()
        if dec.is_nan():
            return "nan"
        if dec.is_infinite():
            return "inf" if dec > 0 else "-inf"
        frac = Fraction(dec)
    elif isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        frac = Fraction(value)
    else:
        frac = Fraction(int(value))
    return f"{frac.numerator}/{frac.denominator}"
