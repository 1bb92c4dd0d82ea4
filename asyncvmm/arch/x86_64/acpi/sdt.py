"""System description table framing: the common header, checksums and the Generic Address Structure.

Contract: pure functions returning bytes; no I/O.  Every table built here
has a correct Length and a Checksum that makes all its bytes sum to 0 mod
256 (ACPI 6.4 section 5.2.6).
"""

from __future__ import annotations

import struct

OEM_ID = b"ASYVMM"               # 6 bytes
OEM_REVISION = 1
CREATOR_ID = b"AVMM"             # 4 bytes, the "ASL compiler" of a table we build in code
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")   # 36 bytes
CHECKSUM_OFFSET = 9

# Generic Address Structure (5.2.3.2): space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
ADDRESS_SPACE_SYSTEM_IO = 1
ACCESS_SIZE_BYTE = 1


class AcpiError(ValueError):
    """A machine description that ACPI tables cannot express (too many vCPUs, a bad GSI ...)."""


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero mod 256."""
    return -sum(data) & 0xFF


def sdt(signature: bytes, revision: int, table_id: bytes, body: bytes) -> bytes:
    """A complete table: the 36-byte header over ``body``, with length and checksum filled in."""
    if len(signature) != 4 or len(table_id) > 8:
        raise AcpiError(f"bad table signature {signature!r} or OEM table id {table_id!r}")
    header = HEADER.pack(signature, HEADER.size + len(body), revision, 0, OEM_ID,
                         table_id.ljust(8, b" "), OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def gas_io(port: int, bit_width: int = 8) -> bytes:
    """A Generic Address Structure for ``bit_width`` bits at a system I/O port."""
    if not 0 <= port <= 0xFFFF:
        raise AcpiError(f"I/O port {port:#x} outside 0..0xffff")
    return GAS.pack(ADDRESS_SPACE_SYSTEM_IO, bit_width, 0, ACCESS_SIZE_BYTE, port)

