"""The loop side of one virtio-vsock activation: the three queues around the muxer.

TX (queue 1): every chain is parsed (:func:`parse_tx`, no I/O) into a
:class:`GuestPacket` effect followed by ``Used(head, 0)``; :meth:`perform`
hands the packet to the muxer, which writes RW payloads from guest memory
straight to the host socket.  An unusable chain costs that packet only
(``Used(head, 0)``, counted).

RX (queue 0) is a pump, as for virtio-net: while the muxer has something for
the guest and the guest has offered buffers, each chain gets one packet --
the header, then payload read from the host socket directly into the
chain's remaining buffers.  The muxer wakes the pump (:meth:`schedule`) when
a host socket turns readable or a control packet is owed; an RX kick wakes
it when the guest adds buffers.  One interrupt per pump.

Event (queue 2): chains wait in the ring until there is an event to deliver
(:meth:`deliver_events`); the queue is popped only then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Drain, Effect, QueueHandler, Used
from asyncvmm.devices.virtio.vsock.packet import (
    EVENT_SIZE,
    HDR_SIZE,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
    Header,
    PacketError,
    TxPacket,
    parse_tx,
)

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.vsock.device import Vsock

log = logging.getLogger(__name__)

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2


@dataclass(slots=True)
class GuestPacket(Effect):
    """Hand a parsed TX packet to the muxer."""

    pkt: TxPacket


class VsockHandler(QueueHandler):
    def __init__(self, device: "Vsock", act: Activation) -> None:
        super().__init__(act, "vsock")
        self.dev = device
        self.muxer = device.muxer
        self.metrics = device.metrics
        self.rxq = act.queues[RX_QUEUE]
        self.evq = act.queues[EVENT_QUEUE]

    def start(self) -> None:
        self.muxer.wake_rx = self._wake_rx
        super().start()

    def _wake_rx(self) -> None:
        self.schedule(RX_QUEUE)

    # -- queue events -------------------------------------------------------

    def process(self, index: int) -> Drain | None:
        if index == RX_QUEUE:
            self.guarded(self._pump_rx)
            return None
        if index == EVENT_QUEUE:
            self.guarded(self._deliver_events)
            return None
        return super().process(index)

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        if queue_index == RX_QUEUE:
            self.metrics.rx_queue_event_count += 1
        elif queue_index == TX_QUEUE:
            self.metrics.tx_queue_event_count += 1

    def on_event_failure(self) -> None:
        self.metrics.conn_event_fails += 1

    # -- TX -----------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        try:
            pkt = parse_tx(self.mem, chain)
        except PacketError as e:
            self.metrics.tx_queue_event_fails += 1
            self.dev.guest_faults.report("vsock_tx", "vsock: dropped a TX packet: %s", e)
            return [Used(chain.head, 0)]
        return [GuestPacket(pkt), Used(chain.head, 0)]

    def perform(self, queue_index: int, effect: Effect) -> bool:
        if type(effect) is GuestPacket:
            pkt = effect.pkt
            self.muxer.on_guest_packet(pkt.hdr, pkt.payload.views(self.mem))
            return True
        return super().perform(queue_index, effect)

    # -- RX -----------------------------------------------------------------

    def _pump_rx(self) -> None:
        """Fill RX chains while the muxer has packets; one interrupt at the end."""
        budget = self.BATCH_PER_WAKEUP_FACTOR * self.rxq.size
        while budget and self.muxer.has_rx():
            chain = self.rxq.pop(self.mem)
            if chain is None:
                if self.rxq.enable_notification(self.mem):
                    continue
                break                              # an RX kick brings buffers and resumes us
            budget -= 1
            if not self._fill_one(chain):
                self.rxq.undo_pop()
                break
        self.notify(RX_QUEUE)
        if not budget:
            self.schedule(RX_QUEUE)

    def _fill_one(self, chain: DescriptorChain) -> bool:
        """Put one packet in ``chain``; ``False`` (chain untouched) if the muxer had none."""
        try:
            bufs = collect(chain)
        except ChainError as e:
            return self._rx_unusable(chain.head, f"bad chain: {e}")
        if bufs.readable.length or bufs.writable.length < HDR_SIZE:
            return self._rx_unusable(chain.head, f"RX chain with {bufs.readable.length} readable and "
                                                 f"{bufs.writable.length} writable bytes")
        capacity = bufs.writable.length - HDR_SIZE
        payload = bufs.writable.slice(HDR_SIZE, capacity).views(self.mem) if capacity else []
        out = self.muxer.fill_rx(payload, capacity)
        if out is None:
            return False
        hdr, n = out
        bufs.writable.write(self.mem, hdr.pack())
        self.rxq.add_used(self.mem, chain.head, HDR_SIZE + n)
        self.metrics.rx_packets_count += 1
        return True

    def _rx_unusable(self, head: int, why: str) -> bool:
        self.metrics.rx_queue_event_fails += 1
        self.dev.guest_faults.report("vsock_rx", "vsock: unusable RX chain: %s", why)
        self.rxq.add_used(self.mem, head, 0)
        return True

    # -- events -------------------------------------------------------------

    def deliver_events(self) -> None:
        self.guarded(self._deliver_events)

    def _deliver_events(self) -> None:
        try:
            self._fill_events()
        finally:
            self.notify(EVENT_QUEUE)

    def _fill_events(self) -> None:
        while self.dev.reset_pending:
            chain = self.evq.pop(self.mem)
            if chain is None:
                if self.evq.enable_notification(self.mem):
                    continue
                return                             # the guest's next event buffer resumes us
            try:
                bufs = collect(chain)
                usable = not bufs.readable.length and bufs.writable.length >= EVENT_SIZE
            except ChainError:
                usable = False
            if not usable:
                self.metrics.ev_queue_event_fails += 1
                self.evq.add_used(self.mem, chain.head, 0)
                continue
            bufs.writable.write(self.mem, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_bytes(4, "little"))
            self.evq.add_used(self.mem, chain.head, EVENT_SIZE)
            self.dev.reset_pending = False

    # -- teardown -----------------------------------------------------------

    def on_stop(self) -> None:
        self.muxer.wake_rx = lambda: None
        self.act.gate.close()


__all__ = ["EVENT_QUEUE", "GuestPacket", "Header", "RX_QUEUE", "TX_QUEUE", "VsockHandler"]
