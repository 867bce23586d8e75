"""The change-batch object: what a watcher writes to the store and an applier reads.

Layout (all integers little-endian):

    b"CMGB" | version u8 | header_len u32 | header (BSON) | payload_len u32 |
    payload (zstd of the events, each a raw BSON document, back to back) |
    checksum (BLAKE2b-128 of every byte before it)

The header is BSON, not JSON, so the resume token keeps its exact BSON form.
Events stay raw BSON end to end: they are never decoded here. Every read
verifies the checksum and the framing; a batch that fails raises
`CorruptBatch` and is never skipped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import bson
import zstandard
from bson.codec_options import CodecOptions
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

MAGIC = b"CMGB"
VERSION = 1
CHECKSUM_SIZE = 16
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_HEADER_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(tz_aware=True, tzinfo=dt.UTC)


class CorruptBatch(Exception):
    """A batch object that fails its checksum or framing: stop, never skip."""


@dataclass(frozen=True)
class BatchHeader:
    """What a batch says about itself; `resume_token` is the namespace's position after its last event: the token, or
    with per-partition capture the units of every partition (`cosmigrate.partitions`)."""

    cluster: str
    ns: str
    seq: int
    count: int
    first_captured_at: dt.datetime
    last_captured_at: dt.datetime
    resume_token: RawBSONDocument
    raw_bytes: int

    def to_bson(self) -> bytes:
        return bson.encode({
            "v": VERSION,
            "cluster": self.cluster,
            "ns": self.ns,
            "seq": Int64(self.seq),
            "count": self.count,
            "first_captured_at": self.first_captured_at,
            "last_captured_at": self.last_captured_at,
            "resume_token": self.resume_token,
            "raw_bytes": Int64(self.raw_bytes),
        })

    @classmethod
    def from_bson(cls, raw: bytes) -> BatchHeader:
        doc = bson.decode(raw, codec_options=_HEADER_OPTIONS)
        token_raw = bson.encode(doc["resume_token"])
        return cls(
            cluster=doc["cluster"], ns=doc["ns"], seq=int(doc["seq"]), count=int(doc["count"]),
            first_captured_at=doc["first_captured_at"], last_captured_at=doc["last_captured_at"],
            resume_token=RawBSONDocument(token_raw), raw_bytes=int(doc["raw_bytes"]),
        )


@dataclass(frozen=True)
class Batch:
    header: BatchHeader
    events: list[bytes]
    checksum: str


class BatchCodec:
    """Encodes and decodes batch objects; holds the (non thread-safe) zstd contexts."""

    def __init__(self, level: int = 3) -> None:
        self._level = level

    def encode(self, header: BatchHeader, events: Sequence[bytes]) -> tuple[bytes, str]:
        """Return the object bytes and its hex checksum."""
        payload = zstandard.ZstdCompressor(level=self._level).compress(b"".join(events))
        head = header.to_bson()
        body = b"".join([MAGIC, bytes([VERSION]), _U32.pack(len(head)), head, _U32.pack(len(payload)), payload])
        digest = hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest()
        return body + digest, digest.hex()

    def decode(self, data: bytes, expect_checksum: str | None = None) -> Batch:
        """Verify and split a batch object; raises CorruptBatch on any inconsistency."""
        if len(data) < 4 + 1 + 4 + 5 + 4 + CHECKSUM_SIZE or data[:4] != MAGIC:
            raise CorruptBatch("not a cosmigrate batch (bad magic or too short)")
        body, digest = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
        if hashlib.blake2b(body, digest_size=CHECKSUM_SIZE).digest() != digest:
            raise CorruptBatch("checksum mismatch: the batch object was altered or truncated")
        if expect_checksum is not None and digest.hex() != expect_checksum:
            raise CorruptBatch(f"checksum {digest.hex()} differs from the ledger's {expect_checksum}")
        if body[4] != VERSION:
            raise CorruptBatch(f"unsupported batch format version {body[4]}")
        (head_len,) = _U32.unpack_from(body, 5)
        head_end = 9 + head_len
        try:
            header = BatchHeader.from_bson(body[9:head_end])
            (payload_len,) = _U32.unpack_from(body, head_end)
        except Exception as exc:
            raise CorruptBatch(f"unreadable header: {exc}") from exc
        payload = body[head_end + 4 : head_end + 4 + payload_len]
        if len(payload) != payload_len or head_end + 4 + payload_len != len(body):
            raise CorruptBatch("payload length does not match the object size")
        try:
            raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max(header.raw_bytes, 1))
        except zstandard.ZstdError as exc:
            raise CorruptBatch(f"payload does not decompress: {exc}") from exc
        events = split_events(raw)
        if len(events) != header.count or len(raw) != header.raw_bytes:
            raise CorruptBatch(f"header says {header.count} events / {header.raw_bytes} bytes, payload has {len(events)} / {len(raw)}")
        return Batch(header, events, digest.hex())


def split_events(raw: bytes) -> list[bytes]:
    """Split back-to-back BSON documents without decoding them."""
    out = []
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + 5 > end:
            raise CorruptBatch("truncated event")
        (size,) = _I32.unpack_from(raw, pos)
        if size < 5 or pos + size > end or raw[pos + size - 1] != 0:
            raise CorruptBatch(f"bad event length {size} at offset {pos}")
        out.append(raw[pos : pos + size])
        pos += size
    return out


def token_bytes(token: Any) -> bytes:
    """The raw BSON of a resume token document (as PyMongo hands it over)."""
    if isinstance(token, RawBSONDocument):
        return bytes(token.raw)
    return bson.encode(token)
