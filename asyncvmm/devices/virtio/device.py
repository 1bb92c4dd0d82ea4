"""What a virtio device is, as the transport sees it.

A device (block, rng, net ...) describes itself (``device_type``, queue
sizes, offered features, config space) and is started and stopped by its
transport:

* :meth:`VirtioDevice.activate` runs **on the asyncio loop** once the driver
  set DRIVER_OK and the transport validated the queues.  It receives an
  :class:`Activation`: guest memory, the live queues, their notification
  eventfds, the negotiated features, a :class:`DmaGate` and the
  :class:`Interrupts` it may raise.  The device's event handler adds its loop
  readers there.
* :meth:`VirtioDevice.deactivate` runs on the loop when the driver resets the
  device, before its status write completes; the transport then closes the
  gate, so nothing of the old activation can touch guest memory afterwards.
* :meth:`VirtioDevice.read_config` / ``write_config`` run on the loop too (a
  vCPU thread hands the access over and waits), so they must be quick.

Everything runs on the loop: a device needs no locks for its own state.  A
guest mistake the device ignores goes to :attr:`VirtioDevice.guest_faults`
(counted, logged a few times), never straight to the log.

A device reports a configuration change (e.g. a block device's new size) with
:meth:`VirtioDevice.config_changed`, which the transport turns into a
ConfigGeneration bump and a configuration-change interrupt.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol

from asyncvmm import guestfault
from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio.gate import DmaGate
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import VIRTIO_F_VERSION_1, bit
from asyncvmm.memory import GuestMemory

log = logging.getLogger(__name__)


class ActivationError(Exception):
    """A device could not start (a host failure while activating)."""


class Interrupts(Protocol):
    """The device's side of the transport's interrupt logic (§4.1.5.3-§4.1.5.4, §4.2.3.4)."""

    def signal_used(self, queue: int | None = None) -> None:
        """A used buffer notification for ``queue`` (virtio-mmio: InterruptStatus bit 0;
        virtio-pci: the queue's MSI-X vector).  ``None``: not said, so every queue's vector."""

    def signal_config(self) -> None:
        """A configuration change notification (InterruptStatus bit 1)."""

    def needs_reset(self, reason: str) -> None:
        """The driver broke the protocol: set DEVICE_NEEDS_RESET (§2.1.2)."""

    def irqfd(self, queue: int) -> int | None:
        """An eventfd whose write *is* ``queue``'s used buffer notification, delivered by KVM
        without the loop (virtio-pci: the queue's MSI-X vector's irqfd while it is enabled and
        unmasked; virtio-mmio: the device's line, InterruptStatus then reporting a used buffer
        until reset), for a back end outside the VMM (vhost) to signal; ``None`` where the
        transport must see each notification (a masked vector, a line without an irqfd):
        then the device relays each one through :meth:`signal_used`."""


@dataclass(eq=False)
class Activation:
    """Everything one activation of a device works with; dropped on reset."""

    mem: GuestMemory
    queues: list[Queue]
    queue_events: list[EventFd]
    acked_features: int
    interrupts: Interrupts
    loop: asyncio.AbstractEventLoop
    gate: DmaGate = field(default_factory=DmaGate)

    def has_feature(self, feature_bit: int) -> bool:
        return bool(self.acked_features & bit(feature_bit))


class VirtioDevice:
    """Base class: subclasses set the class attributes and implement the hooks."""

    device_type: int = 0
    queue_max_sizes: tuple[int, ...] = ()
    #: Where guest mistakes are reported; the transport sets the microVM's reporter.
    guest_faults: guestfault.GuestFaults = guestfault.DEFAULT

    def __init__(self) -> None:
        self._config_listener: Callable[[], None] | None = None

    @property
    def num_queues(self) -> int:
        return len(self.queue_max_sizes)

    @property
    def avail_features(self) -> int:
        """Feature bits offered to the driver; every device offers VIRTIO_F_VERSION_1."""
        return bit(VIRTIO_F_VERSION_1)

    # -- config space (loop) ------------------------------------------------

    #: The device-specific configuration (virtio-mmio: at 0x100 of the window);
    #: subclasses with one replace it whenever it changes, which the transport's
    #: watcher sees (virtio-mmio mirrors it in the page the guest reads).
    @property
    def _config(self) -> bytes:
        return self.__dict__.get("_config_bytes", b"")

    @_config.setter
    def _config(self, value: bytes) -> None:
        self.__dict__["_config_bytes"] = value
        watcher = self.__dict__.get("_config_watcher")
        if watcher is not None:
            watcher()

    def set_config_watcher(self, watcher: Callable[[], None] | None) -> None:
        """``watcher()`` runs after every replacement of the configuration bytes."""
        self.__dict__["_config_watcher"] = watcher

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device-specific configuration; past its end, zeros (and a cfg_fails)."""
        config = self._config
        if offset + size > len(config):
            self._count("cfg_fails")
            self.guest_faults.report("virtio_config", "%s: config read of %d bytes at %#x past the "
                                     "%d-byte config", type(self).__name__, size, offset, len(config))
        return config[offset:offset + size].ljust(size, b"\0")

    def _count(self, counter: str) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None and hasattr(metrics, counter):
            setattr(metrics, counter, getattr(metrics, counter) + 1)

    def write_config(self, offset: int, data: bytes) -> None:
        self.guest_faults.report("virtio_config", "%s: ignored write of %d bytes to config offset %#x",
                                 type(self).__name__, len(data), offset)

    def set_config_listener(self, listener: Callable[[], None] | None) -> None:
        self._config_listener = listener

    def config_changed(self) -> None:
        if self._config_listener is not None:
            self._config_listener()

    # -- lifecycle (loop) ---------------------------------------------------

    def activate(self, activation: Activation) -> None:
        raise NotImplementedError

    def deactivate(self) -> None:
        raise NotImplementedError

    def held_chains(self, queue_index: int) -> int:
        """Descriptor chains of ``queue_index`` the device popped and keeps unused on purpose
        (net's receive stock).  A snapshot rewinds the queue by them, so the restored device
        pops them again."""
        return 0

    def activation_failed(self, reason: str) -> None:
        """The transport could not activate (bad queue setup); count it."""
        self._count("activate_fails")
