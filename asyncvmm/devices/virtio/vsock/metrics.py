"""Counters of the virtio-vsock device, named as Firecracker names them (group ``vsock``).

RX is toward the guest (the RX queue), TX from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class VsockMetrics(MetricGroup):
    activate_fails: int = 0
    cfg_fails: int = 0                 # config accesses past guest_cid, or writes
    rx_queue_event_fails: int = 0      # RX chains that could not carry a packet
    tx_queue_event_fails: int = 0      # TX chains that were not a usable packet, or misaddressed
    ev_queue_event_fails: int = 0      # event chains too small for an event
    muxer_event_fails: int = 0         # failed accepts, refused CONNECT lines
    conn_event_fails: int = 0          # the device stopped (broken ring or internal error)
    rx_queue_event_count: int = 0      # RX kicks
    tx_queue_event_count: int = 0      # TX kicks
    rx_bytes_count: int = 0            # payload bytes given to the guest
    tx_bytes_count: int = 0            # payload bytes taken from the guest
    rx_packets_count: int = 0          # packets given to the guest
    tx_packets_count: int = 0          # packets taken from the guest
    conns_added: int = 0
    conns_killed: int = 0              # connections we reset (timeout, protocol error, host error)
    conns_removed: int = 0             # connections whose host socket was closed, for any reason
    killq_resync: int = 0              # RSTs dropped because too many waited for RX buffers
    tx_flush_fails: int = 0            # host socket errors while flushing buffered guest data
    tx_write_fails: int = 0            # host socket errors on guest data, or data past credit
    rx_read_fails: int = 0             # host socket read errors
