"""MongoDB wire protocol framing: OP_MSG, and the legacy OP_QUERY/OP_REPLY handshake.

Only framing lives here; what a command means is the server's business. Bulk
write payloads arrive as OP_MSG "document sequences" (section kind 1): their
documents are kept as raw BSON slices so that a replacement document reaches
storage byte for byte.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument

from cosmigrate.sandbox.bsonvalues import DECODE_OPTIONS, RAW_OPTIONS

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

MAX_MESSAGE_SIZE = 48_000_000
HEADER = struct.Struct("<iiii")
_INT32 = struct.Struct("<i")
_UINT32 = struct.Struct("<I")

CHECKSUM_PRESENT = 1
MORE_TO_COME = 2


class ProtocolError(Exception):
    """The bytes are not a message we can answer; the connection is closed."""


class BadCommand(Exception):
    """The frame is fine but its BSON is not: answered with an error reply."""


@dataclass
class Request:
    """One decoded request: the command body plus its document sequences."""

    request_id: int
    op_code: int
    body: dict[str, Any]
    sequences: dict[str, list[RawBSONDocument]] = field(default_factory=dict)
    more_to_come: bool = False
    received_at: float = field(default_factory=time.monotonic)
    """When the server had read the whole command (its `maxTimeMS` counts from here)."""

    @property
    def command_name(self) -> str:
        return next(iter(self.body), "")


def parse_header(data: bytes) -> tuple[int, int, int, int]:
    length, request_id, response_to, op_code = HEADER.unpack(data)
    if length < HEADER.size + 1 or length > MAX_MESSAGE_SIZE:
        raise ProtocolError(f"message length {length} out of range")
    return length, request_id, response_to, op_code


def _split_docs(payload: bytes, start: int, end: int) -> list[RawBSONDocument]:
    docs = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise BadCommand("truncated document in sequence")
        (size,) = _INT32.unpack_from(payload, pos)
        if size < 5 or pos + size > end or payload[pos + size - 1] != 0:
            raise BadCommand("invalid document size in sequence")
        docs.append(RawBSONDocument(payload[pos : pos + size], RAW_OPTIONS))
        pos += size
    return docs


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        return bson.decode(raw, codec_options=DECODE_OPTIONS)
    except Exception as exc:  # bson raises several types for garbage
        raise BadCommand(f"invalid BSON: {exc}") from exc


def parse_request(request_id: int, op_code: int, payload: bytes) -> Request:
    """Decode the bytes after the header of an OP_MSG or OP_QUERY request."""
    if op_code == OP_MSG:
        return _parse_op_msg(request_id, payload)
    if op_code == OP_QUERY:
        return _parse_op_query(request_id, payload)
    raise ProtocolError(f"unsupported opCode {op_code}")


def _parse_op_msg(request_id: int, payload: bytes) -> Request:
    if len(payload) < 5:
        raise ProtocolError("OP_MSG too short")
    (flags,) = _UINT32.unpack_from(payload, 0)
    end = len(payload) - (4 if flags & CHECKSUM_PRESENT else 0)
    pos = 4
    body: dict[str, Any] | None = None
    sequences: dict[str, list[RawBSONDocument]] = {}
    while pos < end:
        kind = payload[pos]
        pos += 1
        if pos + 4 > end:
            raise BadCommand("truncated OP_MSG section")
        (size,) = _INT32.unpack_from(payload, pos)
        if size < 5 or pos + size > end:
            raise BadCommand("OP_MSG section size out of range")
        if kind == 0:
            body = _decode(payload[pos : pos + size])
        elif kind == 1:
            name_end = payload.find(b"\x00", pos + 4, pos + size)
            if name_end < 0:
                raise BadCommand("document sequence without identifier")
            ident = payload[pos + 4 : name_end].decode("utf-8", "replace")
            sequences[ident] = _split_docs(payload, name_end + 1, pos + size)
        else:
            raise BadCommand(f"unknown OP_MSG section kind {kind}")
        pos += size
    if body is None:
        raise BadCommand("OP_MSG without a body section")
    return Request(request_id, OP_MSG, body, sequences, bool(flags & MORE_TO_COME))


def _parse_op_query(request_id: int, payload: bytes) -> Request:
    name_end = payload.find(b"\x00", 4)
    if name_end < 0 or name_end + 9 > len(payload):
        raise ProtocolError("malformed OP_QUERY")
    collection = payload[4:name_end].decode("utf-8", "replace")
    qstart = name_end + 9
    (size,) = _INT32.unpack_from(payload, qstart)
    if size < 5 or qstart + size > len(payload):
        raise BadCommand("OP_QUERY document size out of range")
    body = _decode(payload[qstart : qstart + size])
    if not collection.endswith(".$cmd"):
        raise BadCommand("legacy OP_QUERY is only accepted for commands")
    if "$query" in body:
        body = dict(body["$query"])
    body.setdefault("$db", collection[: -len(".$cmd")])
    return Request(request_id, OP_QUERY, body)


def encode_reply(request: Request, reply: dict[str, Any], request_id: int) -> bytes:
    """Frame a reply in the form the request came in (OP_MSG or OP_REPLY)."""
    doc = bson.encode(reply, codec_options=DECODE_OPTIONS)
    if request.op_code == OP_MSG:
        payload = b"\x00\x00\x00\x00\x00" + doc
        op = OP_MSG
    else:
        payload = struct.pack("<iqii", 0, 0, 0, 1) + doc
        op = OP_REPLY
    return HEADER.pack(HEADER.size + len(payload), request_id, request.request_id, op) + payload
