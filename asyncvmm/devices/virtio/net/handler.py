"""The loop side of one virtio-net activation: the tap, both queues, the MMDS, the limiters.

The decisions live in two sans-I/O objects, :class:`TxPath` and
:class:`RxPath`; this handler is their I/O glue -- the only code here that
touches the tap's fd, the loop's readers, writers and timers, or the MMDS
stack -- and it carries out what they decide.

Transmit (queue 1, per kick): for every available chain :class:`TxPath`
returns effects (the base class's mechanism, see
:mod:`asyncvmm.devices.virtio.handler`): parsed (:func:`parse_tx`) and
charged to the TX rate limiter, a frame becomes :class:`WriteTap` (gathered
straight from guest memory into the tap with one ``writev``) or
:class:`ToMmds` (addressed to the MMDS, on an interface listed in
``mmds_config``), followed by ``Used(head, 0)``; one interrupt per batch.  A
throttled chain (:class:`Throttled`) goes back to the ring until the throttle
timer fires; a full tap (EAGAIN) puts it back, with its tokens, until the tap
is writable.  A malformed chain or a failed tap write costs that frame only
(counted), never the device.

Receive: frames come from the MMDS stack first, then from the tap, whose fd
is a loop reader *only while the guest can take frames*.  Each frame is read
into one host buffer and handed to :class:`RxPath`: a frame with nothing to
decide (no limiter, no offload to refuse, room in the next buffer) is placed
at once (:meth:`RxPath.place`); any other is held, charged to the RX rate
limiter and copied into the guest's chains (:class:`RxBuffers`).
When the guest has no room, or the limiter is empty, the frame is *held*
and the tap reader removed: later frames wait in the tap's own queue, so
nothing is dropped or reordered here (back-pressure).  RxPath answers with an
:class:`RxState`; the used entries go into guest memory as it places a frame
(a merged frame's entries must be published together), and the pump raises
one interrupt per batch.  An RX kick (new buffers), the throttle timer, or an MMDS
retransmission deadline resumes receiving.

Errors, as the three kinds of STYLE.md: a bad chain or frame is counted and
answered (used length 0); a broken ring stops the device with
DEVICE_NEEDS_RESET (the base class); a tap failure is counted and, for reads,
retried after :data:`TAP_RETRY_S`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.chain import DescriptorChain
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Drain, Effect, QueueHandler
from asyncvmm.devices.virtio.net.header import (ETH_HLEN, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_GUEST_CSUM,
                                                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                                                VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MRG_RXBUF,
                                                VNET_HDR_SIZE)
from asyncvmm.devices.virtio.net.rx import RxPath, RxState
from asyncvmm.devices.virtio.net.tx import Throttled, ToMmds, TxPacket, TxPath, WriteTap

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.net.device import Net

log = logging.getLogger(__name__)

# After a failed tap read, wait this long before reading again, so a tap
# that keeps failing (e.g. EBADFD after the interface was deleted) does not
# spin the loop.
TAP_RETRY_S = 0.1
GUEST_GSO_FEATURES = (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO)
# The earliest an MMDS retransmission timer may fire again: a floor against
# a deadline that is already past.
MMDS_TIMER_MIN_S = 0.001


class NetHandler(QueueHandler):
    def __init__(self, device: "Net", act: Activation) -> None:
        super().__init__(act, f"net {device.iface_id}")
        self.dev = device
        self.tap = device.tap
        self.mmds = device.mmds
        self.metrics = device.metrics
        self.rxq = act.queues[RX_QUEUE]
        self.txq = act.queues[TX_QUEUE]
        self.tx = TxPath(self.txq, device.tx_rate_limiter, self.metrics,
                         is_mmds_frame=self.mmds.is_mmds_frame if self.mmds is not None else None,
                         guest_mac=lambda: device.mac if device.guest_mac_configured else None)
        self.rx = RxPath(self.rxq, device.rx_rate_limiter, self.metrics,
                         mergeable=act.has_feature(VIRTIO_NET_F_MRG_RXBUF),
                         guest_csum=act.has_feature(VIRTIO_NET_F_GUEST_CSUM),
                         guest_gso=any(act.has_feature(f) for f in GUEST_GSO_FEATURES))
        self._rxview = memoryview(device.rx_buffer)   # frames are slices of it: one view, not one per frame
        self.reading = False                      # the tap fd is a loop reader
        self._waiting_writable = False
        self.rx_timer = ThrottleTimer(act.loop, device.rx_rate_limiter, self._on_rx_timer)
        self.tx_timer = ThrottleTimer(act.loop, device.tx_rate_limiter, self._on_tx_timer)
        self._tap_retry: asyncio.TimerHandle | None = None
        self._mmds_timer: asyncio.TimerHandle | None = None
        self._mmds_deadline: float | None = None

    # -- queue events -------------------------------------------------------

    def process(self, index: int) -> Drain | None:
        if index == RX_QUEUE:
            self.guarded(self._pump_rx)
            return None
        result = super().process(index)
        if self.mmds is not None and not self.stopped:
            # Frames the guest sent to the MMDS usually have answers now; if
            # not, they may have moved the stack's retransmission deadline.
            if self.mmds.has_pending():
                self.guarded(self._pump_rx)
            else:
                self._arm_mmds_timer()
        return result

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        if queue_index == RX_QUEUE:
            self.metrics.rx_queue_event_count += 1
            return
        self.metrics.tx_queue_event_count += 1
        if chains == 0 and not self.tx_timer.armed and not self._waiting_writable:
            self.metrics.no_tx_avail_buffer += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    # -- transmit -----------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        return self.tx.chain(self.mem, chain)

    def perform(self, queue_index: int, effect: Effect) -> bool:
        """The TX effects' I/O: the tap, the MMDS stack, the throttle timer."""
        if isinstance(effect, WriteTap):
            return self._write_tap(effect.pkt)
        if isinstance(effect, ToMmds):
            pkt = effect.pkt
            if self.mmds.handle_guest_frame(pkt.frame(), csum_offloaded=pkt.needs_csum):
                self.tx.sent(pkt, to_tap=False)
                return True
            return self._write_tap(pkt)            # the stack declined it: an ordinary frame
        if isinstance(effect, Throttled):
            self.tx_timer.arm()
            return False
        return super().perform(queue_index, effect)

    def _write_tap(self, pkt: TxPacket) -> bool:
        try:
            written = self.tap.writev(pkt.views)
        except OSError as e:
            log.debug("%s: tap write failed: %s", self.name, e)
            self.tx.write_failed(pkt)
            return True                            # dropped: the chain is still answered
        if written is None:                        # the tap's queue is full: wait, keep the frame
            self.tx.would_block(pkt)
            self._wait_writable()
            return False
        self.tx.sent(pkt, to_tap=True)
        return True

    def _wait_writable(self) -> None:
        if not self._waiting_writable:
            self.loop.add_writer(self.tap.fileno(), self._on_tap_writable)
            self._waiting_writable = True

    def _on_tap_writable(self) -> None:
        self.loop.remove_writer(self.tap.fileno())
        self._waiting_writable = False
        self.process(TX_QUEUE)

    def _on_tx_timer(self) -> None:
        self.metrics.tx_rate_limiter_event_count += 1
        self.process(TX_QUEUE)

    # -- receive ------------------------------------------------------------

    def _on_tap_readable(self) -> None:
        self.metrics.rx_tap_event_count += 1
        self.guarded(self._pump_rx)

    def _on_rx_timer(self) -> None:
        self.metrics.rx_event_rate_limiter_count += 1
        self.guarded(self._pump_rx)

    @property
    def held(self) -> memoryview | None:
        """The frame taken in for the guest and not yet delivered (back-pressure)."""
        return self.rx.held

    def _pump_rx(self) -> None:
        """Deliver frames until there are none, or the guest or the limiter says wait."""
        full_budget = self.BATCH_PER_WAKEUP_FACTOR * self.rxq.size
        budget = full_budget
        state = RxState.READY
        rx, mem = self.rx, self.mem
        while budget:
            if rx.held is None:
                if not rx.can_take():
                    # Receiving was going on (not merely waiting for the first buffers)?
                    state = rx.ready(mem, receiving=self.reading or budget < full_budget)
                    if state is not RxState.READY:
                        break
                frame = self._next_frame()
                if frame is None:
                    break
                if rx.place(mem, frame):          # the usual frame: placed, nothing to decide
                    budget -= 1
                    continue
                rx.hold(frame)
            state = rx.deliver(mem)
            if state is not RxState.READY:
                break
            budget -= 1
        if state is RxState.THROTTLED:
            self.rx_timer.arm()
        stalled = state is not RxState.READY
        self.notify(RX_QUEUE)
        self._set_reading(not stalled and self._tap_retry is None)
        if not budget:
            self.schedule(RX_QUEUE)
        if not stalled:
            self._arm_mmds_timer()

    def _next_frame(self) -> memoryview | None:
        """The next frame for the guest, header included: MMDS first, then the tap."""
        if self.mmds is not None and self.mmds.has_pending():
            frames = self.mmds.pop_frames_for_guest(1)
            if frames:
                buf = bytearray(VNET_HDR_SIZE + len(frames[0]))   # a zero header: no offloads
                buf[VNET_HDR_SIZE:] = frames[0]
                self.metrics.rx_count += 1
                return memoryview(buf)
        if self._tap_retry is not None:
            return None
        while True:
            try:
                n = self.tap.read_into(self._rxview)
            except OSError as e:
                self._tap_read_failed(e)
                return None
            if n is None:
                return None
            if n < VNET_HDR_SIZE + ETH_HLEN:
                self.metrics.rx_fails += 1            # a runt: nothing the guest could use
                continue
            self.metrics.rx_count += 1
            return self._rxview[:n]

    def _tap_read_failed(self, err: OSError) -> None:
        self.metrics.tap_read_fails += 1
        log.warning("%s: tap read failed: %s; retrying in %.1fs", self.name, err, TAP_RETRY_S)
        self._tap_retry = self.loop.call_later(TAP_RETRY_S, self._on_tap_retry)

    def _on_tap_retry(self) -> None:
        self._tap_retry = None
        self.guarded(self._pump_rx)

    def _set_reading(self, on: bool) -> None:
        if on == self.reading or self.stopped:
            return
        if on:
            self.loop.add_reader(self.tap.fileno(), self._on_tap_readable)
        else:
            self.loop.remove_reader(self.tap.fileno())
        self.reading = on

    def _arm_mmds_timer(self) -> None:
        """A loop timer for the MMDS stack's next retransmission, if it has one."""
        deadline = self.mmds.next_deadline() if self.mmds is not None else None
        if deadline == self._mmds_deadline and (deadline is None or self._mmds_timer is not None):
            return
        self._cancel_mmds_timer()
        if deadline is not None and not self.stopped:
            delay = max(MMDS_TIMER_MIN_S, deadline - self.mmds.clock())
            self._mmds_timer = self.loop.call_later(delay, self._on_mmds_timer)
            self._mmds_deadline = deadline

    def _cancel_mmds_timer(self) -> None:
        if self._mmds_timer is not None:
            self._mmds_timer.cancel()
        self._mmds_timer = None
        self._mmds_deadline = None

    def _on_mmds_timer(self) -> None:
        self._mmds_timer = None
        self._mmds_deadline = None
        self.guarded(self._pump_rx)

    # -- updates and teardown -----------------------------------------------

    def rate_limiter_updated(self) -> None:
        """New buckets start full: whatever waited on a limiter may go on now."""
        if self.rx_timer.armed:
            self.rx_timer.cancel()
            self.schedule(RX_QUEUE)
        if self.tx_timer.armed:
            self.tx_timer.cancel()
            self.schedule(TX_QUEUE)

    def halt(self) -> None:
        # A device that needs a reset halts inside the gate and waits for the
        # reset; its tap reader must go now, or a readable tap spins the loop.
        super().halt()
        self._release_io()

    def _release_io(self) -> None:
        self.rx_timer.cancel()
        self.tx_timer.cancel()
        self._cancel_mmds_timer()
        if self._tap_retry is not None:
            self._tap_retry.cancel()
            self._tap_retry = None
        if self.reading:
            self.loop.remove_reader(self.tap.fileno())
            self.reading = False
        if self._waiting_writable:
            self.loop.remove_writer(self.tap.fileno())
            self._waiting_writable = False

    def on_stop(self) -> None:
        self._release_io()
        # After a guest reset the gate is already closed; on VMM teardown this
        # makes sure nothing of this activation touches guest memory again.
        self.act.gate.close()
