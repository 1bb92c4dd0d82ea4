"""CPU templates on a CPUID list and MSR values, and the host checks of static templates (no KVM)."""

from __future__ import annotations

import pytest

from asyncvmm.arch.x86_64 import cpuid, cputemplate as t
from asyncvmm.config import CpuConfig, decode

AMD = dict(ebx=0x68747541, edx=0x69746E65, ecx=0x444D4163)      # "AuthenticAMD"
INTEL = dict(ebx=0x756E6547, edx=0x49656E69, ecx=0x6C65746E)    # "GenuineIntel"
MILAN_EAX = 0x00A00F11
CASCADE_LAKE_EAX = 0x00050657


def host(vendor: dict, leaf1_eax: int) -> list:
    return [
        cpuid.entry(0x0, eax=0x10, **vendor),
        cpuid.entry(0x1, eax=leaf1_eax, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF),
        cpuid.entry(0x7, 0, eax=1, ebx=0xFFFF_FFFF, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF, flags=1),
        cpuid.entry(0x7, 1, flags=1),
        cpuid.entry(0xD, 0, eax=0xFFFF_FFFF, flags=1),
        cpuid.entry(0xD, 1, eax=0xFFFF_FFFF, flags=1),
        cpuid.entry(0x80000001, ecx=0xFFFF_FFFF, edx=0xFFFF_FFFF),
        cpuid.entry(0x80000008, ebx=0xFFFF_FFFF),
    ]


def custom(body: str) -> t.CpuTemplate:
    return t.CpuTemplate.from_config(decode(body.encode(), CpuConfig))


def test_cpuid_modifier_changes_only_its_bits_and_sets_the_flags() -> None:
    tmpl = custom('{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 0, "modifiers": ['
                  '{"register": "ebx", "bitmap": "0b0_1x"}, {"register": "edx", "bitmap": "0b0"}]}]}')
    supported = host(AMD, MILAN_EAX)
    out = t.apply_cpuid(supported, tmpl)
    leaf7 = cpuid.find(out, 0x7, 0)
    assert (leaf7.ebx, leaf7.ecx, leaf7.edx, leaf7.flags) == (0xFFFF_FFFB, 0xFFFF_FFFF, 0xFFFF_FFFE, 0)
    assert cpuid.find(supported, 0x7, 0).ebx == 0xFFFF_FFFF        # the input is not changed
    assert [(e.function, e.index) for e in out] == [(e.function, e.index) for e in supported]


def test_normalization_runs_after_the_template_and_wins() -> None:
    # A template clearing the HYPERVISOR bit (leaf 1 ECX[31]) does not hide it: asyncvmm sets it after.
    tmpl = custom('{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": ['
                  '{"register": "ecx", "bitmap": "0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}]}')
    leaf1 = cpuid.find(cpuid.adjust_cpuid(t.apply_cpuid(host(AMD, MILAN_EAX), tmpl), vcpu_id=0,
                                          vcpu_count=1), 0x1)
    assert leaf1.ecx & cpuid.ECX_HYPERVISOR and not leaf1.ecx & 1


def test_a_leaf_kvm_does_not_report_fails_with_firecrackers_message() -> None:
    tmpl = custom('{"cpuid_modifiers": [{"leaf": "0x8000001f", "subleaf": "0x2", "flags": 1, "modifiers": []}]}')
    with pytest.raises(t.CpuTemplateError) as err:
        t.apply_cpuid(host(AMD, MILAN_EAX), tmpl)
    assert str(err.value) == ("System configuration error: Failed to create guest config: Template changes "
                              "a CPUID entry not supported by KVM: Leaf: 8000001f, Subleaf: 2")


def test_msr_modifiers_apply_to_the_values_kvm_reads() -> None:
    tmpl = custom('{"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1x0"}, {"addr": "0x1a0", "bitmap": "0b"}]}')
    assert t.apply_msrs({0x10A: 0b011, 0x1A0: 7}, tmpl) == [(0x10A, 0b110), (0x1A0, 7)]
    with pytest.raises(t.CpuTemplateError) as err:
        t.apply_msrs({0x10A: 0}, tmpl)
    assert str(err.value).endswith("KVM vcpu ioctl failed: Failed to get KVM vcpu msr: 0x1a0")


def test_capabilities_are_firecrackers_defaults_with_the_templates_changes() -> None:
    tmpl = custom('{"kvm_capabilities": ["!56", "171", "171", "!9999"]}')
    caps = t.required_capabilities(tmpl)
    assert 56 not in caps and caps.count(171) == 1
    assert set(caps) == set(t.DEFAULT_CAPABILITIES) - {56} | {171}
    t.check_capabilities(tmpl, lambda cap: 1)
    with pytest.raises(t.CpuTemplateError) as err:
        t.check_capabilities(tmpl, lambda cap: 0 if cap == 171 else 1)
    assert str(err.value) == "Kvm error: Missing KVM capabilities: 0xab"
    # Removing a default capability means it is not checked at all.
    t.check_capabilities(custom('{"kvm_capabilities": ["!56"]}'), lambda cap: 0 if cap == 56 else 1)


@pytest.mark.parametrize("name", ["C3", "T2", "T2S", "T2CL"])
def test_intel_templates_are_refused_on_amd(name: str) -> None:
    with pytest.raises(t.CpuTemplateError) as err:
        t.select_template(name, None, host(AMD, MILAN_EAX))
    assert str(err.value) == ("Failed to get CPU template: CPU vendor mismatched between actual CPU and "
                              "CPU template.")


def test_t2a_is_refused_on_intel_and_on_amd_other_than_milan() -> None:
    with pytest.raises(t.CpuTemplateError, match="CPU vendor mismatched"):
        t.select_template("T2A", None, host(INTEL, CASCADE_LAKE_EAX))
    with pytest.raises(t.CpuTemplateError) as err:
        t.select_template("T2A", None, host(AMD, 0x00B00F21))       # family 0x1A (Zen 5)
    assert str(err.value) == ("Failed to get CPU template: The current CPU model is not permitted to "
                              "apply the CPU template.")
    with pytest.raises(t.CpuTemplateError, match="CPU model is not permitted"):
        t.select_template("T2A", None, host(AMD, MILAN_EAX + 1))    # another stepping


def test_models_each_static_template_permits() -> None:
    assert t.select_template("T2A", None, host(AMD, MILAN_EAX)) is t.STATIC_TEMPLATES["T2A"][2]
    assert t.select_template("T2CL", None, host(INTEL, CASCADE_LAKE_EAX)).cpuid
    with pytest.raises(t.CpuTemplateError, match="CPU model is not permitted"):
        t.select_template("T2CL", None, host(INTEL, 0x00050654))    # Skylake
    assert t.select_template("T2S", None, host(INTEL, 0x00050654)).msrs


def test_no_template_and_none_change_nothing_and_a_restore_skips_the_host_check() -> None:
    supported = host(AMD, 0x00B00F21)
    for name in (None, "None"):
        assert t.select_template(name, None, supported) == t.CpuTemplate()
    assert bytes(t.apply_cpuid(supported, t.CpuTemplate())[1]) == bytes(supported[1])
    assert t.select_template("T2", None, supported, check_host=False) is t.STATIC_TEMPLATES["T2"][2]


def test_a_custom_template_is_used_even_with_a_static_name() -> None:
    tmpl = t.select_template("T2", CpuConfig(kvm_capabilities=["!56"]), host(AMD, MILAN_EAX))
    assert tmpl == t.CpuTemplate(kvm_capabilities=((False, 56),))


def _bitmap(f, bits: int = 32) -> str:
    return "0b" + "".join("x" if not (f.mask >> i) & 1 else str((f.value >> i) & 1)
                          for i in reversed(range(bits)))


def test_t2a_data_is_firecrackers() -> None:
    # Spot checks against the bitmaps of Firecracker's T2A (tests/data/custom_cpu_templates/T2A.json).
    t2a = {(m.leaf, m.subleaf): (m.flags, dict(m.registers)) for m in t.STATIC_TEMPLATES["T2A"][2].cpuid}
    assert sorted(t2a) == [(0x1, 0), (0x7, 0), (0xD, 0), (0xD, 1), (0x80000001, 0), (0x80000008, 0)]
    flags, regs = t2a[(0x1, 0)]
    assert flags == 0 and _bitmap(regs["eax"]) == "0bxxxx000000000011xx00011011110010"
    assert _bitmap(regs["ecx"]) == "0bxxxxxxxxxxxxx0xx00xx00x0000000xx"
    flags, regs = t2a[(0x7, 0)]
    assert flags == 1 and _bitmap(regs["ebx"]) == "0b00000000000x000000x00x1xxxx0x0xx"
    assert _bitmap(t2a[(0xD, 0)][1]["eax"]) == "0bxxxxxxxxxxxxxxxxxxxxxx0x00000xxx"
    assert not t.STATIC_TEMPLATES["T2A"][2].msrs


def test_t2a_on_a_milan_host_shows_the_template_family_model() -> None:
    out = cpuid.adjust_cpuid(t.apply_cpuid(host(AMD, MILAN_EAX), t.STATIC_TEMPLATES["T2A"][2]),
                             vcpu_id=0, vcpu_count=1)
    assert cpuid.find(out, 0x1).eax == 0x000306F2
    assert cpuid.find(out, 0x7, 0).ebx & (1 << 16) == 0        # AVX512F hidden


def test_t2s_and_t2cl_set_arch_capabilities() -> None:
    for name in ("T2S", "T2CL"):
        ((addr, bitmap),) = t.STATIC_TEMPLATES[name][2].msrs
        assert addr == 0x10A and bitmap.mask
