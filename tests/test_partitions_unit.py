"""Narrow unit tests of the partition units (cosmigrate.partitions) and child tokens (tokens.with_range)."""

from __future__ import annotations

import bson
import pytest

from cosmigrate.partitions import (
    SPLIT,
    TAILING,
    Unit,
    UnitsError,
    children,
    covered_by,
    decode,
    encode,
    from_tokens,
    is_units,
    unit_positions,
)
from cosmigrate.sandbox.cosmos import make_list_token, make_token
from cosmigrate.tokens import positions, with_range


@pytest.mark.parametrize("form", ["json", "gzip", "list"])
def test_a_child_token_keeps_the_parents_form_and_lsn(form: str) -> None:
    parent = bson.encode(make_list_token({("", "80000000"): 41}) if form == "list"
                         else make_token("rid", {("", "80000000"): 41}, 4 if form == "gzip" else 1))
    child = with_range(parent, ("40000000", "80000000"))
    assert positions(child) == {("40000000", "80000000"): 41}
    assert bson.decode(child).get("_kind") == bson.decode(parent).get("_kind")


def test_units_round_trip_and_are_told_from_tokens() -> None:
    token = bson.encode(make_token("rid", {("", "FF"): 3}))
    units = [Unit("", "80000000", token), Unit("80000000", "FF", token, SPLIT, "", "")]
    raw = encode(units)
    assert is_units(raw) and not is_units(token) and not is_units(None)
    assert decode(raw) == units


def test_from_tokens_needs_one_range_per_token_and_no_duplicates() -> None:
    a = bson.encode(make_token("rid", {("", "80000000"): 1}))
    b = bson.encode(make_token("rid", {("80000000", "FF"): 2}))
    assert [u.range for u in from_tokens([b, a])] == [("", "80000000"), ("80000000", "FF")]
    with pytest.raises(UnitsError):
        from_tokens([a, a])
    with pytest.raises(UnitsError):
        from_tokens([bson.encode(make_token("rid", {("", "80000000"): 1, ("80000000", "FF"): 2}))])


def test_covered_by_accepts_only_an_exact_tiling() -> None:
    parent = ("40000000", "80000000")
    assert covered_by(parent, [parent, ("80000000", "FF")]) is None
    halves = [("60000000", "80000000"), ("40000000", "60000000"), ("", "40000000")]
    assert covered_by(parent, halves) == [("40000000", "60000000"), ("60000000", "80000000")]
    with pytest.raises(UnitsError, match="gap"):
        covered_by(parent, [("40000000", "50000000"), ("60000000", "80000000")])
    with pytest.raises(UnitsError, match="merged"):
        covered_by(parent, [("", "FF")])


def test_children_start_at_the_parents_committed_position_and_split_units_leave_the_positions() -> None:
    parent = Unit("", "FF", bson.encode(make_token("rid", {("", "FF"): 9})))
    kids = children(parent, [("", "80000000"), ("80000000", "FF")])
    assert [(k.state, k.parent) for k in kids] == [(TAILING, '""-FF')] * 2
    parent.state = SPLIT
    assert unit_positions([parent, *kids]) == {("", "80000000"): 9, ("80000000", "FF"): 9}


def test_split_units_are_dropped_before_the_record_outgrows_a_ledger_item() -> None:
    token = bson.encode(make_token("rid", {("", "FF"): 3}))
    units = [Unit(f"{i:08X}", f"{i + 1:08X}", token, SPLIT) for i in range(400)] + [Unit("", "FF", token)]
    assert [u.state for u in decode(encode(units))] == [TAILING]
