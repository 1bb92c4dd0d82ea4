"""An encoder for the subset of ACPI Machine Language that a microVM's DSDT needs.

Contract: pure functions from Python values to AML bytes.  No I/O, no
interpretation; every function validates its input and raises
:class:`AmlError` for anything the grammar cannot express, so a bad value
never turns into a table that the guest's interpreter misreads.

Primer (section numbers are those of the ACPI 6.4 specification, chapter 20):

* A *term* is an opcode followed by its operands.  Terms that contain other
  terms (Scope, Device, Method, Buffer, Package) put a **PkgLength** right
  after the opcode: the number of bytes from the first PkgLength byte to the
  end of the term, *including the PkgLength bytes themselves* (20.2.4).  It
  takes 1 byte up to 63; otherwise the lead byte's bits 7-6 count the 1-3
  bytes that follow, its bits 3-0 hold the low nibble and each following
  byte the next 8 bits, for at most 28 bits.
* A **NameString** (20.2.2) is an optional root prefix ``\\`` (0x5C) or a run
  of parent prefixes ``^`` (0x5E), then 0 segments (NullName, 0x00), 1
  segment, 2 segments behind DualNamePrefix (0x2E), or more behind
  MultiNamePrefix (0x2F) and a count byte.  A segment is exactly 4 characters
  from ``[A-Z_][A-Z0-9_]{3}``; ASL pads shorter names with ``_``.
* An **integer** (20.2.3) is ZeroOp (0x00), OneOp (0x01), OnesOp (0xFF, all
  64 bits set in a revision-2 table) or a Byte/Word/DWord/QWord prefix
  (0x0A/0x0B/0x0C/0x0E) and the little-endian value; like iasl we always
  pick the shortest form.  A **string** is 0x0D, ASCII 0x01-0x7F, then NUL.
* Named objects (20.2.5): ``Name`` 0x08, ``Scope`` 0x10, ``Method`` 0x14,
  ``Device`` is the two-byte ExtOpPrefix 0x5B 0x82; ``Buffer`` 0x11,
  ``Package`` 0x12 (``VarPackage`` 0x13 beyond 255 elements), ``Return`` 0xA4.

Values passed as terms are already-encoded AML ``bytes``; build them with
the functions here (``integer``, ``string``, ``package`` ...).
"""

from __future__ import annotations

import re
import struct

__all__ = [
    "AmlError", "pkg_length", "name_seg", "name_string", "integer", "string", "buffer",
    "package", "name", "scope", "device", "method", "return_", "eisa_id", "eisa_id_value",
]

# Opcodes, named as in the AML grammar (ACPI 6.4 section 20.2).
ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
VAR_PACKAGE_OP = 0x13
METHOD_OP = 0x14
RETURN_OP = 0xA4
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82                 # follows EXT_OP_PREFIX
ROOT_CHAR = 0x5C                 # '\'
PARENT_PREFIX_CHAR = 0x5E        # '^'
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00

PKG_LENGTH_MAX = (1 << 28) - 1   # 4 bits in the lead byte + 3 whole bytes
ONES = (1 << 64) - 1

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


class AmlError(ValueError):
    """A value that the AML grammar cannot encode."""


def pkg_length(content_len: int) -> bytes:
    """The PkgLength for a term whose bytes after the PkgLength number ``content_len``.

    The encoded value counts its own bytes too (ACPI 6.4 section 20.2.4), so
    the size of the encoding is chosen first and then added in.
    """
    if content_len < 0:
        raise AmlError(f"negative package length {content_len}")
    if content_len + 1 <= 0x3F:
        return bytes([content_len + 1])
    for follow in (1, 2, 3):
        total = content_len + 1 + follow
        if total < 1 << (4 + 8 * follow):
            lead = (follow << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(follow, "little")
    raise AmlError(f"package of {content_len} bytes exceeds the 28-bit PkgLength")


def _with_pkg_length(opcode: bytes, body: bytes) -> bytes:
    return opcode + pkg_length(len(body)) + body


def name_seg(seg: str) -> bytes:
    """One 4-byte NameSeg; ``seg`` of 1-4 characters is padded with ``_`` as ASL does."""
    if not _NAME_SEG.fullmatch(seg):
        raise AmlError(f"invalid AML name segment {seg!r}")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """Encode an ASL path such as ``_HID``, ``\\_SB.COM1`` or ``^^PCI0.LPC``."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        if not prefix:
            raise AmlError("empty AML name")
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"AML name with {len(segs)} segments exceeds 255")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned 64-bit ``value`` (ACPI 6.4 section 20.2.3)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AmlError(f"AML integer must be an int, not {type(value).__name__}")
    if not 0 <= value <= ONES:
        raise AmlError(f"AML integer {value} outside 0..2**64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == ONES:
        return bytes([ONES_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    """A String object: ASCII characters 0x01-0x7F and a terminating NUL."""
    if not text.isascii() or "\x00" in text:
        raise AmlError(f"AML string must be ASCII without NUL: {text!r}")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def buffer(data: bytes) -> bytes:
    """DefBuffer: BufferOp PkgLength BufferSize ByteList, the size as an integer."""
    return _with_pkg_length(bytes([BUFFER_OP]), integer(len(data)) + bytes(data))


def package(*elements: bytes) -> bytes:
    """DefPackage of encoded elements; DefVarPackage when there are more than 255."""
    body = b"".join(elements)
    if len(elements) <= 255:
        return _with_pkg_length(bytes([PACKAGE_OP]), bytes([len(elements)]) + body)
    return _with_pkg_length(bytes([VAR_PACKAGE_OP]), integer(len(elements)) + body)


def name(path: str, value: bytes) -> bytes:
    """DefName: bind ``path`` to an encoded data object."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: open ``path`` and place ``terms`` in it."""
    return _with_pkg_length(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    return _with_pkg_length(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(path: str, arg_count: int, *terms: bytes, serialized: bool = False,
           sync_level: int = 0) -> bytes:
    """DefMethod; MethodFlags hold ArgCount (bits 2-0), SerializeFlag (3), SyncLevel (7-4)."""
    if not 0 <= arg_count <= 7:
        raise AmlError(f"method argument count {arg_count} outside 0..7")
    if not 0 <= sync_level <= 15:
        raise AmlError(f"method sync level {sync_level} outside 0..15")
    flags = arg_count | (0x08 if serialized else 0) | (sync_level << 4)
    return _with_pkg_length(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    """DefReturn: ReturnOp ArgObject."""
    return bytes([RETURN_OP]) + value


def eisa_id_value(pnp_id: str) -> int:
    """The 32-bit compressed EISA id of a PNP id like ``PNP0501`` (ACPI 6.4 section 19.6.35).

    Three letters of 5 bits each (``A`` = 1) and four hex digits are packed
    big-endian into bits 30-0; the integer the table stores is that word
    byte-swapped, which is why ``PNP0303`` reads as 0x0303D041.
    """
    if not _EISA_ID.fullmatch(pnp_id):
        raise AmlError(f"invalid EISA id {pnp_id!r}: want 3 letters and 4 hex digits")
    packed = 0
    for letter in pnp_id[:3]:
        packed = (packed << 5) | (ord(letter) - 0x40)
    packed = (packed << 16) | int(pnp_id[3:], 16)
    return int.from_bytes(packed.to_bytes(4, "big"), "little")


def eisa_id(pnp_id: str) -> bytes:
    """``EISAID("PNP0501")`` as an encoded integer."""
    return integer(eisa_id_value(pnp_id))
