"""The ``"mmds"`` metrics group, with Firecracker's field names.

One group serves every MMDS network stack and the request handler of a VM;
the builder registers it as ``"mmds"``.  All fields are counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvmm.metrics import MetricGroup


@dataclass
class MmdsMetrics(MetricGroup):
    rx_accepted: int = 0            # guest frames taken by the MMDS instead of the tap
    rx_accepted_err: int = 0        # of those, frames dropped as malformed or unusable
    rx_accepted_unusual: int = 0    # non-TCP IPv4 to the MMDS, odd TCP segments
    rx_bad_eth: int = 0             # guest frames shorter than an Ethernet header
    rx_invalid_token: int = 0       # GET with a token that is forged or expired
    rx_no_token: int = 0            # GET without a token header
    rx_count: int = 0               # TCP segments processed by a connection or the listener
    tx_bytes: int = 0               # bytes of frames handed to the guest
    tx_count: int = 0               # frames handed to the guest
    tx_errors: int = 0              # ARP replies / RSTs owed but dropped: queue full
    tx_frames: int = 0              # frames handed to the guest (net device view)
    connections_created: int = 0
    connections_destroyed: int = 0
