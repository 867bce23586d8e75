"""Every document the source accepts arrives byte for byte: odd-length UUID binaries (subtype 4 of a length other
than 16, which MongoDB stores and PyMongo before 4.18 refused to decode), the other binary subtypes at odd lengths,
dates outside years 1-9999, NaN and signed zeros, extreme integers and timestamps, MinKey/MaxKey, regex flags,
odd field names, sparse arrays, repeated field names and deep nesting, with odd `_id`s among them. Through the
sandbox (stored and read back as sent) and through the tool: capture -> batch file -> apply, on Cosmos DB 4.2
(wire 8, through the source client's shim) and 7.0."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import bson
import pytest
from bson import Decimal128, Int64, MaxKey, MinKey, Timestamp
from bson.raw_bson import RawBSONDocument
from pymongo import AsyncMongoClient

from cosmigrate.daemon import Daemon
from cosmigrate.mongo import RAW, source_client
from cosmigrate.sandbox import Sandbox
from tests.helpers import (
    assert_converged,
    check_committed,
    make_config,
    prepare_backends,
    read_committed,
    source_docs,
    wait_for,
)

NS = "app.odd"


def _doc(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def _el(etype: int, name: str, payload: bytes) -> bytes:
    return bytes([etype]) + name.encode() + b"\x00" + payload


def _str(value: str) -> bytes:
    data = value.encode() + b"\x00"
    return struct.pack("<i", len(data)) + data


def _bin(subtype: int, data: bytes) -> bytes:
    return struct.pack("<i", len(data)) + bytes([subtype]) + data


def _i32(value: int) -> bytes:
    return struct.pack("<i", value)


def _deep(levels: int) -> dict:
    doc: dict = {"leaf": 1}
    for _ in range(levels):
        doc = {"d": [doc]}
    return doc


# Hand-encoded where the driver would not write the value as it is (a UUID of the wrong length, a sparse array,
# a repeated field name), so the bytes are exactly what another client could have stored.
ODD: dict[str, bytes] = {
    "uuid-empty": _doc(_el(5, "_id", _bin(4, b"")), _el(5, "u", _bin(4, b""))),
    "uuid-odd": _doc(_el(5, "_id", _bin(4, b"abc")), _el(5, "u1", _bin(4, b"\x01")), _el(5, "u15", _bin(4, b"y" * 15)),
                     _el(5, "u17", _bin(4, b"x" * 17)), _el(3, "in", _doc(_el(5, "u", _bin(4, b"z" * 31))))),
    "subtypes": _doc(_el(2, "_id", _str("subtypes")), _el(5, "legacy_uuid", _bin(3, b"12345")),
                     _el(5, "md5", _bin(5, b"abc")), _el(5, "user", _bin(0x80, b"1234567")),
                     _el(5, "old", _bin(2, _i32(3) + b"abc")), _el(5, "vector", _bin(9, b"\x03\x00\x01\x02")),
                     _el(5, "empty", _bin(0, b""))),
    "dates": _doc(_el(2, "_id", _str("dates")), _el(9, "after_9999", struct.pack("<q", 2**62)),
                  _el(9, "before_1", struct.pack("<q", -(2**62)))),
    "numbers": bson.encode({"_id": "numbers", "neg_zero": -0.0, "nan": float("nan"), "inf": float("inf"),
                            "neg_inf": float("-inf"), "dec_nan": Decimal128("NaN"), "dec_neg_zero": Decimal128("-0"),
                            "dec_neg_inf": Decimal128("-Infinity"), "dec_exp": Decimal128("1.0E+10"),
                            "dec_tiny": Decimal128("-1E-6176"), "long_max": Int64(2**63 - 1),
                            "long_min": Int64(-(2**63)), "int_min": -(2**31)}),
    "misc": bson.encode({"_id": "misc", "ts_zero": Timestamp(0, 0), "ts_max": Timestamp(2**32 - 1, 2**32 - 1),
                         "min": MinKey(), "max": MaxKey(), "none": None, "nul_inside": "a\x00b", "empty": "",
                         "astral": "\U0001f600", "": 1, "in": {"$dollar": 2}, "a.b": 3, "é": 4, "doc": {},
                         "arr": []}),
    "regex": _doc(_el(2, "_id", _str("regex")), _el(0x0B, "flags", b"a.*b\x00imsux\x00"), _el(0x0B, "none", b"\x00\x00")),
    "sparse-array": _doc(_el(2, "_id", _str("sparse-array")),
                         _el(4, "arr", _doc(_el(0x10, "0", _i32(1)), _el(0x10, "5", _i32(2))))),
    "repeated-name": _doc(_el(2, "_id", _str("repeated-name")), _el(0x10, "a", _i32(1)), _el(0x10, "a", _i32(2))),
    "id-minkey": _doc(_el(0xFF, "_id", b""), _el(0x10, "n", _i32(1))),
    "id-document": bson.encode({"_id": {"b": 1, "a": RawBSONDocument(_doc(_el(5, "u", _bin(4, b"ab"))))}, "x": 1}),
    "deep": bson.encode({"_id": "deep", **_deep(45)}),
}


def _changed(raw: bytes) -> bytes:
    """The same document with one more field at the end (a replace the tool must carry as well)."""
    extra = _el(0x10, "changed", _i32(1))
    return struct.pack("<i", len(raw) + len(extra)) + raw[4:-1] + extra + b"\x00"


async def _insert_and_read_back(client: AsyncMongoClient) -> None:
    coll = client.app.get_collection("odd", codec_options=RAW)
    for name, raw in ODD.items():
        await coll.insert_one(RawBSONDocument(raw, RAW))
        back = [bytes(d.raw) async for d in coll.find({"_id": RawBSONDocument(raw, RAW)["_id"]})]
        assert back == [raw], f"{name}: the sandbox did not store what it was sent"


@pytest.mark.parametrize(("source_version", "target_version"), [("4.2", "5.0"), ("7.0", "8.0")])
async def test_odd_bson_round_trips_byte_for_byte(tmp_path: Path, source_version: str, target_version: str) -> None:
    async with Sandbox(source_version=source_version, target_version=target_version) as sb:
        source = source_client(sb.source_uri, serverSelectionTimeoutMS=5000)
        target: AsyncMongoClient = AsyncMongoClient(sb.target_uri, serverSelectionTimeoutMS=5000,
                                                    tlsCAFile=sb.target_ca_file)
        cfg = make_config(tmp_path, sb.source_uri, sb.target_uri, "file+sqlite", max_batch_events=5)
        await prepare_backends(cfg)
        daemon = Daemon(cfg)
        try:
            await _insert_and_read_back(source)  # history: the full load (start_at = "beginning") reads it
            task = asyncio.create_task(daemon.serve())
            try:
                await wait_for(lambda: _up(daemon), 30, what="daemon up")
                assert (await daemon.handle_control({"cmd": "writer", "action": "start"}))["ok"]
                await wait_for(lambda: assert_converged(source, target, [NS]), 90, what="odd documents applied")
                coll = source.app.get_collection("odd", codec_options=RAW)
                for raw in ODD.values():  # and live changes to each of them
                    doc = RawBSONDocument(raw, RAW)
                    await coll.replace_one({"_id": doc["_id"]}, RawBSONDocument(_changed(raw), RAW))
                await wait_for(lambda: assert_converged(source, target, [NS]), 90, what="odd replacements applied")
            finally:
                daemon.request_stop()
                await asyncio.wait_for(task, 60)
            expected = (await source_docs(source, [NS]))[NS]
            assert sorted(expected.values()) == sorted(_changed(raw) for raw in ODD.values())
            # The batch files hold the same bytes: every document's last captured version is what the source has.
            check_committed((await read_committed(cfg))[NS], expected)
        finally:
            await source.close()
            await target.close()


async def _up(daemon: Daemon) -> bool:
    return daemon.control is not None
