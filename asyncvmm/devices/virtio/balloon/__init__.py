"""virtio-balloon device."""

from asyncvmm.devices.virtio.balloon.device import Balloon, BalloonError
from asyncvmm.devices.virtio.balloon.metrics import BalloonMetrics

__all__ = ["Balloon", "BalloonError", "BalloonMetrics"]
