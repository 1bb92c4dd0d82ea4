"""The loop side of one virtio-rng activation (§5.4.6).

Each chain must be device-writable only; the device fills up to
:data:`MAX_BYTES_PER_REQUEST` of it with host randomness (§5.4.6.2 allows
using less than the whole buffer) and returns the count as the used length.
The rate limiter charges one op plus the bytes; a refused chain goes back
to the ring until the throttle timer fires.  A chain that cannot be used
(readable parts, bad descriptors) or a failing host source is answered with
used length 0 and counted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import QueueHandler

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.rng.device import Rng

# Linux asks for a few dozen bytes at a time; a bound keeps one huge buffer
# from stalling the loop in getrandom.
MAX_BYTES_PER_REQUEST = 64 * 1024


class RngHandler(QueueHandler):
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

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> bool:
        try:
            bufs = collect(chain)
        except ChainError:
            return self._unusable(chain.head)
        if bufs.readable.length:
            return self._unusable(chain.head)
        n = min(bufs.writable.length, MAX_BYTES_PER_REQUEST)
        if n and not self.dev.rate_limiter.consume_request(n):
            self.metrics.entropy_rate_limiter_throttled += 1
            self.timer.arm()
            return False
        data = b""
        if n:
            try:
                data = self.dev.random_bytes(n)
            except OSError:
                self.metrics.host_rng_fails += 1
        written = bufs.writable.write(self.mem, data)
        self.metrics.entropy_bytes += written
        self.queue.add_used(self.mem, chain.head, written)
        return True

    def _unusable(self, head: int) -> bool:
        self.metrics.entropy_event_fails += 1
        self.queue.add_used(self.mem, head, 0)
        return True

    def _on_throttle_timer(self) -> None:
        self.metrics.rate_limiter_event_count += 1
        self.process(0)

    def on_stop(self) -> None:
        self.timer.cancel()
