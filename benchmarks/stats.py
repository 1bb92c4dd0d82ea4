"""Summary statistics of benchmark samples, and ratios against a peer.

Pure functions, no I/O.  Conventions, kept here so every benchmark agrees:

* p99 is the nearest-rank percentile (the smallest sample with at least 99%
  of the samples at or below it).  With fewer than 100 samples it is the
  maximum, which is what a reader of a p99 column should be told.
* stdev is the sample standard deviation (n - 1); 0.0 for a single sample.
* A ratio is subject median / peer median: below 1.0 the subject (asyncvmm)
  is faster or smaller, above 1.0 it is slower or bigger.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Iterable, Sequence


class StatsError(ValueError):
    """No samples, or a sample that is not a finite number."""


@dataclasses.dataclass(frozen=True)
class Summary:
    n: int
    median: float
    p99: float
    min: float
    max: float
    stdev: float

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0 < q <= 100) of ``samples``."""
    if not 0 < q <= 100:
        raise StatsError(f"percentile {q} is outside (0, 100]")
    ordered = sorted(_checked(samples))
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[rank - 1]


def summarize(samples: Iterable[float]) -> Summary:
    values = _checked(list(samples))
    return Summary(
        n=len(values),
        median=statistics.median(values),
        p99=percentile(values, 99),
        min=min(values),
        max=max(values),
        stdev=statistics.stdev(values) if len(values) > 1 else 0.0,
    )


def ratio(subject: float, peer: float) -> float | None:
    """subject / peer, or None when the peer is 0 (no meaningful ratio)."""
    if peer == 0:
        return None
    return subject / peer


def format_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _checked(values: Sequence[float]) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise StatsError("no samples")
    if not all(math.isfinite(v) for v in out):
        raise StatsError("a sample is NaN or infinite")
    return out
