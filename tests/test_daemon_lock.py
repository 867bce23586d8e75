"""One daemon per cluster, and a control socket that only its owner removes (real processes, real sockets).

A second `cosmigrate run` on the same config used to reach the control
socket, find it answering, give up, and unlink the live daemon's socket on
its way out: the first daemon ran on, uncontrollable.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from cosmigrate.control import ControlError, ControlServer, request
from cosmigrate.sandbox import Sandbox
from tests.helpers import make_config, prepare_backends, wait_for, write_config
from tests.test_capture_processes import Child


def _ctl_status(socket_path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cosmigrate", "ctl", "--socket", socket_path, "status", "--json"],
                          capture_output=True, text=True, timeout=60)


async def _answers(socket_path: str) -> bool:
    try:
        return (await request(socket_path, {"cmd": "ping"}, limit_s=5))["ok"] is True
    except ControlError:
        return False


async def _first_daemon_survives(first: Child, socket_path: str, inode: int) -> None:
    """The socket file is still the one the first daemon bound, and the first daemon answers on it."""
    assert first.proc.returncode is None, first.stderr[-5:]
    assert os.stat(socket_path).st_ino == inode, "the first daemon's socket was replaced or removed"
    result = await asyncio.to_thread(_ctl_status, socket_path)
    assert result.returncode in (0, 2), result.stderr  # answered: 0 ready, 2 not ready yet
    assert json.loads(result.stdout)["cluster_name"] == "test"


async def test_a_second_daemon_on_the_same_config_is_refused_by_the_lock(tmp_path: Path, sandbox: Sandbox) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    first = await Child.start(config)
    try:
        await wait_for(lambda: _answers(cfg.control.socket), 60, what="the first daemon to answer")
        inode = os.stat(cfg.control.socket).st_ino
        second = await Child.start(config)
        assert await second.finish(limit_s=60) == 1
        assert len(second.stderr) == 1, second.stderr
        assert second.stderr[0].startswith(
            f"cosmigrate: error: another cosmigrate daemon already runs cluster test (pid {first.proc.pid})"), second.stderr
        assert str(tmp_path / "test.lock") in second.stderr[0]
        await _first_daemon_survives(first, cfg.control.socket, inode)
    finally:
        assert await first.finish(signal.SIGTERM) == 0
    # The lock dies with its holder: the next start takes it again.
    again = await Child.start(config)
    try:
        await wait_for(lambda: _answers(cfg.control.socket), 60, what="a restarted daemon to answer")
    finally:
        assert await again.finish(signal.SIGTERM) == 0


async def test_without_the_lock_the_loser_still_leaves_the_live_socket_alone(tmp_path: Path, sandbox: Sandbox) -> None:
    """As with a DynamoDB ledger (no host lock): the socket check refuses, and the refused daemon unlinks nothing."""
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    config = write_config(cfg, tmp_path / "cosmigrate.toml")
    await prepare_backends(cfg)
    cfg.daemon.lock_file = str(tmp_path / "elsewhere.lock")
    other = write_config(cfg, tmp_path / "other.toml")
    first = await Child.start(config)
    try:
        await wait_for(lambda: _answers(cfg.control.socket), 60, what="the first daemon to answer")
        inode = os.stat(cfg.control.socket).st_ino
        second = await Child.start(other)
        assert await second.finish(limit_s=60) == 1
        assert len(second.stderr) == 1 and "another cosmigrate daemon is answering on" in second.stderr[0], second.stderr
        await _first_daemon_survives(first, cfg.control.socket, inode)
    finally:
        assert await first.finish(signal.SIGTERM) == 0
    assert not await asyncio.to_thread(os.path.exists, cfg.control.socket), "the first daemon removes its own socket"


async def _ok(_: dict) -> dict:
    return {"ok": True}


async def test_stop_removes_only_the_socket_file_this_server_bound(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    first = ControlServer(path, _ok)
    await first.start()
    try:
        refused = ControlServer(path, _ok)
        try:
            await refused.start()
            raise AssertionError("a second server started on a live socket")
        except ControlError as exc:
            assert "another cosmigrate daemon is answering" in str(exc)
        await refused.stop()
        assert await _answers(path), "the refused server removed the live socket"
        # Someone replaces the socket file (an operator, a newer daemon): the old owner must not remove it.
        os.unlink(path)
        replacement = ControlServer(path, _ok)
        await replacement.start()
        try:
            await first.stop()
            assert await _answers(path), "stop() removed a socket file it did not bind"
        finally:
            await replacement.stop()
        assert not await asyncio.to_thread(os.path.exists, path)
    finally:
        await first.stop()
