"""The control socket under abuse, the ctl CLI, and the status object's exact fields."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cosmigrate.sandbox import Sandbox
from cosmigrate.status import CLUSTER_FIELDS, NAMESPACE_FIELDS
from tests.helpers import write_config
from tests.test_apply import Running, config


async def _exchange(path: str, payload: bytes, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path, limit=2**24)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10) if read else b""
    finally:
        writer.close()


def _request_as_nobody(path: str, payload: bytes) -> bytes:
    """Fork a child that drops to uid/gid 65534, sends one request, and hands back the reply line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only socket and os calls, then _exit
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
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


def _ctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosmigrate", "ctl", *args], capture_output=True, text=True,
                          timeout=timeout)


async def test_socket_fuzz_gets_errors_and_the_daemon_keeps_serving(tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = config(tmp_path, sandbox)
    cfg.control.max_request_bytes = 4096
    async with Running(cfg) as run:
        path = cfg.control.socket
        assert oct(os.stat(path).st_mode & 0o777) == "0o660"
        rng = random.Random(99)
        cases = [
            b"not json\n",
            b"[1, 2, 3]\n",
            b'{"no_cmd": 1}\n',
            b'{"cmd": 42}\n',
            b'{"cmd": "launch_missiles"}\n',
            b'{"cmd": "writer", "action": "sideways"}\n',
            b"\xff\xfe\x00garbage\n",
            b"{" * 3000 + b"\n",
            b"x" * 100_000 + b"\n",  # over the request limit
        ] + [rng.randbytes(rng.randint(1, 2000)) + b"\n" for _ in range(30)]
        for payload in cases:
            line = await _exchange(path, payload)
            reply = json.loads(line)
            assert reply["ok"] is False and reply["error"], (payload[:40], reply)
        # Half a request, then hang up: harmless.
        await _exchange(path, b'{"cmd": "sta', read=False)
        # Still serving, with several requests on one connection.
        reader, writer = await asyncio.open_unix_connection(path)
        for _ in range(3):
            writer.write(b'{"cmd": "ping"}\n')
            assert json.loads(await reader.readline()) == {"ok": True}
        writer.close()
        assert (await run.status())["cluster_name"] == "test"


async def test_a_disallowed_uid_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    cfg = config(tmp_path, sandbox)
    shared = Path(tempfile.mkdtemp(prefix="cosmigrate-ctl-"))
    os.chmod(shared, 0o755)  # pytest's own tmp dirs are 0700: the other uid could not even reach the socket
    cfg.control.socket = str(shared / "control.sock")
    async with Running(cfg) as run:
        os.chmod(cfg.control.socket, 0o666)  # let the other uid reach the socket: the uid check must refuse it
        line = await asyncio.to_thread(_request_as_nobody, cfg.control.socket, b'{"cmd": "writer", "action": "start"}\n')
        reply = json.loads(line)
        assert reply["ok"] is False and "permission denied: uid 65534" in reply["error"]
        assert (await run.status())["writer"] == "stopped"


async def test_status_json_has_exactly_the_documented_fields(tmp_path: Path, sandbox: Sandbox, source) -> None:
    cfg = config(tmp_path, sandbox)
    write_config(cfg, tmp_path / "c.toml")
    await source.app.x.insert_one({"_id": 1})
    async with Running(cfg) as run:
        await asyncio.sleep(0)  # let discovery start
        result = await asyncio.to_thread(_ctl, "--socket", cfg.control.socket, "writer", "start")
        assert result.returncode == 0 and result.stdout.strip() == "writer started"
        from tests.helpers import wait_for

        async def has_ns() -> bool:
            return bool((await run.status())["namespaces"])

        await wait_for(has_ns, 30, what="a namespace")
        result = await asyncio.to_thread(_ctl, "--config", str(tmp_path / "c.toml"), "status", "--json")
        status = json.loads(result.stdout)
        assert result.returncode == (0 if status["ready_for_cutover"] else 2), result.stderr
        assert tuple(status) == CLUSTER_FIELDS
        assert tuple(status["namespaces"][0]) == NAMESPACE_FIELDS
        assert status["writer"] == "started"
        table = await asyncio.to_thread(_ctl, "--socket", cfg.control.socket, "status")
        assert table.returncode in (0, 2) and "app.x" in table.stdout


def test_ctl_without_a_daemon_says_so_in_one_line(tmp_path: Path) -> None:
    for args in (["status"], ["status", "--json"], ["writer", "start"]):
        result = _ctl("--socket", str(tmp_path / "none.sock"), *args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "no cosmigrate daemon is running" in lines[0], result.stderr
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    result = _ctl("--socket", str(stale), "status")
    assert result.returncode == 1 and "no cosmigrate daemon answers" in result.stderr


def test_ctl_refuses_a_bad_action(tmp_path: Path) -> None:
    result = _ctl("--socket", str(tmp_path / "x.sock"), "writer", "sideways")
    assert result.returncode == 2 and "'start', 'stop'" in result.stderr and "Traceback" not in result.stderr


# What a socket that is not a cosmigrate daemon (or a daemon of another version) may answer.
ODD_REPLIES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("binary garbage", b"\xff\xfe\x00garbage\n", ("status", "writer")),
    ("not JSON", b"HTTP/1.1 400 Bad Request\n", ("status", "writer")),
    ("a JSON list", b"[1, 2, 3]\n", ("status", "writer")),
    ("a JSON string", b'"ok"\n', ("status", "writer")),
    ("an object without ok", b'{"status": {}}\n', ("status", "writer")),
    ("ok is not a boolean", b'{"ok": "yes"}\n', ("status", "writer")),
    ("a refusal without a message", b'{"ok": false, "error": 3}\n', ("status", "writer")),
    ("ok without the payload", b'{"ok": true}\n', ("status", "status --json", "writer")),
    ("a payload of the wrong type", b'{"ok": true, "status": [], "writer": 5}\n', ("status", "status --json", "writer")),
    ("a status without its fields", b'{"ok": true, "status": {"cluster_name": 1}}\n', ("status",)),
    ("hangs up mid-line", b'{"ok": true, "sta', ("status", "writer")),
    ("a line over the client's limit", b"x" * (2**24 + 100), ("status",)),
]


@pytest.mark.parametrize("name,reply,commands", ODD_REPLIES, ids=[c[0] for c in ODD_REPLIES])
async def test_ctl_against_a_socket_that_answers_something_else(tmp_path: Path, name: str, reply: bytes,
                                                                commands: tuple[str, ...]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            writer.write(reply)
            await writer.drain()
        except ConnectionError:
            pass  # the client gave up on an oversized reply
        finally:
            writer.close()

    path = str(tmp_path / "odd.sock")
    server = await asyncio.start_unix_server(answer, path=path)
    try:
        for command in commands:
            args = {"status": ["status"], "status --json": ["status", "--json"], "writer": ["writer", "start"]}[command]
            result = await asyncio.to_thread(_ctl, "--socket", path, *args)
            out = result.stdout + result.stderr
            assert "Traceback" not in out, out[-2000:]
            assert result.returncode == 1, (command, out[-2000:])
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("cosmigrate: error: "), (command, result.stderr)
            assert path in lines[0] or "closed the connection" in lines[0], lines[0]
    finally:
        server.close()
        await server.wait_closed()
