"""The snapshot state file: a versioned, checksummed container around msgpack.

Layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"AVMMSNAP"
    offset 8   u32       format version (:data:`FORMAT_VERSION`)
    offset 12  u32       reserved, 0
    offset 16  u64       length N of the body
    offset 24  N bytes   body: :class:`SnapshotState` as msgpack
    offset 24+N u64      CRC-64/XZ of bytes [0, 24+N)

Like Firecracker's (a version header and a CRC64 over the whole file), a
truncated, corrupted or foreign file is refused before anything in it is
used, with :class:`SnapshotFormatError` naming what is wrong.  A body that
passes the checksum is still untrusted: it is decoded into typed structs
(msgspec refuses wrong types), and every value becomes live only through the
setters that validate it (KVM's ioctls, the devices' ``restore_state``).
No I/O here except :func:`read_state_file` / :func:`write_state_file`.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec

MAGIC = b"AVMMSNAP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ")
_CRC = struct.Struct("<Q")
# A state file holds registers and device state, kilobytes per vCPU; refuse to read a huge file.
MAX_STATE_FILE_BYTES = 64 << 20


class SnapshotFormatError(Exception):
    """The state file cannot be used; the message says why."""


def _crc64_table() -> list[int]:
    poly = 0xC96C5795D7870F42          # ECMA-182, reflected (CRC-64/XZ)
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc64_table()


def crc64(data: bytes | memoryview) -> int:
    """CRC-64/XZ (check value of b"123456789": 0x995DC9BBDF1939FA)."""
    crc = 0xFFFF_FFFF_FFFF_FFFF
    table = _TABLE
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFF_FFFF_FFFF_FFFF


class MemoryRegionState(msgspec.Struct, forbid_unknown_fields=True):
    guest_addr: int
    size: int
    file_offset: int


class VcpuState(msgspec.Struct, forbid_unknown_fields=True):
    """One vCPU, each KVM struct as its raw bytes (the fixed x86-64 KVM ABI)."""

    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes | None          # None where KVM has no KVM_GET_XSAVE
    xcrs: bytes | None           # None where KVM has no KVM_GET_XCRS
    lapic: bytes
    msrs: list[tuple[int, int]]
    events: bytes
    mp_state: int
    debugregs: bytes
    tsc_khz: int | None


class VmState(msgspec.Struct, forbid_unknown_fields=True):
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes
    host_realtime_ns: int = 0     # the host's CLOCK_REALTIME when the clock was read


class SnapshotState(msgspec.Struct, forbid_unknown_fields=True):
    """Everything but guest memory."""

    asyncvmm_version: str
    snapshot_type: str            # "Full" or "Diff"
    config: bytes                 # the VmConfig the microVM was built from, as JSON
    memory: list[MemoryRegionState]
    memory_file_size: int
    vm: VmState
    vcpus: list[VcpuState]
    devices: dict[str, Any]       # device name -> that device's own versioned state
    # The MMDS data store as compact JSON (asyncvmm.snapshot.mmds); None: never PUT.
    mmds: bytes | None = None
    # A Diff snapshot: the (offset, length) ranges of the memory file it wrote; the rest of
    # the file is a hole and the base snapshot's memory holds those pages.
    dirty_ranges: list[tuple[int, int]] | None = None


def encode_state(state: SnapshotState) -> bytes:
    body = msgspec.msgpack.encode(state)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body)) + body
    return head + _CRC.pack(crc64(head))


def file_version(data: bytes) -> int:
    """The format version a state file declares (for ``--describe-snapshot``)."""
    if len(data) < _HEADER.size:
        raise SnapshotFormatError(
            f"the snapshot state file is truncated: {len(data)} bytes, shorter than its "
            f"{_HEADER.size}-byte header")
    magic, version, _, _ = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotFormatError("this is not an asyncvmm snapshot state file (bad magic number)")
    return version


def decode_state(data: bytes) -> SnapshotState:
    version = file_version(data)
    if version != FORMAT_VERSION:
        raise SnapshotFormatError(
            f"the snapshot state file has format version {version}; this asyncvmm reads "
            f"version {FORMAT_VERSION} only")
    _, _, _, length = _HEADER.unpack_from(data)
    end = _HEADER.size + length
    if len(data) < end + _CRC.size:
        raise SnapshotFormatError(
            f"the snapshot state file is truncated: {len(data)} bytes, its header says "
            f"{end + _CRC.size}")
    if len(data) > end + _CRC.size:
        raise SnapshotFormatError(
            f"the snapshot state file has {len(data) - end - _CRC.size} bytes after its checksum")
    (stored,) = _CRC.unpack_from(data, end)
    computed = crc64(memoryview(data)[:end])
    if stored != computed:
        raise SnapshotFormatError(
            f"the snapshot state file is corrupted: CRC64 {computed:#018x} does not match the "
            f"stored {stored:#018x}")
    try:
        return msgspec.msgpack.decode(memoryview(data)[_HEADER.size:end], type=SnapshotState)
    except msgspec.DecodeError as e:
        raise SnapshotFormatError(f"the snapshot state does not decode: {e}") from None


def read_state_file(path: str) -> SnapshotState:
    return decode_state(read_bounded(path))


def read_bounded(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_STATE_FILE_BYTES:
                raise SnapshotFormatError(
                    f"the snapshot state file is {size} bytes, more than the "
                    f"{MAX_STATE_FILE_BYTES} a state file may have")
            return f.read(MAX_STATE_FILE_BYTES + 1)
    except OSError as e:
        raise SnapshotFormatError(f"cannot read the snapshot state file {path}: "
                                  f"{os.strerror(e.errno) if e.errno else e}") from None


def write_state_file(path: str, state: SnapshotState) -> None:
    data = encode_state(state)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
