"""Setting a vCPU's registers for a kernel entry, and its per-vCPU state.

The loaders return what they loaded; this module turns an entry point into
register state: the 64-bit Linux boot protocol (long mode, identity paging,
``rsi`` = zero page) or PVH (32-bit protected mode, paging off, ``ebx`` =
``hvm_start_info``).  It also applies CPUID, MSRs, the FPU and LAPIC set-up
that every vCPU needs.  Only the boot vCPU gets entry registers: the others
wait in the in-kernel LAPIC for INIT/SIPI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ...kvm import VcpuFd
from ...kvm import structs as s
from ...memory import GuestMemory
from . import gdt, layout, paging
from .cpuid import adjust_cpuid
from .cputemplate import CpuTemplateError
from .lapic import configure_lint
from .msrs import boot_msrs

X86_EFLAGS_FIXED = 0x2
FPU_FCW_DEFAULT = 0x37F           # all x87 exceptions masked, 64-bit precision
MXCSR_DEFAULT = 0x1F80            # all SSE exceptions masked
# Firecracker's words when KVM takes only part of a vCPU's MSRs (a template's value refused).
MSRS_INCOMPLETE = ("System configuration error: Error configuring the vcpu for boot: "
                   "Failed to set MSRs: Not all given MSRs were set.")


@dataclass(frozen=True)
class BootEntry:
    """Where and how to enter the kernel."""

    entry_addr: int
    pvh: bool = False


def _load_segment(dst: s.kvm_segment, seg: gdt.KvmSegment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                 "avl", "unusable"):
        setattr(dst, name, getattr(seg, name))


def boot_sregs(sregs: s.kvm_sregs, mem: GuestMemory, pvh: bool) -> s.kvm_sregs:
    """``sregs`` changed for the chosen entry; writes the GDT (and page tables) to ``mem``."""
    gdt_base, gdt_limit = gdt.write_boot_gdt(mem)
    sregs.gdt.base, sregs.gdt.limit = gdt_base, gdt_limit
    # An empty IDT: a fault before the kernel installs its own is a triple fault,
    # which the VMM reports, rather than a jump through garbage.
    sregs.idt.base, sregs.idt.limit = layout.IDT_START, 0
    segs = gdt.pvh_segments() if pvh else gdt.long_mode_segments()
    _load_segment(sregs.cs, segs.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        _load_segment(getattr(sregs, name), segs.data)
    _load_segment(sregs.tr, segs.tr)
    if pvh:
        sregs.cr0 = paging.PVH_CR0
        sregs.cr4 = 0
        sregs.efer = 0
    else:
        sregs.cr3 = paging.write_identity_page_tables(mem)
        sregs.cr4 = paging.LONG_MODE_CR4
        sregs.efer = paging.LONG_MODE_EFER
        sregs.cr0 = paging.LONG_MODE_CR0
    return sregs


def boot_regs(entry: BootEntry) -> s.kvm_regs:
    regs = s.kvm_regs()
    regs.rflags = X86_EFLAGS_FIXED
    regs.rip = entry.entry_addr
    if entry.pvh:
        regs.rbx = layout.PVH_INFO_START
    else:
        regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
        regs.rsi = layout.ZERO_PAGE_START
    return regs


def configure_vcpu(vcpu: VcpuFd, supported_cpuid: list[s.kvm_cpuid_entry2], *,
                   vcpu_count: int, smt: bool = False,
                   template_msrs: Sequence[tuple[int, int]] = ()) -> None:
    """State every vCPU needs: CPUID, MSRs, FPU and the LAPIC's LINT pins.

    ``supported_cpuid`` is KVM's list with the CPU template already applied
    (:func:`.cputemplate.apply_cpuid`); normalization runs on it here.  The
    template's MSR values go in first and the boot protocol's over them, as in
    Firecracker (docs/cpu_templates/boot-protocol.md)."""
    vcpu.set_cpuid2(adjust_cpuid(supported_cpuid, vcpu_id=vcpu.vcpu_id, vcpu_count=vcpu_count,
                                 smt=smt))
    values = dict(template_msrs)
    values.update(boot_msrs())
    msrs = list(values.items())
    accepted = vcpu.set_msrs(msrs)
    if accepted != len(msrs):
        if msrs[accepted][0] in dict(template_msrs):
            raise CpuTemplateError(MSRS_INCOMPLETE)
        raise ValueError(f"KVM refused boot MSR {msrs[accepted][0]:#x}")
    fpu = s.kvm_fpu()
    fpu.fcw = FPU_FCW_DEFAULT
    fpu.mxcsr = MXCSR_DEFAULT
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    vcpu.set_lapic(s.kvm_lapic_state.from_buffer_copy(configure_lint(bytes(lapic))))


def set_boot_registers(vcpu: VcpuFd, mem: GuestMemory, entry: BootEntry) -> None:
    """Registers of the boot vCPU at the kernel's entry point."""
    vcpu.set_sregs(boot_sregs(vcpu.get_sregs(), mem, entry.pvh))
    vcpu.set_regs(boot_regs(entry))
