"""GSI routing for MSI(-X): the VM's whole KVM routing table, and the irqfds of one device.

KVM turns a GSI into an interrupt through its routing table.  At
``KVM_CREATE_IRQCHIP`` the table holds KVM's defaults: GSIs 0..15 go to both
the 8259 PICs (master pins 0..7, slave pins 8..15) and the IOAPIC pin of the
same number, GSIs 16..23 to the IOAPIC only.  ``KVM_SET_GSI_ROUTING``
*replaces* the table, so every commit here sends those defaults again
together with the MSI routes (one per MSI-X vector, on GSIs from
``GSI_MSI_START``); forgetting them would silence the UART, the i8042 and
every virtio-mmio device.

:class:`RoutingTable` is the sans-I/O core: GSI allocation and the staged
routes, nothing else.  :class:`GsiRouter` adds the one ioctl (``commit``).
:class:`MsiVectors` is the I/O glue of one PCI function: an eventfd +
``KVM_IRQFD`` per vector on its own GSI, so a device interrupt is one eventfd
write and KVM injects the MSI without a trip through userspace.

An MSI address must fall in the local APIC's window 0xFEE0_0000..0xFEEF_FFFF
(Intel SDM vol. 3, 11.11.1 "Message Address Register Format"); any other
address is not routed at all and is reported as a guest fault.  Everything
here runs on the loop thread (the MSI-X model is loop-owned).
"""

from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass
from typing import Sequence

from asyncvmm import guestfault
from asyncvmm.arch.x86_64.layout import GSI_MSI_END, GSI_MSI_START, IRQ_LAST
from asyncvmm.devices.irq import EventFd
from asyncvmm.kvm import KvmError, VmFd
from asyncvmm.kvm import structs as s
from asyncvmm.kvm.ioctls import KVM_CAP_IRQ_ROUTING

log = logging.getLogger(__name__)

MSI_ADDRESS_START = 0xFEE0_0000     # SDM 11.11.1: bits 31:20 of an MSI address are 0xFEE
MSI_ADDRESS_END = 0xFEEF_FFFF

#: KVM_MAX_IRQ_ROUTES on x86 (what KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) reports): the most
#: entries one KVM_SET_GSI_ROUTING takes, the KVM defaults included.
KVM_MAX_IRQ_ROUTES = GSI_MSI_END + 1

#: The guest-fault kind of an MSI-X message with an address outside the LAPIC window.
FAULT_KIND = "msi_address"


class GsiRoutingError(Exception):
    """GSI allocation or a routing commit failed (the message says which GSI or what KVM said)."""


@dataclass(frozen=True)
class IrqchipRoute:
    """A GSI wired to a pin of an in-kernel interrupt controller (``KVM_IRQ_ROUTING_IRQCHIP``)."""
    gsi: int
    irqchip: int        # KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """A GSI that sends one MSI message (``KVM_IRQ_ROUTING_MSI``)."""
    gsi: int
    address: int
    data: int


def default_routes() -> list[IrqchipRoute]:
    """KVM's own table after ``KVM_CREATE_IRQCHIP`` (x86): ISA GSIs on PIC and IOAPIC, the rest IOAPIC."""
    routes = []
    for gsi in range(IRQ_LAST + 1):
        if gsi < 16:
            chip = s.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else s.KVM_IRQCHIP_PIC_SLAVE
            routes.append(IrqchipRoute(gsi, chip, gsi % 8))
        routes.append(IrqchipRoute(gsi, s.KVM_IRQCHIP_IOAPIC, gsi))
    return routes


def valid_msi_address(address: int) -> bool:
    return MSI_ADDRESS_START <= address <= MSI_ADDRESS_END


def to_kvm_entries(routes: Sequence[IrqchipRoute | MsiRoute]) -> list[s.kvm_irq_routing_entry]:
    entries = []
    for r in routes:
        e = s.kvm_irq_routing_entry(gsi=r.gsi)
        if isinstance(r, MsiRoute):
            e.type = s.KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo = r.address & 0xFFFF_FFFF
            e.u.msi.address_hi = r.address >> 32
            e.u.msi.data = r.data
        else:
            e.type = s.KVM_IRQ_ROUTING_IRQCHIP
            e.u.irqchip.irqchip = r.irqchip
            e.u.irqchip.pin = r.pin
        entries.append(e)
    return entries


class RoutingTable:
    """GSI allocation in ``[first, last]`` and the staged MSI routes; no I/O.

    At most ``max_routes`` routes in all: KVM refuses a longer table, so no
    more GSIs are handed out than the defaults leave room for (a table of
    every allocated GSI routed always fits).  ``dirty`` says whether the
    staged table differs from the last one committed.
    """

    def __init__(self, *, first: int = GSI_MSI_START, last: int = GSI_MSI_END,
                 max_routes: int = KVM_MAX_IRQ_ROUTES) -> None:
        if not IRQ_LAST < first <= last:
            raise ValueError(f"MSI GSIs {first}..{last} must follow the IOAPIC pins 0..{IRQ_LAST}")
        self.first, self.last = first, last
        self._defaults = default_routes()
        self.max_routes = max_routes
        self._next = first                   # never handed out yet from here on
        self._freed: list[int] = []          # heap: released GSIs, lowest reused first
        self._allocated: set[int] = set()
        self._msi: dict[int, MsiRoute] = {}
        self.dirty = False

    def allocate(self) -> int:
        """The lowest free GSI; :class:`GsiRoutingError` when all are taken."""
        if len(self._defaults) + len(self._allocated) >= self.max_routes:
            raise GsiRoutingError(f"no free GSI left for MSI: {len(self._allocated)} MSI GSIs and "
                                  f"{len(self._defaults)} default routes fill KVM's "
                                  f"{self.max_routes}-route table")
        if self._freed:
            gsi = heapq.heappop(self._freed)
        elif self._next <= self.last:
            gsi = self._next
            self._next += 1
        else:
            raise GsiRoutingError(f"no free GSI left for MSI (GSIs {self.first}..{self.last} taken)")
        self._allocated.add(gsi)
        return gsi

    def release(self, gsi: int) -> None:
        """Free ``gsi``; its route, if any, is dropped (staged)."""
        self._check(gsi)
        self.clear(gsi)
        self._allocated.remove(gsi)
        heapq.heappush(self._freed, gsi)

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Stage an MSI route on an allocated GSI."""
        self._check(gsi)
        route = MsiRoute(gsi, address, data)
        if self._msi.get(gsi) != route:
            self._msi[gsi] = route
            self.dirty = True

    def clear(self, gsi: int) -> None:
        """Stage "no route" for an allocated GSI: its irqfd, if any, then injects nothing."""
        self._check(gsi)
        if self._msi.pop(gsi, None) is not None:
            self.dirty = True

    def route(self, gsi: int) -> MsiRoute | None:
        return self._msi.get(gsi)

    def routes(self) -> list[IrqchipRoute | MsiRoute]:
        """The whole table as KVM must hold it: the defaults, then the MSI routes by GSI."""
        return [*self._defaults, *(self._msi[g] for g in sorted(self._msi))]

    def _check(self, gsi: int) -> None:
        if gsi not in self._allocated:
            raise GsiRoutingError(f"GSI {gsi} is not allocated for MSI")


class GsiRouter(RoutingTable):
    """The routing table of one VM with an in-kernel irqchip; :meth:`commit` installs it."""

    def __init__(self, vm: VmFd, *, first: int = GSI_MSI_START, last: int = GSI_MSI_END,
                 max_routes: int = KVM_MAX_IRQ_ROUTES) -> None:
        super().__init__(first=first, last=last, max_routes=max_routes)
        self.vm = vm
        self._kvm_limit = vm.check_extension(KVM_CAP_IRQ_ROUTING)    # KVM_MAX_IRQ_ROUTES

    def commit(self) -> None:
        """One ``KVM_SET_GSI_ROUTING`` with the staged table, if it changed since the last one.

        On failure KVM keeps the previous table; the staged one stays staged.
        """
        if not self.dirty:
            return
        routes = self.routes()
        try:
            self.vm.set_gsi_routing(to_kvm_entries(routes))
        except KvmError as e:
            limit = self._kvm_limit       # asked at construction: the loop's seccomp filter
            raise GsiRoutingError(          # does not allow KVM_CHECK_EXTENSION at run time
                f"KVM_SET_GSI_ROUTING refused the table of {len(routes)} routes, highest GSI "
                f"{max(r.gsi for r in routes)} (this KVM takes at most {limit} routes, on GSIs "
                f"below {limit}): {os.strerror(e.errno)}") from e
        self.dirty = False


class MsiVectors:
    """The MSI-X vectors of one PCI function: per vector an eventfd, an irqfd and a GSI.

    The MSI-X model (``pci/msix.py``) decides *whether* to deliver (mask and
    pending bits live there); this class only routes and signals.
    """

    def __init__(self, router: GsiRouter, num_vectors: int, *,
                 faults: guestfault.GuestFaults | None = None) -> None:
        self._router = router
        self._faults = faults or guestfault.DEFAULT
        self.gsis: list[int] = []
        self._eventfds: list[EventFd] = []
        self._reported: list[int | None] = [None] * num_vectors   # the bad address last reported
        # Whether each irqfd is assigned: it is taken off KVM while its vector is masked, so a
        # back end signalling the eventfd itself (vhost) cannot get past the mask; KVM injects
        # a signal that arrived meanwhile when it is assigned again (PCI 3.0 6.8.3.4's pending).
        self._assigned: list[bool] = []
        self._closed = False
        try:
            for _ in range(num_vectors):
                gsi = router.allocate()
                efd = EventFd()
                try:
                    router.vm.register_irqfd(efd.fd, gsi)
                except BaseException:
                    efd.close()
                    router.release(gsi)
                    raise
                self.gsis.append(gsi)
                self._eventfds.append(efd)
                self._assigned.append(True)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.gsis)

    def deliver(self, vector: int) -> None:
        """Send ``vector`` now (KVM injects its routed MSI); an unrouted vector sends nothing."""
        if self._router.route(self.gsis[vector]) is not None:
            self._eventfds[vector].write(1)

    def eventfd(self, vector: int) -> EventFd:
        """``vector``'s irqfd, for a back end that signals it itself (vhost's call fd)."""
        return self._eventfds[vector]

    def route(self, vector: int, address: int, data: int, masked: bool) -> None:
        """Route ``vector`` to its current message and commit.

        A masked vector keeps its route (its eventfd is simply not written
        while masked).  A bad address clears the route; it is reported once
        per bad address, and only while the vector is unmasked: unused vectors
        sit masked with a zero address, which is no fault.
        """
        gsi = self.gsis[vector]
        if valid_msi_address(address):
            self._router.set_msi(gsi, address, data & 0xFFFF_FFFF)
            self._reported[vector] = None
        else:
            self._router.clear(gsi)
            if not masked and self._reported[vector] != address:
                self._reported[vector] = address
                self._faults.report(FAULT_KIND, "MSI-X vector %d: address %#x is outside the local "
                                    "APIC window %#x..%#x; not routed", vector, address,
                                    MSI_ADDRESS_START, MSI_ADDRESS_END)
        try:
            self._router.commit()
        except GsiRoutingError as e:     # a host failure; the guest's write must not fail with it
            log.error("MSI-X vector %d (GSI %d): %s; the route stays staged", vector, gsi, e)
        if masked == self._assigned[vector]:
            try:
                self._router.vm.register_irqfd(self._eventfds[vector].fd, gsi, deassign=masked)
                self._assigned[vector] = not masked
            except KvmError as e:        # a host failure, as above
                log.error("MSI-X vector %d (GSI %d): KVM_IRQFD %s: %s", vector, gsi,
                          "deassign" if masked else "assign", e)

    def close(self) -> None:
        """Deassign the irqfds, drop the routes, free the GSIs and close the eventfds."""
        if self._closed:
            return
        self._closed = True
        vm = self._router.vm
        for efd, gsi, assigned in zip(self._eventfds, self.gsis, self._assigned):
            if not assigned:
                continue
            try:
                vm.register_irqfd(efd.fd, gsi, deassign=True)
            except KvmError as e:                # closing must go on: free what is left
                log.warning("KVM_IRQFD deassign of GSI %d: %s", gsi, e)
        for gsi in self.gsis:
            self._router.release(gsi)
        try:
            self._router.commit()
        except GsiRoutingError as e:
            log.warning("dropping the routes of closed MSI-X vectors: %s", e)
        for efd in self._eventfds:
            efd.close()
        self.gsis, self._eventfds = [], []
