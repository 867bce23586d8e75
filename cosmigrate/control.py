"""The control channel: a Unix socket that replaces the old recipe's SQS queues.

Newline-delimited JSON, one request one reply, several requests per
connection. The peer's uid is read with SO_PEERCRED and must be the daemon's
own uid, root, or a member of `control.allowed_group`. A request that is not
JSON, not an object, too large, or unknown gets an error reply; nothing a
client sends can disturb the daemon.

The socket file belongs to the process that bound it, and only while it is
that same file: `stop()` unlinks the path only if it still is the inode this
server created, so a second daemon that gives up at start-up (or a daemon
whose socket was replaced by another one's) never removes a live socket.
`request()` trusts nothing it reads back: a peer that answers garbage, not
JSON, not an object, or hangs up halfway is a `ControlError`, not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
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
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file this server created
        self.log = get_logger(component="control")

    async def start(self) -> None:
        """Bind the socket; refuse if a daemon answers on it; replace a stale one (nobody listening)."""
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(f"control socket directory {parent}: cannot create it ({_why(exc)})") from None
        try:
            existing = os.lstat(self.path)
        except FileNotFoundError:
            existing = None
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {_why(exc)} (the service user needs write and "
                               f"search access to {parent})") from None
        if existing is not None:
            if not stat.S_ISSOCK(existing.st_mode):
                raise ControlError(f"control socket {self.path}: a file that is not a socket is in the way; "
                                   "remove it or set control.socket")
            if await _alive(self.path):
                raise ControlError(f"another cosmigrate daemon is answering on {self.path}; stop it first")
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ControlError(f"cannot remove the stale control socket {self.path}: {_why(exc)} "
                                   f"(the service user needs write access to {parent})") from None
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=self.max_request_bytes)
            bound = os.stat(self.path)
        except OSError as exc:
            await self._close_server()
            raise ControlError(f"cannot listen on {self.path}: {_why(exc)}") from None
        self._bound = (bound.st_dev, bound.st_ino)
        try:
            os.chmod(self.path, 0o660)
        except OSError as exc:
            await self.stop()
            raise ControlError(f"cannot restrict access to {self.path}: {_why(exc)}") from None
        if self.allowed_gid is not None:
            with contextlib.suppress(OSError):
                os.chown(self.path, -1, self.allowed_gid)

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def stop(self) -> None:
        """Stop serving; remove the socket file only if it is still the one this server bound."""
        await self._close_server()
        bound, self._bound = self._bound, None
        if bound is None:
            return
        try:
            current = os.lstat(self.path)
            if (current.st_dev, current.st_ino) == bound:
                self.path.unlink()
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self.log.warning("could not remove the control socket", path=str(self.path), error=_why(exc))

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


def _why(exc: OSError) -> str:
    """An OSError as a few words ("Permission denied"), never None (AF_UNIX path errors carry no strerror)."""
    return exc.strerror or str(exc) or exc.__class__.__name__


async def _alive(path: Path) -> bool:
    """Does a process answer on this socket? Only a refused connection proves the file is stale."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (OSError, TimeoutError) as exc:
        # Cannot tell (no permission, backlog full): treat it as live rather than unlink someone else's socket.
        why = _why(exc) if isinstance(exc, OSError) else "timed out"
        raise ControlError(f"cannot tell whether a daemon answers on {path} ({why}); remove the socket "
                           "if no daemon runs") from None
    writer.close()
    return True


async def request(path: str, payload: dict[str, Any], limit_s: float = 30.0) -> dict[str, Any]:
    """Send one request to the daemon and return its reply (raises ControlError, whatever the peer sends)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path, limit=2**24), 5)
    except FileNotFoundError:
        raise ControlError(f"no cosmigrate daemon is running (no socket at {path})") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as the service user, root, or a member of its group") from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"no cosmigrate daemon answers on {path} ({getattr(exc, 'strerror', None) or exc or 'timeout'})") from None
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), limit_s)
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"the daemon on {path} did not answer ({exc or 'timeout'})") from None
    except ValueError:  # a line over the reader's limit
        raise ControlError(f"{path} answered with more than {2**24} bytes and no line end: not a cosmigrate daemon") from None
    finally:
        writer.close()
    if not line:
        raise ControlError(f"the daemon on {path} closed the connection without answering")
    if not line.endswith(b"\n"):
        raise ControlError(f"the daemon on {path} closed the connection halfway through its answer")
    try:
        reply = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
        reply = None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError(f"{path} answered something that is not a cosmigrate reply; is it a cosmigrate control socket?")
    if not reply["ok"]:
        error = reply.get("error")
        raise ControlError(error if isinstance(error, str) and error else f"the daemon on {path} refused the request")
    return reply
