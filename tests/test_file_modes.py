"""Files that hold resume tokens or change data are owner-only (0600), however they came to exist."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

from cosmigrate.ledger.sqlite import SqliteLedger
from tests.helpers import child_env, make_config, write_config

NS = "app.users"


def _modes(directory: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir() if p.name.startswith("ledger.db")}


async def test_a_ledger_left_readable_by_others_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    first = SqliteLedger(f"sqlite://{path}", str(path), "test")
    await first.init()
    await first.close()
    # As an older release (or a copy made as root with umask 022) left it, with a -wal and -shm beside it.
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
    for name in ("ledger.db", "ledger.db-wal", "ledger.db-shm"):
        os.chmod(tmp_path / name, 0o644)
    ledger = SqliteLedger(f"sqlite://{path}", str(path), "test")
    try:
        await ledger.claim(NS, "me")
        modes = _modes(tmp_path)
    finally:
        await ledger.close()
        conn.close()
    assert modes == {"ledger.db": 0o600, "ledger.db-wal": 0o600, "ledger.db-shm": 0o600}


def test_ledger_init_from_the_cli_under_umask_022_is_owner_only(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "mongodb://127.0.0.1:9/", "mongodb://127.0.0.1:9/?tls=true", "file+sqlite")
    config = write_config(cfg, tmp_path / "c.toml")
    result = subprocess.run([sys.executable, "-m", "cosmigrate", "ledger", "init", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, env=child_env(),
                            preexec_fn=lambda: os.umask(0o022))
    assert result.returncode == 0, result.stderr
    assert _modes(tmp_path) == {"ledger.db": 0o600}
