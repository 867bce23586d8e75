"""The control channel: a Unix socket that replaces the old recipe's SQS queues.

Newline-delimited JSON, one request one reply, several requests per
connection. A request that is not JSON, not an object, too large, nested too
deeply, or unknown gets an error reply; nothing a client sends can disturb
the daemon.

Who may connect: the peer's uid (SO_PEERCRED) must be the daemon's own uid,
root, or, with `control.allowed_group`, the peer must be in that group by its
gid or a supplementary group (SO_PEERGROUPS, read from the socket itself, so
`ProtectProc=invisible` does not hide it). The socket file is given to that
group (0660); a group the service user cannot give it to fails the start.

What a client can hold: at most `connection_cap()` connections are served at
once, far below the process's file-handle limit, so capture's own files and
connections are never starved. A request must arrive within
`request_timeout_s` (a reply must be taken within it too); when every slot is
taken, the connection idle longest is closed for the newcomer. A refused peer
gets its answer at once and is closed (after at most `LINGER_S` for its
request, so that its write does not meet a closed socket; never more than
`LINGER_MAX` of them at a time), and refusals are logged at most once per
`REFUSAL_LOG_INTERVAL_S`, with a count.

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
import errno
import grp
import json
import os
import resource
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cosmigrate.clock import Mono
from cosmigrate.logs import get_logger
from cosmigrate.timeouts import within

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
_PEERCRED = struct.Struct("3i")
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python names it from 3.13 on
MAX_CONNECTIONS = 32
"""Control connections served at once at most (fewer under a low file-handle limit, see `connection_cap`)."""
REQUEST_TIMEOUT_S = 10.0
LINGER_S = 0.5
LINGER_MAX = 8
REFUSAL_LOG_INTERVAL_S = 10.0


class ControlError(Exception):
    """The control socket cannot be served or reached; the message says why."""


def connection_cap(open_files_limit: int) -> int:
    """How many control connections to serve at once: MAX_CONNECTIONS, and never more than 1/16 of the
    file-handle limit, which leaves the rest (and the accept burst) to capture and apply."""
    return max(2, min(MAX_CONNECTIONS, open_files_limit // 16))


def peer_groups(sock: Any, pid: int) -> set[int]:
    """The peer's supplementary groups: from the socket (SO_PEERGROUPS), else from /proc/<pid>/status."""
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue  # more groups than the buffer holds
            break  # ENOPROTOOPT: an old kernel
        n = len(raw) // 4
        return set(struct.unpack(f"{n}I", raw[: 4 * n]))
    try:  # hidden by ProtectProc=invisible; only reached on kernels without SO_PEERGROUPS
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class _Throttled:
    """A log line that repeats at most once per interval, counting what it held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next: Mono | None = None
        self._held = 0

    def due(self) -> int:
        """0 while the line is held back; else how many occurrences it reports (this one included)."""
        self._held += 1
        now = Mono.now()
        if self._next is not None and now < self._next:
            return 0
        self._next = now + self.interval_s
        count, self._held = self._held, 0
        return count


class ControlServer:
    def __init__(self, path: str, handler: Handler, *, allowed_group: str = "", max_request_bytes: int = 65536,
                 max_connections: int | None = None, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.path = Path(path)
        self.handler = handler
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.allowed_group = allowed_group
        self.allowed_gid: int | None = None
        if allowed_group:
            try:
                self.allowed_gid = grp.getgrnam(allowed_group).gr_gid
            except KeyError:
                raise ControlError(f"control.allowed_group: no group named {allowed_group!r} on this machine") from None
        self._server: asyncio.Server | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file this server created
        self._open = 0  # connections being served
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # served connections waiting for a request, oldest first
        self._lingering = 0
        self._refusals = _Throttled(REFUSAL_LOG_INTERVAL_S)
        self._turned_away = _Throttled(REFUSAL_LOG_INTERVAL_S)
        self.log = get_logger(component="control")

    async def start(self) -> None:
        """Bind the socket; refuse if a daemon answers on it; replace a stale one (nobody listening)."""
        if self.max_connections is None:
            self.max_connections = connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
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
            problem = self._give_to_group(self.allowed_gid)
            if problem:
                await self.stop()
                raise ControlError(f"control.allowed_group {self.allowed_group}: {problem}")

    def _give_to_group(self, gid: int) -> str:
        """Give the socket to the operators' group; what stands in the way, or "" when members can use it."""
        try:
            os.chown(self.path, -1, gid)
        except OSError as exc:
            return (f"cannot give {self.path} to that group ({_why(exc)}): the service user must be a member "
                    f"(SupplementaryGroups={self.allowed_group} in the unit) and the unit must not set PrivateUsers=yes")
        for directory in self.path.parents:  # members must be able to reach the socket, not just open it
            try:
                st = os.stat(directory)
            except OSError as exc:
                return f"cannot check {directory} ({_why(exc)})"
            if not (st.st_mode & stat.S_IXOTH or (st.st_gid == gid and st.st_mode & stat.S_IXGRP)):
                return (f"its members cannot reach {self.path}: {directory} is not searchable by them "
                        "(RuntimeDirectoryMode=0755 in the unit, or put control.socket in a directory they can search)")
        return ""

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2)
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

    def _allowed(self, sock: Any) -> tuple[bool, int]:
        pid, uid, gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid in (0, os.getuid()):
            return True, uid
        if self.allowed_gid is not None and (gid == self.allowed_gid or self.allowed_gid in peer_groups(sock, pid)):
            return True, uid
        return False, uid

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # whatever a client does, no traceback and the server goes on
            self.log.warning("control connection failed", error=f"{type(exc).__name__}: {exc}"[:300])
        finally:
            writer.transport.abort()  # nothing is left to flush: every reply was drained

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ok, uid = self._allowed(writer.get_extra_info("socket"))
        except OSError:
            return
        if not ok:
            if count := self._refusals.due():
                self.log.warning("control request refused", peer_uid=uid, refused=count)
            await self._turn_away(reader, writer, f"permission denied: uid {uid} may not control this daemon "
                                                  "(use the service user, root, or control.allowed_group)")
            return
        assert self.max_connections is not None
        if self._open >= self.max_connections and not self._close_idlest():
            if count := self._turned_away.due():
                self.log.warning("control connections at their limit; turning a client away",
                                 limit=self.max_connections, turned_away=count)
            await self._turn_away(reader, writer, f"the daemon is busy: {self._open} control requests in progress; "
                                                  "try again")
            return
        self._open += 1
        try:
            while True:
                self._waiting[writer] = None
                try:
                    line = await within(reader.readline(), self.request_timeout_s)
                except (asyncio.LimitOverrunError, ValueError):
                    await self._reply(writer, {"ok": False,
                                               "error": f"request too large (limit {self.max_request_bytes} bytes)"})
                    return
                finally:
                    self._waiting.pop(writer, None)
                if not line.endswith(b"\n"):
                    return  # the client hung up (mid-request, or its connection was closed for a newcomer)
                if not line.strip():
                    continue
                await self._reply(writer, await self._dispatch(line))
        finally:
            self._open -= 1

    def _close_idlest(self) -> bool:
        """Make room: close the connection that has waited longest for a request (none waiting: False)."""
        for idle in self._waiting:
            del self._waiting[idle]
            idle.transport.abort()  # its reader sees the end of the stream; its slot is freed as it returns
            return True
        return False

    async def _turn_away(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: str) -> None:
        """Answer a refused or surplus peer at once and close it.

        The answer goes out first. Its request is awaited briefly (a client writes before it reads, and a
        write to a closed socket would hide the answer), but never long, and never for more than LINGER_MAX
        peers at a time: under a flood the rest are closed straight away.
        """
        writer.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
        if self._lingering >= LINGER_MAX:
            return
        self._lingering += 1
        try:
            with contextlib.suppress(Exception):
                await within(reader.readline(), LINGER_S)
                await within(writer.drain(), LINGER_S)
        finally:
            self._lingering -= 1

    async def _reply(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(json.dumps(obj, default=str).encode() + b"\n")
        await within(writer.drain(), self.request_timeout_s)  # a client that never reads frees its slot

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not valid JSON"}
        except RecursionError:
            return {"ok": False, "error": "request is nested too deeply"}
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
        _, writer = await within(asyncio.open_unix_connection(str(path)), 1)
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
        reader, writer = await within(asyncio.open_unix_connection(path, limit=2**24), 5)
    except FileNotFoundError:
        raise ControlError(f"no cosmigrate daemon is running (no socket at {path})") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run as the service user, root, or a member of its group") from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"no cosmigrate daemon answers on {path} ({getattr(exc, 'strerror', None) or exc or 'timeout'})") from None
    try:
        writer.write(json.dumps(payload).encode() + b"\n")
        await writer.drain()
        line = await within(reader.readline(), limit_s)
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
