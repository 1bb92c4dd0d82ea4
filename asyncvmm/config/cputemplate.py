"""``CpuConfig``: a custom CPU template for x86_64 (``PUT /cpu-config``, ``--config-file``).

A template names KVM capabilities to check (``"171"``) or not to check
(``"!56"``), CPUID leaves whose registers it changes, and MSRs it changes.
Each change is a *bitmap*: ``0b`` (optional) then one character per bit,
most significant first: ``1`` sets the bit, ``0`` clears it, ``x`` leaves it;
``_`` separates groups and is skipped; a short bitmap leaves the missing
high bits alone (docs/cpu_templates/cpu-templates.md in Firecracker 1.16).

Parsing follows Firecracker 1.16's deserializers and fails with their words
(as a 400 on ``PUT /cpu-config``): leaf, subleaf and MSR address need a
``0x`` or ``0b`` prefix; the register is one of ``eax ebx ecx edx``; a bitmap
longer than its register or with another character is refused; ``flags`` is
a u32.  On x86_64 a template has only ``kvm_capabilities``,
``cpuid_modifiers`` and ``msr_modifiers``: the aarch64 fields
(``reg_modifiers``, ``vcpu_features``) are unknown fields there, refused as
serde refuses them.  The leaf and MSR being known to KVM, and the
capabilities being present, are checked at InstanceStart
(:mod:`asyncvmm.arch.x86_64.cputemplate`).  No I/O here.
"""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from asyncvmm.config.common import U32, Base
from asyncvmm.config.errors import ConfigError

CPUID_REGISTERS = ("eax", "ebx", "ecx", "edx")
INVALID_CPUID_REGISTER = "Invalid CPUID register. Must be one of [eax, ebx, ecx, edx]"


class BitmapFilter(NamedTuple):
    """A parsed bitmap: bits in ``mask`` are replaced by those of ``value``."""

    mask: int
    value: int

    def apply(self, register: int) -> int:
        return (register & ~self.mask) | self.value


def parse_bitmap(text: str, bits: int) -> BitmapFilter:
    """``text`` as a ``bits``-wide bitmap, read from its last character as Firecracker does."""
    digits = text[2:] if text.startswith("0b") else text
    mask = value = 0
    bit = 0
    for ch in reversed(digits.encode()):
        if bit == bits:
            raise ConfigError(f"Failed to parse string [{text}] as a bitmap - string is too long")
        if ch == ord("_"):
            continue
        if ch in b"01":
            mask |= 1 << bit
            value |= (ch - ord("0")) << bit
        elif ch != ord("x"):
            # Firecracker prints the offending byte as a number.
            raise ConfigError(f"Failed to parse string [{text}] as a bitmap - unknown character: {ch}")
        bit += 1
    return BitmapFilter(mask, value)


def _rust_uint(digits: str, radix: int, bits: int) -> int | str:
    """Rust's ``from_str_radix`` for an unsigned type: the value, or its error kind."""
    body = digits[1:] if digits.startswith("+") else digits
    if not digits:
        return "Empty"
    allowed = {2: "01", 10: "0123456789", 16: "0123456789abcdefABCDEF"}[radix]
    if not body or any(ch not in allowed for ch in body):
        return "InvalidDigit"
    number = int(body, radix)
    return number if number < 1 << bits else "PosOverflow"


def parse_number(text: str, bits: int = 32) -> int:
    """A leaf, subleaf or MSR address: ``0x`` hexadecimal or ``0b`` binary, nothing else."""
    if text.startswith("0b"):
        parsed = _rust_uint(text[2:], 2, bits)
    elif text.startswith("0x"):
        parsed = _rust_uint(text[2:], 16, bits)
    else:
        raise ConfigError(
            f"No supported number system prefix found in value [{text}]. Make sure to prefix the "
            "number with '0x' for hexadecimal numbers or '0b' for binary numbers."
        )
    if isinstance(parsed, str):
        raise ConfigError(
            f"Failed to parse string [{text}] as a number for CPU template - "
            f"ParseIntError {{ kind: {parsed} }}"
        )
    return parsed


_PARSE_INT_MESSAGES = {
    "Empty": "cannot parse integer from empty string",
    "InvalidDigit": "invalid digit found in string",
    "PosOverflow": "number too large to fit in target type",
}


def parse_kvm_capability(text: str) -> tuple[bool, int]:
    """``"N"`` (check capability N too) or ``"!N"`` (do not check it): ``(add, N)``."""
    add = not text.startswith("!")
    parsed = _rust_uint(text if add else text[1:], 10, 32)
    if isinstance(parsed, str):
        raise ConfigError(
            f"Failed to parse string [{text}] as a kvm capability - can not convert to numeric: "
            f"{_PARSE_INT_MESSAGES[parsed]}"
        )
    return add, parsed


# The modifier objects ignore unknown fields: only the template itself denies them in serde.

class CpuidRegisterModifier(msgspec.Struct):
    """One register of a CPUID leaf and the bitmap applied to it."""

    register: str
    bitmap: str

    def check(self) -> None:
        if self.register not in CPUID_REGISTERS:
            raise ConfigError(INVALID_CPUID_REGISTER)
        parse_bitmap(self.bitmap, 32)


class CpuidLeafModifier(msgspec.Struct):
    """The registers to change in CPUID ``leaf``/``subleaf``; ``flags`` replace KVM's flags."""

    leaf: str
    subleaf: str
    flags: U32
    modifiers: list[CpuidRegisterModifier]

    def check(self) -> None:
        parse_number(self.leaf)
        parse_number(self.subleaf)


class MsrModifier(msgspec.Struct):
    """The MSR at ``addr`` and the 64-bit bitmap applied to it."""

    addr: str
    bitmap: str

    def check(self) -> None:
        parse_number(self.addr)
        parse_bitmap(self.bitmap, 64)


class CpuConfig(Base):
    """``CpuConfig`` on x86_64; ``{}`` is the empty template (it changes nothing)."""

    kvm_capabilities: list[str] = msgspec.field(default_factory=list)
    cpuid_modifiers: list[CpuidLeafModifier] = msgspec.field(default_factory=list)
    msr_modifiers: list[MsrModifier] = msgspec.field(default_factory=list)

    def check(self) -> None:
        for cap in self.kvm_capabilities:
            parse_kvm_capability(cap)
