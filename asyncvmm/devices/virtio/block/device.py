"""The virtio-block device (§5.2): what the driver sees and what the API changes.

One request queue of 256 entries.  Offered features: VIRTIO_F_VERSION_1,
VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VIRTIO_BLK_F_SEG_MAX
(large requests in one chain), VIRTIO_BLK_F_RO for read-only drives and
VIRTIO_BLK_F_FLUSH for ``cache_type`` Writeback only, where a flush reaches
the disk (``fdatasync``) before it completes; with Unsafe the guest is told
there is no write cache and never flushes.

Config space (§5.2.4): ``le64 capacity`` (512-byte sectors), ``le32
size_max`` (0: not offered), ``le32 seg_max``.  Read on vCPU threads from an
immutable ``bytes`` replaced whole on a path swap, so a reader never sees a
half-updated capacity; ConfigGeneration covers the two 32-bit halves.

``io_engine`` Sync runs each request on the loop thread; Async hands them to
the kernel's io_uring.  A host whose io_uring cannot serve them (no
io_uring, ``kernel.io_uring_disabled``, seccomp, a kernel without the
operations) gets the drive refused with :class:`UnsupportedEngineError`,
as Firecracker refuses it: never a quiet fallback to something else.

API-facing methods run on the loop: :meth:`Block.update_path` (PATCH
``path_on_host``) and :meth:`Block.update_rate_limiter`.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Callable, Literal

from asyncvmm.devices.rate_limiter import RateLimiter, RateLimiterSpec
from asyncvmm.devices.virtio.block.disk import BackingFile, BlockFileError
from asyncvmm.devices.virtio.block.handler import BlockHandler
from asyncvmm.devices.virtio.block.metrics import BlockMetrics
from asyncvmm.devices.virtio.block.request import Disk
from asyncvmm.devices.virtio.block.uring import why_io_uring_unavailable
from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.spec import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    bit,
)

log = logging.getLogger(__name__)

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_FLUSH = 9

QUEUE_SIZE = 256
# A chain is at most QUEUE_SIZE descriptors (indirect tables included): header and status take two.
SEG_MAX = QUEUE_SIZE - 2
_CONFIG = struct.Struct("<QII")        # capacity, size_max, seg_max

CacheType = Literal["Unsafe", "Writeback"]
IoEngine = Literal["Sync", "Async"]


class UnsupportedEngineError(Exception):
    """The host cannot run the requested ``io_engine`` (Async needs io_uring)."""


def check_async_engine() -> None:
    """Raise :class:`UnsupportedEngineError` unless this host's io_uring can serve Async drives."""
    why = why_io_uring_unavailable()
    if why is not None:
        raise UnsupportedEngineError(f"Unsupported io_engine Async: it needs io_uring, which this host "
                                     f"does not provide ({why})")


class Block(VirtioDevice):
    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, drive_id: str, path: str, *, read_only: bool, is_root_device: bool = False,
                 partuuid: str | None = None, cache_type: CacheType = "Unsafe",
                 io_engine: IoEngine = "Sync", rate_limiter: RateLimiter | None = None,
                 metrics: BlockMetrics | None = None,
                 fdatasync: Callable[[int], None] = os.fdatasync,
                 async_depth: int = 64) -> None:
        super().__init__()
        if cache_type not in ("Unsafe", "Writeback"):
            raise ValueError(f"cache_type {cache_type!r}")
        if io_engine not in ("Sync", "Async"):
            raise ValueError(f"io_engine {io_engine!r}")
        if io_engine == "Async":
            check_async_engine()
        self.drive_id = drive_id
        self.read_only = read_only
        self.is_root_device = is_root_device
        self.partuuid = partuuid
        self.cache_type = cache_type
        self.io_engine = io_engine
        self.rate_limiter = rate_limiter or RateLimiter()
        self.metrics = metrics or BlockMetrics()
        self.fdatasync = fdatasync
        self.async_depth = async_depth
        self.file = BackingFile(path, read_only=read_only)
        self.handler: BlockHandler | None = None
        self._refresh()

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def avail_features(self) -> int:
        features = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                    | bit(VIRTIO_BLK_F_SEG_MAX))
        if self.read_only:
            features |= bit(VIRTIO_BLK_F_RO)
        if self.cache_type == "Writeback":
            features |= bit(VIRTIO_BLK_F_FLUSH)
        return features

    def _refresh(self) -> None:
        self.disk = Disk(capacity=self.file.capacity, read_only=self.read_only,
                         flush=self.cache_type == "Writeback")
        self._config = _CONFIG.pack(self.file.capacity, 0, SEG_MAX)

    # -- config space (vCPU threads) ----------------------------------------

    def write_config(self, offset: int, data: bytes) -> None:
        # Nothing in this config is writable (no VIRTIO_BLK_F_CONFIG_WCE).
        self.metrics.cfg_fails += 1
        super().write_config(offset, data)

    # -- lifecycle (loop) ---------------------------------------------------

    def activate(self, activation: Activation) -> None:
        if not activation.queues[0].ready:
            raise ActivationError(f"block {self.drive_id}: request queue not ready")
        self.deactivate()
        self.handler = BlockHandler(self, activation)
        self.handler.start()

    def deactivate(self) -> None:
        if self.handler is not None:
            self.handler.stop()
            self.handler = None

    def close(self) -> None:
        self.deactivate()
        self.file.retire()

    # -- API updates (loop) -------------------------------------------------

    def update_path(self, new_path: str) -> None:
        """Swap the backing file; the guest sees the new size and a config interrupt.

        Raises :class:`BlockFileError` (the old file stays) when the new one
        cannot be opened.  Operations in flight finish on the old file.
        """
        try:
            new = BackingFile(new_path, read_only=self.read_only)
        except BlockFileError:
            self.metrics.update_fails += 1
            raise
        old, self.file = self.file, new
        old.retire()
        self._refresh()
        self.metrics.update_count += 1
        self.config_changed()

    def update_rate_limiter(self, spec: RateLimiterSpec) -> None:
        """PATCH semantics: absent buckets stay, zero-size buckets are disabled."""
        self.rate_limiter.update_from_config(spec)
        self.metrics.update_count += 1
        if self.handler is not None:
            self.handler.rate_limiter_updated()
