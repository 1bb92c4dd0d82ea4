"""CPUID for a vCPU: KVM's supported leaves adjusted for the VM's topology.

Input is the list ``KVM_GET_SUPPORTED_CPUID`` returned; output is the list
for ``KVM_SET_CPUID2`` of one vCPU.  No I/O here.  What is changed, and why:

* leaf 0x1: initial APIC id (EBX[31:24]) = vCPU id, logical processor count
  (EBX[23:16]), CLFLUSH line size, the HYPERVISOR bit (ECX[31]) so guests know
  they are virtualised, HTT (EDX[28]) when there is more than one vCPU;
* leaf 0x4 (Intel caches): cores per package and threads sharing each cache;
* leaves 0xB and 0x1F (extended topology): SMT and core levels with the
  x2APIC id in EDX;
* leaf 0xA (architectural PMU): cleared, the VM has no PMU;
* leaf 0x6: turbo and hardware P-state bits cleared (no power management);
* leaves 0x80000001 / 0x80000008 / 0x8000001E (AMD): CmpLegacy, core count and
  the extended APIC id;
* leaf 0x40000000 (KVM signature) is kept from KVM.
"""

from __future__ import annotations

import ctypes

from ...kvm.structs import kvm_cpuid_entry2

ECX_HYPERVISOR = 1 << 31
ECX_TSC_DEADLINE = 1 << 24
EDX_HTT = 1 << 28
AMD_ECX_CMP_LEGACY = 1 << 1

LEVEL_TYPE_INVALID = 0
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


class CpuidError(ValueError):
    pass


def _bits_for(n: int) -> int:
    """Bits needed to number ``n`` items (the APIC id shift for a level)."""
    return max(0, (n - 1).bit_length())


def _set_bits(value: int, lo: int, hi: int, field: int) -> int:
    width = hi - lo + 1
    mask = ((1 << width) - 1) << lo
    return (value & ~mask) | ((field << lo) & mask)


def adjust_cpuid(supported: list[kvm_cpuid_entry2], *, vcpu_id: int, vcpu_count: int,
                 smt: bool = False) -> list[kvm_cpuid_entry2]:
    """CPUID entries for vCPU ``vcpu_id`` of a VM with ``vcpu_count`` vCPUs."""
    if not 1 <= vcpu_count <= 254:
        raise CpuidError(f"vcpu_count {vcpu_count} out of range 1..254")
    if not 0 <= vcpu_id < vcpu_count:
        raise CpuidError(f"vcpu_id {vcpu_id} out of range for {vcpu_count} vCPUs")
    threads_per_core = 2 if smt and vcpu_count > 1 else 1
    cores = max(1, vcpu_count // threads_per_core)
    out: list[kvm_cpuid_entry2] = []
    for src in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(src)
        fn = e.function
        if fn == 0x1:
            e.ebx = _set_bits(e.ebx, 24, 31, vcpu_id)
            e.ebx = _set_bits(e.ebx, 16, 23, vcpu_count)
            e.ebx = _set_bits(e.ebx, 8, 15, 8)           # CLFLUSH line size, in 8-byte units
            e.ecx |= ECX_HYPERVISOR
            e.edx = (e.edx | EDX_HTT) if vcpu_count > 1 else (e.edx & ~EDX_HTT)
        elif fn == 0x4:
            if e.eax & 0x1F:                              # cache type 0 means "no more caches"
                cache_level = (e.eax >> 5) & 0x7
                sharing = threads_per_core if cache_level <= 2 else vcpu_count
                e.eax = _set_bits(e.eax, 26, 31, cores - 1)
                e.eax = _set_bits(e.eax, 14, 25, sharing - 1)
        elif fn in (0xB, 0x1F):
            e.edx = vcpu_id
            if e.index == 0:
                e.eax = _bits_for(threads_per_core)
                e.ebx = threads_per_core
                e.ecx = (LEVEL_TYPE_SMT << 8) | e.index
            elif e.index == 1:
                e.eax = _bits_for(vcpu_count)
                e.ebx = vcpu_count
                e.ecx = (LEVEL_TYPE_CORE << 8) | e.index
            else:
                e.eax = e.ebx = 0
                e.ecx = (LEVEL_TYPE_INVALID << 8) | e.index
        elif fn == 0x6:
            e.eax &= ~((1 << 1) | (1 << 7))               # turbo boost, HWP
            e.ecx &= ~(1 << 3)                            # energy/performance bias
        elif fn == 0xA:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif fn == 0x80000001:
            if vcpu_count > 1:
                e.ecx |= AMD_ECX_CMP_LEGACY
            else:
                e.ecx &= ~AMD_ECX_CMP_LEGACY
        elif fn == 0x80000008:
            e.ecx = _set_bits(e.ecx, 0, 7, vcpu_count - 1)
            e.ecx = _set_bits(e.ecx, 12, 15, _bits_for(vcpu_count))
        elif fn == 0x8000001E:
            e.eax = vcpu_id
            e.ebx = ((threads_per_core - 1) << 8) | (vcpu_id // threads_per_core)
            e.ecx = 0
        out.append(e)
    return out


def find(entries: list[kvm_cpuid_entry2], function: int, index: int = 0) -> kvm_cpuid_entry2 | None:
    for e in entries:
        if e.function == function and e.index == index:
            return e
    return None


def entry(function: int, index: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0,
          edx: int = 0, flags: int = 0) -> kvm_cpuid_entry2:
    e = kvm_cpuid_entry2()
    e.function, e.index, e.flags = function, index, flags
    e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
    return e


def vendor(entries: list[kvm_cpuid_entry2]) -> str:
    e = find(entries, 0)
    if e is None:
        return ""
    return b"".join(ctypes.c_uint32(r).value.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx)).decode(
        "ascii", "replace")
