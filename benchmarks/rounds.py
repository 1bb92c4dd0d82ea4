"""Rounds: every variant once per round, the starting variant rotated from round to round.

Variants share one machine, so whatever the machine does meanwhile (other jobs,
page cache, CPU frequency) lands on all of them alike; rotating the order keeps
any one variant from always running first (cold) or last.  Warm-up rounds run
first and their results are dropped.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from benchmarks import machine

V = TypeVar("V")


def interleaved_rounds(variants: Sequence[V], runs: int, run: Callable[[V], object], *,
                       warmup: int = 0, discard: Callable[[V], None] = lambda v: None,
                       describe: Callable[[Sequence[V]], str] = lambda vs: "",
                       log: Callable[[str], None] = print) -> list[list[float]]:
    """``warmup`` rounds whose results ``discard`` drops, then ``runs`` rounds.

    After each measured round ``log`` gets ``round i/n: load [...]; <describe(variants)>``.
    Returns the load average (1/5/15 min) taken before each measured round.
    """
    for _ in range(warmup):
        for v in variants:
            run(v)
            discard(v)
    loads = []
    for i in range(runs):
        loads.append(machine.load_average())
        shift = i % len(variants)
        for v in [*variants[shift:], *variants[:shift]]:
            run(v)
        log(f"round {i + 1}/{runs}: load {loads[-1]}; {describe(variants)}")
    return loads
