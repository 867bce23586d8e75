"""A write workload for the sandbox source: the demo, the benchmarks and the tests share it.

Random inserts, updates, replaces (and, with `delete_share`, deletes and
re-inserts of the same `_id`) over several collections, 20% of the
writes on 1% of the keys (hot keys), documents with many BSON types so that
any type loss shows up, and optional unique-email swaps (A and B exchange
values through a temporary one, as an application must under a unique index).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from bson import Binary, Decimal128, Int64, ObjectId
from pymongo import AsyncMongoClient


def rich_doc(key: Any, v: int, rng: random.Random) -> dict[str, Any]:
    """A document with many BSON types, so type loss anywhere shows up."""
    return {
        "_id": key,
        "v": v,
        "small_long": Int64(rng.randint(0, 100)),
        "dec": Decimal128(Decimal(f"{rng.randint(0, 10**6)}.{rng.randint(0, 99):02d}")),
        "when": dt.datetime(2024, 1, 1) + dt.timedelta(milliseconds=rng.randint(0, 10**9)),
        "bin": Binary(rng.randbytes(8), 0),
        "uuid": Binary(uuid.UUID(int=rng.getrandbits(128)).bytes, 4),
        "oid": ObjectId(),
        "nested": {"b": rng.random(), "a": [1, "two", {"three": Int64(3)}]},
        "pad": "x" * rng.randint(0, 300),
    }


@dataclass
class Workload:
    """Random inserts/updates/replaces over several collections, 20% of writes on 1% of keys."""

    client: AsyncMongoClient
    namespaces: list[str]
    keys_per_ns: int = 500
    seed: int = 1
    delete_share: float = 0.0
    """Share of writes to an existing document that delete it (its next write inserts it again)."""
    writes: int = 0
    deletes: int = 0
    rng: random.Random = field(init=False)
    versions: dict[tuple[str, Any], int] = field(default_factory=dict)
    deleted: set[tuple[str, Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def _pick(self) -> tuple[str, Any]:
        ns = self.rng.choice(self.namespaces)
        hot = max(1, self.keys_per_ns // 100)
        idx = self.rng.randrange(hot) if self.rng.random() < 0.2 else self.rng.randrange(self.keys_per_ns)
        key = idx if idx % 3 else f"k{idx}"
        return ns, key

    def _deleting(self, ns: str, key: Any, v: int) -> bool:
        if v == 0 or (ns, key) in self.deleted or not self.delete_share or self.rng.random() >= self.delete_share:
            return False
        self.deleted.add((ns, key))
        self.deletes += 1
        return True

    def _inserting(self, ns: str, key: Any, v: int) -> bool:
        if v == 0 or (ns, key) in self.deleted:
            self.deleted.discard((ns, key))
            return True
        return False

    async def write_one(self) -> None:
        ns, key = self._pick()
        db, _, coll = ns.partition(".")
        c = self.client[db][coll]
        v = self.versions.get((ns, key), -1) + 1
        if self._deleting(ns, key, v):
            await c.delete_one({"_id": key})
            self.writes += 1
            return
        if self._inserting(ns, key, v):
            await c.insert_one(rich_doc(key, v, self.rng))
        elif self.rng.random() < 0.5:
            await c.update_one({"_id": key}, {"$set": {"v": v, "f": self.rng.random(), "small_long": Int64(v)}})
        else:
            await c.replace_one({"_id": key}, rich_doc(key, v, self.rng))
        self.versions[(ns, key)] = v
        self.writes += 1

    async def run_bulk(self, count: int, per_write: int = 500) -> None:
        """`count` changes sent as ordered bulk writes (fast), each op a change like write_one's."""
        from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne

        done = 0
        while done < count:
            by_ns: dict[str, list[Any]] = {}
            for _ in range(min(per_write, count - done)):
                ns, key = self._pick()
                v = self.versions.get((ns, key), -1) + 1
                op: Any
                if self._deleting(ns, key, v):
                    by_ns.setdefault(ns, []).append(DeleteOne({"_id": key}))
                    done += 1
                    continue
                if self._inserting(ns, key, v):
                    op = InsertOne(rich_doc(key, v, self.rng))
                elif self.rng.random() < 0.5:
                    op = UpdateOne({"_id": key}, {"$set": {"v": v, "f": self.rng.random(), "small_long": Int64(v)}})
                else:
                    op = ReplaceOne({"_id": key}, rich_doc(key, v, self.rng))
                self.versions[(ns, key)] = v
                by_ns.setdefault(ns, []).append(op)
                done += 1
            for ns, ops in by_ns.items():
                db, _, coll = ns.partition(".")
                await self.client[db][coll].bulk_write(ops, ordered=True)
            self.writes += sum(len(o) for o in by_ns.values())

    async def swap_emails(self, ns: str, a: int, b: int) -> None:
        """Exchange two users' unique emails through a temporary value (the source enforces uniqueness)."""
        db, _, coll = ns.partition(".")
        c = self.client[db][coll]
        da, db_ = await c.find_one({"_id": a}), await c.find_one({"_id": b})
        if not da or not db_:
            return
        await c.update_one({"_id": a}, {"$set": {"email": f"swap-{a}-{uuid.uuid4().hex[:6]}"}})
        await c.update_one({"_id": b}, {"$set": {"email": da["email"]}})
        await c.update_one({"_id": a}, {"$set": {"email": db_["email"]}})
        self.writes += 3

    async def run(self, count: int, stop: asyncio.Event | None = None, pace_s: float = 0.0) -> None:
        for _ in range(count):
            if stop is not None and stop.is_set():
                return
            await self.write_one()
            if pace_s:
                await asyncio.sleep(pace_s)
