"""Document identity in collapsing: numerically equal `_id`s are one target document, never two racing writes."""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal

import bson
import pytest
from bson import Int64
from bson.binary import Binary
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId
from pymongo import AsyncMongoClient

from cosmigrate.apply import collapse
from cosmigrate.identity import identity
from cosmigrate.sandbox import Sandbox
from tests.helpers import assert_converged, wait_for
from tests.test_apply import Running, _captured, config
from tests.test_apply_unit import _batch, event


def key(value, **more) -> bytes:
    return bson.encode({**more, "_id": value} if more else {"_id": value})


@pytest.mark.parametrize("value", [ObjectId(), "a", "", Binary(b"x", 4), True, None,
                                   dt.datetime(2026, 1, 1), bson.Timestamp(1, 2)])
def test_bytewise_ids_keep_their_raw_key(value) -> None:
    assert identity(key(value)) == key(value)


def test_numbers_equal_by_value_are_one_identity() -> None:
    ones = [1, Int64(1), 1.0, Decimal128("1"), Decimal128("1.0")]
    assert len({identity(key(v)) for v in ones}) == 1
    assert identity(key(0.0)) == identity(key(-0.0)) == identity(key(Decimal128("-0")))
    assert identity(key(math.nan)) == identity(key(Decimal128("NaN")))
    assert identity(key(2**53 + 1)) != identity(key(float(2**53)))  # exact values, no float rounding
    assert identity(key(0.1)) != identity(key(Decimal128(Decimal("0.1"))))
    assert identity(key({"a": 1})) == identity(key({"a": 1.0}))
    assert identity(key({"a": 1, "b": 2})) != identity(key({"b": 2, "a": 1}))  # field order counts
    assert identity(key([1, 2])) == identity(key([1.0, Int64(2)]))
    assert identity(key(True)) != identity(key(1))
    assert identity(key(1, sk="x")) == identity(key(1.0, sk="x")) != identity(key(1, sk="y"))
    assert identity(key("1")) != identity(key(1))


@pytest.mark.parametrize("n", [0, 1, -1, 7, 2**31 - 1, -(2**31), 2**53 + 1, 2**63 - 1, -(2**63)])
def test_the_integer_fast_path_gives_the_general_canonical_form(n: int) -> None:
    as_double = [float(n)] if float(n) == n else []  # the general path (no fast path for doubles)
    forms = [Int64(n), Decimal128(str(n)), *as_double] + ([n] if -(2**31) <= n < 2**31 else [])
    assert len({identity(key(v)) for v in forms}) == 1


def test_an_int32_id_is_its_own_key_and_the_integer_forms_meet_the_general_path_at_the_edges() -> None:
    assert identity(key(5)) == key(5)  # the common numeric `_id` costs nothing
    assert identity(key(Int64(5))) == identity(key(5.0)) == identity(key(Decimal128("5.00"))) == key(5)
    assert identity(key(Int64(2**31))) == identity(key(2.0**31)) != identity(key(2**31 - 1))
    # Beyond Int64 no integer type exists: a double and a decimal of one value still meet (the general path).
    assert identity(key(2.0**63)) == identity(key(Decimal128("9223372036854775808")))
    assert identity(key(2.0**63)) != identity(key(Int64(2**63 - 1)))
    assert identity(key(1.5)) == identity(key(Decimal128("1.5"))) != identity(key(1))
    assert identity(key(math.nan)) == identity(key(Decimal128("NaN"))) != identity(key(0))


def test_collapse_keeps_one_op_per_target_document() -> None:
    ops = collapse([_batch(0, [event(1, {"_id": 1, "v": 1})]), _batch(1, [event(1.0, {"_id": 1.0, "v": 2})])], {})
    assert len(ops) == 1
    (op,) = ops.values()
    assert op.doc is not None and op.doc["v"] == 2 and op.origin_seq == 1
    # A deferred (carried) write of the same document is replaced by the newer event, whatever its _id's type.
    carried = collapse([_batch(0, [event(Int64(7), {"_id": Int64(7), "v": 1})])], {})
    ops = collapse([_batch(1, [event(7.0, {"_id": 7.0, "v": 3})])], carried)
    assert len(ops) == 1 and next(iter(ops.values())).doc["v"] == 3  # type: ignore[index]


async def test_one_document_written_through_equal_ids_converges(
    tmp_path, sandbox: Sandbox, source: AsyncMongoClient, target: AsyncMongoClient,
) -> None:
    """The source document's `_id` changes representation between events; the target ends with one document."""
    cfg = config(tmp_path, sandbox, max_batch_events=1)
    cfg.apply.max_ops_per_write, cfg.apply.write_concurrency = 1, 4
    async with Running(cfg) as run:
        await source.app.nums.insert_one({"_id": 1, "v": 0})
        await wait_for(lambda: _captured(run, "app.nums", 1), 10, what="the insert captured")
        for v, _id in enumerate([Int64(1), 1.0, Decimal128("1"), 1, 1.0], start=1):
            await source.app.nums.replace_one({"_id": _id}, {"_id": _id, "v": v})
            await wait_for(lambda v=v: _captured(run, "app.nums", v + 1), 10, what=f"version {v} in its own batch")
        await run.writer("start")
        await wait_for(lambda: assert_converged(source, target, ["app.nums"]), 30, what="convergence")
    assert await target.app.nums.count_documents({}) == 1
