"""Which server versions cosmigrate migrates from and to, and a check that needs no driver's consent.

PyMongo refuses a server whose `hello.maxWireVersion` is below its
`MIN_SUPPORTED_WIRE_VERSION` with a `ConfigurationError` raised from server
selection ("Server at ... reports wire version 7, but this version of PyMongo
requires at least 8 (MongoDB 4.2)"). That says nothing about Cosmos DB or what
to do, so before the driver connects, `probe` asks the server itself over a
bare socket (legacy `isMaster`, which every server answers unauthenticated,
then `buildInfo`), and `check_answer` turns a too-old answer into one line:
the version found, the oldest supported, and what to do.

Version facts (checked 2026; cite in README "Compatibility"):
- Cosmos DB for MongoDB (RU) reports MongoDB's own wire version for the server
  version the account is set to (same codebase, feature flags per version:
  devblogs.microsoft.com/cosmosdb/mongodb-3-6-lives-on-in-azure-cosmos-db).
  Observed: a 3.6 account reports maximum wire version 6
  (github.com/microsoft/vscode-documentdb/issues/453), a 4.0 account 7
  (github.com/clearlydefined/service/pull/1431). 4.2, 5.0, 6.0, 7.0 follow
  MongoDB's table (8, 13, 17, 21; mongodb/specifications wire versions);
  `buildInfo.version` is "<major>.<minor>.0" (a 3.2 account reports "3.2.0",
  github.com/jeroen/mongolite/issues/167). Server versions offered by Azure:
  3.2, 3.6, 4.0, 4.2, 5.0, 6.0, 7.0 (Azure.Provisioning CosmosDBServerVersion).
- Amazon DocumentDB 4.0 reports wire version 7 (Gurobi Remote Services
  deprecation notice for DocumentDB 4.0); 5.0 reports 13; 8.0 claims full
  MongoDB 8.0 wire compatibility (AWS release notes, 2025-11-11): 25 assumed.
  Elastic clusters speak the 5.0 wire protocol and are not offered on 8.0.
- PyMongo's MIN_SUPPORTED_WIRE_VERSION, read from each release's
  pymongo/common.py: 4.13 -> 7 (MongoDB 4.0); 4.14 to 4.17 -> 8 (4.2);
  4.18, 4.19, 4.20 -> 9 (4.4). cosmigrate pins the newest (pyproject.toml)
  and its source client accepts wire 8 through a shim (cosmigrate.mongo,
  SOURCE_MIN_WIRE), so Cosmos DB 4.2 stays supported; the target client keeps
  the driver's own floor.
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import bson
import pymongo
from pymongo.common import MIN_SUPPORTED_WIRE_VERSION

from cosmigrate.mongo import SOURCE_MIN_WIRE

SOURCE = "source"
TARGET = "target"


@dataclass(frozen=True)
class ServerVersion:
    """One server version as the server reports it."""

    name: str
    build_version: str
    """What `buildInfo.version` says."""
    max_wire: int
    """What `hello.maxWireVersion` says."""
    token_form: str = "v2"
    """Cosmos only: "list" (the old form, 3.6 accounts) or "v2" (JSON with V, Rid, Continuation)."""
    sharded: bool = False
    """DocumentDB elastic clusters answer `hello` as a mongos (`msg: "isdbgrid"`, no replica set)."""


COSMOS_VERSIONS: dict[str, ServerVersion] = {
    v.name: v for v in (
        ServerVersion("3.6", "3.6.0", 6, token_form="list"),
        ServerVersion("4.0", "4.0.0", 7),
        ServerVersion("4.2", "4.2.0", 8),
        ServerVersion("5.0", "5.0.0", 13),
        ServerVersion("6.0", "6.0.0", 17),
        ServerVersion("7.0", "7.0.0", 21),
    )
}
"""Azure Cosmos DB for MongoDB (RU) server versions with change streams (3.2 has none)."""

DOCUMENTDB_VERSIONS: dict[str, ServerVersion] = {
    v.name: v for v in (
        ServerVersion("3.6", "3.6.0", 6),
        ServerVersion("4.0", "4.0.0", 7),
        ServerVersion("5.0", "5.0.0", 13),
        ServerVersion("8.0", "8.0.0", 25),
        ServerVersion("elastic", "5.0.0", 13, sharded=True),
    )
}
"""Amazon DocumentDB engine versions (instance-based and serverless), and elastic clusters."""

PRODUCT = {SOURCE: "Azure Cosmos DB for MongoDB server version", TARGET: "Amazon DocumentDB"}
TODO = {
    SOURCE: "upgrade the account's server version in the Azure portal before migrating",
    TARGET: "upgrade the cluster (in-place major version upgrade) or create one with "
            "deploy/cloudformation/documentdb.yaml, then point target.uri at it",
}


def table(role: str) -> dict[str, ServerVersion]:
    return COSMOS_VERSIONS if role == SOURCE else DOCUMENTDB_VERSIONS


def required_wire(role: str) -> int:
    """The lowest wire version cosmigrate works with, for this role, with the installed driver.

    Nothing cosmigrate does needs more than the driver does: Cosmos change streams
    exist from 3.6 (wire 6) on, and the target only takes unordered bulk upserts
    and deletes. The floor is therefore the client's: the source client accepts
    wire 8 (Cosmos DB 4.2) through cosmigrate.mongo's shim, the target client
    keeps the driver's MIN_SUPPORTED_WIRE_VERSION.
    """
    return max(SOURCE_MIN_WIRE if role == SOURCE else MIN_SUPPORTED_WIRE_VERSION, 6)


def supported(role: str) -> list[ServerVersion]:
    """The versions of the table that the installed driver and cosmigrate work with, oldest first."""
    return [v for v in table(role).values() if v.max_wire >= required_wire(role)]


def oldest_supported(role: str) -> ServerVersion:
    return min(supported(role), key=lambda v: v.max_wire)


def lookup(role: str, name: str) -> ServerVersion:
    """A table entry by name ("4.2", "4.2.0", "elastic"); ValueError names the known ones."""
    key = name if name in table(role) else ".".join(name.split(".")[:2])
    try:
        return table(role)[key]
    except KeyError:
        raise ValueError(f"unknown {role} version {name!r}; known: {', '.join(table(role))}") from None


def version_name(role: str, wire: int, build_info: Mapping[str, Any] | None = None) -> str:
    """The version to name to a person: buildInfo's major.minor, else the table's entry for the wire version."""
    version = (build_info or {}).get("version")
    if isinstance(version, str) and version:
        return ".".join(version.split(".")[:2])
    names = [v.name for v in table(role).values() if v.max_wire == wire and not v.sharded]
    return names[0] if names else f"(unknown; wire version {wire})"


@dataclass(frozen=True)
class Problem:
    """An unsupported server version, said in one line."""

    role: str
    found: str
    wire: int
    oldest: ServerVersion

    @property
    def detail(self) -> str:
        return (f"{PRODUCT[self.role]} {self.found} (wire version {self.wire}) is not supported; the oldest supported "
                f"is {self.oldest.name} (cosmigrate with its driver, PyMongo {pymongo.__version__}, needs wire "
                f"version {required_wire(self.role)} or later)")

    @property
    def todo(self) -> str:
        return TODO[self.role]

    def __str__(self) -> str:
        return f"{self.role}: {self.detail}: {self.todo}"


class UnsupportedVersion(Exception):
    """`cosmigrate run` exits 2 with this one line (a set-up problem, like a bad config value)."""

    exit_code = 2

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def check_answer(role: str, hello: Mapping[str, Any], build_info: Mapping[str, Any] | None = None) -> Problem | None:
    """The problem with a server that answered `hello` (and maybe `buildInfo`) so, or None when it is supported."""
    wire = hello.get("maxWireVersion", 0)
    wire = wire if isinstance(wire, int) else 0
    if wire >= required_wire(role):
        return None
    return Problem(role, version_name(role, wire, build_info), wire, oldest_supported(role))


_DRIVER_REFUSAL = re.compile(r"reports (?:maximum )?wire version (\d+), but this version of PyMongo requires at least")


def problem_from_driver_error(role: str, exc: BaseException) -> Problem | None:
    """The same problem, read from PyMongo's ConfigurationError when the driver got there first."""
    found = _DRIVER_REFUSAL.search(str(exc))
    if found is None:
        return None
    wire = int(found.group(1))
    return Problem(role, version_name(role, wire), wire, oldest_supported(role))


def raise_for_driver_error(role: str, exc: BaseException) -> None:
    """Raise UnsupportedVersion when `exc` is the driver refusing the server's wire version."""
    problem = problem_from_driver_error(role, exc)
    if problem is not None:
        raise UnsupportedVersion(problem) from None


# --- the probe: two commands over a bare socket ------------------------------------------

OP_REPLY, OP_QUERY, OP_MSG = 1, 2004, 2013
_HEADER = struct.Struct("<iiii")


class ProbeError(Exception):
    """No host of the URI answered the probe (the driver then reports reachability itself)."""


def _encode_query(request_id: int, command: dict[str, Any]) -> bytes:
    """Legacy OP_QUERY on admin.$cmd: every server answers isMaster in this form."""
    body = struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1) + bson.encode(command)
    return _HEADER.pack(_HEADER.size + len(body), request_id, 0, OP_QUERY) + body


def _encode_msg(request_id: int, command: dict[str, Any]) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode({**command, "$db": command.get("$db", "admin")})
    return _HEADER.pack(_HEADER.size + len(body), request_id, 0, OP_MSG) + body


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, message: bytes) -> dict[str, Any]:
    writer.write(message)
    await writer.drain()
    length, _, _, op = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if not _HEADER.size < length <= 48_000_000:
        raise ProbeError(f"reply length {length} out of range")
    payload = await reader.readexactly(length - _HEADER.size)
    if op == OP_REPLY:
        return bson.decode(payload[20:])
    if op == OP_MSG and payload[4] == 0:
        return bson.decode(payload[5:])
    raise ProbeError(f"unexpected reply opCode {op}")


async def command(host: str, port: int, commands: list[dict[str, Any]], *, tls: ssl.SSLContext | None = None,
                  timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Run commands on one host over one bare connection: the first as OP_QUERY, the rest as OP_MSG.

    Used by the probe, and by tests to talk to a server the driver refuses.
    """
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None)
        try:
            out = []
            for i, cmd in enumerate(commands):
                rid = random.randint(1, 2**31 - 1)
                out.append(await _roundtrip(reader, writer, _encode_query(rid, cmd) if i == 0 else _encode_msg(rid, cmd)))
            return out
        finally:
            writer.close()


def _tls_context(options: Mapping[str, Any], tls_ca_file: str) -> ssl.SSLContext | None:
    if not options.get("tls"):
        return None
    ctx = ssl.create_default_context(cafile=tls_ca_file or options.get("tlsCAFile") or None)
    if options.get("tlsInsecure") or options.get("tlsAllowInvalidHostnames"):
        ctx.check_hostname = False
    if options.get("tlsInsecure") or options.get("tlsAllowInvalidCertificates"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def probe(uri: str, tls_ca_file: str = "", timeout_s: float = 5.0) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(`isMaster` answer, `buildInfo` answer or None) from the first host of the URI that answers.

    Unauthenticated on purpose: `isMaster` is the handshake and always allowed;
    `buildInfo` may be refused before authentication, and is then left out.
    """
    from pymongo.uri_parser import parse_uri

    try:
        parsed = await asyncio.to_thread(parse_uri, uri)
    except Exception as exc:  # an invalid URI, a missing CA file, an SRV lookup failure: the driver will say
        raise ProbeError(f"cannot parse the URI: {exc}") from None
    options = parsed["options"]
    try:
        tls = _tls_context(options, tls_ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ProbeError(f"TLS set-up: {exc}") from None
    errors = []
    for host, port in parsed["nodelist"]:
        try:
            hello, build = await command(host, port, [{"isMaster": 1}, {"buildInfo": 1}], tls=tls, timeout_s=timeout_s)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError, ProbeError,
                bson.errors.BSONError, struct.error, IndexError) as exc:
            errors.append(f"{host}:{port}: {exc!r}")
            continue
        return hello, (build if build.get("ok") == 1 and isinstance(build.get("version"), str) else None)
    raise ProbeError("; ".join(errors) or "no host in the URI")


async def check_server(role: str, uri: str, tls_ca_file: str = "", timeout_s: float = 5.0) -> Problem | None:
    """Probe the server and check its version. None when supported, or when the probe could not reach it
    (reachability is then the driver's to report, with its own, better, message)."""
    try:
        hello, build = await probe(uri, tls_ca_file, timeout_s)
    except ProbeError:
        return None
    return check_answer(role, hello, build)


async def require_supported(role: str, uri: str, tls_ca_file: str = "", timeout_s: float = 5.0) -> None:
    """Raise UnsupportedVersion (one line, exit 2 from `cosmigrate run`) for a server too old to migrate."""
    problem = await check_server(role, uri, tls_ca_file, timeout_s)
    if problem is not None:
        raise UnsupportedVersion(problem)
