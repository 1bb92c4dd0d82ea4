"""virtio-vsock device on Firecracker's hybrid Unix-socket backend."""

from asyncvmm.devices.virtio.vsock.device import Vsock
from asyncvmm.devices.virtio.vsock.metrics import VsockMetrics
from asyncvmm.devices.virtio.vsock.muxer import VsockBackendError

__all__ = ["Vsock", "VsockBackendError", "VsockMetrics"]
