"""Writes the metrics registry as JSON lines: at InstanceStart, every 60 s, on FlushMetrics.

Each line is one JSON object: ``utc_timestamp_ms`` and one object per
registered group (counters as deltas since the previous line, stores as
values; see :class:`asyncvmm.metrics.MetricsRegistry`).  The destination is
set once, by ``--metrics-path`` or ``PUT /metrics``; a second attempt fails
with Firecracker's "Reinitialization of metrics not allowed.".  A FIFO
without a reader or a full pipe loses the line rather than blocking the VMM.
The controller calls this directly, so the backend need not flush metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

import msgspec

from asyncvmm.logger import LoggerMetrics, open_nonblocking
from asyncvmm.metrics import MetricsRegistry

log = logging.getLogger(__name__)

WRITE_METRICS_PERIOD_S = 60.0


def _utc_ms() -> int:
    return time.time_ns() // 1_000_000


class MetricsWriter:
    def __init__(self, registry: MetricsRegistry, *, clock_ms: Callable[[], int] = _utc_ms,
                 logger_metrics: LoggerMetrics | None = None) -> None:
        self.registry = registry
        self.clock_ms = clock_ms
        self.logger_metrics = logger_metrics if logger_metrics is not None else LoggerMetrics()
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def init(self, path: str) -> None:
        """Raises ``RuntimeError`` on a second call, ``OSError`` if ``path`` cannot be opened."""
        if self._fd is not None:
            raise RuntimeError("Reinitialization of metrics not allowed.")
        self._fd = open_nonblocking(path)

    def line(self) -> bytes:
        report = {"utc_timestamp_ms": self.clock_ms(), **self.registry.flush()}
        return msgspec.json.encode(report) + b"\n"

    def flush(self) -> bool:
        """Write one line; ``False`` (and nothing consumed) when no destination is set."""
        if self._fd is None:
            return False
        data = self.line()
        try:
            os.write(self._fd, data)
        except BlockingIOError:
            self.logger_metrics.missed_metrics_count += 1
            log.warning("Metrics line dropped: the metrics destination is full.")
        except OSError:
            self.logger_metrics.metrics_fails += 1
            raise
        return True

    def start_periodic(self, period_s: float = WRITE_METRICS_PERIOD_S) -> None:
        """Flush every ``period_s`` on the running loop (idempotent)."""
        if self._timer is not None:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            try:
                self.flush()
            except OSError as err:
                log.error("Failed to write metrics: %s", err)
            self._timer = loop.call_later(period_s, tick)

        self._timer = loop.call_later(period_s, tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
