"""A batch store in a local directory (the embedded default).

Writes are atomic and durable: write a temporary file, fsync it, rename it
into place, fsync the directory. Blocking file I/O runs in a worker thread.

Retention: only applied batches are ever deleted. `mark_applied` leaves an
empty marker `.<name>.applied` beside the batch file (its mtime is the time
applied); a sweep, run from `mark_applied` at most every
`min(retention / 4, 10 minutes)`, deletes batch files whose marker is older
than `retention_hours`, then the marker. A batch never marked stays for ever.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cosmigrate.clock import Mono, Wall
from cosmigrate.logs import get_logger
from cosmigrate.stores.base import ObjectMissing, StoreError

MARKER_SUFFIX = ".applied"


class LocalStore:
    def __init__(self, url: str, root: str, retention_hours: float = 24.0) -> None:
        self.url = url
        self.root = Path(root)
        self.retention_s = max(0.0, retention_hours * 3600)
        self.sweep_interval_s = min(self.retention_s / 4, 600.0)
        self._next_sweep: Mono | None = None

    def _path(self, key: str) -> Path:
        # Keys come from `batch_key`, whose components are never empty, "." or "..": a key that has one
        # would name another key's file (or a directory), so it is refused rather than resolved.
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise StoreError(f"key {key!r} has an empty, '.' or '..' component")
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"key {key!r} escapes the store directory")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # change data: owner only
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(self._put, key, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.root / key}: {exc.strerror}") from exc

    async def get(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}/{key}: no such batch object") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self.root / key}: {exc.strerror}") from exc

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(self._path(key).unlink, True)
        except OSError as exc:
            raise StoreError(f"cannot delete {self.root / key}: {exc.strerror}") from exc

    @staticmethod
    def _marker(path: Path) -> Path:
        return path.with_name(f".{path.name}{MARKER_SUFFIX}")

    async def mark_applied(self, key: str) -> None:
        path = self._path(key)

        def mark() -> None:
            if not path.is_file():
                raise FileNotFoundError(2, "no such batch object")
            self._marker(path).touch()

        try:
            await asyncio.to_thread(mark)
        except FileNotFoundError:
            raise ObjectMissing(f"{self.url}/{key}: no such batch object") from None
        except OSError as exc:
            raise StoreError(f"cannot mark {self.root / key} applied: {exc.strerror}") from exc
        if self._next_sweep is None or Mono.now() >= self._next_sweep:
            self._next_sweep = Mono.now() + self.sweep_interval_s
            try:
                await self.sweep()
            except StoreError as exc:  # the next sweep tries again; nothing unapplied is at stake
                get_logger().warning("sweeping applied batch files failed; will retry", error=str(exc))

    async def sweep(self, now: Wall | None = None) -> int:
        """Delete the batch files applied more than `retention_hours` before `now`; return how many.

        The wall clock: it is compared with the markers' modification times (set by whichever process marked
        them)."""
        cutoff = (Wall.now() if now is None else now).minus(self.retention_s).s

        def run() -> int:
            deleted = 0
            if not self.root.exists():
                return 0
            for marker in self.root.rglob(f".*{MARKER_SUFFIX}"):
                try:
                    if marker.stat().st_mtime > cutoff:
                        continue
                except FileNotFoundError:
                    continue
                marker.with_name(marker.name[1 : -len(MARKER_SUFFIX)]).unlink(missing_ok=True)
                marker.unlink(missing_ok=True)  # after the batch: a crash in between leaves a marker, swept next time
                deleted += 1
            return deleted

        try:
            return await asyncio.to_thread(run)
        except OSError as exc:
            raise StoreError(f"cannot sweep {self.root}: {exc.strerror}") from exc

    async def list(self, prefix: str) -> list[str]:
        def walk() -> list[str]:
            base = self.root
            if not base.exists():
                return []
            keys = [str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".")]
            return sorted(k for k in keys if k.startswith(prefix))

        return await asyncio.to_thread(walk)

    async def check(self) -> None:
        def probe() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise PermissionError(13, "not writable")

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            raise StoreError(f"store directory {self.root}: {exc.strerror or exc}; create it and give the service user write access") from exc

    async def close(self) -> None:
        return None
