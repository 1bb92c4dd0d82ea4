"""The PCI side of a microVM (``--enable-pci``): the bus, and each virtio device's KVM wiring.

The pieces are sans-I/O elsewhere (:mod:`asyncvmm.pci` for configuration
space, the bus and BAR bookkeeping; :mod:`asyncvmm.devices.virtio.pci` for
the transport); this module is their glue to KVM and to the VMM's buses,
built by :mod:`asyncvmm.builder` and used again for hot-plug:

* the configuration mechanisms: ECAM on the MMIO bus at
  ``layout.PCI_ECAM_START`` and CONFIG_ADDRESS/CONFIG_DATA on the loop-owned
  port bus (both reach the loop, which owns every function's state);
* per device: one eventfd per queue, bound by ``KVM_IOEVENTFD`` to the
  queue's notify address inside BAR0 (so a kick never exits to userspace),
  and one MSI-X vector per queue plus one for configuration changes, each an
  irqfd on its own GSI whose MSI route follows the guest's MSI-X table
  (:class:`asyncvmm.irqroute.MsiVectors`);
* BAR0 is placed by the VMM in the 64-bit window; the guest may move it
  (Linux does when it rescans the bus after a hot-plug).  A move is applied
  when the guest's configuration writes settle on a mapping: memory decoding
  on and a BAR inside a host-bridge window that overlaps no other BAR.  A
  BAR anywhere else is left unmapped and reported as a guest fault.

Everything here runs on the loop, like the devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

from .arch.x86_64 import layout
from .devices.bus import Bus, BusError
from .devices.irq import EventFd
from .devices.virtio.device import VirtioDevice
from .devices.virtio.pci import BAR0_SIZE, VirtioPciTransport
from .guestfault import GuestFaults
from .irqroute import GsiRouter, GsiRoutingError, MsiVectors
from .kvm import VmFd
from .memory import GuestMemory
from .pci.bars import BarAllocationError, BarSpace
from .pci.bus import PciBus, PciBusFullError, PciConfigIo, PciConfigMmio
from .pci.hostbridge import HostBridge

log = logging.getLogger(__name__)

#: The width of a notify write: Linux's virtio_pci writes the queue index as 16 bits.
NOTIFY_WRITE_LEN = 2


class PciSlotError(Exception):
    """A device cannot be put on (or taken off) the bus; the message is for the API client."""


@dataclasses.dataclass(eq=False)
class _Attached:
    """One device on the bus and everything of the host's it holds."""

    transport: VirtioPciTransport
    slot: int
    vectors: MsiVectors
    queue_events: list[EventFd]
    resources: contextlib.ExitStack
    mapped: int | None = None              # where BAR0 is on the MMIO bus now


class PciSlots:
    """Bus 0 of the microVM, its host bridge, and the virtio devices attached to it."""

    def __init__(self, vm: VmFd, mem: GuestMemory, mmio_bus: Bus, loop_pio_bus: Bus,
                 loop: asyncio.AbstractEventLoop, faults: GuestFaults, router: GsiRouter) -> None:
        self._vm, self._mem, self._mmio, self._loop = vm, mem, mmio_bus, loop
        self._faults, self._router = faults, router
        self.bus = PciBus(faults=faults)
        self.bus.add(HostBridge(), slot=0)
        mmio_bus.insert(layout.PCI_ECAM_START, layout.PCI_ECAM_BUS0_SIZE, PciConfigMmio(self.bus))
        loop_pio_bus.insert(layout.PCI_CONFIG_IO_PORT, layout.PCI_CONFIG_IO_SIZE, PciConfigIo(self.bus))
        ram_end = max(r.guest_addr + r.size for r in mem.regions)
        mmio64 = layout.pci_mmio64_window(ram_end)
        self.mmio32 = (layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - layout.PCI_MMIO32_START)
        self.mmio64 = mmio64
        self.space = BarSpace([self.mmio32, mmio64])
        self._attached: list[_Attached] = []

    @property
    def transports(self) -> list[VirtioPciTransport]:
        return [a.transport for a in self._attached]

    def slot_of(self, transport: VirtioPciTransport) -> int:
        return self._entry(transport).slot

    def _entry(self, transport: VirtioPciTransport) -> _Attached:
        for a in self._attached:
            if a.transport is transport:
                return a
        raise PciSlotError("Device not found")

    # -- attach / detach -------------------------------------------------------------

    def attach(self, device: VirtioDevice, *, slot: int | None = None) -> VirtioPciTransport:
        """Put ``device`` on the bus (the next free slot, or ``slot`` for a restore).

        Everything that can fail (no slot or BAR space, no GSI, a host refusing an eventfd or
        irqfd) raises :class:`PciSlotError` and leaves the bus as it was."""
        try:
            return self._attach(device, slot)
        except (OSError, ValueError, GsiRoutingError) as e:   # KvmError is an OSError
            raise PciSlotError(f"cannot attach {type(device).__name__}: {e}") from e

    def _attach(self, device: VirtioDevice, slot: int | None) -> VirtioPciTransport:
        with contextlib.ExitStack() as stack:
            events = []
            for _ in range(device.num_queues):
                evt = EventFd()
                stack.callback(evt.close)
                events.append(evt)
            vectors = MsiVectors(self._router, device.num_queues + 1, faults=self._faults)
            stack.callback(vectors.close)
            holder: list[_Attached] = []
            transport = VirtioPciTransport(
                device, mem=self._mem, queue_events=events, loop=self._loop, faults=self._faults,
                deliver=vectors.deliver,
                on_route_change=lambda v: self._route(holder[0], v),
                on_bar_change=lambda: self._remap(holder[0]), vector_eventfd=vectors.eventfd)
            try:
                base = self.space.allocate(BAR0_SIZE)
            except BarAllocationError as e:
                raise PciSlotError(f"no room for a BAR of {BAR0_SIZE:#x} bytes: {e}") from e
            stack.callback(self.space.free, base, BAR0_SIZE)
            transport.config.set_bar_address(0, base)
            try:
                slot = self.bus.add(transport, slot)
            except PciBusFullError as e:
                raise PciSlotError(str(e)) from e
            stack.callback(self.bus.remove, slot)
            entry = _Attached(transport, slot, vectors, events, contextlib.ExitStack())
            holder.append(entry)
            stack.callback(self._unmap, entry)
            entry.resources = stack.pop_all()
        self._attached.append(entry)
        log.debug("PCI 00:%02x.0: %s, BAR0 at %#x", slot, type(device).__name__, base)
        return transport

    def detach(self, transport: VirtioPciTransport) -> None:
        """Take a device off the bus: it stops, and its slot, GSIs and BAR space are free again."""
        entry = self._entry(transport)
        self._attached.remove(entry)
        try:
            _close_device(transport)
        finally:
            entry.resources.close()

    def close(self) -> None:
        while self._attached:
            entry = self._attached.pop()
            try:
                _close_device(entry.transport)
            finally:
                entry.resources.close()

    # -- the guest's configuration writes ---------------------------------------------

    def _route(self, entry: _Attached, vector: int) -> None:
        msix = entry.transport.msix
        address, data = msix.message(vector)
        # With MSI-X off a function sends no MSI at all: its irqfds are off KVM like masked ones.
        entry.vectors.route(vector, address, data, msix.masked(vector) or not msix.enabled)

    def _remap(self, entry: _Attached) -> None:
        new = entry.transport.bar_mapping()
        if new == entry.mapped:
            return
        self._unmap(entry)
        if new is None:
            return
        reason = self.space.check(entry, new, BAR0_SIZE)
        if reason is None:
            try:
                self._mmio.insert(new, BAR0_SIZE, entry.transport)
            except BusError as e:
                reason = str(e)
        if reason is not None:
            self._faults.report("pci_bar", "PCI 00:%02x.0: BAR0 at %#x not mapped: %s",
                                entry.slot, new, reason)
            return
        self.space.claim(entry, new, BAR0_SIZE)
        for queue, evt in enumerate(entry.queue_events):
            self._vm.register_ioeventfd(evt.fd, entry.transport.notify_address(new, queue),
                                        NOTIFY_WRITE_LEN)
        entry.mapped = new

    def _unmap(self, entry: _Attached) -> None:
        old, entry.mapped = entry.mapped, None
        if old is None:
            return
        for queue, evt in enumerate(entry.queue_events):
            self._vm.register_ioeventfd(evt.fd, entry.transport.notify_address(old, queue),
                                        NOTIFY_WRITE_LEN, deassign=True)
        self._mmio.remove(old)
        self.space.release(entry)

    # -- snapshots ------------------------------------------------------------------------

    def restored(self, transport: VirtioPciTransport) -> None:
        """After ``transport.restore_state``: its MSI routes and BAR mapping as the guest left them."""
        entry = self._entry(transport)
        for vector in range(len(entry.vectors)):
            self._route(entry, vector)
        self._remap(entry)


def _close_device(transport: VirtioPciTransport) -> None:
    """Stop the device and release its backend (file, tap, socket) as the mmio builder does."""
    device = transport.device
    getattr(device, "close", device.deactivate)()
