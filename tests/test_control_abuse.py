"""The control socket under a hostile local user: floods, idle and slow clients, deep JSON, group access."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from cosmigrate.control import ControlError, ControlServer, peer_groups, request
from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child

ROOT = os.getuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
OPERATORS = "operator"  # an existing group that neither root nor the test users belong to


def _shared_dir() -> Path:
    """A directory other uids can search (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cosmigrate-ctl-"))
    os.chmod(path, 0o755)
    return path


def _as_user(path: str, payload: bytes, uid: int, gid: int, groups: list[int]) -> bytes:
    """Fork a child with these credentials that sends one request and hands back the reply line (or the error)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only socket and os calls, then _exit
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(payload)
            os.write(w, s.makefile("rb").readline())
        except BaseException as exc:
            os.write(w, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks)


def _refused_flood(path: str, n: int, uid: int = 65534) -> list[bytes]:
    """A child as `uid` that connects n times in a row, as a reconnect loop would; the first reply line of each."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = []
            for _ in range(n):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.settimeout(5)
                    s.connect(path)
                    s.sendall(b'{"cmd": "status"}\n')
                    out.append(s.makefile("rb").readline().strip() or b"<closed>")
                except OSError as exc:
                    out.append(f"<{exc!r}>".encode())
                finally:
                    s.close()
            os.write(w, b"\n".join(out))
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return b"".join(chunks).split(b"\n")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _flood(path: str, n: int) -> tuple[list[socket.socket], str]:
    """Open n idle connections (a thread: the sandbox runs on the test's loop); stop at the first failure."""
    socks: list[socket.socket] = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.connect(path)
                break
            except BlockingIOError:  # the listen backlog is full: retry, as any reconnect loop would
                if time.monotonic() > deadline:
                    s.close()
                    return socks, f"connection {len(socks) + 1}: the daemon stopped accepting"
                time.sleep(0.005)
            except OSError as exc:
                s.close()
                return socks, f"connection {len(socks) + 1} failed: {exc!r}"
        socks.append(s)
    return socks, ""


def _closed_by_peer(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _committed_seq(sock: str) -> int:
    """The flood namespace's last committed batch (-1: none yet, or the daemon not up yet)."""
    try:
        status = (await request(sock, {"cmd": "status"}))["status"]
    except ControlError:
        return -1
    return max((n["captured_seq"] for n in status["namespaces"]), default=-1)


@needs_root
async def test_a_socket_flood_never_starves_capture_and_ctl_still_answers(tmp_path: Path, sandbox: Sandbox, source) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4096:
        pytest.skip("the test itself needs a few thousand file handles")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    shared = _shared_dir()
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite", max_batch_age_s=0.1)
    cfg.control.socket = str(shared / "control.sock")
    config = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cosmigrate", "run", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=child_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)),
    )
    child = Child(proc)
    stop = asyncio.Event()

    async def writes() -> None:  # the application keeps writing: capture must keep committing batches
        i = 0
        while not stop.is_set():
            await source.app.flood.insert_one({"_id": i})
            i += 1
            await asyncio.sleep(0.01)

    writer = asyncio.create_task(writes())
    socks: list[socket.socket] = []
    try:
        await wait_for(lambda: _more(cfg.control.socket, 0), 60, what="a first committed batch")
        base_fds = _open_fds(proc.pid)
        socks, failure = await asyncio.to_thread(_flood, cfg.control.socket, 1100)
        assert not failure, failure
        # While the 1,100 connections are held open: capture commits, ctl answers, handles stay bounded.
        seq = await _committed_seq(cfg.control.socket)
        await wait_for(lambda: _more(cfg.control.socket, seq + 3), 30, what="capture committing during the flood")
        result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "cosmigrate", "ctl", "--socket",
                                                          cfg.control.socket, "status", "--json"],
                                         capture_output=True, text=True, timeout=60)
        assert result.returncode in (0, 2), result.stderr  # 2: answered, not ready
        assert json.loads(result.stdout)["namespaces"][0]["namespace"] == "app.flood"
        fds = _open_fds(proc.pid)
        assert fds < base_fds + 64, (base_fds, fds)  # the cap (32 under 1,024 handles) and a little slack
        closed = sum(await asyncio.to_thread(lambda: [_closed_by_peer(s) for s in socks]))
        assert closed >= 1100 - 32, closed
        # A refused peer in a reconnect loop: answered at once, and a handful of log lines, not one per try.
        os.chmod(cfg.control.socket, 0o666)  # let uid 65534 reach the socket: the peer check must refuse it
        began = time.monotonic()
        replies = await asyncio.to_thread(_refused_flood, cfg.control.socket, 300)
        assert time.monotonic() - began < 30
        assert sum(b"permission denied: uid 65534" in r for r in replies) >= 290, replies[:5]
    finally:
        stop.set()
        await writer
        for s in socks:
            s.close()
        code = await child.finish(15)
        shutil.rmtree(shared, ignore_errors=True)
    out = "\n".join(child.stdout + child.stderr)
    assert code == 0, out[-3000:]
    assert "Too many open files" not in out and "Traceback" not in out, out[-3000:]
    refusals = [e for e in child.events() if e.get("event") == "control request refused"]
    assert 1 <= len(refusals) <= 4 and sum(e["refused"] for e in refusals) <= 300, refusals


async def _more(sock: str, seq: int) -> bool:
    return await _committed_seq(sock) >= seq


# --- one server, in process -------------------------------------------------------------------------------


async def _ping(request_: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


@contextlib.asynccontextmanager
async def _server(path: Path, **kwargs: Any):
    server = ControlServer(str(path), _ping, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def _eof_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Did the server close the connection within `seconds`? (A reset is a close too: bytes were in flight.)"""
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_idle_and_slow_clients_are_closed_after_the_request_timeout(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    async with _server(path, request_timeout_s=0.5):
        idle_reader, idle_writer = await asyncio.open_unix_connection(str(path))
        slow_reader, slow_writer = await asyncio.open_unix_connection(str(path))

        async def trickle() -> None:  # a byte every 0.1 s for 4 s, never a line: the whole request has one deadline
            with contextlib.suppress(ConnectionError):
                for ch in b'{"cmd": "ping", "padding": "' + b"x" * 14:
                    slow_writer.write(bytes([ch]))
                    await slow_writer.drain()
                    await asyncio.sleep(0.1)

        began = time.monotonic()
        trickler = asyncio.create_task(trickle())
        assert await _eof_within(idle_reader, 3)
        assert await _eof_within(slow_reader, 3)
        assert time.monotonic() - began < 2.5  # long before the trickle ends: not a timeout per read
        trickler.cancel()
        for w in (idle_writer, slow_writer):
            w.close()
        assert await request(str(path), {"cmd": "ping"}) == {"ok": True}  # still serving


async def test_past_the_cap_the_longest_idle_connection_makes_room(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    async with _server(path, max_connections=4, request_timeout_s=30):
        conns = [await asyncio.open_unix_connection(str(path)) for _ in range(10)]
        await asyncio.sleep(0.2)
        open_ = [w for r, w in conns if not await _eof_within(r, 0.05)]
        assert len(open_) <= 4
        assert await request(str(path), {"cmd": "ping"}) == {"ok": True}  # a newcomer is always served
        for _, w in conns:
            w.close()


async def test_deeply_nested_json_gets_an_error_reply_and_the_daemon_keeps_serving(tmp_path: Path, sandbox: Sandbox,
                                                                                   capfd) -> None:
    from tests.test_apply import Running, config

    cfg = config(tmp_path, sandbox)
    async with Running(cfg):
        for payload in (b"[" * 60_000, b'{"a":' * 12_000, b'{"cmd": "writer", "by": ' + b"[" * 20_000):
            reader, writer = await asyncio.open_unix_connection(cfg.control.socket)
            writer.write(payload + b"\n")
            reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
            writer.close()
            assert reply["ok"] is False and "nested too deeply" in reply["error"], reply
        assert await request(cfg.control.socket, {"cmd": "ping"}) == {"ok": True}
    captured = capfd.readouterr()
    assert "RecursionError" not in captured.out + captured.err and "Traceback" not in captured.err


# --- control.allowed_group --------------------------------------------------------------------------------


@needs_root
def test_peer_groups_come_from_the_socket_not_from_proc() -> None:
    gid = grp.getgrnam(OPERATORS).gr_gid
    shared = _shared_dir()
    path = str(shared / "g.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(1)
    listener.settimeout(30)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([gid])
            os.setgid(1)
            os.setuid(1)
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.recv(1)
        finally:
            os._exit(0)
    conn, _ = listener.accept()
    try:
        # A pid whose /proc entry cannot be read (as under ProtectProc=invisible): the socket still answers.
        assert gid in peer_groups(conn, 2**22 + 12345)
    finally:
        conn.close()
        listener.close()
        os.waitpid(pid, 0)
        shutil.rmtree(shared, ignore_errors=True)


def _run_without_chown(config: Path, groups: str) -> subprocess.Popen[str]:
    """`cosmigrate run` as root without CAP_CHOWN: like a service user, it may only give its files to its groups."""
    groups_arg = ["--clear-groups"] if not groups else ["--groups", groups]
    return subprocess.Popen(["setpriv", "--bounding-set=-chown", "--inh-caps=-chown", *groups_arg,
                             sys.executable, "-m", "cosmigrate", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_a_group_the_service_cannot_apply_fails_the_start_in_one_line(tmp_path: Path, sandbox: Sandbox) -> None:
    shared = _shared_dir()
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.control.socket = str(shared / "control.sock")
    cfg.control.allowed_group = OPERATORS
    config = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    proc = _run_without_chown(config, groups="")  # not a member of the group
    try:
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(shared, ignore_errors=True)
    assert proc.returncode == 1, (out[-2000:], err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosmigrate: error: control.allowed_group operator: "), err
    assert "SupplementaryGroups=operator" in lines[0]


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_members_of_the_allowed_group_may_use_ctl(tmp_path: Path, sandbox: Sandbox) -> None:
    gid = grp.getgrnam(OPERATORS).gr_gid
    shared = _shared_dir()
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.control.socket = str(shared / "control.sock")
    cfg.control.allowed_group = OPERATORS
    config = write_config(cfg, tmp_path / "c.toml")
    await prepare_backends(cfg)
    proc = _run_without_chown(config, groups=str(gid))  # SupplementaryGroups=operator
    try:
        async def up() -> bool:
            with contextlib.suppress(ControlError):
                return (await request(cfg.control.socket, {"cmd": "ping"}))["ok"]
            return False

        await wait_for(up, 60, what="the daemon up")
        st = os.stat(cfg.control.socket)
        assert st.st_gid == gid and st.st_mode & 0o777 == 0o660
        ping = b'{"cmd": "ping"}\n'
        for creds in ((1, 1, [gid]), (1, gid, [])):  # a supplementary group (SO_PEERGROUPS), the primary group
            reply = await asyncio.to_thread(_as_user, cfg.control.socket, ping, *creds)
            assert json.loads(reply) == {"ok": True}, (creds, reply)
        # Not a member: the socket's mode keeps it out, and past the mode the peer check does.
        assert b"Permission denied" in await asyncio.to_thread(_as_user, cfg.control.socket, ping, 2, 2, [])
        os.chmod(cfg.control.socket, 0o666)
        reply = await asyncio.to_thread(_as_user, cfg.control.socket, ping, 2, 2, [])
        assert "permission denied: uid 2" in json.loads(reply)["error"]
        assert await asyncio.to_thread(_group_or_world_readable, tmp_path) == []  # data files stay owner-only
    finally:
        proc.terminate()
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
        shutil.rmtree(shared, ignore_errors=True)
    assert proc.returncode == 0, err[-2000:]


def _group_or_world_readable(root: Path) -> list[str]:
    """Data files (batches, ledger) others could read; the config and the lock file (a pid) are no data."""
    return [str(p) for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".toml", ".lock") and p.stat().st_mode & 0o077]


@needs_root
async def test_a_socket_directory_members_cannot_search_fails_the_start(tmp_path: Path, sandbox: Sandbox) -> None:
    from cosmigrate.daemon import Daemon, StartupError

    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    os.chmod(tmp_path, 0o700)
    cfg.control.allowed_group = OPERATORS
    await prepare_backends(cfg)
    with pytest.raises(StartupError, match=r"cannot reach .*RuntimeDirectoryMode=0755"):
        await Daemon(cfg).serve()
