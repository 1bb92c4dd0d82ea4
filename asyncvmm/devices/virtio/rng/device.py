"""The virtio entropy device (§5.4): one request queue, no features, no config.

Randomness comes from ``random_bytes`` (``os.urandom``, i.e. getrandom(2),
unless a test injects a source).
"""

from __future__ import annotations

import os
from typing import Callable

from asyncvmm.devices.rate_limiter import RateLimiter
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.rng.handler import RngHandler
from asyncvmm.devices.virtio.rng.metrics import EntropyMetrics
from asyncvmm.devices.virtio.spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_ID_RNG, bit

QUEUE_SIZE = 256


class Rng(VirtioDevice):
    device_type = VIRTIO_ID_RNG
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, rate_limiter: RateLimiter | None = None, metrics: EntropyMetrics | None = None,
                 *, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        super().__init__()
        self.rate_limiter = rate_limiter or RateLimiter()
        self.metrics = metrics or EntropyMetrics()
        self.random_bytes = random_bytes
        self.handler: RngHandler | None = None

    @property
    def avail_features(self) -> int:
        return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX)

    def activate(self, activation: Activation) -> None:
        if not activation.queues[0].ready:
            raise ActivationError("entropy: request queue not ready")
        self.deactivate()
        self.handler = RngHandler(self, activation)
        self.handler.start()

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None
