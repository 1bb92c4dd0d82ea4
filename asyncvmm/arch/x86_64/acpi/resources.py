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
DWORD_ADDRESS_TAG = 0x87         # large item 0x07
WORD_ADDRESS_TAG = 0x88          # large item 0x08
EXTENDED_IRQ_TAG = 0x89          # large item 0x09
QWORD_ADDRESS_TAG = 0x8A         # large item 0x0A

# Address Space Descriptors (6.4.3.5, Tables 6.44-6.46): Resource Type, General Flags.
RESOURCE_TYPE_MEMORY = 0
RESOURCE_TYPE_BUS_NUMBER = 2
_GENERAL_CONSUMER = 1 << 0       # clear: ResourceProducer (a bridge window)
_GENERAL_MIN_FIXED = 1 << 2      # _MIF
_GENERAL_MAX_FIXED = 1 << 3      # _MAF
# Memory Resource Flag (Type Specific, Table 6.49): _RW bit 0, _MEM bits 2-1.
_MEMORY_READ_WRITE = 1 << 0
_MEMORY_CACHEABLE = 1 << 1

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


def _address_space(tag: int, width: int, resource_type: int, specific: int, minimum: int,
                   length: int, *, consumer: bool) -> bytes:
    """A Word/DWord/QWord Address Space Descriptor (6.4.3.5.1-3) for one fixed range.

    Min and max are fixed (_MIF, _MAF) and decoding positive; granularity and
    translation offset are 0, as 6.4.3.5 requires of a fixed-size,
    fixed-location range.
    """
    limit = 1 << (8 * width)
    _check("range minimum", minimum, limit)
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0 \
            or minimum + length > limit:
        raise AmlError(f"range {minimum:#x}+{length!r} is empty or does not fit "
                       f"{8 * width}-bit addresses")
    general = _GENERAL_MIN_FIXED | _GENERAL_MAX_FIXED | (_GENERAL_CONSUMER if consumer else 0)
    fields = "<BBB" + {2: "H", 4: "I", 8: "Q"}[width] * 5
    body = struct.pack(fields, resource_type, general, specific, 0, minimum, minimum + length - 1,
                       0, length)
    return struct.pack("<BH", tag, len(body)) + body


def _memory_flags(cacheable: bool, writeable: bool) -> int:
    return (_MEMORY_READ_WRITE if writeable else 0) | (_MEMORY_CACHEABLE if cacheable else 0)


def word_bus_number(minimum: int, length: int, *, consumer: bool = False) -> bytes:
    """ASL ``WordBusNumber``: the bus numbers ``minimum .. minimum + length - 1``.

    A PCI host bridge *produces* its bus range, hence the producer default.
    """
    return _address_space(WORD_ADDRESS_TAG, 2, RESOURCE_TYPE_BUS_NUMBER, 0, minimum, length,
                          consumer=consumer)


def dword_memory(minimum: int, length: int, *, consumer: bool = True, cacheable: bool = False,
                 writeable: bool = True) -> bytes:
    """ASL ``DWordMemory`` for a fixed range below 4 GiB (6.4.3.5.2)."""
    return _address_space(DWORD_ADDRESS_TAG, 4, RESOURCE_TYPE_MEMORY,
                          _memory_flags(cacheable, writeable), minimum, length, consumer=consumer)


def qword_memory(minimum: int, length: int, *, consumer: bool = True, cacheable: bool = False,
                 writeable: bool = True) -> bytes:
    """ASL ``QWordMemory`` for a fixed range (6.4.3.5.1), the shape of a plain MMIO window."""
    return _address_space(QWORD_ADDRESS_TAG, 8, RESOURCE_TYPE_MEMORY,
                          _memory_flags(cacheable, writeable), minimum, length, consumer=consumer)


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
