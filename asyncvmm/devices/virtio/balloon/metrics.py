"""Counters of the virtio-balloon device, named as Firecracker names them (group ``balloon``)."""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class BalloonMetrics(MetricGroup):
    activate_fails: int = 0
    inflate_count: int = 0            # inflate queue events
    stats_updates_count: int = 0      # statistics buffers received from the guest
    stats_update_fails: int = 0       # unknown statistics tags, oversized or unusable buffers
    deflate_count: int = 0            # deflate queue events
    event_fails: int = 0              # unusable chains, PFNs outside guest RAM, a stopped device
    free_page_report_count: int = 0   # reported free ranges
    free_page_report_freed: int = 0   # bytes of reported free ranges given back to the host
    free_page_report_fails: int = 0   # reported ranges that could not be given back
    free_page_hint_count: int = 0     # hinted free ranges of the current run
    free_page_hint_freed: int = 0     # bytes of hinted ranges given back to the host
    free_page_hint_fails: int = 0     # hinted ranges that could not be given back
