"""The virtio socket device (§5.10) on Firecracker's Unix-socket backend.

Three queues of 256 entries: rx (0, packets to the guest), tx (1, packets
from it) and event (2, transport resets).  Offered features:
VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC.
Config space (§5.10.4): ``le64 guest_cid``, read-only.

The backend (:class:`~asyncvmm.devices.virtio.vsock.muxer.VsockMuxer`) lives
as long as the device: its listener is bound when the device is built, so a
host process may connect before the driver is up (its REQUEST waits for the
driver).  A driver reset drops every connection.  :meth:`Vsock.transport_reset`
is what Firecracker does after a snapshot load (the builder calls it on
restore, docs/snapshots.md): every host connection is closed and the guest gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
after which it drops its own (§5.10.6.6).
"""

from __future__ import annotations

import asyncio
import struct

from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_VSOCK,
    bit,
)
from asyncvmm.devices.virtio.vsock.handler import VsockHandler
from asyncvmm.devices.virtio.vsock.metrics import VsockMetrics
from asyncvmm.devices.virtio.vsock.muxer import VsockMuxer

QUEUE_SIZE = 256


class Vsock(VirtioDevice):
    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: str, loop: asyncio.AbstractEventLoop,
                 metrics: VsockMetrics | None = None) -> None:
        super().__init__()
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.metrics = metrics or VsockMetrics()
        self.muxer = VsockMuxer(guest_cid, uds_path, loop, self.metrics)
        self.handler: VsockHandler | None = None
        self.reset_pending = False         # a transport reset not yet in an event buffer
        self._config = struct.pack("<Q", guest_cid)

    @property
    def avail_features(self) -> int:
        return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)

    def write_config(self, offset: int, data: bytes) -> None:
        self.metrics.cfg_fails += 1
        super().write_config(offset, data)

    # -- lifecycle (loop) ---------------------------------------------------

    def activate(self, activation: Activation) -> None:
        if not all(q.ready for q in activation.queues):
            raise ActivationError("vsock: rx, tx and event queues must all be ready")
        self.deactivate()
        self.handler = VsockHandler(self, activation)
        self.handler.start()

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None
            # The guest's sockets die with its driver; so do ours.
            self.muxer.reset_connections()

    def close(self) -> None:
        self.deactivate()
        self.muxer.close()

    def transport_reset(self) -> None:
        """Drop every connection and tell the guest so (after a snapshot load)."""
        self.muxer.reset_connections()
        self.reset_pending = True          # two resets before the guest looks are one
        if self.handler is not None:
            self.handler.deliver_events()
