"""The source's indexes as DocumentDB can take them: read, translate, report (`cosmigrate indexes`, preflight).

Nothing here writes anywhere: creating the translated indexes on the target
belongs to the full load. What is reported, per source index:

- `build`: DocumentDB accepts it as translated (`target` is the spec to create);
- `cannot build`: a kind DocumentDB lacks (wildcard, 2d, hashed, text or
  partial before 5.0, collations before 8.0), with the reason;
- TTL, per kind (docs/design.md, `cosmigrate.ttl`): a TTL on Cosmos's system
  field `_ts` (the last write; a document's own `ttl` field overrides the
  seconds) cannot be rebuilt, because `_ts` is not a field of the documents:
  the operator decides once per namespace (`[ttl]`: an expiry on a date field
  the application writes, or none), and the report shows the decision. A TTL
  on a custom date field (EnableTtlOnCustomPath) is built without its expiry,
  which is set at cutover (collMod): an expiring target would delete
  documents the source still serves. Either way the source's expiry deletes
  never reach the change feed: the delete sweep reconciles them.
- unique indexes, checked under DocumentDB's semantics (`unique_violations`):
  Cosmos DB creates unique indexes only on empty collections and does not
  hold values under arrays unique (without EnableUniqueCompoundNestedDocs);
  DocumentDB indexes every array element. So the source can legally hold
  documents that break the same index on DocumentDB; they are reported by
  `_id`, never by value.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import json_util
from bson.errors import BSONError
from pymongo.asynchronous.collection import AsyncCollection

from cosmigrate.config import Config
from cosmigrate.mongo import RAW, list_namespaces, raw_collection, source_client, target_client
from cosmigrate.ttl import UNDECIDED, ttl_state

MAX_CANDIDATES = 10_000
"""Default bound of the unique check: documents holding an array on an index path, read per index."""
MAX_GROUPS = 20
"""Violations reported per index (each a group of `_id`s sharing one entry)."""

_KEEP = ("unique", "sparse", "partialFilterExpression", "collation", "weights", "default_language",
         "language_override", "textIndexVersion", "2dsphereIndexVersion", "bits", "min", "max")


def unsupported_index(spec: Mapping[str, Any], target_major: int) -> str | None:
    """Why DocumentDB (of that major version) cannot build this source index, or None."""
    for name, kind in dict(spec.get("key", {})).items():
        if "$**" in name:
            return "wildcard index"
        if kind in ("2d", "hashed", "geoHaystack"):
            return f"{kind} index"
        if kind == "text" and target_major < 5:
            return "text index (needs DocumentDB 5.0)"
    if "partialFilterExpression" in spec and target_major < 5:
        return "partial index (needs DocumentDB 5.0)"
    if "collation" in spec and target_major < 8:
        return "collation (needs DocumentDB 8.0)"
    return None


@dataclass
class UniqueCheck:
    """What the bounded unique check read, and the `_id` groups it found (each group shares one entry)."""

    candidates: int = 0
    lookups: int = 0
    complete: bool = True
    groups: list[list[str]] = field(default_factory=list)

    def cost(self, documents: int | None) -> str:
        scanned = f"about {documents}" if documents is not None else "every"
        bound = "" if self.complete else f", stopped at the bound of {self.candidates} candidates: partial"
        return (f"one filtered scan (Cosmos reads {scanned} documents to answer it; {self.candidates} returned, "
                f"those holding an array on an index path) and {self.lookups} indexed lookups{bound}")


@dataclass
class IndexReport:
    ns: str
    name: str
    key: dict[str, Any]
    action: str
    """`build`, `cannot build` or `implicit` (the `_id` index)."""
    reason: str = ""
    target: dict[str, Any] | None = None
    ttl: str = ""
    """"", "_ts" or "custom": the TTL kind, when the index is one."""
    unique: UniqueCheck | None = None
    documents: int | None = None
    decision: str = ""
    """A `_ts` TTL's `[ttl]` decision (`undecided`, `none`, `field:<path>:<seconds>`); "" for other indexes."""

    @property
    def decided(self) -> bool:
        """A `_ts` TTL whose decision is made: nothing left to do, although the index itself is not built."""
        return self.ttl == "_ts" and self.decision not in ("", UNDECIDED)

    @property
    def problem(self) -> bool:
        return (self.action == "cannot build" and not self.decided) or bool(self.unique and self.unique.groups)

    def line(self) -> str:
        fields = ", ".join(f"{k}: {v}" for k, v in self.key.items())
        text = f"{self.ns} {self.name} {{{fields}}}: {self.action}"
        if self.reason:
            text += f" ({self.reason})"
        if self.decision:
            text += f"; [ttl] decision: {self.decision}"
        if self.unique is not None:
            if self.unique.groups:
                shown = "; ".join("_id " + " and ".join(g) for g in self.unique.groups[:5])
                more = f" and {len(self.unique.groups) - 5} more" if len(self.unique.groups) > 5 else ""
                text += (f"; {len(self.unique.groups)} groups of source documents break it under DocumentDB's "
                         f"semantics: {shown}{more}")
            else:
                text += "; no source document breaks it under DocumentDB's semantics"
            text += f" [{'complete' if self.unique.complete else 'PARTIAL'} check: {self.unique.cost(self.documents)}]"
        return text

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"namespace": self.ns, "name": self.name, "key": self.key, "action": self.action,
                               "reason": self.reason, "target": self.target, "ttl": self.ttl,
                               "ttl_decision": self.decision}
        if self.unique is not None:
            out["unique_check"] = {"complete": self.unique.complete, "candidates": self.unique.candidates,
                                   "lookups": self.unique.lookups, "violations": self.unique.groups,
                                   "cost": self.unique.cost(self.documents)}
        return out


def translate(ns: str, spec: Mapping[str, Any], target_major: int) -> IndexReport:
    """One source index as DocumentDB can take it (nothing is read or written here)."""
    name = str(spec.get("name", "?"))
    key = dict(spec.get("key", {}))
    if name == "_id_":
        return IndexReport(ns, name, key, "implicit", "DocumentDB creates the _id index itself")
    why = unsupported_index(spec, target_major)
    if why:
        return IndexReport(ns, name, key, "cannot build", why)
    target: dict[str, Any] = {"key": key, "name": name, **{k: spec[k] for k in _KEEP if k in spec}}
    if "expireAfterSeconds" in spec:
        seconds = spec["expireAfterSeconds"]
        if list(key) == ["_ts"]:
            return IndexReport(
                ns, name, key, "cannot build",
                f"TTL on the system field _ts (expireAfterSeconds={seconds}; a document's own ttl field overrides "
                "it): _ts is not a field of the documents, so DocumentDB cannot expire by it; decide in [ttl]: an "
                "expiry on a date field the application writes (enabled at cutover), or none", ttl="_ts")
        return IndexReport(
            ns, name, key, "build",
            f"TTL on {next(iter(key))} (expireAfterSeconds={seconds}): built without expiry; set expireAfterSeconds "
            "at cutover (collMod), or the target would delete documents the source still serves", target, ttl="custom")
    return IndexReport(ns, name, key, "build", "", target)


def index_values(doc: Any, path: str) -> tuple[list[Any], bool]:
    """The entries a multikey index (DocumentDB's) holds for a dotted path, and whether an array was crossed."""
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

    return walk(doc, path.split(".")), crossed


def crosses_array(doc: Mapping[str, Any], paths: list[str]) -> bool:
    """True when a value of `doc` on one of the index paths lies under an array (Cosmos does not hold it unique)."""
    try:
        return any(index_values(doc, path)[1] for path in paths)
    except BSONError:
        return False


def show_id(value: Any) -> str:
    try:
        return json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)
    except (BSONError, TypeError, ValueError):
        return "<undisplayable _id>"


async def unique_violations(
    coll: AsyncCollection[Any], key: Mapping[str, Any], partial: Mapping[str, Any] | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> UniqueCheck:
    """Source documents that share an entry of a unique index under DocumentDB's (multikey) semantics.

    Cosmos DB holds values outside arrays unique itself, so a violation needs at least one document with an
    array on an index path. The check reads those candidates (one filtered scan: Cosmos evaluates every
    document to answer it, and charges for it) and, for each of their entries, runs one lookup by value (the
    source's own unique index serves it) for other documents holding it. Bounded by `max_candidates`; the
    report says when it stopped early. Memory: the `_id` groups found.
    """
    paths = list(key)
    prefixes = sorted({".".join(p.split(".")[: i + 1]) for p in paths for i in range(len(p.split(".")))})
    flt: dict[str, Any] = {"$or": [{prefix: {"$type": "array"}} for prefix in prefixes]}
    if partial:
        flt = {"$and": [flt, dict(partial)]}
    projection = {p.split(".")[0]: 1 for p in paths}
    check = UniqueCheck()
    parent: dict[bytes, bytes] = {}  # union-find over encoded `_id`s: one group per shared entry, merged
    shown: dict[bytes, str] = {}

    def root(x: bytes) -> bytes:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    async for doc in coll.find(flt, projection).limit(max_candidates + 1):
        if check.candidates >= max_candidates:
            check.complete = False
            break
        check.candidates += 1
        mine = bson.encode({"_id": doc["_id"]}, codec_options=RAW)
        per_path = [index_values(doc, path)[0] or [None] for path in paths]
        for combo in itertools.product(*per_path):
            query: dict[str, Any] = {"$and": [*({p: v} for p, v in zip(paths, combo, strict=True)),
                                              {"_id": {"$ne": doc["_id"]}}, *([dict(partial)] if partial else [])]}
            check.lookups += 1
            async for other in coll.find(query, {"_id": 1}).limit(MAX_GROUPS):
                theirs = bson.encode({"_id": other["_id"]}, codec_options=RAW)
                for enc, value in ((mine, doc["_id"]), (theirs, other["_id"])):
                    if enc not in parent:
                        parent[enc] = enc
                        shown[enc] = show_id(value)
                a, b = root(mine), root(theirs)
                if a != b:
                    parent[b] = a
    found: dict[bytes, list[str]] = {}
    for enc in parent:
        found.setdefault(root(enc), []).append(shown[enc])
    check.groups = [sorted(g) for g in found.values()][:MAX_GROUPS]
    return check


async def read_indexes(
    source: Any, namespaces: list[str], target_major: int, cfg: Config, *, check_unique: bool = True,
    max_candidates: int = MAX_CANDIDATES, documents_known: dict[str, int] | None = None,
) -> list[IndexReport]:
    """Every index of every namespace, translated, with the unique check where asked and a `_ts` TTL's decision.

    `documents_known`: counts the caller already read (collStats), so the check's cost line needs no `count`
    (Cosmos charges a count by the documents it counts)."""
    out: list[IndexReport] = []
    for ns in namespaces:
        coll = raw_collection(source, ns)
        documents: int | None = (documents_known or {}).get(ns)
        specs = [spec async for spec in await coll.list_indexes()]
        decision = ttl_state(ns, specs, cfg).decision_text
        for spec in specs:
            report = translate(ns, spec, target_major)
            if report.ttl == "_ts":
                report.decision = decision
            if check_unique and spec.get("unique") and report.name != "_id_":
                if documents is None:
                    documents = await coll.estimated_document_count()
                partial = spec.get("partialFilterExpression")
                report.unique = await unique_violations(coll, dict(spec["key"]), partial, max_candidates)
                report.documents = documents
            out.append(report)
    return out


async def report(
    cfg: Config, namespaces: list[str] | None = None, *, check_unique: bool = True, max_candidates: int = MAX_CANDIDATES,
) -> list[IndexReport]:
    """`cosmigrate indexes`: connect to both sides (the target only for its version), read and translate."""
    source = source_client(cfg.source.uri, serverSelectionTimeoutMS=10_000)
    target = target_client(cfg.target.uri, cfg.target.tls_ca_file, serverSelectionTimeoutMS=10_000)
    try:
        info = await target.admin.command("buildInfo")
        major = int(str(info.get("version", "5")).split(".")[0])
        names = namespaces or await list_namespaces(source, cfg.capture.include, cfg.capture.exclude)
        return await read_indexes(source, names, major, cfg, check_unique=check_unique, max_candidates=max_candidates)
    finally:
        await source.close()
        await target.close()
