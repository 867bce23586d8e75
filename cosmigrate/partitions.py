"""Capture units: one per physical partition of a namespace, kept in the namespace's ledger meta.

Cosmos DB answers `GetChangeStreamTokens` with one resume token per physical
partition; a stream opened with one reads that partition only. Capture runs
one watcher per partition (`cosmigrate.capture`) and keeps, for each, a
*unit*: the partition's effective-partition-key range, its resume token as of
the namespace's last committed batch, and its state:

| state     | meaning                                             | next                          |
|-----------|-----------------------------------------------------|-------------------------------|
| `tailing` | a watcher reads the partition from `token`          | `split` or `failed`           |
| `split`   | the partition split; children continue from `token` | final (kept for the record)   |
| `failed`  | the source refused the position (`error`)           | final until an operator acts  |

All units of a namespace are one BSON document stored where a single-stream
namespace stores its resume token (`NamespaceMeta.resume_token`), so every
batch commit writes the batch and the positions of all partitions in one
epoch-fenced ledger transaction. The document is told from a token by its
first field, `UNITS_FIELD` (a resume token starts with `_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument

from cosmigrate.tokens import Positions, Range, TokenFormatError, positions, with_range

UNITS_FIELD = "cosmigrate_partition_units"
TAILING, SPLIT, FAILED = "tailing", "split", "failed"
STATES = (TAILING, SPLIT, FAILED)
MAX_BYTES = 300_000
"""The units must fit one ledger item (DynamoDB's limit is 400 KB, shared with the namespace's other
attributes): split units are dropped from the record first (their children cover them), and a namespace whose
live partitions alone do not fit is refused rather than overflowing the item."""
KEEP_SPLIT_BYTES = 64 * 1024
"""Split units are kept for the record (status shows them) only while the document stays under this size."""


def range_name(rng: Range) -> str:
    """`min-max` of an effective partition key range, the lowest bound shown as `""`."""
    low = rng[0] or '""'
    return f"{low}-{rng[1]}"


class UnitsError(ValueError):
    """A stored units document that cannot be read, or a split that cannot be followed."""


@dataclass
class Unit:
    lo: str
    hi: str
    token: bytes
    """Raw BSON resume token: the partition's position as of the namespace's last committed batch."""
    state: str = TAILING
    error: str = ""
    parent: str = ""
    """`lo-hi` of the partition this one split from ("" for a partition found at the start)."""

    @property
    def range(self) -> Range:
        return (self.lo, self.hi)

    @property
    def name(self) -> str:
        return range_name(self.range)

    def describe(self) -> dict[str, Any]:
        """What status shows: the range, the state, and why it failed."""
        return {"range": self.name, "state": self.state, "error": self.error}


def is_units(raw: bytes | None) -> bool:
    """True for a stored units document (False for a plain resume token or nothing)."""
    if not raw:
        return False
    try:
        return next(iter(RawBSONDocument(raw)), None) == UNITS_FIELD
    except (bson.errors.InvalidBSON, StopIteration):
        return False


def encode(units: list[Unit]) -> bytes:
    raw = _encode(units)
    if len(raw) > KEEP_SPLIT_BYTES:
        raw = _encode([u for u in units if u.state != SPLIT])
    if len(raw) > MAX_BYTES:
        raise UnitsError(f"the positions of {len(units)} partitions take {len(raw)} bytes, over the ledger's "
                         f"{MAX_BYTES}; set capture.per_partition = false for this source")
    return raw


def _encode(units: list[Unit]) -> bytes:
    return bson.encode({
        UNITS_FIELD: 1,
        "units": [{"min": u.lo, "max": u.hi, "token": RawBSONDocument(u.token), "state": u.state,
                   "error": u.error, "parent": u.parent} for u in units],
    })


def decode(raw: bytes) -> list[Unit]:
    try:
        doc = bson.decode(raw)
        out = []
        for u in doc["units"]:
            state = u["state"]
            if state not in STATES:
                raise UnitsError(f"unknown partition unit state {state!r}")
            out.append(Unit(str(u["min"]), str(u["max"]), bson.encode(u["token"]), state, str(u.get("error", "")),
                            str(u.get("parent", ""))))
        return out
    except (KeyError, TypeError, bson.errors.InvalidBSON) as exc:
        raise UnitsError(f"unreadable partition units in the ledger ({type(exc).__name__})") from exc


def from_tokens(tokens: list[bytes]) -> list[Unit]:
    """Units for the tokens `GetChangeStreamTokens` answered: one per partition, each naming one range."""
    units = []
    for token in tokens:
        try:
            pos = positions(token)
        except TokenFormatError as exc:
            raise UnitsError(f"a partition token cannot be read: {exc}") from exc
        if len(pos) != 1:
            raise UnitsError(f"a partition token names {len(pos)} ranges, not one")
        ((lo, hi),) = pos
        units.append(Unit(lo, hi, token))
    ranges = sorted(u.range for u in units)
    if len(set(ranges)) != len(ranges):
        raise UnitsError("GetChangeStreamTokens answered two tokens for one partition range")
    return sorted(units, key=lambda u: (u.lo != "", u.lo))


def covered_by(parent: Range, current: list[Range]) -> list[Range] | None:
    """The current partition ranges that replaced `parent` after a split; None while `parent` still exists.

    They must tile the parent exactly (two halves, or more after repeated splits); anything else (a merge,
    a gap) raises UnitsError, since following it could skip or double a range.
    """
    if parent in current:
        return None
    inside = sorted((r for r in current if _within(r, parent)), key=lambda r: (r[0] != "", r[0]))
    if not inside:
        raise UnitsError(f"partition {range_name(parent)} is gone and no current partition lies "
                         "within it (merged?)")
    edge = parent[0]
    for lo, hi in inside:
        if lo != edge:
            raise UnitsError(f"the partitions that replaced {range_name(parent)} leave a gap at {edge}")
        edge = hi
    if edge != parent[1]:
        raise UnitsError(f"the partitions that replaced {range_name(parent)} stop at {edge}")
    return inside


def _within(inner: Range, outer: Range) -> bool:
    lo_ok = outer[0] == "" or (inner[0] != "" and inner[0] >= outer[0])
    hi_ok = outer[1] == "FF" or (inner[1] != "FF" and inner[1] <= outer[1])
    return lo_ok and hi_ok and inner != outer


def children(parent: Unit, ranges: list[Range]) -> list[Unit]:
    """The units that continue a split partition: each child range from the parent's committed position (the
    children continue the parent's LSNs, as the Cosmos SDKs continue a split feed range)."""
    try:
        return [Unit(lo, hi, with_range(parent.token, (lo, hi)), TAILING, "", parent.name) for lo, hi in ranges]
    except TokenFormatError as exc:
        raise UnitsError(f"cannot continue split partition {parent.name}: {exc}") from exc


def unit_positions(units: list[Unit]) -> Positions:
    """The capture position of a namespace: the LSN per range of every unit that is not split (a split
    parent's range is covered by its children; a failed unit keeps its last position, so never looks caught
    up)."""
    out: Positions = {}
    for u in units:
        if u.state == SPLIT:
            continue
        try:
            out.update(positions(u.token))
        except TokenFormatError:
            continue
    return out
