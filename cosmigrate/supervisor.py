"""`cosmigrate run --workers N`: N worker processes under one systemd service, to use the host's cores.

Each child is a plain `cosmigrate run --worker wK` (its own lock file and
control socket, docs/design.md "Workers"); the children share the cluster's
units through their leases, so the supervisor decides nothing about the
work. It only keeps N children alive: a child that dies is started again
after a pause (a configuration error, exit 2, stops everything instead, as
it would stop systemd), SIGTERM/SIGINT and SIGHUP are forwarded, and the
supervisor speaks to systemd for all of them (READY, STATUS, WATCHDOG; the
children get no NOTIFY_SOCKET, since the unit's NotifyAccess is the main
process).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping

from cosmigrate.logs import get_logger
from cosmigrate.sdnotify import Notifier
from cosmigrate.timeouts import within

RESTART_PAUSE_S = 5.0
EXIT_CONFIG = 2
NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def worker_names(count: int) -> list[str]:
    return [f"w{i}" for i in range(1, count + 1)]


class Supervisor:
    def __init__(self, config: str, count: int, stop_timeout_s: float, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.names = worker_names(count)
        self.stop_timeout_s = stop_timeout_s
        base = dict(os.environ if env is None else env)
        self.notify = Notifier(base)
        self.env = {k: v for k, v in base.items() if k not in NOTIFY_VARS}
        self.log = get_logger(supervisor=os.getpid())
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self._stop = asyncio.Event()
        self.exit_code = 0

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cosmigrate", "run", "--config", self.config, "--worker", name, env=self.env)
        self.children[name] = proc
        self.log.info("worker process started", worker_name=name, pid=proc.pid)
        return proc

    async def _keep(self, name: str) -> None:
        """One child, restarted whenever it dies until the supervisor stops."""
        while not self._stop.is_set():
            proc = await self._spawn(name)
            code = await proc.wait()
            if self._stop.is_set():
                return
            if code == EXIT_CONFIG:
                self.log.error("worker process refused its configuration; stopping every worker", worker_name=name)
                self.exit_code = EXIT_CONFIG
                self._stop.set()
                return
            self.log.warning("worker process ended; starting it again", worker_name=name, exit_code=code,
                             pause_s=RESTART_PAUSE_S)
            try:
                await within(self._stop.wait(), RESTART_PAUSE_S)
            except TimeoutError:
                pass

    def _forward(self, sig: int) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notify.watchdog()
            await asyncio.sleep(interval)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._forward(signal.SIGHUP))
        keepers = [asyncio.create_task(self._keep(name), name=f"keep:{name}") for name in self.names]
        extra = []
        if self.notify.watchdog_interval_s:
            extra.append(asyncio.create_task(self._watchdog(self.notify.watchdog_interval_s), name="watchdog"))
        self.notify.ready(f"{len(self.names)} worker processes")
        try:
            await self._stop.wait()
            self.notify.stopping()
            self._forward(signal.SIGTERM)  # each drains and hands its leases over
            try:
                await within(asyncio.gather(*keepers), self.stop_timeout_s)
            except TimeoutError:
                self.log.warning("worker processes did not stop in time; killing them")
                self._forward(signal.SIGKILL)
                await asyncio.gather(*keepers, return_exceptions=True)
        finally:
            for task in extra + keepers:
                task.cancel()
            await asyncio.gather(*extra, *keepers, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.notify.close()
        return self.exit_code
