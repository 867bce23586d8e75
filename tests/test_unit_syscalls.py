"""The unit's system call filter lets through every call the daemon makes (a denied call is SIGSYS: the service
dies at start, e.g. on `os.chown` of the control socket with `control.allowed_group`).

Three levels, so that a machine without systemd still checks something: the filter lines parsed against a small
table of the groups' members for the calls we know the daemon needs (always); the same with the groups expanded
by `systemd-analyze syscall-filter` (where installed); and every call a real `cosmigrate run` makes under
`strace`, with `control.allowed_group` set (where both are installed).
"""

from __future__ import annotations

import asyncio
import grp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from pymongo import AsyncMongoClient

from cosmigrate.sandbox import Sandbox
from tests.helpers import child_env, make_config, prepare_backends, wait_for, write_config

UNIT = Path(__file__).parent.parent / "deploy" / "systemd" / "cosmigrate.service"
ANALYZE = shutil.which("systemd-analyze")
STRACE = shutil.which("strace")

NEEDED = {
    "fchownat": "cosmigrate.control: os.chown of the control socket to control.allowed_group",
    "chown": "the same on libcs that call chown(2)",
    "fchown": "SQLite and Python's own files (seen under strace)",
    "prlimit64": "cosmigrate.limits: the open-file limit raised to the unit's LimitNOFILE",
    "fchmodat": "cosmigrate.control: the socket's mode 0660",
    "flock": "cosmigrate.lock: the cluster lock",
}
# systemd 252's groups, only as far as the calls above go (`systemd-analyze syscall-filter` gives them whole).
GROUPS_KNOWN = {
    "@system-service": {"fchownat", "chown", "fchown", "prlimit64", "fchmodat", "flock", "setrlimit"},
    "@chown": {"fchownat", "chown", "fchown"},
    "@privileged": {"fchownat", "chown", "fchown"},  # through @chown
    "@resources": {"setrlimit"},
    "@default": {"prlimit64"},
    "@file-system": {"fchmodat"},
    "@basic-io": set(),
}


def filter_lines(unit: Path = UNIT) -> list[str]:
    return [line.partition("=")[2].strip() for line in unit.read_text().splitlines()
            if line.startswith("SystemCallFilter=")]


def allowed(lines: list[str], expand: Callable[[str], set[str]]) -> tuple[bool, set[str]]:
    """(allow-list mode?, the set) as systemd builds it: the first line picks the mode; a later `~` line removes
    its calls from an allow-list, a plain line adds them (in the order written)."""
    allow_list = not lines[0].startswith("~")
    calls: set[str] = set()
    for line in lines:
        invert = line.startswith("~")
        names = set().union(*(expand(n) for n in line.lstrip("~").split()))
        if invert == allow_list:
            calls -= names
        else:
            calls |= names
    return allow_list, calls


def permits(lines: list[str], expand: Callable[[str], set[str]], call: str) -> bool:
    allow_list, calls = allowed(lines, expand)
    return call in calls if allow_list else call not in calls


def _known(name: str) -> set[str]:
    return GROUPS_KNOWN.get(name, set()) if name.startswith("@") else {name}


def _analyzed(name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    out = subprocess.run([str(ANALYZE), "syscall-filter", name], capture_output=True, text=True, timeout=60).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if word and not word.startswith("#"):
            calls |= _analyzed(word) if word.startswith("@") else {word}
    return calls


def test_the_unit_filter_permits_the_calls_the_daemon_needs_by_parsing() -> None:
    lines = filter_lines()
    assert lines and lines[0] == "@system-service", lines
    refused = [f"{call} ({why})" for call, why in NEEDED.items() if not permits(lines, _known, call)]
    assert not refused, f"the unit's SystemCallFilter= lines {lines} deny: {refused}"
    assert not permits(lines, _known, "setrlimit"), "@resources stays denied (prlimit64 is what the daemon calls)"


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")
def test_the_unit_filter_permits_the_calls_the_daemon_needs_by_systemd_analyze() -> None:
    lines = filter_lines()
    refused = [f"{call} ({why})" for call, why in NEEDED.items() if not permits(lines, _analyzed, call)]
    assert not refused, f"the unit's SystemCallFilter= lines {lines} deny: {refused}"
    for call in ("reboot", "init_module", "setuid", "sethostname", "setrlimit"):
        assert not permits(lines, _analyzed, call), f"{call} should stay denied"


_CALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_][a-z0-9_]*)(?:\(| resumed>)")


def _socket_dir() -> Path:
    """A directory the group's members can search (pytest's tmp is 0700), for the socket."""
    reachable = Path(tempfile.mkdtemp(prefix="cosmigrate-sock-", dir="/tmp"))
    reachable.chmod(0o755)
    return reachable


def _pid_in(lock: Path) -> int:
    """The daemon's pid from its cluster lock file (0 before it wrote it)."""
    text = lock.read_text().strip() if lock.exists() else ""
    return int(text) if text.isdigit() else 0


def _calls(trace: Path) -> set[str]:
    return {m.group(1) for m in map(_CALL.match, trace.read_text().splitlines()) if m}


@pytest.mark.skipif(ANALYZE is None or STRACE is None, reason="needs systemd-analyze and strace")
async def test_every_call_a_real_daemon_makes_with_allowed_group_passes_the_unit_filter(
        tmp_path: Path, sandbox: Sandbox, source: AsyncMongoClient) -> None:
    cfg = make_config(tmp_path, sandbox.source_uri, sandbox.target_uri, "file+sqlite")
    cfg.control.allowed_group = grp.getgrgid(os.getgid()).gr_name
    reachable = await asyncio.to_thread(_socket_dir)
    cfg.control.socket = str(reachable / "control.sock")
    await prepare_backends(cfg)
    await source.app.d.insert_many([{"_id": i} for i in range(20)])
    config = write_config(cfg, tmp_path / "c.toml")
    trace = tmp_path / "strace.txt"
    proc = await asyncio.create_subprocess_exec(
        str(STRACE), "-f", "-qq", "-o", str(trace), sys.executable, "-m", "cosmigrate", "run", "--config", str(config),
        env=child_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output = asyncio.create_task(proc.communicate())
    lock = Path(cfg.ledger.url.removeprefix("sqlite://")).parent / "test.lock"
    try:
        async def serving() -> bool:
            if proc.returncode is not None:
                raise AssertionError((await output)[0].decode()[-3000:])
            return await asyncio.to_thread(_pid_in, lock) > 0 and await asyncio.to_thread(Path(cfg.control.socket).exists)

        await wait_for(serving, 120, what="the traced daemon serving its socket")
        ctl = await asyncio.create_subprocess_exec(sys.executable, "-m", "cosmigrate", "ctl", "--socket",
                                                   cfg.control.socket, "status", env=child_env(),
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(ctl.communicate(), 60)
        assert ctl.returncode in (0, 2), err
        os.kill(await asyncio.to_thread(_pid_in, lock), signal.SIGTERM)  # the daemon itself (the child strace started)
        await asyncio.wait_for(output, 120)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.to_thread(shutil.rmtree, reachable, True)
    made = await asyncio.to_thread(_calls, trace)
    assert {"fchownat", "chown"} & made, "the daemon gave its socket to the group"
    lines = filter_lines()
    refused = sorted(call for call in made if not permits(lines, _analyzed, call))
    assert not refused, f"calls the daemon made that {lines} would kill it for: {refused}"
