"""In-memory storage shared by both emulators.

Documents are kept as raw BSON bytes keyed by a MongoDB-equality `_id` key
(with the shard key value too, in a sharded Cosmos collection), so
point writes are O(1) and what a client wrote is exactly what it reads back
(field order, Int64, Decimal128, ...). An `_id`-ordered view is kept lazily for
range scans. The source additionally keeps a change feed with Cosmos DB's
"latest version" semantics: each document sits in the feed once, at the
position of its latest write, in the log of the physical partition its shard
key (or `_id`) hashes to.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import heapq
import itertools
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.datetime_ms import DatetimeMS

from cosmigrate.sandbox.bsonvalues import DECODE_OPTIONS, canonical_key, sort_key
from cosmigrate.sandbox.query import QueryError, matches, resolve

SYSTEM_DATABASES = ("admin", "local", "config")


@dataclass
class IndexSpec:
    """One index as listIndexes reports it; only unique ones are enforced.

    Unique entries are multikey, as in MongoDB and DocumentDB: an array on an
    index path gives one entry per element, and two documents conflict when
    any of their entries is equal. `ignore_arrays` is Cosmos DB's rule without
    the EnableUniqueCompoundNestedDocs capability: a document whose value on
    an index path lies under an array is not held unique at all.
    """

    name: str
    key: dict[str, Any]
    unique: bool = False
    sparse: bool = False
    partial: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    entries: dict[tuple[Hashable, ...], Hashable] = field(default_factory=dict)
    ignore_arrays: bool = False

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": 2, "key": self.key, "name": self.name}
        if self.unique:
            out["unique"] = True
        if self.sparse:
            out["sparse"] = True
        if self.partial is not None:
            out["partialFilterExpression"] = self.partial
        out.update(self.extra)
        return out

    def entry_values(self, doc: Mapping[str, Any]) -> dict[tuple[Hashable, ...], tuple[Any, ...]]:
        """Every index entry of a document (canonical key -> the values themselves); empty when not covered."""
        if self.partial is not None and not matches(doc, self.partial):
            return {}
        per_path: list[list[Any]] = []
        present = False
        for path in self.key:
            values, through_array = index_values(doc, path)
            if through_array and self.ignore_arrays:
                return {}
            present = present or bool(values)
            per_path.append(values or [None])
        if self.sparse and not present:
            return {}
        return {tuple(canonical_key(v) for v in combo): combo for combo in itertools.product(*per_path)}

    def entry_keys(self, doc: Mapping[str, Any]) -> list[tuple[Hashable, ...]]:
        return list(self.entry_values(doc))


def index_values(doc: Any, path: str) -> tuple[list[Any], bool]:
    """The values a multikey index holds for a dotted path, and whether an array was crossed on the way."""
    crossed = False

    def walk(value: Any, parts: list[str]) -> list[Any]:
        nonlocal crossed
        if not parts:
            if isinstance(value, list):
                crossed = True
                return list(value) if value else [value]
            return [value]
        head, rest = parts[0], parts[1:]
        if isinstance(value, Mapping):
            return walk(value[head], rest) if head in value else []
        if isinstance(value, list):
            crossed = True
            out: list[Any] = []
            if head.isdigit() and int(head) < len(value):
                out.extend(walk(value[int(head)], rest))
            for item in value:
                if isinstance(item, Mapping):
                    out.extend(walk(item, parts))
            return out
        return []

    values = walk(doc, path.split("."))
    return values, crossed


@dataclass
class TtlRule:
    """A Cosmos TTL index: on `_ts` (the last write; a document's own `ttl` field overrides the seconds, -1 never
    expires), or on a date field with the EnableTtlOnCustomPath capability."""

    path: str
    seconds: float

    def deadline(self, doc: Mapping[str, Any], written_at: float) -> float | None:
        if self.path == "_ts":
            own = doc.get("ttl")
            if isinstance(own, (int, float)) and not isinstance(own, bool):
                return None if own == -1 else written_at + float(own)
            return None if self.seconds < 0 else written_at + self.seconds
        values = resolve(doc, self.path)
        when = values[0] if values else None
        if isinstance(when, DatetimeMS):
            return int(when) / 1000 + self.seconds
        return None


_SHARDED = object()  # first element of a sharded collection's storage keys: (shard key value, _id) identities


class DuplicateKey(Exception):
    """A write that would break a unique index; shaped like MongoDB's E11000."""

    def __init__(self, ns: str, index: IndexSpec, doc: Mapping[str, Any], values: tuple[Any, ...] | None = None) -> None:
        self.key_pattern = dict(index.key)
        if values is None:
            values = tuple((resolve(doc, p) or [None])[0] for p in index.key)
        self.key_value = dict(zip(index.key, values, strict=True))
        shown = ", ".join(f"{p}: {v!r}" for p, v in self.key_value.items())
        super().__init__(
            f"E11000 duplicate key error collection: {ns} index: {index.name} dup key: {{ {shown} }}"
        )


EPK_SPACE = 0xFF000000
"""Effective partition keys are 8 hex digits below "FF000000", so every one sorts inside ("", "FF")."""
FULL_RANGE = ("", "FF")


def epk_of(value: Hashable) -> str:
    """A stable effective partition key: a hash of the canonical shard key value (or `_id`), as Cosmos hashes
    the partition key; equal values (1, 1.0, Int64(1)) share one canonical key, so one partition."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return f"{int.from_bytes(digest, 'big') % EPK_SPACE:08X}"


def _bound(text: str) -> int:
    return 0 if text == "" else EPK_SPACE if text == "FF" else int(text, 16)


def _text(bound: int) -> str:
    return "" if bound == 0 else "FF" if bound >= EPK_SPACE else f"{bound:08X}"


class ChangeFeed:
    """One physical partition's change log ("latest version" mode), with its own LSN sequence.

    Entries are keyed by the document's identity, as storage is (`canonical_key`
    of the `_id`, with the shard key value when sharded), so writes to `_id` 1,
    then 1.0, then NaN, then NaN again are two documents, not four.

    Every write moves the document to the log's end with a new LSN; a reader
    positioned after LSN n gets each document whose latest write is past n,
    once, in LSN order. Deletes leave the log unless the delete preview is on.
    Each entry also carries the collection-wide write stamp, so that a
    whole-collection stream can interleave the partitions in write order.
    """

    def __init__(self, lo: str = "", hi: str = "FF", pid: int = 0, lsn: int = 0) -> None:
        self.lo, self.hi, self.pid = lo, hi, pid
        self.lsn = lsn
        self._entries: list[tuple[int, int, Hashable, str]] = []  # (lsn, stamp, key, op)
        self._latest: dict[Hashable, int] = {}

    @property
    def range(self) -> tuple[str, str]:
        return (self.lo, self.hi)

    def record(self, key: Hashable, op: str, stamp: int, emit_delete: bool = False) -> None:
        """Move `key` to the log's end; `op` is insert, update or delete."""
        if op == "delete" and not emit_delete:
            # The partition's log moves on (its head LSN too), but the latest-version feed shows nothing.
            self._latest.pop(key, None)
            self.lsn += 1
            return
        self.lsn += 1
        self._latest[key] = self.lsn
        self._entries.append((self.lsn, stamp, key, op))
        if len(self._entries) > 1024 and len(self._entries) > 2 * len(self._latest):
            self._entries = [e for e in self._entries if self._latest.get(e[2]) == e[0]]

    def read(self, after_lsn: int, limit: int) -> tuple[list[tuple[int, int, Hashable, str]], int]:
        """Up to `limit` live (lsn, stamp, key, op) entries after `after_lsn`, and the LSN to resume after."""
        start = bisect_right(self._entries, after_lsn, key=lambda e: e[0])
        out: list[tuple[int, int, Hashable, str]] = []
        last = after_lsn
        entries = self._entries
        for i in range(start, len(entries)):
            entry = entries[i]
            last = entry[0]
            if self._latest.get(entry[2]) != entry[0]:
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        else:
            last = max(last, self.lsn)
        return out, last

    def child(self, lo: str, hi: str, pid: int, epk: Any) -> ChangeFeed:
        """The half of this partition from `lo` to `hi`: its live entries, continuing this partition's LSNs
        (a reader positioned in the parent is positioned in both children)."""
        feed = ChangeFeed(lo, hi, pid, self.lsn)
        feed._entries = [e for e in self._entries if lo <= epk(e[2]) < hi]  # every key sorts below "FF"
        feed._latest = {k: v for k, v in self._latest.items() if lo <= epk(k) < hi}
        return feed


class PartitionedFeed:
    """A collection's change feed over its physical partitions (Cosmos DB).

    Documents are placed by `epk_of` their shard key value (or `_id` when the
    collection has none); each partition covers a range of effective partition
    keys and keeps its own LSN log. `split` replaces a partition by two
    children, as Cosmos does when a partition grows.
    """

    def __init__(self, partitions: int = 1, placement: Callable[[Hashable], Hashable] = lambda key: key) -> None:
        self.rid = base64.b64encode(os.urandom(6)).decode()
        n = max(1, partitions)
        bounds = [_text(EPK_SPACE * i // n) for i in range(n)] + ["FF"]
        self.partitions = [ChangeFeed(bounds[i], bounds[i + 1], i) for i in range(n)]
        self._next_pid = n
        self.gone: dict[tuple[str, str], int] = {}
        """Ranges of partitions that split, with their ids (a stream on one of them fails)."""
        self._stamp = 0
        self._epk: dict[Hashable, str] = {}
        self.placement = placement
        """The part of a storage key that places it: the shard key value when sharded, else the key (`_id`)."""
        self.splits = 0

    @property
    def lsn(self) -> int:
        """The LSN of the only partition (tests of single-partition collections); the highest one otherwise."""
        return max(p.lsn for p in self.partitions)

    def epk(self, key: Hashable) -> str:
        found = self._epk.get(key)
        if found is None:
            found = self._epk[key] = epk_of(self.placement(key))
        return found

    def partition_of(self, key: Hashable) -> ChangeFeed:
        if len(self.partitions) == 1:
            return self.partitions[0]
        e = self.epk(key)
        los = [p.lo for p in self.partitions]
        return self.partitions[bisect_right(los, e) - 1]

    def by_pid(self, pid: int) -> ChangeFeed | None:
        return next((p for p in self.partitions if p.pid == pid), None)

    def record(self, key: Hashable, op: str, emit_delete: bool = False) -> None:
        self._stamp += 1
        self.partition_of(key).record(key, op, self._stamp, emit_delete)

    def split(self, index: int) -> tuple[ChangeFeed, ChangeFeed]:
        """Split the `index`-th partition (in range order) into two halves; returns the children."""
        parent = self.partitions[index]
        lo, hi = _bound(parent.lo), _bound(parent.hi)
        if hi - lo < 2:
            raise ValueError(f"partition {parent.lo}-{parent.hi} is too small to split")
        mid = _text((lo + hi) // 2)
        left = parent.child(parent.lo, mid, self._next_pid, self.epk)
        right = parent.child(mid, parent.hi, self._next_pid + 1, self.epk)
        self._next_pid += 2
        self.gone[parent.range] = parent.pid
        self.partitions[index: index + 1] = [left, right]
        self.splits += 1
        return left, right


class Collection:
    """Documents of one collection, with their indexes and (on the source) a change feed.

    Documents are stored by identity: the canonical key of `_id`, or for a
    sharded Cosmos collection (`shard_key` set) the pair (shard key value,
    `_id`), because `_id` is then unique only per shard key value.
    """

    def __init__(self, db: str, name: str, *, with_feed: bool, partitions: int = 1) -> None:
        self.db = db
        self.name = name
        self.docs: dict[Hashable, bytes] = {}
        self.id_values: dict[Hashable, Any] = {}
        self.indexes: dict[str, IndexSpec] = {"_id_": IndexSpec("_id_", {"_id": 1})}
        self.feed = PartitionedFeed(partitions, self._placement) if with_feed else None
        self.shard_key: str | None = None
        self.shard_values: dict[Hashable, Any] = {}
        self._by_id: dict[Hashable, set[Hashable]] = {}  # sharded: canonical _id -> identities
        self.ttl: TtlRule | None = None
        self._expiry: list[tuple[float, int, Hashable]] = []  # heap of (deadline, stamp, identity)
        self._stamps: dict[Hashable, int] = {}
        self._stamp = itertools.count()
        self.options: dict[str, Any] = {}  # as given to `create` (capped, size, max), reported by listCollections
        self._order: list[tuple[tuple[Any, ...], Hashable]] = []
        self._in_order: set[Hashable] = set()
        self._pending: list[tuple[tuple[Any, ...], Hashable]] = []
        self._changed: asyncio.Event | None = None

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.name}"

    def _placement(self, key: Hashable) -> Hashable:
        """What places a document in a partition: its shard key value when sharded (identities are
        (marker, shard key value, `_id`)), else its `_id`."""
        return key[1] if self.shard_key is not None and isinstance(key, tuple) else key  # type: ignore[index]

    @property
    def unique_indexes(self) -> list[IndexSpec]:
        return [ix for ix in self.indexes.values() if ix.unique and ix.name != "_id_"]

    # --- identity -------------------------------------------------------------------------

    def shard_value(self, doc: Mapping[str, Any]) -> Any:
        assert self.shard_key is not None
        values = resolve(doc, self.shard_key)
        return values[0] if values else None

    def identity(self, id_value: Any, raw: bytes | None = None, doc: Mapping[str, Any] | None = None) -> Hashable:
        """The storage key of a document with this `_id` (and, when sharded, this document's shard key value)."""
        if self.shard_key is None:
            return canonical_key(id_value)
        if doc is None:
            assert raw is not None
            doc = bson.decode(raw, codec_options=DECODE_OPTIONS)
        return (_SHARDED, canonical_key(self.shard_value(doc)), canonical_key(id_value))

    def keys_for_id(self, id_value: Any) -> list[Hashable]:
        """Live storage keys of the documents with this `_id` (several in a sharded collection)."""
        if self.shard_key is None:
            key = canonical_key(id_value)
            return [key] if key in self.docs else []
        return [k for k in self._by_id.get(canonical_key(id_value), ()) if k in self.docs]

    def document_key(self, key: Hashable) -> dict[str, Any]:
        """A change event's documentKey: the shard key fields, then `_id` (just `_id` when unsharded)."""
        if self.shard_key is None:
            return {"_id": self.id_values[key]}
        return {self.shard_key: self.shard_values.get(key), "_id": self.id_values[key]}

    # --- changes --------------------------------------------------------------------------

    def changed_event(self) -> asyncio.Event:
        """An event set at the next write (change-stream getMores wait on it)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def decode(self, key: Hashable) -> dict[str, Any]:
        return bson.decode(self.docs[key], codec_options=DECODE_OPTIONS)

    def check_unique(self, key: Hashable, doc: Mapping[str, Any]) -> None:
        for ix in self.unique_indexes:
            for ek, values in ix.entry_values(doc).items():
                if ix.entries.get(ek, key) != key:
                    raise DuplicateKey(self.ns, ix, doc, values)

    def put(
        self, key: Hashable, id_value: Any, raw: bytes, doc: Mapping[str, Any] | None = None
    ) -> None:
        """Insert or replace one document; `doc` (decoded) is needed when unique indexes exist.

        `key` is the identity of the document (see `identity`). A replacement
        may carry an `_id` that is equal but not identical to the stored one
        (1.0 for 1): mongod then stores the replacement as given, so `id_value`
        is always taken as the document's `_id` from now on.
        """
        uniques = self.unique_indexes
        if (uniques or self.shard_key is not None or self.ttl is not None) and doc is None:
            doc = bson.decode(raw, codec_options=DECODE_OPTIONS)
        if uniques:
            assert doc is not None
            self.check_unique(key, doc)
            if key in self.docs:
                self._unindex(key, uniques)
            for ix in uniques:
                for ek in ix.entry_keys(doc):
                    ix.entries[ek] = key
        op = "update" if key in self.docs else "insert"
        self.id_values[key] = id_value
        if self.shard_key is not None:
            assert doc is not None
            self.shard_values[key] = self.shard_value(doc)
            self._by_id.setdefault(canonical_key(id_value), set()).add(key)
        if op == "insert":
            if key not in self._in_order:
                self._in_order.add(key)
                self._pending.append((sort_key(id_value), key))
        self.docs[key] = raw
        if self.ttl is not None:
            assert doc is not None
            self._arm(key, doc, time.time())
        if self.feed is not None:
            self.feed.record(key, op)
        self._notify()

    def remove(self, key: Hashable, emit_delete: bool = False, moves_log: bool = True) -> None:
        """`moves_log=False`: gone from every read, but the partition's log (its head LSN) does not move."""
        if key not in self.docs:
            return
        self._unindex(key, self.unique_indexes)
        del self.docs[key]
        self._stamps.pop(key, None)
        if self.feed is not None and moves_log:
            self.feed.record(key, "delete", emit_delete=emit_delete)
            if not emit_delete:
                # Keep the id so that a delete-preview event can still name it.
                self._forget(key)
        else:
            self._forget(key)
        self._notify()

    def _forget(self, key: Hashable) -> None:
        id_value = self.id_values.pop(key, None)
        if self.shard_key is not None:
            self.shard_values.pop(key, None)
            keys = self._by_id.get(canonical_key(id_value))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_id[canonical_key(id_value)]

    def _unindex(self, key: Hashable, uniques: list[IndexSpec]) -> None:
        if not uniques or key not in self.docs:
            return
        old = self.decode(key)
        for ix in uniques:
            for ek in ix.entry_keys(old):
                if ix.entries.get(ek) == key:
                    del ix.entries[ek]

    # --- TTL (Cosmos DB) --------------------------------------------------------------------

    def set_ttl(self, rule: TtlRule) -> None:
        """Start expiring documents; the ones already stored count as written now."""
        self.ttl = rule
        now = time.time()
        for key in list(self.docs):
            self._arm(key, self.decode(key), now)

    def _arm(self, key: Hashable, doc: Mapping[str, Any], written_at: float) -> None:
        assert self.ttl is not None
        stamp = next(self._stamp)
        self._stamps[key] = stamp
        deadline = self.ttl.deadline(doc, written_at)
        if deadline is not None:
            heapq.heappush(self._expiry, (deadline, stamp, key))

    def expire(self, now: float, lazy: bool = False) -> int:
        """Remove the documents whose time is up. Never in the change feed, not even with the delete preview.

        `lazy`: as Cosmos does under load, an expired document is hidden from every read at once but deleted
        later, in the background: the head does not move at expiry (the sandbox never moves it for them)."""
        n = 0
        while self._expiry and self._expiry[0][0] <= now:
            _, stamp, key = heapq.heappop(self._expiry)
            if self._stamps.get(key) == stamp and key in self.docs:
                self.remove(key, emit_delete=False, moves_log=not lazy)
                n += 1
        return n

    def ordered_keys(self, lower: Any = None, inclusive: bool = True) -> Iterator[Hashable]:
        """Live keys in `_id` order, optionally starting at a lower bound."""
        for _, key in self.ordered_items(lower, inclusive):
            yield key

    def ordered_items(self, lower: Any = None, inclusive: bool = True) -> Iterator[tuple[tuple[Any, ...], Hashable]]:
        """(sort key, key) of the live documents in `_id` order, optionally starting at a lower bound."""
        if self._pending:
            self._order.extend(self._pending)
            self._pending = []
            if len(self._order) > 2 * max(len(self.docs), 512):
                self._order = [e for e in self._order if e[1] in self.docs]
                self._in_order = {e[1] for e in self._order}
            self._order.sort(key=lambda e: e[0])
        start = 0
        if lower is not None:
            bound = sort_key(lower)
            if inclusive:
                from bisect import bisect_left

                start = bisect_left(self._order, bound, key=lambda e: e[0])
            else:
                start = bisect_right(self._order, bound, key=lambda e: e[0])
        order = self._order
        docs = self.docs
        for i in range(start, len(order)):
            item = order[i]
            if item[1] in docs:
                yield item

    def add_index(self, spec: IndexSpec) -> bool:
        """Create an index; False when an identical one exists. Builds unique entries."""
        existing = self.indexes.get(spec.name)
        if existing is not None:
            if existing.key == spec.key and existing.unique == spec.unique:
                return False
            raise QueryError(85, f"Index with name: {spec.name} already exists with different options", "IndexOptionsConflict")
        if spec.unique:
            for key in self.docs:
                doc = self.decode(key)
                for ek, values in spec.entry_values(doc).items():
                    if spec.entries.get(ek, key) != key:
                        spec.entries.clear()
                        raise DuplicateKey(self.ns, spec, doc, values)
                    spec.entries[ek] = key
        self.indexes[spec.name] = spec
        return True


class Store:
    """All databases of one emulated server."""

    def __init__(self, *, with_feed: bool) -> None:
        self.with_feed = with_feed
        self.partitions: Callable[[str], int] = lambda ns: 1
        """How many physical partitions a new collection (`db.coll`) gets (the source sets it from its faults)."""
        self.databases: dict[str, dict[str, Collection]] = {}
        self.writes = 0

    def get(self, db: str, coll: str) -> Collection | None:
        return self.databases.get(db, {}).get(coll)

    def expire(self, now: float, lazy: bool = False) -> int:
        """TTL: remove every document whose time is up (collections with a TTL index only)."""
        return sum(c.expire(now, lazy) for colls in self.databases.values() for c in list(colls.values())
                   if c.ttl is not None)

    def get_or_create(self, db: str, coll: str) -> Collection:
        colls = self.databases.setdefault(db, {})
        c = colls.get(coll)
        if c is None:
            c = colls[coll] = Collection(db, coll, with_feed=self.with_feed, partitions=self.partitions(f"{db}.{coll}"))
        return c

    def drop(self, db: str, coll: str) -> bool:
        colls = self.databases.get(db)
        if not colls or coll not in colls:
            return False
        c = colls.pop(coll)
        c._notify()
        if not colls:
            del self.databases[db]
        return True

    def drop_database(self, db: str) -> None:
        for c in self.databases.pop(db, {}).values():
            c._notify()
