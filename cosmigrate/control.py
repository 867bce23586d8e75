"""The control channel: a Unix socket that replaces the old recipe's SQS queues.

Newline-delimited JSON, one request one reply, several requests per
connection. The peer's uid is read with SO_PEERCRED and must be the daemon's
own uid, root, or a member of `control.allowed_group`. A request that is not
JSON, not an object, too large, or unknown gets an error reply; nothing a
client sends can disturb the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cosmigrate.logs import get_logger

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_PEERCRED = struct.Struct("3i")


class ControlError(Exception):
    """The control socket cannot be served or reached; the message says why."""


def _peer_groups(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    def __init__(self, path: str, handler: Handler, *, allowed_group: str = "", max_request_bytes: int = 65536) -> None:
        self.path = Path(path)
        self.handler = handler
        self.max_request_bytes = max_request_bytes
        self.allowed_gid: int | None = None
        if allowed_group:
            try:
                self.allowed_gid = grp.getgrnam(allowed_group).gr_gid
            except KeyError:
                raise ControlError(f"control.allowed_group: no group named {allowed_group!r} on this machine") from None
        self._server: asyncio.Server | None = None
        self.log = get_logger(component="control")

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"control socket directory {self.path.parent}: {exc.strerror}") from None
        if self.path.exists():
            if await _alive(self.path):
                raise ControlError(f"another cosmigrate daemon is answering on {self.path}; stop it first")
            self.path.unlink()
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=self.max_request_bytes)
        except OSError as exc:
            raise ControlError(f"cannot listen on {self.path}: {exc.strerror}") from None
        os.chmod(self.path, 0o660)
        if self.allowed_gid is not None:
            with contextlib.suppress(OSError):
                os.chown(self.path, -1, self.allowed_gid)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _allowed(self, sock: socket.socket) -> tuple[bool, int]:
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid in (0, os.getuid()):
            return True, uid
        if self.allowed_gid is not None and (gid == self.allowed_gid or self.allowed_gid in _peer_groups(pid)):
            return True, uid
        return False, uid

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj, default=str).encode() + b"\n")
            await writer.drain()

        try:
            ok, uid = self._allowed(writer.get_extra_info("socket"))
            if not ok:
                # Read the request first, so that the client's write never meets a closed socket.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(reader.readline(), 5)
                self.log.warning("control request refused", peer_uid=uid)
                await reply({"ok": False, "error": f"permission denied: uid {uid} may not control this daemon "
                                                   "(use the service user, root, or control.allowed_group)"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await reply({"ok": False, "error": f"request too large (limit {self.max_request_bytes} bytes)"})
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                await reply(await self._dispatch(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not valid JSON"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'request must be a JSON object with a "cmd" string'}
        try:
            return await self.handler(request)
        except Exception as exc:  # a handler bug answers an error; the daemon keeps serving
            self.log.exception("control handler failed", cmd=request.get("cmd"))
            return {"ok": False, "error": f"internal error: {exc}"}


async def _alive(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def request(path: str, payload: dict[str, Any], limit_s: float = 30.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply (raises ControlError)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=2**24), 5)
    except FileNotFoundError:
        raise ControlError(f"no cosmigrate daemon is running (no socket at {path})") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as the service user, root, or a member of its group") from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"no cosmigrate daemon answers on {path} ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), limit_s)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"the daemon on {path} did not answer ({exc or 'timeout'})") from None
    finally:
        writer.close()
    if not line:
        raise ControlError(f"the daemon on {path} closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"))
    return dict(reply)
