"""moto's server as the tests' DynamoDB and S3, with DynamoDB requests taken one at a time.

Why not moto's own `ThreadedMotoServer` or `moto_server`: they serve each
request on its own thread, and moto's TransactWriteItems is not isolated. It
deep-copies the whole table when a transaction starts and, if the
transaction is cancelled (a condition failed), puts that copy back, so every
write that another thread made meanwhile is undone. Real DynamoDB never
undoes a write it acknowledged. Under lost answers this cost a namespace its
capture (issue 23, part 6): a lost TransactWriteItems answer makes the ledger
re-send the commit (moto ignores ClientRequestToken, so the repeat is
cancelled), and its rollback undid another namespace's commit that moto had
already acknowledged. That namespace's next commit then met "committing seq
32 but next_seq is 31".

Serialising DynamoDB requests gives every one of them the isolation that
DynamoDB gives. S3 requests stay concurrent (moto's S3 has no rollback).
Nothing else of moto changes: it still ignores ClientRequestToken, so a re-sent
transaction is cancelled and the ledger's re-read path runs, which is stricter
than the real service.

In-process: `MotoServer().start()` (tests/conftest.py). As its own process:
`python tests/motoserver.py -p PORT` (bench/harness.py).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server


class SerialDynamoDB:
    """WSGI middleware: one DynamoDB request at a time (its target header names the API), others in parallel."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not str(environ.get("HTTP_X_AMZ_TARGET", "")).startswith("DynamoDB_"):
            return self.app(environ, start_response)
        with self.lock:
            # moto builds the whole answer inside the call: the body is complete when the lock is released.
            return list(self.app(environ, start_response))


def make_moto_server(host: str = "127.0.0.1", port: int = 0) -> BaseWSGIServer:
    app = SerialDynamoDB(DomainDispatcherApplication(create_backend_app))
    return make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)


class MotoServer:
    """The server on a thread of this process (the tests' session-wide AWS stand-in)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = make_moto_server(host, port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> MotoServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args()
    make_moto_server(args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
