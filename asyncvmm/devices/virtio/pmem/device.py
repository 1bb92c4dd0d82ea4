"""The virtio persistent-memory device (virtio 1.2 §5.19): one request queue, a 16-byte config.

The guest reaches the memory itself through a guest-physical region (where a
host file is mapped, see :mod:`asyncvmm.pmemslots`); the device only tells
the driver where that region is (the config space, §5.19.4: ``le64 start;
le64 size``) and answers flush requests (§5.19.6).  This class holds no file
and no mapping: ``flush`` is injected and returns whether the backing store
confirmed the write-back (the glue calls msync(MS_SYNC)), so the device runs
on a ``bytearray`` in tests.

A flush is charged to the rate limiter as one op and ``file_len`` bytes (the
whole file is written back each time), once per group of requests answered
by one write-back.
"""

from __future__ import annotations

import struct
from typing import Callable

import msgspec

from asyncvmm.devices.rate_limiter import RateLimiter
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.pmem.handler import PmemHandler
from asyncvmm.devices.virtio.pmem.metrics import PmemMetrics
from asyncvmm.devices.virtio.spec import VIRTIO_ID_PMEM

QUEUE_SIZE = 256
_CONFIG = struct.Struct("<QQ")      # struct virtio_pmem_config { le64 start; le64 size; }


class PmemState(msgspec.Struct, forbid_unknown_fields=True, tag="pmem-v1"):
    """Where the region was in guest-physical memory: a restored guest's driver still uses it."""

    start: int
    size: int


class Pmem(VirtioDevice):
    device_type = VIRTIO_ID_PMEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, pmem_id: str, *, start: int, size: int, file_len: int,
                 flush: Callable[[], bool], read_only: bool = False, root_device: bool = False,
                 rate_limiter: RateLimiter | None = None,
                 metrics: PmemMetrics | None = None) -> None:
        super().__init__()
        self.id = pmem_id
        self.start = start
        self.size = size
        self.file_len = file_len
        self.flush = flush
        self.read_only = read_only
        self.root_device = root_device
        self.rate_limiter = rate_limiter or RateLimiter()
        self.metrics = metrics or PmemMetrics()
        self._config = _CONFIG.pack(start, size)
        self.handler: PmemHandler | None = None

    def activate(self, activation: Activation) -> None:
        if not activation.queues[0].ready:
            raise ActivationError("pmem: request queue not ready")
        self.deactivate()
        self.handler = PmemHandler(self, activation)
        self.handler.start()

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None

    def update_rate_limiter(self, spec) -> None:
        """PATCH /pmem: new buckets (a bucket the update does not name stays)."""
        self.rate_limiter.update_from_config(spec)
        if self.handler is not None:
            self.handler.rate_limiter_updated()

    def save_state(self) -> PmemState:
        return PmemState(start=self.start, size=self.size)
