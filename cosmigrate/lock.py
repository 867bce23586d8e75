"""One daemon per cluster on this machine's embedded backend: an exclusive `flock` held for the daemon's life.

With a SQLite ledger (or a local batch store) two daemons on the same
config would both claim the namespaces and fight over one control socket.
The second one must give up at start-up, in one line, before it touches
anything the first one owns. The lock file is `<ledger dir>/<cluster>.lock`
next to the SQLite ledger (else next to the local store directory), or
`daemon.lock_file`; it holds the owner's pid so the message can name it. A
DynamoDB ledger with an S3 store takes no lock unless `daemon.lock_file` is
set: daemons on several hosts are fenced by the ledger itself.

`flock` belongs to the open file: the kernel drops it when the process dies,
however it dies, so a stale lock file never blocks a restart. The file is not
removed on release (removing it would let a third process lock a new inode
while a second one still waits on the old).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from urllib.parse import urlsplit

from cosmigrate.config import Config


class LockError(Exception):
    """The cluster lock cannot be taken; the message says why in one line."""


def lock_path(cfg: Config) -> Path | None:
    """Where the worker's lock lives: `daemon.lock_file`, else next to the embedded backend, else None.

    The lock is per worker name (`daemon.worker`): several workers of one cluster share a host, each
    under its own name, and two processes of the same name are refused as before. Holding it proves
    that an earlier process of this name on this host is dead (`cosmigrate.leases.keeper` takes that
    one's units back without waiting for their leases to expire).
    """
    name = f"{cfg.cluster_name}.{cfg.daemon.worker}.lock" if cfg.daemon.worker else f"{cfg.cluster_name}.lock"
    if cfg.daemon.lock_file:
        path = Path(cfg.daemon.lock_file)
        return path.with_name(f"{path.stem}.{cfg.daemon.worker}{path.suffix}") if cfg.daemon.worker else path
    ledger = urlsplit(cfg.ledger.url)
    if ledger.scheme == "sqlite":
        return Path(ledger.path).parent / name
    store = urlsplit(cfg.store.url)
    if store.scheme == "file":
        return Path(store.path.rstrip("/") or "/").parent / name
    return None


class ClusterLock:
    """An exclusive, non-blocking `flock` on the cluster's lock file, with the holder's pid inside."""

    def __init__(self, path: Path, cluster: str) -> None:
        self.path = path
        self.cluster = cluster
        self._fd: int | None = None

    @classmethod
    def acquire_for(cls, cfg: Config) -> ClusterLock | None:
        """Take the lock for this config's cluster (None when its backend needs none); raises LockError."""
        path = lock_path(cfg)
        if path is None:
            return None
        lock = cls(path, cfg.cluster_name)
        lock.acquire()
        return lock

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LockError(f"cannot open the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise LockError(f"another cosmigrate daemon already runs cluster {self.cluster} (pid {holder}); "
                            f"it holds {self.path} (give each worker on a host its own --worker name)") from None
        except OSError as exc:
            os.close(fd)
            raise LockError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the lock is held all the same; only the pid in a rival's message is lost
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock). Safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> str:
    """The pid the holder wrote, or "unknown" (it may not have written it yet)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
