"""Counters of the virtio-rng device, named as Firecracker names them (group ``entropy``)."""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class EntropyMetrics(MetricGroup):
    activate_fails: int = 0
    entropy_event_fails: int = 0            # the device stopped, or a chain was unusable
    entropy_event_count: int = 0            # kicks
    entropy_bytes: int = 0                  # random bytes given to the guest
    host_rng_fails: int = 0                 # the host's getrandom failed
    entropy_rate_limiter_throttled: int = 0 # requests put back because the limiter was empty
    rate_limiter_event_count: int = 0       # throttle timers that resumed the queue
