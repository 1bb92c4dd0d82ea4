"""Model-specific registers a vCPU starts with.  No I/O here.

Linux sets up syscall MSRs itself; they are zeroed so a guest never sees
host leftovers.  IA32_MISC_ENABLE gets fast-strings, and MTRRs are enabled
with write-back as the default memory type so that guest RAM is cacheable
before the guest programs variable MTRRs (without this, Linux may run with
RAM uncached).
"""

from __future__ import annotations

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRRdefType = 0x2FF

MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 0x6


def boot_msrs() -> list[tuple[int, int]]:
    """``(index, value)`` pairs for ``KVM_SET_MSRS`` on every vCPU at boot."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRRdefType, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
