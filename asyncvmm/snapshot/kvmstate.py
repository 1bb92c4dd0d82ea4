"""The KVM side of a snapshot: every vCPU's registers and the VM's irqchip, PIT and clock.

Read only while every vCPU thread is parked (paused and out of ``KVM_RUN``,
with any port/MMIO exit completed: :meth:`asyncvmm.vcpu.Vcpu` re-enters
``KVM_RUN`` with ``immediate_exit`` before parking, as KVM's API document
asks of a VMM that saves state).  KVM takes the vCPU's mutex in every vCPU
ioctl, so calling them from the loop thread while the vCPU's own thread is
parked is safe.

Each struct is kept as its raw bytes: the x86-64 KVM ABI fixes their layout,
and on restore KVM's setters validate the values (a bad segment, CR or
LAPIC state is refused with EINVAL, which the load reports).

XSAVE/XCRS: when KVM_GET_XSAVE is refused (a KVM without XSAVE support) the
FPU/SSE state from KVM_GET_FPU is what is kept; a snapshot with XSAVE state
cannot be restored where KVM_SET_XSAVE is refused.
"""

from __future__ import annotations

import ctypes
import errno
import time

from ..kvm import KvmError, VcpuFd, VmFd
from ..kvm import structs as s
from .format import SnapshotFormatError, VcpuState, VmState


def _raw(value: ctypes.Structure) -> bytes:
    return bytes(value)


def _struct(ctype: type, data: bytes, what: str):
    if len(data) != ctypes.sizeof(ctype):
        raise SnapshotFormatError(f"the snapshot's {what} is {len(data)} bytes, KVM's "
                                  f"{ctype.__name__} is {ctypes.sizeof(ctype)}")
    return ctype.from_buffer_copy(data)


def readable_msrs(vcpu: VcpuFd, indices: list[int]) -> list[tuple[int, int]]:
    """Every MSR of ``indices`` KVM can read, skipping those it refuses."""
    values: list[tuple[int, int]] = []
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.extend(got.items())
        rest = rest[len(got) + 1:]          # skip the one KVM could not read
    return values


def _optional(get, *errnos: int):
    try:
        return _raw(get())
    except KvmError as e:
        if e.errno in errnos:
            return None
        raise


def save_vcpu(vcpu: VcpuFd, msr_indices: list[int]) -> VcpuState:
    try:
        tsc_khz = vcpu.get_tsc_khz()
    except KvmError:
        tsc_khz = None
    return VcpuState(
        regs=_raw(vcpu.get_regs()), sregs=_raw(vcpu.get_sregs()), fpu=_raw(vcpu.get_fpu()),
        xsave=_optional(vcpu.get_xsave, errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP),
        xcrs=_optional(vcpu.get_xcrs, errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP),
        lapic=_raw(vcpu.get_lapic()), msrs=readable_msrs(vcpu, msr_indices),
        events=_raw(vcpu.get_vcpu_events()), mp_state=vcpu.get_mp_state().mp_state,
        debugregs=_raw(vcpu.get_debugregs()), tsc_khz=tsc_khz)


def restore_vcpu(vcpu: VcpuFd, state: VcpuState) -> None:
    """Set a vCPU from ``state`` (its CPUID is already set), in the order KVM needs:
    MP state, registers, special registers, FPU/XSAVE, XCRs, debug registers, LAPIC,
    MSRs (after the LAPIC: the TSC deadline MSR needs it), then pending events."""
    if state.tsc_khz:
        try:
            current = vcpu.get_tsc_khz()
        except KvmError:
            current = None
        if current is not None and current != state.tsc_khz:
            vcpu.set_tsc_khz(state.tsc_khz)
    vcpu.set_mp_state(s.kvm_mp_state(mp_state=state.mp_state))
    vcpu.set_regs(_struct(s.kvm_regs, state.regs, "registers"))
    vcpu.set_sregs(_struct(s.kvm_sregs, state.sregs, "special registers"))
    vcpu.set_fpu(_struct(s.kvm_fpu, state.fpu, "FPU state"))
    if state.xsave is not None:
        vcpu.set_xsave(_struct(s.kvm_xsave, state.xsave, "XSAVE area"))
    if state.xcrs is not None:
        vcpu.set_xcrs(_struct(s.kvm_xcrs, state.xcrs, "XCRs"))
    vcpu.set_debugregs(_struct(s.kvm_debugregs, state.debugregs, "debug registers"))
    vcpu.set_lapic(_struct(s.kvm_lapic_state, state.lapic, "LAPIC state"))
    accepted = vcpu.set_msrs(state.msrs)
    if accepted != len(state.msrs):
        raise SnapshotFormatError(f"KVM refused MSR {state.msrs[accepted][0]:#x} of the snapshot")
    vcpu.set_vcpu_events(_struct(s.kvm_vcpu_events, state.events, "vCPU events"))


def save_vm(vm: VmFd) -> VmState:
    return VmState(pic_master=_raw(vm.get_irqchip(s.KVM_IRQCHIP_PIC_MASTER)),
                   pic_slave=_raw(vm.get_irqchip(s.KVM_IRQCHIP_PIC_SLAVE)),
                   ioapic=_raw(vm.get_irqchip(s.KVM_IRQCHIP_IOAPIC)),
                   pit=_raw(vm.get_pit2()), clock=_raw(vm.get_clock()),
                   host_realtime_ns=time.time_ns())


KVM_CLOCK_REALTIME = 1 << 2      # kvm_clock_data.realtime is valid (<linux/kvm.h>)


def restore_vm(vm: VmFd, state: VmState, *, clock_realtime: bool = False,
               now_realtime_ns=time.time_ns) -> None:
    """PIT, kvmclock and the irqchip; before the vCPUs are restored (their LAPICs last).

    ``clock_realtime`` (snapshot-load ``clock_realtime``): kvmclock moves on by the host
    wall-clock time that passed since the snapshot, so the guest's clock does not lag by the
    time it spent saved: KVM does it (``KVM_CLOCK_REALTIME`` with the saved ``realtime``)
    where it reported that at save; otherwise the clock value is advanced by the difference
    of the host's CLOCK_REALTIME now and at save (never backwards)."""
    vm.set_pit2(_struct(s.kvm_pit_state2, state.pit, "PIT state"))
    clock = _struct(s.kvm_clock_data, state.clock, "kvmclock")
    if clock_realtime and clock.flags & KVM_CLOCK_REALTIME:
        clock.flags = KVM_CLOCK_REALTIME
    else:
        if clock_realtime:
            if not state.host_realtime_ns:
                raise SnapshotFormatError("clock_realtime: the snapshot has no host realtime")
            clock.clock += max(0, now_realtime_ns() - state.host_realtime_ns)
        clock.flags = 0      # only the clock value
    vm.set_clock(clock)
    for data, chip_id, what in ((state.pic_master, s.KVM_IRQCHIP_PIC_MASTER, "PIC"),
                                (state.pic_slave, s.KVM_IRQCHIP_PIC_SLAVE, "PIC"),
                                (state.ioapic, s.KVM_IRQCHIP_IOAPIC, "IOAPIC")):
        chip = _struct(s.kvm_irqchip, data, what)
        if chip.chip_id != chip_id:
            raise SnapshotFormatError(f"the snapshot's {what} state names chip {chip.chip_id}")
        vm.set_irqchip(chip)
