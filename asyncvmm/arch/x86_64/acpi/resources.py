"""ACPI resource descriptors and the ResourceTemplate buffer that carries them in ``_CRS``.

Contract: pure functions returning descriptor bytes (ACPI 6.4 section 6.4);
no I/O.  Out-of-range values raise :class:`~.aml.AmlError`.

Primer: a small descriptor starts with one tag byte ``0 nnnn lll`` (item name
n, data length l); a large one with ``1 nnnnnnn`` and a 16-bit data length.
A template is the descriptors followed by the End Tag (0x79) and a checksum
byte, wrapped in an AML Buffer.  A checksum of 0 means "not checksummed",
which is what iasl emits and what OSPM accepts.
"""

from __future__ import annotations

import struct

from .aml import AmlError, buffer

# Tag bytes (ACPI 6.4 sections 6.4.2 and 6.4.3).
IRQ_TAG_NO_FLAGS = 0x22          # small item 0x4, length 2
IRQ_TAG = 0x23                   # small item 0x4, length 3
IO_PORT_TAG = 0x47               # small item 0x8, length 7
END_TAG = 0x79                   # small item 0xF, length 1
MEMORY32_FIXED_TAG = 0x86        # large item 0x06
QWORD_ADDRESS_TAG = 0x8A         # large item 0x0A
EXTENDED_IRQ_TAG = 0x89          # large item 0x09

# Extended Interrupt Descriptor flags (6.4.3.6): _HE, _LL, _SHR, _WKC.
_CONSUMER = 1 << 0
_EDGE = 1 << 1
_ACTIVE_LOW = 1 << 2
_SHARED = 1 << 3
_WAKE = 1 << 4


def _check(name: str, value: int, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise AmlError(f"{name} {value!r} outside 0..{limit - 1:#x}")
    return value


def irq(*irqs: int, flags: bool = False, edge: bool = True, active_low: bool = False,
        shared: bool = False, wake: bool = False) -> bytes:
    """IRQ Descriptor (6.4.2.1): a 16-bit mask of ISA IRQs, optionally with a flags byte.

    Without flags (ASL ``IRQNoFlags``) the interrupt is edge, active-high,
    exclusive, the ISA convention.
    """
    if not irqs:
        raise AmlError("IRQ descriptor needs at least one IRQ")
    mask = 0
    for n in irqs:
        mask |= 1 << _check("ISA IRQ", n, 16)
    if not flags:
        if not edge or active_low or shared or wake:
            raise AmlError("IRQNoFlags is always edge, active-high, exclusive")
        return struct.pack("<BH", IRQ_TAG_NO_FLAGS, mask)
    info = (1 if edge else 0) | (0x08 if active_low else 0) | (0x10 if shared else 0)
    info |= 0x20 if wake else 0
    return struct.pack("<BHB", IRQ_TAG, mask, info)


def io(minimum: int, maximum: int, alignment: int, length: int, *, decode16: bool = True) -> bytes:
    """I/O Port Descriptor (6.4.2.5); ``decode16`` says the device decodes all 16 address bits."""
    _check("I/O minimum", minimum, 1 << 16)
    _check("I/O maximum", maximum, 1 << 16)
    _check("I/O alignment", alignment, 1 << 8)
    _check("I/O length", length, 1 << 8)
    if maximum < minimum:
        raise AmlError(f"I/O range maximum {maximum:#x} below minimum {minimum:#x}")
    return struct.pack("<BBHHBB", IO_PORT_TAG, 1 if decode16 else 0, minimum, maximum, alignment,
                       length)


def memory32_fixed(base: int, length: int, *, writeable: bool = True) -> bytes:
    """32-Bit Fixed Memory Range Descriptor (6.4.3.4)."""
    _check("memory base", base, 1 << 32)
    _check("memory length", length, 1 << 32)
    if base + length > 1 << 32:
        raise AmlError(f"memory range {base:#x}+{length:#x} crosses 4 GiB")
    return struct.pack("<BHBII", MEMORY32_FIXED_TAG, 9, 1 if writeable else 0, base, length)


def qword_memory(minimum: int, length: int, *, consumer: bool = True, cacheable: bool = False,
                 writeable: bool = True) -> bytes:
    """QWord Address Space Descriptor (6.4.3.5.1) for a fixed memory range.

    Min and max are fixed (_MIF, _MAF), decoding is positive, granularity 0
    and translation offset 0: the shape of a plain MMIO window.
    """
    _check("memory minimum", minimum, 1 << 64)
    if length <= 0 or minimum + length > 1 << 64:
        raise AmlError(f"memory range {minimum:#x}+{length:#x} is empty or crosses 2**64")
    general = 0x0C | (1 if consumer else 0)                         # _MAF, _MIF, consumer
    specific = (1 if writeable else 0) | ((1 if cacheable else 0) << 1)   # _RW, _MEM
    body = struct.pack("<BBBQQQQQ", 0, general, specific, 0, minimum, minimum + length - 1, 0,
                       length)
    return struct.pack("<BH", QWORD_ADDRESS_TAG, len(body)) + body


def extended_interrupt(*gsis: int, consumer: bool = True, edge: bool = True,
                       active_low: bool = False, shared: bool = False, wake: bool = False) -> bytes:
    """Extended Interrupt Descriptor (6.4.3.6), ASL ``Interrupt(...) {gsi, ...}``."""
    if not 1 <= len(gsis) <= 255:
        raise AmlError(f"extended interrupt descriptor needs 1..255 interrupts, got {len(gsis)}")
    flags = (_CONSUMER if consumer else 0) | (_EDGE if edge else 0)
    flags |= (_ACTIVE_LOW if active_low else 0) | (_SHARED if shared else 0) | (_WAKE if wake else 0)
    numbers = b"".join(struct.pack("<I", _check("interrupt number", g, 1 << 32)) for g in gsis)
    return struct.pack("<BHBB", EXTENDED_IRQ_TAG, 2 + len(numbers), flags, len(gsis)) + numbers


def end_tag(descriptors: bytes, *, checksum: bool = False) -> bytes:
    """End Tag (6.4.2.9); with ``checksum`` the byte makes the template sum to zero."""
    if not checksum:
        return bytes([END_TAG, 0])
    return bytes([END_TAG, (-(sum(descriptors) + END_TAG)) & 0xFF])


def resource_template(*descriptors: bytes, checksum: bool = False) -> bytes:
    """ASL ``ResourceTemplate() { ... }``: the descriptors and End Tag as an AML Buffer."""
    body = b"".join(descriptors)
    return buffer(body + end_tag(body, checksum=checksum))
