"""GSI routing and MSI injection on the local /dev/kvm (no guest; the ioctls themselves).

What is checked: KVM reports the routing limit the layout assumes; a VM with
an in-kernel irqchip takes the whole table (KVM's defaults plus MSI routes),
a second commit that replaces routes, and a table of every GSI the router
hands out; MsiVectors assigns an irqfd per vector and close() deassigns them
(proved by assigning the same eventfd again, which KVM refuses with EBUSY
while it is assigned); KVM_SIGNAL_MSI to APIC id 0 answers >= 0 once vCPU 0
exists; an MSI route on a GSI beyond KVM's limit is refused with an error
that says so.
"""

from __future__ import annotations

import errno
import os

import pytest

from asyncvmm.arch.x86_64.layout import GSI_MSI_END, GSI_MSI_START
from asyncvmm.irqroute import GsiRouter, GsiRoutingError, MsiVectors
from asyncvmm.kvm import Kvm, KvmError
from asyncvmm.kvm.ioctls import KVM_CAP_IRQ_ROUTING, KVM_CAP_SIGNAL_MSI
from tests.conftest import require
from tests.kvm.conftest import KVM_PATH, kvm_usable

pytestmark = pytest.mark.kvm

LAPIC_MSG = 0xFEE0_0000       # destination APIC id 0 (address bits 19:12), physical mode


@pytest.fixture
def vm():
    require(kvm_usable(), f"{KVM_PATH} is missing or not accessible")
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        yield vm


def test_kvm_routes_as_many_gsis_as_the_layout_hands_out(vm):
    assert vm.check_extension(KVM_CAP_IRQ_ROUTING) >= GSI_MSI_END + 1
    assert vm.check_extension(KVM_CAP_SIGNAL_MSI)


def test_the_whole_table_with_msi_routes_is_taken_and_replaced(vm):
    router = GsiRouter(vm)
    vectors = MsiVectors(router, 8)
    assert vectors.gsis == list(range(GSI_MSI_START, GSI_MSI_START + 8))
    for v in range(8):
        vectors.route(v, LAPIC_MSG, 0x40 + v, masked=v % 2 == 1)
    assert not router.dirty
    for v in range(8):                     # a second commit replacing every route
        vectors.route(v, LAPIC_MSG | 0x1000 * (v % 2), 0x60 + v, masked=False)
    vectors.deliver(3)
    assert not router.dirty
    vectors.close()
    assert not router.dirty                # the table shrank back to KVM's defaults


def test_a_table_of_every_gsi_the_router_hands_out_fits_kvm(vm):
    router = GsiRouter(vm)
    gsis = []
    while True:
        try:
            gsis.append(router.allocate())
        except GsiRoutingError:
            break
    for gsi in gsis:
        router.set_msi(gsi, LAPIC_MSG, 0x40 + gsi % 0xA0)
    assert len(router.routes()) == vm.check_extension(KVM_CAP_IRQ_ROUTING)
    router.commit()


def test_irqfds_are_assigned_and_deassigned_on_msi_gsis(vm):
    router = GsiRouter(vm)
    vectors = MsiVectors(router, 3)
    vectors.route(0, LAPIC_MSG, 0x40, masked=False)
    dups = [os.dup(efd.fd) for efd in vectors._eventfds]     # the same eventfds, kept past close()
    try:
        for fd, gsi in zip(dups, vectors.gsis):
            with pytest.raises(KvmError) as e:
                vm.register_irqfd(fd, gsi)
            assert e.value.errno == errno.EBUSY             # assigned
        vectors.close()
        for fd, gsi in zip(dups, range(GSI_MSI_START, GSI_MSI_START + 3)):
            vm.register_irqfd(fd, gsi)                      # free again: close() deassigned it
            vm.register_irqfd(fd, gsi, deassign=True)
    finally:
        for fd in dups:
            os.close(fd)
    assert router.allocate() == GSI_MSI_START


def test_signal_msi_reaches_apic_id_0_once_the_vcpu_exists(vm):
    with pytest.raises(KvmError) as e:                      # no local APIC matches yet
        vm.signal_msi(LAPIC_MSG, 0x40)
    assert e.value.op == "KVM_SIGNAL_MSI"
    with vm.create_vcpu(0):
        # 0: accepted but not delivered (the fresh APIC is software-disabled); > 0 delivered.
        assert vm.signal_msi(LAPIC_MSG, 0x40) >= 0


def test_an_msi_route_beyond_kvms_limit_is_refused_clearly(vm):
    limit = vm.check_extension(KVM_CAP_IRQ_ROUTING)
    router = GsiRouter(vm, first=limit - 1, last=limit)
    ok, beyond = router.allocate(), router.allocate()
    router.set_msi(ok, LAPIC_MSG, 0x40)
    router.commit()                                          # the last GSI KVM takes
    router.set_msi(beyond, LAPIC_MSG, 0x41)
    with pytest.raises(GsiRoutingError,
                       match=rf"highest GSI {limit} \(this KVM takes at most {limit} routes, on GSIs "
                             rf"below {limit}\): Invalid argument"):
        router.commit()
    router.clear(beyond)                                     # KVM kept the previous table
    router.commit()
