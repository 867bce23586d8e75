"""Merge-comparing one `_id` range of both sides, as raw BSON, a page at a time.

A range is a page of the source walk (`cosmigrate.idorder.walk`): up to
`page_size` source documents, and every target document between the same
bounds. Both are sorted by `_id`, so one pass of two cursors compares them:
equal `_id`s compare their documents (bytes, then `compare.difference`), an
`_id` on one side only is `missing` (on the target) or `extra`. Memory is the
source page plus one target cursor batch, whatever the collection's size.

The fast path never decodes: identical documents are identical bytes, so the
`_id` is only sliced out (and decoded for ordering) where the bytes differ.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cosmigrate.idorder import IdDoc, Page, id_doc, id_order, iter_raw
from cosmigrate.verify.compare import difference


@dataclass(frozen=True)
class Mismatch:
    """One document that differs: its `_id` (raw `{_id: v}`), the kind, and where (for `different`)."""

    id: IdDoc
    kind: str  # missing (on the target), extra (on the target), different
    path: str = ""
    difference: str = ""

    def to_doc(self) -> dict[str, Any]:
        from bson.binary import Binary

        return {"id": Binary(self.id), "kind": self.kind, "path": self.path, "difference": self.difference}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Mismatch:
        return cls(bytes(doc["id"]), doc["kind"], doc.get("path", ""), doc.get("difference", ""))


@dataclass
class RangeResult:
    source_docs: int = 0
    target_docs: int = 0
    equal: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


def compare_pair(src: bytes, tgt: bytes) -> Mismatch | None:
    """Two documents with the same `_id`."""
    d = difference(src, tgt)
    if d is None:
        return None
    return Mismatch(id_doc(src), "different", d.path, d.kind)


async def compare_range(source: list[bytes], target: AsyncIterator[bytes]) -> RangeResult:
    """Merge the sorted source page with the sorted target documents of the same range."""
    out = RangeResult(source_docs=len(source))
    i, n = 0, len(source)
    mismatches = out.mismatches
    async for t in target:
        out.target_docs += 1
        while True:
            if i >= n:
                mismatches.append(Mismatch(id_doc(t), "extra"))
                break
            s = source[i]
            if s == t:
                out.equal += 1
                i += 1
                break
            sid, tid = id_doc(s), id_doc(t)
            if sid == tid:
                m = compare_pair(s, t)
                i += 1
                if m is None:
                    out.equal += 1
                else:
                    mismatches.append(m)
                break
            so, to = id_order(sid), id_order(tid)
            if so == to:  # the same _id in another numeric type (1 vs 1.0): one document, differing in _id's type
                mismatches.append(compare_pair(s, t) or Mismatch(sid, "different", "_id", "type"))
                i += 1
                break
            if so < to:
                mismatches.append(Mismatch(sid, "missing"))
                i += 1
                continue
            mismatches.append(Mismatch(tid, "extra"))
            break
    for doc in source[i:]:
        mismatches.append(Mismatch(id_doc(doc), "missing"))
    return out


async def target_range(coll: Any, page: Page, batch_size: int) -> AsyncIterator[bytes]:
    """The target's documents between the page's bounds, in `_id` order, one cursor batch in memory."""
    async for doc in iter_raw(coll.find_raw_batches(page.filter(), sort=[("_id", 1)], batch_size=batch_size)):
        yield doc


async def recheck(source: Any, target: Any, ids: list[IdDoc], value: Callable[[IdDoc], Any]) -> list[Mismatch]:
    """Compare a few documents again by `_id` (`$in` on both sides): the mismatches that remain."""
    if not ids:
        return []
    flt = {"_id": {"$in": [value(i) for i in ids]}}
    src = {id_doc(bytes(d.raw)): bytes(d.raw) async for d in source.find(flt)}
    tgt = {id_doc(bytes(d.raw)): bytes(d.raw) async for d in target.find(flt)}
    # Numeric _ids equal across types (1 and 1.0) are one document: match them by order key too.
    src_by_order = {id_order(k): k for k in src}
    out: list[Mismatch] = []
    seen_t: set[IdDoc] = set()
    for k, raw in src.items():
        tk = k if k in tgt else next((t for t in tgt if t not in seen_t and id_order(t) == id_order(k)), None)
        if tk is None:
            out.append(Mismatch(k, "missing"))
            continue
        seen_t.add(tk)
        m = compare_pair(raw, tgt[tk])
        if m is not None:
            out.append(m)
    for k in tgt:
        if k not in seen_t and id_order(k) not in src_by_order:
            out.append(Mismatch(k, "extra"))
    return out
