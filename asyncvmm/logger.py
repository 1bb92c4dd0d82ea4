"""Logging in Firecracker's line format, configured by flags or ``PUT /logger``.

Every module logs through ``logging.getLogger(__name__)`` under the
``asyncvmm`` logger; this module gives that logger one handler whose lines read

    2026-11-27T00:38:03.123456789 [anonymous-instance:main:INFO:asyncvmm/cli.py:120] message

with the level and the origin only when ``show_level`` / ``show_log_origin``
ask for them.  Levels are Firecracker's (Error, Warning, Info, Debug, Trace,
Off; case-insensitive).  Output goes to stdout, as Firecracker's does, until
a ``log_path`` (file or named pipe, opened non-blocking so a stalled reader
drops lines instead of stalling the VMM) replaces it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any, TextIO

from asyncvmm.config import LoggerConfig
from asyncvmm.config.service import LOG_LEVELS
from asyncvmm.metrics import MetricGroup

ROOT = "asyncvmm"
TRACE = 5
logging.addLevelName(TRACE, "TRACE")

PY_LEVELS = {
    "Off": logging.CRITICAL + 10, "Error": logging.ERROR, "Warning": logging.WARNING,
    "Info": logging.INFO, "Debug": logging.DEBUG, "Trace": TRACE,
}
LEVEL_NAMES = {logging.ERROR: "ERROR", logging.WARNING: "WARN", logging.INFO: "INFO",
               logging.DEBUG: "DEBUG", TRACE: "TRACE", logging.CRITICAL: "ERROR"}


def parse_level(text: str) -> int:
    """A Firecracker level name to a ``logging`` level; ``ValueError`` if unknown."""
    name = LOG_LEVELS.get(text.lower())
    if name is None:
        raise ValueError(text)
    return PY_LEVELS[name]


def format_timestamp(created: float) -> str:
    """Local time with nanoseconds, the way Firecracker stamps its lines."""
    ns = int(round(created * 1e9))
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(secs)) + f".{frac:09d}"


class FirecrackerFormatter(logging.Formatter):
    def __init__(self, instance_id: str, show_level: bool = False, show_origin: bool = False) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        thread = "main" if record.threadName == "MainThread" else record.threadName
        prefix = f"{format_timestamp(record.created)} [{self.instance_id}:{thread}"
        if self.show_level:
            prefix += ":" + LEVEL_NAMES.get(record.levelno, record.levelname)
        if self.show_origin:
            prefix += f":{record.pathname}:{record.lineno}"
        text = f"{prefix}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@dataclasses.dataclass
class LoggerMetrics(MetricGroup):
    """Firecracker's ``logger`` group: lines the log and metrics writers lost or failed."""

    missed_metrics_count: int = 0
    metrics_fails: int = 0
    missed_log_count: int = 0
    log_fails: int = 0


class _FdStream:
    """A write-only text stream over a non-blocking fd; a full pipe drops the line."""

    def __init__(self, fd: int, metrics: LoggerMetrics) -> None:
        self.fd = fd
        self.metrics = metrics

    def write(self, text: str) -> int:
        try:
            return os.write(self.fd, text.encode(errors="replace"))
        except BlockingIOError:
            self.metrics.missed_log_count += 1
            return 0
        except OSError:
            self.metrics.log_fails += 1
            return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def open_nonblocking(path: str) -> int:
    """Open a log or metrics destination; O_RDWR keeps a FIFO openable with no reader yet."""
    return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)


class _ModuleFilter(logging.Filter):
    def __init__(self, module: str | None) -> None:
        super().__init__()
        self.prefix = module.replace("::", ".") if module else None

    def filter(self, record: logging.LogRecord) -> bool:
        return self.prefix is None or record.name.startswith(self.prefix) or (
            record.name.startswith(ROOT + ".") and record.name[len(ROOT) + 1:].startswith(self.prefix)
        )


class Logger:
    """The process's log configuration; :meth:`apply` takes a ``LoggerConfig`` (unset fields stay)."""

    def __init__(self, instance_id: str = "anonymous-instance", stream: TextIO | None = None,
                 metrics: LoggerMetrics | None = None) -> None:
        self.instance_id = instance_id
        self.metrics = metrics if metrics is not None else LoggerMetrics()
        self.level = logging.INFO
        self.show_level = False
        self.show_origin = False
        self.module: str | None = None
        self._stream: Any = stream if stream is not None else sys.stdout
        self._owned: _FdStream | None = None
        self._handler: logging.Handler | None = None
        self._install()

    def apply(self, cfg: LoggerConfig) -> None:
        """Raises ``OSError`` if ``log_path`` cannot be opened (then nothing changes)."""
        if cfg.log_path is not None:
            stream = _FdStream(open_nonblocking(cfg.log_path), self.metrics)
            if self._owned is not None:
                self._owned.close()
            self._owned = self._stream = stream
        if cfg.level is not None:
            self.level = parse_level(cfg.level)
        if cfg.show_level is not None:
            self.show_level = cfg.show_level
        if cfg.show_log_origin is not None:
            self.show_origin = cfg.show_log_origin
        if cfg.module is not None:
            self.module = cfg.module
        self._install()

    def _install(self) -> None:
        root = logging.getLogger(ROOT)
        if self._handler is not None:
            root.removeHandler(self._handler)
        handler = logging.StreamHandler(self._stream)
        handler.setFormatter(FirecrackerFormatter(self.instance_id, self.show_level, self.show_origin))
        handler.addFilter(_ModuleFilter(self.module))
        root.addHandler(handler)
        root.setLevel(self.level)
        root.propagate = False
        self._handler = handler
