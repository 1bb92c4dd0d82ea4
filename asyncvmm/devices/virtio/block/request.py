"""virtio-block requests (§5.2.6): parsing is pure validation, one error per failure.

Primer.  A request is one chain carrying ``struct virtio_blk_req``::

    le32 type; le32 reserved; le64 sector;   16 bytes, device-readable
    u8 data[];                               readable (OUT) or writable (IN, GET_ID)
    u8 status;                               the last device-writable byte

§2.6.4 forbids assuming how that is split into descriptors, so the parser
sees the chain as two byte streams (readable, writable): the header is the
first 16 readable bytes, the status is the last writable byte and the data is
whatever lies between.  ``sector`` counts 512-byte units whatever the
block size.

:func:`parse` returns a :class:`Request` or raises a :class:`RequestError`
whose ``status`` is what the device answers and whose ``status_at`` says
where (``None`` when the chain has no writable byte at all, so nothing can be
answered but the used-ring entry).  :func:`parse_framed` is the hot path for the
usual framing (a descriptor each for header, data and status): the same
answer for the requests it takes, ``None`` for the rest (:func:`parse_framed_at` reads it
straight from the descriptor table).  No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from asyncvmm.devices.virtio.chain import ChainBuffers, DescriptorChain, Segments, direct_three
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_WRITE
from asyncvmm.memory import GuestMemory, GuestMemoryError

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20
SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

_HEADER = struct.Struct("<IIQ")


class RequestError(Exception):
    status = VIRTIO_BLK_S_IOERR

    def __init__(self, message: str, status_at: Segments | None = None) -> None:
        super().__init__(message)
        self.status_at = status_at


class MissingStatusError(RequestError):
    """No device-writable byte for the status (§5.2.6)."""


class HeaderLengthError(RequestError):
    """Fewer than 16 device-readable bytes for the header."""


class UnexpectedReadableDataError(RequestError):
    """Device-readable bytes after the header of a request that carries none (IN, GET_ID)."""


class UnexpectedWritableDataError(RequestError):
    """Device-writable bytes besides the status in a request that returns none (OUT)."""


class DataLengthError(RequestError):
    """IN/OUT data that is not a whole number of 512-byte sectors (§5.2.6.1)."""


class SectorRangeError(RequestError):
    """IN/OUT data that runs past the end of the disk."""


class ReadOnlyError(RequestError):
    """OUT to a VIRTIO_BLK_F_RO device (§5.2.6.2: IOERR, no data written)."""


class IdBufferError(RequestError):
    """GET_ID without room for the id."""


class UnsupportedRequestError(RequestError):
    """A type the device does not implement, or FLUSH without VIRTIO_BLK_F_FLUSH (§5.2.6.2)."""

    status = VIRTIO_BLK_S_UNSUPP


@dataclass(frozen=True, slots=True)
class Disk:
    """What the parser needs to know about the backing disk."""

    capacity: int          # in 512-byte sectors
    read_only: bool
    flush: bool            # VIRTIO_BLK_F_FLUSH offered


@dataclass(slots=True)
class Request:
    head: int
    type: int
    sector: int
    data: Segments
    status_at: Segments

    @classmethod
    def from_framed(cls, head: int, framed: Framed) -> Request:
        """The :class:`Request` :func:`parse` would give for what :func:`parse_framed` read."""
        req_type, offset, data_addr, nbytes, status_addr = framed
        data, status_at = Segments(), Segments()
        data.parts, data.length = [(data_addr, nbytes)], nbytes
        status_at.parts, status_at.length = [(status_addr, 1)], 1
        return cls(head, req_type, offset >> SECTOR_SHIFT, data, status_at)

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT

    @property
    def nbytes(self) -> int:
        return self.data.length

    def used_len(self, status: int) -> int:
        """Bytes the device wrote into the chain (§2.7.8): data for a successful IN, then status."""
        if status == VIRTIO_BLK_S_OK and self.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID):
            written = self.data.length if self.type == VIRTIO_BLK_T_IN else min(self.data.length, VIRTIO_BLK_ID_BYTES)
            return written + 1
        return 1


def parse(mem: GuestMemory, bufs: ChainBuffers, disk: Disk) -> Request:
    readable, writable = bufs.readable, bufs.writable
    if writable.length == 0:
        raise MissingStatusError("no device-writable status byte")
    in_data, status_at = writable.split_last_byte()
    if readable.length < _HEADER.size:
        raise HeaderLengthError(f"header of {readable.length} bytes", status_at)
    req_type, _reserved, sector = _HEADER.unpack(_read_header(mem, readable))
    in_len = writable.length - 1                    # device-writable data bytes
    out_len = readable.length - _HEADER.size        # device-readable data bytes

    if req_type == VIRTIO_BLK_T_IN:
        if out_len:
            raise UnexpectedReadableDataError(f"IN with {out_len} readable data bytes", status_at)
        data = in_data
    elif req_type == VIRTIO_BLK_T_OUT:
        if disk.read_only:
            raise ReadOnlyError("OUT to a read-only device", status_at)
        if in_len:
            raise UnexpectedWritableDataError(f"OUT with {in_len} writable data bytes", status_at)
        data = readable.after(_HEADER.size)
    elif req_type == VIRTIO_BLK_T_FLUSH:
        if not disk.flush:
            raise UnsupportedRequestError("FLUSH without VIRTIO_BLK_F_FLUSH", status_at)
        # §5.2.6.1: the driver SHOULD NOT send data with a flush; whatever it sent is ignored.
        return Request(bufs.head, req_type, 0, Segments(), status_at)
    elif req_type == VIRTIO_BLK_T_GET_ID:
        if out_len:
            raise UnexpectedReadableDataError(f"GET_ID with {out_len} readable data bytes", status_at)
        if in_len == 0:
            raise IdBufferError("GET_ID without an id buffer", status_at)
        return Request(bufs.head, req_type, 0, in_data, status_at)
    else:
        raise UnsupportedRequestError(f"request type {req_type}", status_at)

    if data.length % SECTOR_SIZE:
        raise DataLengthError(f"{data.length} data bytes is not a multiple of {SECTOR_SIZE}", status_at)
    end = sector + (data.length >> SECTOR_SHIFT)
    if end > disk.capacity:
        raise SectorRangeError(f"sectors {sector}..{end} beyond capacity {disk.capacity}", status_at)
    return Request(bufs.head, req_type, sector, data, status_at)


# parse_framed's answer: (type, offset in bytes, data address, data length, status address).
# A plain tuple: this is built for every request, and a NamedTuple's constructor is a
# Python-level call.
Framed = tuple[int, int, int, int, int]


def parse_framed(mem: GuestMemory, chain: DescriptorChain, disk: Disk) -> Framed | None:
    """:func:`parse_framed_at` for a chain not yet walked."""
    descs = chain.direct_three()
    return None if descs is None else _framed(mem, descs, disk)


def parse_framed_at(mem: GuestMemory, table: memoryview, head: int, disk: Disk) -> Framed | None:
    """The request at ``head`` of the descriptor table ``table`` if it is an IN or OUT in
    the usual framing that :func:`parse` accepts; ``None`` for anything else, which
    :func:`parse` then parses or names.

    The usual framing is what Linux sends for one segment: the 16-byte header, the data
    and the status byte, a descriptor each.  This is the per-request hot path of every
    read and write, so it answers in plain numbers (:data:`Framed`): no
    :class:`DescriptorChain`, no :class:`Segments`, no :class:`Request`.  A test holds it
    to :func:`parse` over every combination of what it checks.
    """
    descs = direct_three(mem, table, head)
    return None if descs is None else _framed(mem, descs, disk)


def _framed(mem: GuestMemory, descs, disk: Disk) -> Framed | None:
    (h_addr, h_len, h_flags, _), (d_addr, d_len, d_flags, _), (s_addr, s_len, s_flags, _) = descs
    if (h_len != _HEADER.size or h_flags & VIRTQ_DESC_F_WRITE or s_len != 1
            or not s_flags & VIRTQ_DESC_F_WRITE or d_len == 0 or d_len % SECTOR_SIZE):
        return None
    req_type, _reserved, sector = mem.unpack(_HEADER, h_addr)
    if req_type == VIRTIO_BLK_T_IN:
        if not d_flags & VIRTQ_DESC_F_WRITE:
            return None
    elif req_type == VIRTIO_BLK_T_OUT:
        if d_flags & VIRTQ_DESC_F_WRITE or disk.read_only:
            return None
    else:
        return None
    if sector + (d_len >> SECTOR_SHIFT) > disk.capacity:
        return None
    return req_type, sector << SECTOR_SHIFT, d_addr, d_len, s_addr


def _read_header(mem: GuestMemory, readable: Segments) -> bytes:
    addr, n = readable.parts[0]
    if n >= _HEADER.size:
        try:
            return mem.read(addr, _HEADER.size)     # the usual framing: a descriptor of its own
        except GuestMemoryError:                    # a buffer across two adjacent regions
            pass
    return readable.slice(0, _HEADER.size).read(mem)


def device_id(drive_id: str) -> bytes:
    """The GET_ID answer: the drive id, NUL-padded or cut to VIRTIO_BLK_ID_BYTES (§5.2.6)."""
    return drive_id.encode("utf-8", "replace")[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")
