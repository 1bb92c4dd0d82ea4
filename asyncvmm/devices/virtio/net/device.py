"""The virtio-net device (§5.1) on a tap: what the driver sees and what the API changes.

One queue pair (receiveq1 = 0, transmitq1 = 1) of 256 entries each.
Offered features: VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_NET_F_MAC, the checksum and segmentation
offloads both ways (CSUM, GUEST_CSUM, GUEST/HOST_TSO4, _TSO6, _UFO),
VIRTIO_NET_F_MRG_RXBUF, and VIRTIO_NET_F_MTU when an ``mtu`` is configured.

The MAC is ``guest_mac`` or, without one, a random locally administered
unicast address, so the guest always finds one in the config space.  On
activation the offloads the driver acknowledged become the tap's
TUNSETOFFLOAD flags, so the kernel hands us only frames the guest can take;
the virtio header goes through the tap unchanged both ways.

Config space (§5.1.4, read on vCPU threads): ``mac``, ``status`` (link up),
``max_virtqueue_pairs`` (1), ``mtu``.  A driver write to ``mac`` is taken
(``mac_address_updates``, as Firecracker does); other writes are refused
(``cfg_fails``).  The bytes are an immutable ``bytes`` replaced whole.

The tap is anything with the :class:`TapBackend` methods (``asyncvmm.net.tap.Tap``
in production, a socket in tests); the device owns it and closes it.
API-facing methods run on the loop: :meth:`Net.update_rate_limiters`.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from asyncvmm.devices.rate_limiter import RateLimiter, RateLimiterSpec
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.net.handler import NetHandler
from asyncvmm.devices.virtio.net.header import (
    ETH_ALEN,
    MAC_OFFSET,
    RX_QUEUE,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    format_mac,
    pack_config,
    parse_mac,
)
from asyncvmm.devices.virtio.net.metrics import NetMetrics
from asyncvmm.devices.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_NET,
    bit,
)
from asyncvmm.net.tap import TUN_F_TSO_ECN, TUN_F_UFO, offload_for_guest_features

if TYPE_CHECKING:
    from asyncvmm.mmds.stack import MmdsNetworkStack

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
# One host buffer per device for tap reads: more than the largest GSO frame
# the kernel can hand over (64 KiB + headers), so a read never truncates.
RX_BUFFER_SIZE = 70 * 1024
MIN_MTU, MAX_MTU = 68, 65535


class TapBackend(Protocol):
    """What the device needs of its tap (see :class:`asyncvmm.net.tap.Tap`)."""

    def fileno(self) -> int: ...
    def read_into(self, buf: bytearray | memoryview) -> int | None: ...
    def writev(self, bufs: Sequence[bytes | bytearray | memoryview]) -> int | None: ...
    def set_offload(self, flags: int) -> None: ...
    def close(self) -> None: ...


def random_mac() -> bytes:
    """A random unicast, locally administered MAC (first octet: bit 0 clear, bit 1 set)."""
    mac = bytearray(secrets.token_bytes(ETH_ALEN))
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


_OFFLOAD_FEATURES = (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
                     VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
                     VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO)


class Net(VirtioDevice):
    device_type = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, iface_id: str, tap: TapBackend, *, guest_mac: str | None = None,
                 mtu: int | None = None, rx_rate_limiter: RateLimiter | None = None,
                 tx_rate_limiter: RateLimiter | None = None, mmds: "MmdsNetworkStack | None" = None,
                 metrics: NetMetrics | None = None,
                 make_mac: Callable[[], bytes] = random_mac) -> None:
        super().__init__()
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu} outside {MIN_MTU}..{MAX_MTU}")
        self.iface_id = iface_id
        self.tap = tap
        self.guest_mac_configured = guest_mac is not None
        self.mac = parse_mac(guest_mac) if guest_mac is not None else make_mac()
        self.mtu = mtu
        self.rx_rate_limiter = rx_rate_limiter or RateLimiter()
        self.tx_rate_limiter = tx_rate_limiter or RateLimiter()
        self.mmds = mmds
        self.metrics = metrics or NetMetrics()
        self.rx_buffer = bytearray(RX_BUFFER_SIZE)
        self.handler: NetHandler | None = None
        self.tap_offload: int | None = None        # the last TUNSETOFFLOAD flags set
        self._config = pack_config(self.mac, mtu or 0)

    @property
    def avail_features(self) -> int:
        features = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
        features |= bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MRG_RXBUF)
        for feature in _OFFLOAD_FEATURES:
            features |= bit(feature)
        if self.mtu is not None:
            features |= bit(VIRTIO_NET_F_MTU)
        return features

    @property
    def mac_address(self) -> str:
        return format_mac(self.mac)

    # -- config space (vCPU threads) ----------------------------------------

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < MAC_OFFSET or offset + len(data) > MAC_OFFSET + ETH_ALEN or not data:
            self.metrics.cfg_fails += 1
            # Rate-limited: a guest writing config space in a loop must not flood the host's log.
            self.guest_faults.report("virtio_config", "net %s: refused a %d-byte config write at %#x "
                                     "(only mac is writable)", self.iface_id, len(data), offset)
            return
        mac = bytearray(self.mac)
        mac[offset - MAC_OFFSET:offset - MAC_OFFSET + len(data)] = data
        self.mac = bytes(mac)
        self._config = pack_config(self.mac, self.mtu or 0)
        self.metrics.mac_address_updates += 1

    # -- lifecycle (loop) ---------------------------------------------------

    def activate(self, activation: Activation) -> None:
        if not all(q.ready for q in activation.queues):
            raise ActivationError(f"net {self.iface_id}: receive and transmit queues must both be ready")
        self.deactivate()
        self._set_tap_offload(offload_for_guest_features(activation.acked_features))
        self.handler = NetHandler(self, activation)
        self.handler.start()

    def _set_tap_offload(self, flags: int) -> None:
        # A kernel without UFO or ECN offload for taps refuses the whole set;
        # the guest then gets those packets segmented by the kernel instead.
        for attempt in (flags, flags & ~(TUN_F_UFO | TUN_F_TSO_ECN)):
            try:
                self.tap.set_offload(attempt)
                self.tap_offload = attempt
                return
            except OSError as e:
                error = e
        raise ActivationError(f"net {self.iface_id}: TUNSETOFFLOAD {flags:#x} failed: {error}")

    def held_chains(self, queue_index: int) -> int:
        if self.handler is None or queue_index != RX_QUEUE:
            return 0
        return self.handler.rx.buffers.held_chains

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None

    def close(self) -> None:
        self.deactivate()
        self.tap.close()

    # -- API updates (loop) -------------------------------------------------

    def update_rate_limiters(self, rx: RateLimiterSpec | None, tx: RateLimiterSpec | None) -> None:
        """PATCH semantics per limiter: absent stays, zero-size buckets are disabled."""
        if rx is not None:
            self.rx_rate_limiter.update_from_config(rx)
        if tx is not None:
            self.tx_rate_limiter.update_from_config(tx)
        if self.handler is not None:
            self.handler.rate_limiter_updated()
