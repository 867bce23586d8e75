"""Structured logging: JSON lines on stdout, console on a terminal, native journal fields under systemd.

Every string that reaches a log record passes through `redact`, so a
connection string with a password can never be logged by accident.

Under systemd, stdout is connected to the journal and `$JOURNAL_STREAM`
names that stream (`<dev>:<inode>`). Then records go to the journal's native
socket instead, one field per key (`COSMIGRATE_NAMESPACE`, `COSMIGRATE_SEQ`,
...), so `journalctl -u cosmigrate COSMIGRATE_NAMESPACE=sales.orders` filters
one namespace.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

from cosmigrate.redact import redact
from cosmigrate.terminal import printable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact(value)
    return event


def journal_fields(event: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Map a structlog event to journal fields: MESSAGE, PRIORITY, and COSMIGRATE_<KEY>."""
    fields = [
        ("MESSAGE", str(event.get("event", ""))),
        ("PRIORITY", str(_PRIORITY.get(str(event.get("level", "info")), 6))),
        ("SYSLOG_IDENTIFIER", "cosmigrate"),
    ]
    for key, value in event.items():
        if key in ("event", "level", "timestamp"):
            continue
        name = "COSMIGRATE_" + "".join(c if c.isalnum() else "_" for c in key.upper())
        fields.append((name, str(value)))
    return fields


def encode_journal(fields: list[tuple[str, str]]) -> bytes:
    """The journal's native datagram format (binary-safe form for values with newlines)."""
    out = bytearray()
    for name, value in fields:
        data = value.encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalSender:
    """A structlog renderer that sends each record to the journal socket and prints nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> str:
        try:
            self.sock.sendto(encode_journal(journal_fields(event)), self.path)
        except OSError:
            # The journal is gone or the record is too large: fall back to stdout, which systemd also collects.
            return structlog.processors.JSONRenderer()(_, __, event)  # type: ignore[return-value]
        raise structlog.DropEvent


def stdout_is_journal(env: Mapping[str, str]) -> bool:
    stream = env.get("JOURNAL_STREAM", "")
    if ":" not in stream:
        return False
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    dev, _, ino = stream.partition(":")
    return dev == str(st.st_dev) and ino == str(st.st_ino)


class LevelFilter:
    """Drops records below the configured level; changing `level` affects every logger already bound.

    structlog's own filtering loggers fix the level when a logger is bound (`get_logger().bind()`),
    so the loggers the daemon's parts bound at start would ignore a SIGHUP `log.level`.
    This processor is shared by every bound logger of the process instead.
    """

    def __init__(self, level: str) -> None:
        self.set(level)

    def set(self, level: str) -> None:
        self.level = level.lower()
        self.threshold = getattr(logging, self.level.upper())

    def __call__(self, _: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if getattr(logging, "WARNING" if method == "warn" else method.upper(), logging.CRITICAL) < self.threshold \
                and method not in ("exception", "critical"):
            raise structlog.DropEvent
        return event


def _current_filter() -> LevelFilter | None:
    for processor in structlog.get_config().get("processors", []):
        if isinstance(processor, LevelFilter):
            return processor
    return None


def set_level(level: str) -> None:
    """Change the level of every logger of the process, including those bound before (SIGHUP `log.level`)."""
    current = _current_filter()
    if current is None:
        configure_logging(level)
    else:
        current.set(level)


def configure_logging(level: str = "info", fmt: str = "auto", env: Mapping[str, str] | None = None) -> None:
    """Set up structlog (called by the CLI, never at import); called again, it also re-levels bound loggers."""
    env = os.environ if env is None else env
    level_filter = _current_filter()
    if level_filter is None:
        level_filter = LevelFilter(level)
    else:
        level_filter.set(level)
    renderer: Any
    if stdout_is_journal(env):
        renderer = JournalSender(env.get("COSMIGRATE_JOURNAL_SOCKET", JOURNAL_SOCKET))
    elif fmt == "console" or (fmt == "auto" and sys.stdout.isatty()):
        console = structlog.dev.ConsoleRenderer(colors=True)

        def renderer(logger: Any, name: str, event: MutableMapping[str, Any]) -> Any:
            # A terminal: a namespace name may hold escape sequences; show them, never send them.
            return console(logger, name, {k: printable(v) if isinstance(v, str) else v for k, v in event.items()})
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            level_filter,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("cosmigrate").bind(**bind)
