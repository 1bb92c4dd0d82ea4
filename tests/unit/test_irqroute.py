"""GSI routing without KVM: the table and its allocation (sans-I/O), and MsiVectors on a fake VM.

What is checked: the committed table always starts with KVM's own default
routes (PIC and IOAPIC for 0..15, IOAPIC for 16..23); GSIs are allocated from
24, lowest freed first, and run out at the limit; only allocated GSIs take
routes; a commit happens only when the table changed; the ctypes entries
carry what the routes say; MsiVectors wires one irqfd per vector, routes,
refuses and reports addresses outside the LAPIC window (once, and not for
masked unprogrammed vectors), and close() undoes everything.
"""

from __future__ import annotations

import errno
import os

import pytest

from asyncvmm import guestfault
from asyncvmm.arch.x86_64.layout import GSI_MSI_END, GSI_MSI_START
from asyncvmm.irqroute import (GsiRouter, GsiRoutingError, IrqchipRoute, MsiRoute, MsiVectors,
                               RoutingTable, default_routes, to_kvm_entries)
from asyncvmm.kvm import KvmError
from asyncvmm.kvm import structs as s
from asyncvmm.kvm.ioctls import KVM_CAP_IRQ_ROUTING

LAPIC_MSG = 0xFEE0_0000


class FakeVm:
    """Records the irqfd and routing ioctls a VmFd would make."""

    def __init__(self) -> None:
        self.irqfds: dict[int, int] = {}          # eventfd -> gsi
        self.tables: list[list[tuple]] = []       # each committed table, decoded
        self.fail_routing = False

    def register_irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        if deassign:
            assert self.irqfds.pop(eventfd) == gsi
        else:
            assert eventfd not in self.irqfds
            self.irqfds[eventfd] = gsi

    def check_extension(self, cap: int) -> int:
        assert cap == KVM_CAP_IRQ_ROUTING
        return 4096

    def set_gsi_routing(self, entries) -> None:
        if self.fail_routing:
            raise KvmError("KVM_SET_GSI_ROUTING", errno.EINVAL)
        self.tables.append([
            (e.gsi, "msi", e.u.msi.address_lo | e.u.msi.address_hi << 32, e.u.msi.data)
            if e.type == s.KVM_IRQ_ROUTING_MSI else (e.gsi, "irqchip", e.u.irqchip.irqchip, e.u.irqchip.pin)
            for e in entries])


class RecordingFaults(guestfault.GuestFaults):
    def __init__(self) -> None:
        super().__init__()
        self.reports: list[tuple[str, tuple]] = []

    def report(self, kind, fmt, *args, **kw) -> None:
        self.reports.append((kind, args))


# --- the table ----------------------------------------------------------------

def test_default_routes_are_kvms_own():
    routes = default_routes()
    assert len(routes) == 16 * 2 + 8
    by_gsi: dict[int, set] = {}
    for r in routes:
        by_gsi.setdefault(r.gsi, set()).add((r.irqchip, r.pin))
    assert by_gsi[0] == {(s.KVM_IRQCHIP_PIC_MASTER, 0), (s.KVM_IRQCHIP_IOAPIC, 0)}
    assert by_gsi[7] == {(s.KVM_IRQCHIP_PIC_MASTER, 7), (s.KVM_IRQCHIP_IOAPIC, 7)}
    assert by_gsi[8] == {(s.KVM_IRQCHIP_PIC_SLAVE, 0), (s.KVM_IRQCHIP_IOAPIC, 8)}
    assert by_gsi[15] == {(s.KVM_IRQCHIP_PIC_SLAVE, 7), (s.KVM_IRQCHIP_IOAPIC, 15)}
    for gsi in range(16, 24):
        assert by_gsi[gsi] == {(s.KVM_IRQCHIP_IOAPIC, gsi)}
    assert sorted(by_gsi) == list(range(24))


def test_allocation_starts_after_the_ioapic_and_reuses_the_lowest_freed():
    t = RoutingTable()
    a, b, c = t.allocate(), t.allocate(), t.allocate()
    assert (a, b, c) == (GSI_MSI_START, GSI_MSI_START + 1, GSI_MSI_START + 2) == (24, 25, 26)
    t.release(c)
    t.release(a)
    assert t.allocate() == a
    assert t.allocate() == c
    assert t.allocate() == 27


def test_allocation_stops_where_kvms_route_table_would_overflow():
    t = RoutingTable()
    got = [t.allocate() for _ in range(4096 - 40)]
    assert got[-1] == 24 + 4055
    with pytest.raises(GsiRoutingError, match="4056 MSI GSIs and 40 default routes fill KVM's 4096-route"):
        t.allocate()
    for gsi in got:
        t.set_msi(gsi, LAPIC_MSG, 0x40)
    assert len(t.routes()) == 4096
    t.release(100)
    assert t.allocate() == 100


def test_allocation_runs_out_at_the_last_gsi():
    t = RoutingTable(last=GSI_MSI_END, max_routes=10_000)
    got = [t.allocate() for _ in range(GSI_MSI_END - GSI_MSI_START + 1)]
    assert got[-1] == GSI_MSI_END == 4095
    with pytest.raises(GsiRoutingError, match=r"no free GSI left for MSI \(GSIs 24..4095 taken\)"):
        t.allocate()


def test_the_range_must_follow_the_ioapic_pins():
    with pytest.raises(ValueError):
        RoutingTable(first=23)
    with pytest.raises(ValueError):
        RoutingTable(first=30, last=29)


def test_only_allocated_gsis_take_routes():
    t = RoutingTable()
    for op in (lambda: t.set_msi(24, LAPIC_MSG, 0x30), lambda: t.clear(24), lambda: t.release(24),
               lambda: t.set_msi(5, LAPIC_MSG, 0x30)):
        with pytest.raises(GsiRoutingError, match="not allocated"):
            op()
    gsi = t.allocate()
    t.release(gsi)
    with pytest.raises(GsiRoutingError):
        t.release(gsi)


def test_routes_are_the_defaults_then_msi_routes_by_gsi():
    t = RoutingTable()
    a, b = t.allocate(), t.allocate()
    t.set_msi(b, LAPIC_MSG | 0x1000, 0x41)
    t.set_msi(a, LAPIC_MSG, 0x40)
    assert t.routes() == [*default_routes(), MsiRoute(a, LAPIC_MSG, 0x40),
                          MsiRoute(b, LAPIC_MSG | 0x1000, 0x41)]
    t.clear(a)
    assert t.routes()[-1] == MsiRoute(b, LAPIC_MSG | 0x1000, 0x41) and len(t.routes()) == 41
    t.release(b)
    assert t.routes() == default_routes()


def test_dirty_tracks_real_changes_only():
    t = RoutingTable()
    gsi = t.allocate()
    assert not t.dirty
    t.clear(gsi)                       # nothing to clear
    assert not t.dirty
    t.set_msi(gsi, LAPIC_MSG, 0x40)
    assert t.dirty
    t.dirty = False
    t.set_msi(gsi, LAPIC_MSG, 0x40)    # the same message again
    assert not t.dirty
    t.release(gsi)
    assert t.dirty


def test_kvm_entries_carry_the_routes():
    e_chip, e_msi = to_kvm_entries([IrqchipRoute(9, s.KVM_IRQCHIP_PIC_SLAVE, 1),
                                    MsiRoute(30, 0x1_FEE0_1000, 0x4031)])
    assert (e_chip.gsi, e_chip.type, e_chip.flags) == (9, s.KVM_IRQ_ROUTING_IRQCHIP, 0)
    assert (e_chip.u.irqchip.irqchip, e_chip.u.irqchip.pin) == (s.KVM_IRQCHIP_PIC_SLAVE, 1)
    assert (e_msi.gsi, e_msi.type, e_msi.flags) == (30, s.KVM_IRQ_ROUTING_MSI, 0)
    assert (e_msi.u.msi.address_lo, e_msi.u.msi.address_hi, e_msi.u.msi.data) == (0xFEE0_1000, 1, 0x4031)


# --- the router ---------------------------------------------------------------

def test_commit_sends_the_whole_table_once_per_change():
    vm = FakeVm()
    r = GsiRouter(vm)
    r.commit()
    assert vm.tables == []                 # KVM already holds the defaults
    gsi = r.allocate()
    r.set_msi(gsi, LAPIC_MSG, 0x40)
    r.commit()
    r.commit()
    (table,) = vm.tables
    assert table[:40] == [(d.gsi, "irqchip", d.irqchip, d.pin) for d in default_routes()]
    assert table[40:] == [(gsi, "msi", LAPIC_MSG, 0x40)]


def test_a_refused_commit_is_a_clear_error_and_stays_staged():
    vm = FakeVm()
    r = GsiRouter(vm)
    gsi = r.allocate()
    r.set_msi(gsi, LAPIC_MSG, 0x40)
    vm.fail_routing = True
    with pytest.raises(GsiRoutingError, match=r"refused the table of 41 routes, highest GSI 24 \(this KVM takes at most "
                       r"4096 routes, on GSIs below 4096\): Invalid argument$"):
        r.commit()
    assert r.dirty
    vm.fail_routing = False
    r.commit()
    assert vm.tables[-1][-1] == (gsi, "msi", LAPIC_MSG, 0x40)


def test_a_refused_commit_does_not_fail_the_guests_route_write(caplog):
    vm, router, _, v = vectors(1)
    vm.fail_routing = True
    v.route(0, LAPIC_MSG, 0x40, masked=False)
    assert "MSI-X vector 0 (GSI 24)" in caplog.text and router.dirty
    vm.fail_routing = False
    v.route(0, LAPIC_MSG, 0x40, masked=False)      # the next change retries the staged table
    assert vm.tables[-1][-1] == (24, "msi", LAPIC_MSG, 0x40)


# --- MsiVectors ------------------------------------------------------------------

def vectors(n=3, vm=None):
    vm = vm or FakeVm()
    faults = RecordingFaults()
    router = GsiRouter(vm)
    return vm, router, faults, MsiVectors(router, n, faults=faults)


def test_each_vector_has_its_own_gsi_and_irqfd():
    vm, _, _, v = vectors(3)
    assert v.gsis == [24, 25, 26] and len(v) == 3
    assert sorted(vm.irqfds.values()) == [24, 25, 26]


def test_deliver_writes_the_vectors_eventfd_only_when_routed():
    vm, _, _, v = vectors(2)
    fd_of = {gsi: fd for fd, gsi in vm.irqfds.items()}
    v.deliver(1)                                   # not routed yet: nothing to send
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd_of[25])
    v.route(1, LAPIC_MSG, 0x41, masked=False)
    v.deliver(1)
    v.deliver(1)
    assert os.eventfd_read(fd_of[25]) == 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(fd_of[24])


def test_a_masked_vector_has_its_irqfd_off_kvm_until_unmasked():
    # A back end writing the eventfd itself (vhost) must not get past the mask: KVM injects
    # what it wrote meanwhile once the irqfd is assigned again.
    vm, _, _, v = vectors(2)
    fd = v.eventfd(0).fd
    v.route(0, LAPIC_MSG, 0x40, masked=True)
    assert fd not in vm.irqfds and v.eventfd(1).fd in vm.irqfds
    v.route(0, LAPIC_MSG, 0x41, masked=True)      # still masked: no second deassign
    v.route(0, LAPIC_MSG, 0x41, masked=False)
    assert vm.irqfds[fd] == 24
    v.close()
    assert vm.irqfds == {}


def test_route_commits_and_masked_vectors_keep_their_route():
    vm, router, _, v = vectors(2)
    v.route(0, LAPIC_MSG, 0x40, masked=False)
    assert vm.tables[-1][-1] == (24, "msi", LAPIC_MSG, 0x40)
    v.route(0, LAPIC_MSG, 0x40, masked=True)
    assert router.route(24) == MsiRoute(24, LAPIC_MSG, 0x40)
    assert len(vm.tables) == 1                     # nothing changed: no second ioctl
    v.route(1, LAPIC_MSG | 0x2000, 0x51, masked=True)
    assert vm.tables[-1][-2:] == [(24, "msi", LAPIC_MSG, 0x40), (25, "msi", LAPIC_MSG | 0x2000, 0x51)]


@pytest.mark.parametrize("address", [0, 0xFED0_0000, 0xFEF0_0000, 0x1_FEE0_0000])
def test_an_address_outside_the_lapic_window_is_cleared_and_reported_once(address):
    vm, router, faults, v = vectors(1)
    v.route(0, LAPIC_MSG, 0x40, masked=False)
    v.route(0, address, 0x40, masked=False)
    v.route(0, address, 0x40, masked=False)
    assert router.route(24) is None
    assert vm.tables[-1] == vm.tables[0][:40]
    assert [k for k, _ in faults.reports] == ["msi_address"]
    assert faults.reports[0][1][:2] == (0, address)
    v.route(0, LAPIC_MSG, 0x40, masked=False)      # fixed, then broken again: a new report
    v.route(0, address, 0x40, masked=False)
    assert len(faults.reports) == 2


def test_a_masked_unprogrammed_vector_is_no_fault():
    _, router, faults, v = vectors(1)
    v.route(0, 0, 0, masked=True)
    assert router.route(24) is None and faults.reports == []


def test_the_lapic_window_edges():
    _, router, faults, v = vectors(1)
    v.route(0, 0xFEEF_FFFC, 1, masked=False)
    assert router.route(24) == MsiRoute(24, 0xFEEF_FFFC, 1)
    v.route(0, 0xFEDF_FFFC, 1, masked=False)
    assert router.route(24) is None and len(faults.reports) == 1


def test_close_undoes_everything_and_frees_the_gsis():
    vm, router, _, v = vectors(2)
    fds = list(vm.irqfds)
    v.route(0, LAPIC_MSG, 0x40, masked=False)
    v.close()
    assert vm.irqfds == {}
    assert vm.tables[-1] == vm.tables[0][:40]
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    v.close()                                       # twice is harmless
    assert router.allocate() == 24


def test_a_failed_irqfd_leaves_nothing_behind():
    class FailingVm(FakeVm):
        def register_irqfd(self, eventfd, gsi, *, deassign=False):
            if gsi == 26 and not deassign:
                raise KvmError("KVM_IRQFD", errno.EINVAL)
            super().register_irqfd(eventfd, gsi, deassign=deassign)

    vm = FailingVm()
    router = GsiRouter(vm)
    with pytest.raises(KvmError):
        MsiVectors(router, 4)
    assert vm.irqfds == {}
    assert router.allocate() == 24
