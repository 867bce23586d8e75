"""In-memory storage shared by both emulators.

Documents are kept as raw BSON bytes keyed by a MongoDB-equality `_id` key, so
point writes are O(1) and what a client wrote is exactly what it reads back
(field order, Int64, Decimal128, ...). An `_id`-ordered view is kept lazily for
range scans. The source additionally keeps a change feed with Cosmos DB's
"latest version" semantics: each document sits in the feed once, at the
position of its latest write.
"""

from __future__ import annotations

import asyncio
import base64
import os
from bisect import bisect_right
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import bson

from cosmigrate.sandbox.bsonvalues import DECODE_OPTIONS, canonical_key, sort_key
from cosmigrate.sandbox.query import QueryError, matches, resolve

SYSTEM_DATABASES = ("admin", "local", "config")


@dataclass
class IndexSpec:
    """One index as listIndexes reports it; only unique ones are enforced."""

    name: str
    key: dict[str, Any]
    unique: bool = False
    sparse: bool = False
    partial: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    entries: dict[tuple[Hashable, ...], Hashable] = field(default_factory=dict)

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

    def entry_key(self, doc: Mapping[str, Any]) -> tuple[Hashable, ...] | None:
        """The index key of a document, or None when the index does not cover it."""
        if self.partial is not None and not matches(doc, self.partial):
            return None
        parts = []
        present = False
        for path in self.key:
            values = resolve(doc, path)
            if values:
                present = True
            parts.append(canonical_key(values[0] if values else None))
        if self.sparse and not present:
            return None
        return tuple(parts)


class DuplicateKey(Exception):
    """A write that would break a unique index; shaped like MongoDB's E11000."""

    def __init__(self, ns: str, index: IndexSpec, doc: Mapping[str, Any]) -> None:
        self.key_pattern = dict(index.key)
        self.key_value = {p: (resolve(doc, p) or [None])[0] for p in index.key}
        shown = ", ".join(f"{p}: {v!r}" for p, v in self.key_value.items())
        super().__init__(
            f"E11000 duplicate key error collection: {ns} index: {index.name} dup key: {{ {shown} }}"
        )


class ChangeFeed:
    """Cosmos DB's change feed for one collection ("latest version" mode).

    Entries are keyed by `canonical_key` of the `_id`, as storage is, so writes
    to `_id` 1, then 1.0, then NaN, then NaN again are two documents, not four.

    Every write moves the document to the feed's end with a new LSN; a reader
    positioned after LSN n gets each document whose latest write is past n,
    once, in LSN order. Deletes leave the feed unless the delete preview is on.
    """

    def __init__(self) -> None:
        self.rid = base64.b64encode(os.urandom(6)).decode()
        self.lsn = 0
        self._entries: list[tuple[int, Hashable, str]] = []
        self._latest: dict[Hashable, int] = {}

    def record(self, key: Hashable, op: str, emit_delete: bool = False) -> None:
        """Move `key` to the feed's end; `op` is insert, update or delete."""
        if op == "delete" and not emit_delete:
            # The partition's log moves on (its head LSN too), but the latest-version feed shows nothing.
            self._latest.pop(key, None)
            self.lsn += 1
            return
        self.lsn += 1
        self._latest[key] = self.lsn
        self._entries.append((self.lsn, key, op))
        if len(self._entries) > 1024 and len(self._entries) > 2 * len(self._latest):
            self._entries = [e for e in self._entries if self._latest.get(e[1]) == e[0]]

    def read(self, after_lsn: int, limit: int) -> tuple[list[tuple[Hashable, str]], int]:
        """Up to `limit` live (key, op) entries after `after_lsn`, and the LSN to resume after."""
        start = bisect_right(self._entries, after_lsn, key=lambda e: e[0])
        out: list[tuple[Hashable, str]] = []
        last = after_lsn
        entries = self._entries
        for i in range(start, len(entries)):
            lsn, key, op = entries[i]
            last = lsn
            if self._latest.get(key) != lsn:
                continue
            out.append((key, op))
            if len(out) >= limit:
                break
        else:
            last = max(last, self.lsn)
        return out, last


class Collection:
    """Documents of one collection, with their indexes and (on the source) a change feed."""

    def __init__(self, db: str, name: str, *, with_feed: bool) -> None:
        self.db = db
        self.name = name
        self.docs: dict[Hashable, bytes] = {}
        self.id_values: dict[Hashable, Any] = {}
        self.indexes: dict[str, IndexSpec] = {"_id_": IndexSpec("_id_", {"_id": 1})}
        self.feed = ChangeFeed() if with_feed else None
        self.options: dict[str, Any] = {}  # as given to `create` (capped, size, max), reported by listCollections
        self._order: list[tuple[tuple[Any, ...], Hashable]] = []
        self._in_order: set[Hashable] = set()
        self._pending: list[tuple[tuple[Any, ...], Hashable]] = []
        self._changed: asyncio.Event | None = None

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.name}"

    @property
    def unique_indexes(self) -> list[IndexSpec]:
        return [ix for ix in self.indexes.values() if ix.unique and ix.name != "_id_"]

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
            ek = ix.entry_key(doc)
            if ek is not None and ix.entries.get(ek, key) != key:
                raise DuplicateKey(self.ns, ix, doc)

    def put(
        self, key: Hashable, id_value: Any, raw: bytes, doc: Mapping[str, Any] | None = None
    ) -> None:
        """Insert or replace one document; `doc` (decoded) is needed when unique indexes exist.

        `key` is the canonical key of `id_value`. A replacement may carry an
        `_id` that is equal but not identical to the stored one (1.0 for 1):
        mongod then stores the replacement as given, so `id_value` is always
        taken as the document's `_id` from now on.
        """
        uniques = self.unique_indexes
        if uniques:
            if doc is None:
                doc = bson.decode(raw, codec_options=DECODE_OPTIONS)
            self.check_unique(key, doc)
            if key in self.docs:
                self._unindex(key, uniques)
            for ix in uniques:
                ek = ix.entry_key(doc)
                if ek is not None:
                    ix.entries[ek] = key
        op = "update" if key in self.docs else "insert"
        self.id_values[key] = id_value
        if op == "insert":
            if key not in self._in_order:
                self._in_order.add(key)
                self._pending.append((sort_key(id_value), key))
        self.docs[key] = raw
        if self.feed is not None:
            self.feed.record(key, op)
        self._notify()

    def remove(self, key: Hashable, emit_delete: bool = False) -> None:
        if key not in self.docs:
            return
        self._unindex(key, self.unique_indexes)
        del self.docs[key]
        if self.feed is not None:
            self.feed.record(key, "delete", emit_delete=emit_delete)
            if not emit_delete:
                # Keep the id so that a delete-preview event can still name it.
                self.id_values.pop(key, None)
        else:
            self.id_values.pop(key, None)
        self._notify()

    def _unindex(self, key: Hashable, uniques: list[IndexSpec]) -> None:
        if not uniques or key not in self.docs:
            return
        old = self.decode(key)
        for ix in uniques:
            ek = ix.entry_key(old)
            if ek is not None and ix.entries.get(ek) == key:
                del ix.entries[ek]

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
                ek = spec.entry_key(doc)
                if ek is None:
                    continue
                if ek in spec.entries:
                    spec.entries.clear()
                    raise DuplicateKey(self.ns, spec, doc)
                spec.entries[ek] = key
        self.indexes[spec.name] = spec
        return True


class Store:
    """All databases of one emulated server."""

    def __init__(self, *, with_feed: bool) -> None:
        self.with_feed = with_feed
        self.databases: dict[str, dict[str, Collection]] = {}
        self.writes = 0

    def get(self, db: str, coll: str) -> Collection | None:
        return self.databases.get(db, {}).get(coll)

    def get_or_create(self, db: str, coll: str) -> Collection:
        colls = self.databases.setdefault(db, {})
        c = colls.get(coll)
        if c is None:
            c = colls[coll] = Collection(db, coll, with_feed=self.with_feed)
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
