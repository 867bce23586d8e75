"""systemd's notify protocol, implemented directly on `$NOTIFY_SOCKET` (a datagram socket).

READY=1 once the ledger, source and target answered; STATUS=<one line> every
few seconds so `systemctl status cosmigrate` shows writer, gap and failures;
WATCHDOG=1 from the event loop at half of `$WATCHDOG_USEC` (a stuck loop stops
the pings and systemd restarts the service); STOPPING=1 when draining.
Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if path:
            self._addr = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1_000_000 / 2

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *lines: str) -> None:
        """Send one notification; a vanished socket is ignored (systemd may be restarting)."""
        if self._addr is None:
            return
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.sendto("\n".join(lines).encode(), self._addr)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining: committing open batches, finishing writes")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
