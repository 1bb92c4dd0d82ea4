"""Counters of one virtio-block device, named as Firecracker names them.

Registered by the builder as ``block_<drive_id>`` with aggregate ``block``.
Only the device bumps them: ``cfg_fails`` on vCPU threads (config-space
accesses), everything else on the loop; every field is a counter.  Firecracker's ``read_agg``/``write_agg`` latency objects are nested
JSON, which a flat :class:`MetricGroup` cannot express, so they are absent.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class BlockMetrics(MetricGroup):
    activate_fails: int = 0                 # the device could not start
    cfg_fails: int = 0                      # config-space accesses outside the config / writes to it
    no_avail_buffer: int = 0                # a kick found nothing to do
    event_fails: int = 0                    # the device stopped: broken ring or internal error
    execute_fails: int = 0                  # the host failed a read, write or flush
    invalid_reqs_count: int = 0             # malformed chains and requests
    flush_count: int = 0
    queue_event_count: int = 0              # kicks
    rate_limiter_event_count: int = 0       # throttle timers that resumed the queue
    update_count: int = 0                   # backing-file swaps and rate-limiter updates
    update_fails: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    read_count: int = 0
    write_count: int = 0
    rate_limiter_throttled_events: int = 0  # requests put back because the limiter was empty
    io_engine_throttled_events: int = 0     # requests put back because the engine was full
    remaining_reqs_count: int = 0           # requests left in the ring when the queue stalled
    # Not in Firecracker:
    io_uring_count: int = 0                 # requests answered with the result of an io_uring operation
    discarded_reqs_count: int = 0           # requests popped but never answered: the driver reset the device
