"""CPU templates on a vCPU's CPUID and MSRs, as Firecracker 1.16 applies them.  No I/O here.

A template is a static one named in machine-config ``cpu_template`` (C3, T2,
T2S, T2CL for Intel, T2A for AMD) or a custom one from ``PUT /cpu-config``
(:mod:`asyncvmm.config.cputemplate`); whichever was configured last is the
one used.  At InstanceStart, in Firecracker's order:

1. a static template is checked against the host CPU (vendor of CPUID leaf
   0, family/model/stepping of leaf 1 EAX, both as KVM reports them): a
   mismatch fails the start (``Failed to get CPU template: ...``);
2. the KVM capabilities Firecracker requires, plus those the template adds
   and minus those it removes (``"!N"``), must be present (``Kvm error:
   Missing KVM capabilities: 0x..``);
3. the CPUID modifiers change KVM's supported CPUID (a leaf/subleaf KVM does
   not report fails the start) and replace the entry's flags; then the usual
   normalization (:mod:`.cpuid`) runs on the result, so bits it sets win
   (Firecracker's docs/cpu_templates/cpuid-normalization.md);
4. the MSR modifiers change the values KVM reports for vCPU 0 (an MSR KVM
   cannot read fails the start), and every vCPU gets them, with the boot
   protocol MSRs (:mod:`.msrs`) set over them.

The static templates' bits are Firecracker's (static_cpu_templates/*.rs),
kept here as (mask, value) pairs per register: bits in ``mask`` take the
value's bit, the others are left as KVM reports them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from ...config.cputemplate import BitmapFilter, CpuConfig, parse_bitmap, parse_kvm_capability, parse_number
from ...kvm.structs import kvm_cpuid_entry2
from .cpuid import find, vendor

VENDOR_INTEL = "GenuineIntel"
VENDOR_AMD = "AuthenticAMD"

# What Firecracker 1.16 checks on every x86_64 host before a template adds or removes any:
# KVM_CAP_IRQCHIP, IOEVENTFD, IRQFD, USER_MEMORY, SET_TSS_ADDR, PIT2, PIT_STATE2,
# ADJUST_CLOCK, DEBUGREGS, MP_STATE, VCPU_EVENTS, XCRS, XSAVE, EXT_CPUID (<linux/kvm.h>).
DEFAULT_CAPABILITIES = (0, 36, 32, 3, 4, 33, 35, 39, 50, 14, 41, 56, 55, 7)

TEMPLATE_PREFIX = "Failed to get CPU template: "
VENDOR_MISMATCH = TEMPLATE_PREFIX + "CPU vendor mismatched between actual CPU and CPU template."
MODEL_NOT_PERMITTED = TEMPLATE_PREFIX + "The current CPU model is not permitted to apply the CPU template."
GUEST_CONFIG_PREFIX = "System configuration error: Failed to create guest config: "


class CpuTemplateError(Exception):
    """The template cannot be applied here; the message is Firecracker's (after
    ``Start microvm error: ``)."""


@dataclasses.dataclass(frozen=True)
class CpuidModifier:
    leaf: int
    subleaf: int
    flags: int
    registers: tuple[tuple[str, BitmapFilter], ...]


@dataclasses.dataclass(frozen=True)
class CpuTemplate:
    """A template in applicable form: capabilities ``(add, number)``, CPUID and MSR changes."""

    kvm_capabilities: tuple[tuple[bool, int], ...] = ()
    cpuid: tuple[CpuidModifier, ...] = ()
    msrs: tuple[tuple[int, BitmapFilter], ...] = ()

    @classmethod
    def from_config(cls, config: CpuConfig) -> "CpuTemplate":
        """A parsed ``CpuConfig`` (already checked when it was decoded)."""
        return cls(
            kvm_capabilities=tuple(parse_kvm_capability(c) for c in config.kvm_capabilities),
            cpuid=tuple(
                CpuidModifier(parse_number(m.leaf), parse_number(m.subleaf), m.flags,
                              tuple((r.register, parse_bitmap(r.bitmap, 32)) for r in m.modifiers))
                for m in config.cpuid_modifiers),
            msrs=tuple((parse_number(m.addr), parse_bitmap(m.bitmap, 64)) for m in config.msr_modifiers),
        )


@dataclasses.dataclass(frozen=True)
class CpuModel:
    """Family/model/stepping fields of CPUID leaf 1 EAX, compared whole as Firecracker does."""

    extended_family: int
    extended_model: int
    family: int
    model: int
    stepping: int

    @classmethod
    def from_eax(cls, eax: int) -> "CpuModel":
        return cls((eax >> 20) & 0xFF, (eax >> 16) & 0xF, (eax >> 8) & 0xF, (eax >> 4) & 0xF, eax & 0xF)


SKYLAKE = CpuModel.from_eax(0x00050654)
CASCADE_LAKE = CpuModel.from_eax(0x00050657)
ICE_LAKE = CpuModel.from_eax(0x000606A6)
MILAN = CpuModel.from_eax(0x00A00F11)


def _template(cpuid: Iterable[tuple[int, int, int, dict[str, tuple[int, int]]]],
              msrs: Iterable[tuple[int, int, int]]) -> CpuTemplate:
    return CpuTemplate(
        cpuid=tuple(CpuidModifier(leaf, subleaf, flags,
                                  tuple((reg, BitmapFilter(*mv)) for reg, mv in regs.items()))
                    for leaf, subleaf, flags, regs in cpuid),
        msrs=tuple((addr, BitmapFilter(mask, value)) for addr, mask, value in msrs))


# Leaf 0x1 EAX: the family/model/stepping the guest sees; ECX/EDX, leaf 0x7.0 and
# 0x80000001 ECX/EDX: features hidden; leaf 0xD: XSAVE components hidden; 0x80000008 EBX:
# WBNOINVD hidden; MSR 0x10A (IA32_ARCH_CAPABILITIES): the mitigations announced.
_C3 = _template(
    cpuid=[
        (0x1, 0, 0, {"eax": (0x0fff3fff, 0x000306e4), "ecx": (0x0040dd3c, 0x00000000), "edx": (0xa8641080, 0x00001080)}),
        (0x7, 0, 1, {"ebx": (0xffafdd3c, 0x00000000), "ecx": (0x4041481e, 0x00000000), "edx": (0x0000000c, 0x00000000)}),
        (0xd, 0, 1, {"eax": (0x000002f8, 0x00000000)}),
        (0xd, 1, 1, {"eax": (0x0000000e, 0x00000000)}),
        (0x80000001, 0, 0, {"ecx": (0x00000120, 0x00000000), "edx": (0x04000000, 0x00000000)}),
    ],
    msrs=[],
)
_T2 = _template(
    cpuid=[
        (0x1, 0, 0, {"eax": (0x0fff3fff, 0x000306f2), "ecx": (0x0004cdfc, 0x00000000), "edx": (0xe8641080, 0x00001080)}),
        (0x7, 0, 1, {"ebx": (0xffefda14, 0x00000200), "ecx": (0x40415f5e, 0x00000000), "edx": (0x0000011c, 0x00000000)}),
        (0xd, 0, 1, {"eax": (0x000002f8, 0x00000000)}),
        (0xd, 1, 1, {"eax": (0x0000000e, 0x00000000)}),
        (0x80000001, 0, 0, {"ecx": (0x20000100, 0x00000000), "edx": (0x04000000, 0x00000000)}),
        (0x80000008, 0, 0, {"ebx": (0x00000200, 0x00000000)}),
    ],
    msrs=[],
)
_T2S = _template(
    cpuid=[
        (0x1, 0, 0, {"eax": (0x0fff3fff, 0x000306f2), "ecx": (0x0004cdfc, 0x00000000), "edx": (0xe8641080, 0x00001080)}),
        (0x7, 0, 1, {"ebx": (0xffefda14, 0x00000200), "ecx": (0x40415f5e, 0x00000000), "edx": (0x0000011c, 0x00000000)}),
        (0xd, 0, 1, {"eax": (0x000002f8, 0x00000000)}),
        (0xd, 1, 1, {"eax": (0x0000000e, 0x00000000)}),
        (0x80000001, 0, 0, {"ecx": (0x20000100, 0x00000000), "edx": (0x04000000, 0x00000000)}),
        (0x80000008, 0, 0, {"ebx": (0x00000200, 0x00000000)}),
    ],
    msrs=[(0x10a, 0xffffffffffffffff, 0x000000000c080c4c)],
)
_T2CL = _template(
    cpuid=[
        (0x1, 0, 0, {"eax": (0x0fff3fff, 0x000306f2), "ecx": (0x0004cdfc, 0x00000000), "edx": (0xe8641080, 0x00001080)}),
        (0x7, 0, 1, {"ebx": (0xffefda14, 0x00000200), "ecx": (0x40415f5e, 0x00000000), "edx": (0x0000011c, 0x00000000)}),
        (0xd, 0, 1, {"eax": (0x000002f8, 0x00000000)}),
        (0xd, 1, 1, {"eax": (0x0000000e, 0x00000000)}),
        (0x80000001, 0, 0, {"ecx": (0x200001c0, 0x00000000), "edx": (0x07c00000, 0x00000000)}),
        (0x80000008, 0, 0, {"ebx": (0x00000200, 0x00000000)}),
    ],
    msrs=[(0x10a, 0xffffffffe2f51e00, 0x0000000000000000)],
)
_T2A = _template(
    cpuid=[
        (0x1, 0, 0, {"eax": (0x0fff3fff, 0x000306f2), "ecx": (0x0004cdfc, 0x00000000), "edx": (0xe8641080, 0x00001080)}),
        (0x7, 0, 1, {"ebx": (0xffefda14, 0x00000200), "ecx": (0x40415f5e, 0x00000000), "edx": (0x0000011c, 0x00000000)}),
        (0xd, 0, 1, {"eax": (0x000002f8, 0x00000000)}),
        (0xd, 1, 1, {"eax": (0x0000000e, 0x00000000)}),
        (0x80000001, 0, 0, {"ecx": (0x200001c4, 0x00000000), "edx": (0x06400000, 0x00000000)}),
        (0x80000008, 0, 0, {"ebx": (0x001c0205, 0x001c0004)}),
    ],
    msrs=[],
)

# name -> (vendor, CPU models it is permitted on, template)
STATIC_TEMPLATES: dict[str, tuple[str, tuple[CpuModel, ...], CpuTemplate]] = {
    "C3": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE, ICE_LAKE), _C3),
    "T2": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE, ICE_LAKE), _T2),
    "T2S": (VENDOR_INTEL, (SKYLAKE, CASCADE_LAKE), _T2S),
    "T2CL": (VENDOR_INTEL, (CASCADE_LAKE, ICE_LAKE), _T2CL),
    "T2A": (VENDOR_AMD, (MILAN,), _T2A),
}


def static_template(name: str, supported: list[kvm_cpuid_entry2]) -> CpuTemplate:
    """The static template ``name`` if the host CPU (as KVM's ``supported`` CPUID shows it) fits."""
    template_vendor, models, template = STATIC_TEMPLATES[name]
    if vendor(supported) != template_vendor:
        raise CpuTemplateError(VENDOR_MISMATCH)
    leaf1 = find(supported, 0x1)
    if leaf1 is None or CpuModel.from_eax(leaf1.eax) not in models:
        raise CpuTemplateError(MODEL_NOT_PERMITTED)
    return template


def select_template(static_name: str | None, custom: CpuConfig | None,
                    supported: list[kvm_cpuid_entry2], *, check_host: bool = True) -> CpuTemplate:
    """The template a microVM is built with; the empty template when none is configured.

    ``check_host`` is off for a snapshot restore: the guest already runs with that CPUID, and
    Firecracker restores it without checking the host again."""
    if custom is not None:
        return CpuTemplate.from_config(custom)
    if static_name in (None, "None"):
        return CpuTemplate()
    if not check_host:
        return STATIC_TEMPLATES[static_name][2]
    return static_template(static_name, supported)


def required_capabilities(template: CpuTemplate) -> list[int]:
    """Firecracker's default capabilities, with the template's additions and removals."""
    caps = list(DEFAULT_CAPABILITIES)
    for add, cap in template.kvm_capabilities:
        if add and cap not in caps:
            caps.append(cap)
        elif not add and cap in caps:
            caps.remove(cap)
    return caps


def check_capabilities(template: CpuTemplate, check_extension: Callable[[int], int]) -> None:
    """Fail on the first required capability ``KVM_CHECK_EXTENSION`` answers 0 for."""
    for cap in required_capabilities(template):
        if check_extension(cap) == 0:
            raise CpuTemplateError(f"Kvm error: Missing KVM capabilities: {cap:#x}")


def apply_cpuid(supported: list[kvm_cpuid_entry2], template: CpuTemplate) -> list[kvm_cpuid_entry2]:
    """A copy of ``supported`` with the template's CPUID modifiers applied (before normalization)."""
    out = [kvm_cpuid_entry2.from_buffer_copy(e) for e in supported]
    for mod in template.cpuid:
        entry = find(out, mod.leaf, mod.subleaf)
        if entry is None:
            raise CpuTemplateError(
                GUEST_CONFIG_PREFIX + "Template changes a CPUID entry not supported by KVM: "
                f"Leaf: {mod.leaf:x}, Subleaf: {mod.subleaf:x}")
        entry.flags = mod.flags
        for register, bitmap in mod.registers:
            setattr(entry, register, bitmap.apply(getattr(entry, register)))
    return out


def apply_msrs(current: dict[int, int], template: CpuTemplate) -> list[tuple[int, int]]:
    """``(index, value)`` for every MSR the template changes, from the values KVM reported."""
    out = []
    for addr, bitmap in template.msrs:
        if addr not in current:
            raise CpuTemplateError(
                GUEST_CONFIG_PREFIX + f"KVM vcpu ioctl failed: Failed to get KVM vcpu msr: {addr:#x}")
        out.append((addr, bitmap.apply(current[addr])))
    return out
