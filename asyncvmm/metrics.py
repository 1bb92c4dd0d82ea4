"""Metrics: groups of counters that parts of the VMM own, flushed as JSON lines.

A part of the VMM (a device, the API server, a vCPU) owns a *group*: a
dataclass whose int fields only ever grow (counters) except the fields named
in ``STORE_FIELDS``, which hold a latest value (stores).  Owners bump their
own fields with plain ``+=``; nobody else writes them.  :class:`MetricsRegistry`
knows every group by the name Firecracker gives it in its metrics output
(``"block"``, ``"net_eth0"``, ``"api_server"`` ...) and, at each flush, reports
counters as the delta since the previous flush and stores as their value.

A group bumped by several threads at once (the vCPUs) would lose counts to
racing ``+=``; :class:`SummedGroup` gives each thread its own copy (a
*part*) and reports their sum when read.

Per-device groups may also be summed into an aggregate group, the way
Firecracker reports ``"block"`` beside ``"block_<drive_id>"``.

Nothing here does I/O; the writer (:mod:`asyncvmm.metrics_writer`) does.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, ClassVar


@dataclasses.dataclass
class MetricGroup:
    """Base class: subclasses are ``@dataclass`` with ``int`` fields defaulting to 0."""

    STORE_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def values(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class SummedGroup(MetricGroup):
    """A counters-only group reported as the sum of per-thread parts of type ``part_type``."""

    def __init__(self, part_type: type[MetricGroup]) -> None:
        if part_type.STORE_FIELDS:
            raise ValueError(f"{part_type.__name__} has stores; only counters can be summed")
        self.part_type = part_type
        self._parts: list[MetricGroup] = []
        self._lock = threading.Lock()

    def new_part(self) -> MetricGroup:
        """A fresh part for one thread to bump with plain ``+=``; it is never removed."""
        part = self.part_type()
        with self._lock:
            self._parts.append(part)
        return part

    def values(self) -> dict[str, int]:
        with self._lock:
            parts = list(self._parts)
        total = dict.fromkeys((f.name for f in dataclasses.fields(self.part_type)), 0)
        for part in parts:
            for name, value in part.values().items():
                total[name] += value
        return total

    def __getattr__(self, name: str) -> int:
        if name.startswith("_") or name == "part_type":
            raise AttributeError(name)
        values = self.values()
        if name not in values:
            raise AttributeError(name)
        return values[name]


class MetricsRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, MetricGroup] = {}
        self._aggregates: dict[str, list[str]] = {}
        self._last: dict[str, dict[str, int]] = {}

    def register(self, name: str, group: MetricGroup, aggregate: str | None = None) -> None:
        """Report ``group`` as ``name``; if ``aggregate``, also sum it into that group."""
        with self._lock:
            if name in self._groups:
                raise ValueError(f"metrics group {name!r} already registered")
            self._groups[name] = group
            if aggregate is not None:
                self._aggregates.setdefault(aggregate, []).append(name)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._groups.pop(name, None)
            for members in self._aggregates.values():
                if name in members:
                    members.remove(name)

    def get(self, name: str) -> MetricGroup | None:
        return self._groups.get(name)

    def _current(self) -> dict[str, tuple[dict[str, int], frozenset[str]]]:
        out = {name: (g.values(), type(g).STORE_FIELDS) for name, g in self._groups.items()}
        for agg, members in self._aggregates.items():
            if agg in self._groups or not members:
                continue
            total: dict[str, int] = {}
            stores: frozenset[str] = frozenset()
            for m in members:
                vals, stores = out[m]
                for k, v in vals.items():
                    total[k] = total.get(k, 0) + v
            out[agg] = (total, stores)
        return out

    def flush(self) -> dict[str, Any]:
        """Counters as deltas since the previous flush, stores as values."""
        with self._lock:
            report: dict[str, Any] = {}
            for name, (vals, stores) in self._current().items():
                last = self._last.get(name, {})
                report[name] = {
                    k: (v if k in stores else v - last.get(k, 0)) for k, v in vals.items()
                }
                self._last[name] = vals
            return report
