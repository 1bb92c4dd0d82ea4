from hypothesis import given, strategies as st
import pytest

from asyncvmm.arch.x86_64 import cpuid
from asyncvmm.arch.x86_64.lapic import APIC_LVT0, APIC_LVT1, configure_lint
import struct


def supported():
    return [
        cpuid.entry(0x0, eax=0x1F, ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E),
        cpuid.entry(0x1, eax=0x806EA, ebx=0xFF_07_08_00, ecx=0x0, edx=0x0),
        cpuid.entry(0x4, 0, eax=0x1C004121),   # L1d
        cpuid.entry(0x4, 3, eax=0x1C03C163),   # L3
        cpuid.entry(0x4, 4, eax=0),            # no more caches
        cpuid.entry(0x6, eax=0xFF, ecx=0xFF),
        cpuid.entry(0xA, eax=0x07300403, ebx=1, edx=0x603),
        cpuid.entry(0xB, 0, eax=1, ebx=2, ecx=0x100, edx=7),
        cpuid.entry(0xB, 1, eax=4, ebx=8, ecx=0x201, edx=7),
        cpuid.entry(0xB, 2, eax=9, ebx=9, ecx=0x302, edx=7),
        cpuid.entry(0x40000000, eax=0x40000001, ebx=0x4B4D564B, ecx=0x564B4D56, edx=0x4D),
        cpuid.entry(0x80000001, ecx=0x2),
        cpuid.entry(0x80000008, eax=0x3027, ecx=0xFF),
        cpuid.entry(0x8000001E, eax=9, ebx=9, ecx=9),
    ]


def test_leaf1_topology_and_hypervisor_bit():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=1, vcpu_count=2)
    e = cpuid.find(out, 1)
    assert e.ebx >> 24 == 1
    assert (e.ebx >> 16) & 0xFF == 2
    assert (e.ebx >> 8) & 0xFF == 8
    assert e.ecx & cpuid.ECX_HYPERVISOR
    assert e.edx & cpuid.EDX_HTT


def test_single_vcpu_has_no_htt_or_cmp_legacy():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=0, vcpu_count=1)
    assert not cpuid.find(out, 1).edx & cpuid.EDX_HTT
    assert not cpuid.find(out, 0x80000001).ecx & cpuid.AMD_ECX_CMP_LEGACY


def test_extended_topology_levels():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=3, vcpu_count=4, smt=True)
    smt, core, inval = (cpuid.find(out, 0xB, i) for i in range(3))
    assert (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx) == (1, 2, cpuid.LEVEL_TYPE_SMT, 3)
    assert (core.eax, core.ebx, core.ecx >> 8, core.edx) == (2, 4, cpuid.LEVEL_TYPE_CORE, 3)
    assert (inval.eax, inval.ebx, inval.ecx >> 8) == (0, 0, cpuid.LEVEL_TYPE_INVALID)


def test_cache_leaf_core_counts_and_terminator_untouched():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=0, vcpu_count=4)
    l1, l3, end = (cpuid.find(out, 4, i) for i in (0, 3, 4))
    assert l1.eax >> 26 == 3 and (l1.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == 3
    assert end.eax == 0


def test_pmu_cleared_and_kvm_signature_kept():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=0, vcpu_count=1)
    pmu = cpuid.find(out, 0xA)
    assert (pmu.eax, pmu.ebx, pmu.ecx, pmu.edx) == (0, 0, 0, 0)
    assert cpuid.find(out, 0x40000000).ebx == 0x4B4D564B


def test_amd_leaves():
    out = cpuid.adjust_cpuid(supported(), vcpu_id=2, vcpu_count=3)
    assert cpuid.find(out, 0x80000008).ecx & 0xFF == 2
    assert cpuid.find(out, 0x8000001E).eax == 2


def test_input_not_modified():
    src = supported()
    before = [bytes(e) for e in src]
    cpuid.adjust_cpuid(src, vcpu_id=0, vcpu_count=2)
    assert [bytes(e) for e in src] == before


@given(st.integers(1, 254), st.data(), st.booleans())
def test_apic_ids_are_unique(count, data, smt):
    ids = {cpuid.find(cpuid.adjust_cpuid(supported(), vcpu_id=i, vcpu_count=count, smt=smt), 1).ebx >> 24
           for i in range(count)}
    assert len(ids) == count


@pytest.mark.parametrize("count,vid", [(0, 0), (255, 0), (2, 2), (2, -1)])
def test_bad_topology_is_an_error(count, vid):
    with pytest.raises(cpuid.CpuidError):
        cpuid.adjust_cpuid(supported(), vcpu_id=vid, vcpu_count=count)


def test_vendor_string():
    assert cpuid.vendor(supported()) == "GenuineIntel"


def test_lint_delivery_modes():
    page = bytearray(0x400)
    struct.pack_into("<I", page, APIC_LVT0, 0x10700)   # masked, some mode
    out = configure_lint(bytes(page))
    assert struct.unpack_from("<I", out, APIC_LVT0)[0] == 0x10700
    assert (struct.unpack_from("<I", out, APIC_LVT1)[0] >> 8) & 7 == 4
    page2 = configure_lint(bytes(0x400))
    assert (struct.unpack_from("<I", page2, APIC_LVT0)[0] >> 8) & 7 == 7
