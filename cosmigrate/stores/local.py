"""A batch store in a local directory (the embedded default).

Writes are atomic and durable: write a temporary file, fsync it, rename it
into place, fsync the directory. Blocking file I/O runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cosmigrate.stores.base import ObjectMissing, StoreError


class LocalStore:
    def __init__(self, url: str, root: str) -> None:
        self.url = url
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise StoreError(f"key {key!r} escapes the store directory")
        return path

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
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
