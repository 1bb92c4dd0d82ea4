"""The loop side of one virtio-rng activation (§5.4.6).

Each chain must be device-writable only; the device fills up to
:data:`MAX_BYTES_PER_REQUEST` of it with host randomness (§5.4.6.2 allows
using less than the whole buffer) and returns the count as the used length.
The rate limiter charges one op plus the bytes; a refused chain goes back
to the ring until the throttle timer fires.  A chain that cannot be used
(readable parts, bad descriptors) or a failing host source is answered with
used length 0 and counted.

:meth:`RngHandler.handle_chain` only decides (the base class's effects): an
unusable chain is ``Used(head, 0)``, a refused one :class:`Throttled`, and a
good one :class:`FillRandom`, whose :meth:`RngHandler.perform` reads the host
source, writes the bytes and answers the chain with the count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, Segments, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Effect, ThrottledQueueHandler, Used

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.rng.device import Rng

# Linux asks for a few dozen bytes at a time; a bound keeps one huge buffer
# from stalling the loop in getrandom.
MAX_BYTES_PER_REQUEST = 64 * 1024


@dataclass(slots=True)
class FillRandom(Effect):
    """Fill ``nbytes`` of ``segments`` from the host source, then answer chain ``head``."""

    head: int
    segments: Segments
    nbytes: int


@dataclass(slots=True)
class Throttled(Effect):
    """The limiter refused the request: arm the throttle timer and stall."""


class RngHandler(ThrottledQueueHandler):
    def __init__(self, device: "Rng", act: Activation) -> None:
        super().__init__(act, "entropy")
        self.dev = device
        self.metrics = device.metrics
        self.queue = act.queues[0]
        self.timer = ThrottleTimer(act.loop, device.rate_limiter, self._on_throttle_timer)

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.entropy_event_count += 1

    def on_event_failure(self) -> None:
        self.metrics.entropy_event_fails += 1

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        try:
            bufs = collect(chain)
        except ChainError:
            return self._unusable(chain.head)
        if bufs.readable.length:
            return self._unusable(chain.head)
        n = min(bufs.writable.length, MAX_BYTES_PER_REQUEST)
        if n and not self.dev.rate_limiter.consume_request(n):
            self.metrics.entropy_rate_limiter_throttled += 1
            return [Throttled()]
        return [FillRandom(chain.head, bufs.writable, n)]

    def _unusable(self, head: int) -> list[Effect]:
        self.metrics.entropy_event_fails += 1
        return [Used(head, 0)]

    def perform(self, queue_index: int, effect: Effect) -> bool:
        if isinstance(effect, FillRandom):
            data = b""
            if effect.nbytes:
                try:
                    data = self.dev.random_bytes(effect.nbytes)
                except OSError:
                    self.metrics.host_rng_fails += 1
            written = effect.segments.write(self.mem, data)
            self.metrics.entropy_bytes += written
            return self.carry_out(queue_index, [Used(effect.head, written)])
        if isinstance(effect, Throttled):
            self.timer.arm()
            return False
        return super().perform(queue_index, effect)

    def on_stop(self) -> None:
        self.timer.cancel()
