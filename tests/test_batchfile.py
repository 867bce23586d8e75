"""The batch object format: round trips over every BSON type, and corruption is always caught."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import bson
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.raw_bson import RawBSONDocument
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmigrate.batchfile import BatchCodec, BatchHeader, CorruptBatch, split_events
from cosmigrate.sandbox.cosmos import make_token
from cosmigrate.stores import batch_key

names = st.text(st.characters(blacklist_characters="\x00.$", blacklist_categories=("Cs",)), min_size=1, max_size=8)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.integers(-5, 5).map(Int64),  # small Int64: must stay Int64, not become Int32
    st.floats(allow_nan=False),
    st.decimals(min_value=-(10**9), max_value=10**9, places=4).map(lambda d: Decimal128(Decimal(d))),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.binary(max_size=20).map(lambda b: Binary(b, 0)),
    st.binary(min_size=16, max_size=16).map(lambda b: Binary(b, 4)),
    st.binary(max_size=10).map(lambda b: Binary(b, 0x80)),
    st.builds(ObjectId),
    st.datetimes(min_value=dt.datetime(1900, 1, 1), max_value=dt.datetime(2200, 1, 1)).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)),
    st.builds(Regex, st.sampled_from(["^a", "b+c", "[x-z]"]), st.sampled_from(["", "i", "ms"])),
    st.builds(Timestamp, st.integers(0, 2**31), st.integers(0, 2**31)),
    st.just(MinKey()),
    st.just(MaxKey()),
    st.builds(Code, st.sampled_from(["return 1", "x => x"])),
)
values = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4),
    st.dictionaries(names, children, max_size=4),
), max_leaves=12)
documents = st.dictionaries(names, values, max_size=6)


def header(seq: int, events: list[bytes]) -> BatchHeader:
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    return BatchHeader(cluster="c", ns="db.coll", seq=seq, count=len(events), first_captured_at=now,
                       last_captured_at=now, resume_token=RawBSONDocument(bson.encode(make_token("rid", 42))),
                       raw_bytes=sum(map(len, events)))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(documents, max_size=8), st.integers(0, 10**9))
def test_round_trip_keeps_every_byte_and_field_order(docs, seq) -> None:
    events = [bson.encode({"_id": i, "fullDocument": d}) for i, d in enumerate(docs)]
    codec = BatchCodec()
    data, checksum = codec.encode(header(seq, events), events)
    batch = codec.decode(data, expect_checksum=checksum)
    assert batch.events == events
    assert batch.header == header(seq, events)
    assert batch.checksum == checksum
    for raw, doc in zip(batch.events, docs, strict=True):
        back = bson.decode(raw)["fullDocument"]
        assert list(back) == list(doc)  # field order
        assert bson.encode(back) == bson.encode(doc)  # types, including small Int64


def test_every_single_byte_flip_is_detected() -> None:
    events = [bson.encode({"_id": i, "x": "y" * i}) for i in range(5)]
    data, _ = BatchCodec().encode(header(7, events), events)
    for pos in range(0, len(data), max(1, len(data) // 97)):
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptBatch):
            BatchCodec().decode(bytes(bad))


@pytest.mark.parametrize("cut", [0, 3, 10, -1, -17])
def test_truncation_is_detected(cut: int) -> None:
    events = [bson.encode({"_id": 1})]
    data, _ = BatchCodec().encode(header(0, events), events)
    with pytest.raises(CorruptBatch):
        BatchCodec().decode(data[:cut])


def test_ledger_checksum_mismatch_is_detected() -> None:
    events = [bson.encode({"_id": 1})]
    data, _ = BatchCodec().encode(header(0, events), events)
    with pytest.raises(CorruptBatch, match="differs from the ledger"):
        BatchCodec().decode(data, expect_checksum="00" * 16)


def test_split_events_refuses_garbage() -> None:
    with pytest.raises(CorruptBatch):
        split_events(b"\x05\x00\x00\x00\x01")
    assert split_events(bson.encode({"a": 1}) * 3) == [bson.encode({"a": 1})] * 3


def test_batch_key_layout() -> None:
    assert batch_key("changes", "prod", "sales.orders", 42, 3) == "changes/prod/sales/orders/000000000042-e3"
    assert batch_key("", "prod", "db.a/b c", 1, 1) == "prod/db/a%2Fb%20c/000000000001-e1"
    assert re.fullmatch(r"p/c/d/e\.f/\d{12}-e7", batch_key("/p/", "c", "d.e.f", 3, 7))
