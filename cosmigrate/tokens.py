"""Reading positions out of Cosmos DB resume tokens.

Tokens stay opaque everywhere in the data path (they are stored and handed
back as raw BSON). Only freshness needs to look inside: to know that capture
has seen everything up to a sampled head, the LSN of each partition range in
the committed token is compared with the LSN in the head token.

Forms seen on real accounts (all handled here):
- `{_data: BinData(JSON)}` or `{_data: "<JSON>"}`, optionally `_kind: 1`;
- `{_data: BinData(gzip(JSON)), _kind: 4}`;
- tokens from `GetChangeStreamTokens` also carry `_startAtOperationTime`.
The JSON is either the old form, a list of `{"token": "\\"<lsn>\\"", "range": {min, max}}`,
or the current one, `{"V": 2, "Rid": ..., "Continuation": [{"FeedRange": {"value": {min, max}}, "State":
{"value": "\\"<lsn>\\""}}]}`. LSNs are comparable only within one partition range.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from typing import Any

import bson
from bson.binary import Binary
from bson.raw_bson import RawBSONDocument

Range = tuple[str, str]
Positions = dict[Range, int]
"""LSN per partition range (min, max) of effective partition key, hex strings ("" .. "FF")."""

GZIP_KIND = 4


class TokenFormatError(ValueError):
    """A token whose positions cannot be read (freshness then stays unknown; capture is not affected)."""


def _json_text(token: Mapping[str, Any]) -> str:
    data = token.get("_data")
    if isinstance(data, Binary | bytes):
        raw = bytes(data)
        if token.get("_kind") == GZIP_KIND or raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError) as exc:
                raise TokenFormatError("a _kind 4 token is not gzip data") from exc
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise TokenFormatError("token data is not UTF-8 JSON") from exc
    if isinstance(data, str):
        return data
    raise TokenFormatError("token has no _data")


def _lsn(value: Any) -> int:
    """LSNs are JSON strings inside JSON strings (`"\\"12\\""`), sometimes plain numbers."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, str):
        value = value.strip('"')
    return int(value)


def positions(token: bytes | Mapping[str, Any]) -> Positions:
    """The LSN of every partition range a token names; raises TokenFormatError."""
    try:
        doc: Mapping[str, Any] = (
            bson.decode(token) if isinstance(token, bytes) else
            bson.decode(token.raw) if isinstance(token, RawBSONDocument) else token
        )
        parsed = json.loads(_json_text(doc))
        out: Positions = {}
        if isinstance(parsed, list):  # the old form
            for entry in parsed:
                rng = entry["range"]
                out[(rng["min"], rng["max"])] = _lsn(entry["token"])
        else:
            for cont in parsed["Continuation"]:
                rng = cont["FeedRange"]["value"]
                out[(rng["min"], rng["max"])] = _lsn(cont["State"]["value"])
        if not out:
            raise TokenFormatError("token names no partition range")
        return out
    except TokenFormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, bson.errors.InvalidBSON) as exc:
        raise TokenFormatError(f"unreadable resume token ({type(exc).__name__})") from exc


def _contains(outer: Range, inner: Range) -> bool:
    """Effective partition key ranges are hex strings; "" is the lowest and "FF" the highest bound."""
    lo_ok = outer[0] == "" or (inner[0] != "" and inner[0] >= outer[0])
    hi_ok = outer[1] == "FF" or (inner[1] != "FF" and inner[1] <= outer[1])
    return lo_ok and hi_ok


def reached(position: Positions, head: Positions) -> bool:
    """True when `position` is at or past `head` in every partition range of the head.

    A head range is reached when a position range that contains it has an LSN at
    least the head's. A range the position does not cover is not reached: unknown
    is never reported as caught up.

    A head sampled before a split names the parent's range, and a position
    taken after it names the children: the head's range is then reached when
    the children inside it cover it entirely, each at least at the head's LSN
    (children continue their parent's LSNs).

    O(ranges) when the position names the head's ranges (a dictionary lookup
    each); the scans below only run for a range that is behind or was split.
    """
    for hrange, hlsn in head.items():
        exact = position.get(hrange)
        if exact is not None and exact >= hlsn:
            continue  # the common case (no split since the head): one lookup, not a scan of every range
        if any(_contains(prange, hrange) and plsn >= hlsn for prange, plsn in position.items()):
            continue
        inside = sorted((prange, plsn) for prange, plsn in position.items() if _contains(hrange, prange))
        if not inside or any(plsn < hlsn for _, plsn in inside) or not _covers(hrange, [r for r, _ in inside]):
            return False
    return True


def _covers(outer: Range, ranges: list[Range]) -> bool:
    """Whether `ranges` (sorted, each inside `outer`) tile `outer` with no gap."""
    edge = outer[0]
    for lo, hi in ranges:
        if lo > edge:
            return False  # a gap: part of the range has no position
        edge = max(edge, hi) if edge != "FF" and hi != "FF" else "FF"
    return edge == outer[1]


def with_range(token: bytes, rng: Range) -> bytes:
    """The token for partition range `rng`, at the LSN the token has for the range containing it.

    After a split, Cosmos's child partitions continue their parent's LSNs, and
    the Cosmos SDKs resume each child of a split feed range from the parent's
    continuation: the same state under the child's range. This builds that
    token in the parent's own form (V2 `_kind` 1 or 4, or the old list form),
    so a stream opened with it reads the child from the parent's position.
    """
    try:
        doc = dict(bson.decode(token))
        text = _json_text(doc)
        parsed = json.loads(text)
        lo, hi = rng
        if isinstance(parsed, list):
            entry = next(e for e in parsed if _contains((e["range"]["min"], e["range"]["max"]), rng))
            out: Any = [{"token": entry["token"], "range": {"min": lo, "max": hi}}]
        else:
            cont = next(c for c in parsed["Continuation"]
                        if _contains((c["FeedRange"]["value"]["min"], c["FeedRange"]["value"]["max"]), rng))
            child = dict(cont)
            child["FeedRange"] = dict(cont["FeedRange"], value={"min": lo, "max": hi})
            out = dict(parsed, Continuation=[child])
        data = json.dumps(out, separators=(",", ":")).encode()
        raw = doc.get("_data")
        if isinstance(raw, str):
            doc["_data"] = data.decode()
        else:
            gz = doc.get("_kind") == GZIP_KIND or bytes(raw or b"")[:2] == b"\x1f\x8b"
            doc["_data"] = Binary(gzip.compress(data, mtime=0) if gz else data)
        doc.pop("_startAtOperationTime", None)
        return bson.encode(doc)
    except TokenFormatError:
        raise
    except StopIteration as exc:
        raise TokenFormatError("the token has no range containing the child's") from exc
    except (KeyError, TypeError, ValueError, AttributeError, bson.errors.InvalidBSON) as exc:
        raise TokenFormatError(f"unreadable resume token ({type(exc).__name__})") from exc
