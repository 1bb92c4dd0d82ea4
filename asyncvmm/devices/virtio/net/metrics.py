"""Counters of one virtio-net device, named as Firecracker names them.

Registered by the builder as ``net_<iface_id>`` with aggregate ``net``.  Only
the device (config space, on vCPU threads) and its handler (on the loop) bump
them; every field is a counter.  Firecracker's ``tap_write_agg`` latency
object is nested JSON, which a flat :class:`MetricGroup` cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class NetMetrics(MetricGroup):
    activate_fails: int = 0                 # the device could not start (e.g. TUNSETOFFLOAD failed)
    cfg_fails: int = 0                      # config-space accesses outside the config / to read-only fields
    mac_address_updates: int = 0            # driver writes to the mac field
    no_rx_avail_buffer: int = 0             # receiving paused: the guest had no receive buffer
    no_tx_avail_buffer: int = 0             # a TX kick found nothing to send
    event_fails: int = 0                    # the device stopped: broken ring or internal error
    rx_queue_event_count: int = 0           # RX kicks (new receive buffers)
    rx_event_rate_limiter_count: int = 0    # RX throttle timers that resumed receiving
    rx_partial_writes: int = 0              # (never: a frame is written whole or not at all)
    rx_rate_limiter_throttled: int = 0      # frames held back because the RX limiter was empty
    rx_tap_event_count: int = 0             # the tap became readable
    rx_bytes_count: int = 0                 # bytes given to the guest (virtio header excluded)
    rx_packets_count: int = 0               # frames given to the guest
    rx_fails: int = 0                       # unusable receive chains, frames too large for the buffers
    rx_count: int = 0                       # frames taken in for the guest (tap reads and MMDS frames)
    tap_read_fails: int = 0                 # read(2) on the tap failed
    tap_write_fails: int = 0                # write(2) on the tap failed
    tx_bytes_count: int = 0                 # bytes the guest sent (virtio header excluded)
    tx_malformed_frames: int = 0            # TX chains that are not a frame (bad descriptors, sizes)
    tx_fails: int = 0                       # frames that could not be sent (malformed or tap failure)
    tx_count: int = 0                       # frames written to the tap
    tx_packets_count: int = 0               # frames sent (to the tap or to the MMDS)
    tx_partial_reads: int = 0               # (never: a frame is read whole from guest memory)
    tx_queue_event_count: int = 0           # TX kicks
    tx_rate_limiter_event_count: int = 0    # TX throttle timers that resumed sending
    tx_rate_limiter_throttled: int = 0      # frames held back because the TX limiter was empty
    tx_spoofed_mac_count: int = 0           # frames whose source MAC is not the configured guest_mac
    tx_remaining_reqs_count: int = 0        # frames left in the ring when TX stalled
