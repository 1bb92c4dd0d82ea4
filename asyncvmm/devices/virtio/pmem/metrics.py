"""Counters of one virtio-pmem device, named as Firecracker names them.

Each device is the group ``pmem_<id>``; the ``pmem`` group sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class PmemMetrics(MetricGroup):
    activate_fails: int = 0
    cfg_fails: int = 0                      # config-space reads past its 16 bytes
    event_fails: int = 0                    # unusable requests, or the device stopped
    queue_event_count: int = 0              # kicks of the request queue
    rate_limiter_throttled_events: int = 0  # flushes held back because the limiter was empty
    rate_limiter_event_count: int = 0       # throttle timers that resumed the queue
