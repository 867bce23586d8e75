"""A failing HTTP endpoint in front of moto: S3 and DynamoDB errors on demand.

One request per connection (the proxy forces `Connection: close`). For each
request, with probability `fail_rate`, one of:
- "503": answer 503 Service Unavailable without forwarding (a throttled or sick service);
- "reset": close the connection without forwarding (a network failure);
- "lost": forward it, then close without returning the answer (the request
  took effect but the client cannot know: the ambiguous case).
"""

from __future__ import annotations

import asyncio
import random


class FlakyHttpProxy:
    def __init__(self, upstream: str, fail_rate: float = 0.0, seed: int = 1, modes: tuple[str, ...] = ("503", "reset", "lost")) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.fail_rate = fail_rate
        self.modes = modes
        self.rng = random.Random(seed)
        self.failures: dict[str, int] = {m: 0 for m in modes}
        self.requests = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FlakyHttpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        kept = [lines[0]] + [ln for ln in lines[1:] if ln and not ln.lower().startswith(("connection:", "expect:"))]
        headers = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip() for ln in lines[1:] if ":" in ln}
        if headers.get("expect", "").lower() == "100-continue":
            # S3 PutObject waits for this before sending its body.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                chunk = await reader.readexactly(size + 2)
                body += size_line + chunk
                if size == 0:  # no trailers: the terminating CRLF was read with the chunk
                    break
        return ("\r\n".join(kept + ["Connection: close", "", ""])).encode("latin-1") + body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mode: str | None = None
        try:
            request = await self._read_request(reader, writer)
            self.requests += 1
            mode = self.rng.choice(self.modes) if self.rng.random() < self.fail_rate else None
            if mode:
                self.failures[mode] += 1
            if mode == "503":
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if mode == "reset":
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            up_writer.write(request)
            await up_writer.drain()
            response = await up_reader.read()
            up_writer.close()
            if mode == "lost":
                return
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if mode in ("reset", "lost"):
                writer.transport.abort()
            else:
                writer.close()
