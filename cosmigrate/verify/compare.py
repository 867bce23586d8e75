"""Comparing two versions of one document: bytes first, a canonical walk only where the bytes differ.

Equal bytes are the common case and cost one `memcmp`. Where they differ the
two documents are decoded (types kept: Int32 is not Int64, a datetime is not
a DatetimeMS, Binary subtypes stay) and walked in the source's field order to
name the first difference and its kind:

- `missing field` / `extra field`: a field only on the source / the target;
- `type`: the same field with another BSON type (Int64 vs Int32 is one);
- `value`: same type, another value (-0.0 vs 0.0 and two NaN payloads too);
- `field order`: every field equal, in another order (a replace with the
  fields reordered; some drivers and tools reorder, and byte equality fails).

Never a field value in what this returns: only paths and kinds.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bson
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.decimal128 import Decimal128

_DECODE: CodecOptions[dict[str, Any]] = CodecOptions(document_class=dict, datetime_conversion=DatetimeConversion.DATETIME_AUTO)
_double = struct.Struct("<d").pack


@dataclass(frozen=True)
class Difference:
    path: str
    kind: str  # missing field, extra field, type, value, field order, encoding


def _join(path: str, part: str | int) -> str:
    return f"{path}.{part}" if path else str(part)


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return _double(a) == _double(b)  # tells -0.0 from 0.0 and NaN payloads apart, as bytes would
    if isinstance(a, Decimal128):
        return a.bid == b.bid
    return bool(a == b)


def _walk(a: Any, b: Any, path: str) -> Difference | None:
    if type(a) is not type(b):
        return Difference(path, "type")
    if isinstance(a, Mapping):
        for name, value in a.items():
            if name not in b:
                return Difference(_join(path, name), "missing field")
            d = _walk(value, b[name], _join(path, name))
            if d is not None:
                return d
        for name in b:
            if name not in a:
                return Difference(_join(path, name), "extra field")
        for x, y in zip(a, b, strict=True):
            if x != y:
                return Difference(_join(path, x), "field order")
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            d = _walk(x, y, _join(path, i))
            if d is not None:
                return d
        if len(a) != len(b):
            return Difference(_join(path, min(len(a), len(b))), "missing field" if len(a) > len(b) else "extra field")
        return None
    return None if _same_scalar(a, b) else Difference(path, "value")


def difference(source: bytes, target: bytes) -> Difference | None:
    """None when the two raw documents are byte for byte equal; else the first difference."""
    if source == target:
        return None
    d = _walk(bson.decode(source, codec_options=_DECODE), bson.decode(target, codec_options=_DECODE), "")
    # Bytes differ but no decoded difference: an encoding detail the decoder hides (e.g. a Binary subtype 2 layout).
    return d if d is not None else Difference("", "encoding")
