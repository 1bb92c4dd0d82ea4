"""Counters of the virtio-mem device, named as Firecracker names them (group ``memory_hotplug``)."""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class VirtioMemMetrics(MetricGroup):
    activate_fails: int = 0           # the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    queue_event_fails: int = 0        # unusable chains, a stopped device
    queue_event_count: int = 0        # guest queue kicks
    plug_count: int = 0
    plug_bytes: int = 0               # bytes plugged by acknowledged requests
    plug_fails: int = 0               # plug requests answered NACK or ERROR
    unplug_count: int = 0
    unplug_bytes: int = 0
    unplug_fails: int = 0
    unplug_discard_fails: int = 0     # unplugged ranges whose host memory could not be released
    unplug_all_count: int = 0
    unplug_all_fails: int = 0
    state_count: int = 0
    state_fails: int = 0
