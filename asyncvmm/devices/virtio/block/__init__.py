"""virtio-block device."""

from asyncvmm.devices.virtio.block.device import Block, UnsupportedEngineError, check_async_engine
from asyncvmm.devices.virtio.block.disk import BlockFileError
from asyncvmm.devices.virtio.block.metrics import BlockMetrics

__all__ = ["Block", "BlockFileError", "BlockMetrics", "UnsupportedEngineError", "check_async_engine"]
