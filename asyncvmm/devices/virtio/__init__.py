"""virtio core: split virtqueues, the virtio-mmio transport, and the devices built on them.

A guest kick walks: ioeventfd -> loop reader (``handler``) -> ``queue`` pop ->
``chain`` walk -> device logic -> used ring -> irqfd via the ``mmio`` transport.
"""

from asyncvmm.devices.virtio.device import Activation, ActivationError, VirtioDevice
from asyncvmm.devices.virtio.mmio import VirtioMmioTransport
from asyncvmm.devices.virtio.queue import Queue, QueueConfigError, QueueContractError

__all__ = [
    "Activation", "ActivationError", "Queue", "QueueConfigError", "QueueContractError",
    "VirtioDevice", "VirtioMmioTransport",
]
