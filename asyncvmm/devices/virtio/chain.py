"""Descriptor chains of a split virtqueue, walked defensively.

Primer (§2.7.5, §2.7.5.3, §2.7.4).  A buffer the driver hands over is a chain
of 16-byte descriptors ``{le64 addr; le32 len; le16 flags; le16 next}`` in the
descriptor table.  ``VIRTQ_DESC_F_NEXT`` links to ``next``;
``VIRTQ_DESC_F_WRITE`` marks a device-writable buffer, and all device-readable
descriptors come before all device-writable ones.  A descriptor with
``VIRTQ_DESC_F_INDIRECT`` (only if ``VIRTIO_F_INDIRECT_DESC`` was negotiated)
points at a separate table of ``len / 16`` descriptors that continues the chain
from its index 0; it ends the outer chain (no NEXT beside it) and tables do not
nest.  The device must not assume how a message is split into descriptors.

Everything in a chain is guest-controlled, so :class:`DescriptorChain` is an
iterator with a time-to-live: it yields at most ``queue size`` descriptors
from the main table and ``len / 16`` from an indirect one, so a cycle ends in
:class:`ChainLoopError` rather than a hang.  Every way a chain can be wrong
is its own :class:`ChainError`; every buffer yielded lies in guest memory.

:func:`collect` walks a chain into two :class:`Segments` byte streams,
readable then writable, which is all a device needs.  No I/O: guest memory
is passed in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from asyncvmm.devices.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
)
from asyncvmm.memory import GuestMemory, GuestMemoryError

_DESC = struct.Struct("<QIHH")

# The used ring's len field is le32, so no chain may carry more than this (§2.7.8).
MAX_CHAIN_BYTES = 0xFFFF_FFFF
# direct_three: of these flags a descriptor before the last has NEXT only,
# the last has neither.
_LINKS = VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT


class ChainError(Exception):
    """A descriptor chain the device cannot use; the request gets no buffer access."""


class DescriptorIndexError(ChainError):
    """A ``next`` index (or an indirect table entry) outside its table."""


class ChainLoopError(ChainError):
    """More descriptors than the table holds: the chain loops (§2.7.5.2)."""


class IndirectNotNegotiatedError(ChainError):
    """VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC (§2.7.5.3.1)."""


class NestedIndirectError(ChainError):
    """VIRTQ_DESC_F_INDIRECT inside an indirect table (§2.7.5.3.1)."""


class IndirectTableError(ChainError):
    """An indirect table that is empty, not a multiple of 16 bytes, too long,
    outside guest memory, or combined with VIRTQ_DESC_F_NEXT (§2.7.5.3.1)."""


class DescriptorRangeError(ChainError):
    """A buffer that is not entirely guest RAM."""


class DescriptorDirectionError(ChainError):
    """A device-readable buffer after a device-writable one (§2.7.4.2)."""


class ChainLengthError(ChainError):
    """More bytes than a used-ring length can report."""


class Descriptor(NamedTuple):
    addr: int
    len: int
    flags: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


def in_guest_memory(mem: GuestMemory, addr: int, length: int) -> bool:
    """Whether ``[addr, addr+length)`` is RAM, possibly across adjacent regions."""
    if length == 0 or mem.contains(addr, length):
        return True
    try:
        for _ in mem.views(addr, length):
            pass
    except GuestMemoryError:
        return False
    return True


class DescriptorChain:
    """The descriptors of one chain, starting at ``head``; an iterator.

    ``table`` is the queue's descriptor table as a view of guest memory
    (``GuestMemory.view``, so it was bounds-checked when taken).
    """

    __slots__ = ("mem", "head", "_table", "_table_len", "_index", "_ttl",
                 "_indirect_ok", "_in_indirect", "_done", "_seen_write")

    def __init__(self, mem: GuestMemory, table: memoryview, head: int, *, indirect_ok: bool) -> None:
        # One of these per chain of every device: as few stores as will do.
        self.mem = mem
        self.head = self._index = head
        self._table = table
        self._table_len = self._ttl = len(table) // VIRTQ_DESC_SIZE
        self._indirect_ok = indirect_ok
        self._in_indirect = self._done = self._seen_write = False

    def __iter__(self) -> Iterator[Descriptor]:
        return self

    def __next__(self) -> Descriptor:
        while not self._done:
            addr, length, flags, nxt = self._read(self._index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                self._enter_indirect(addr, length, flags)
                continue
            if flags & VIRTQ_DESC_F_NEXT:
                self._index = nxt
            else:
                self._done = True
            return self._checked(Descriptor(addr, length, flags))
        raise StopIteration

    def _read(self, index: int) -> tuple[int, int, int, int]:
        if index >= self._table_len:
            raise DescriptorIndexError(f"descriptor {index} outside a table of {self._table_len}")
        if self._ttl == 0:
            raise ChainLoopError(f"chain from head {self.head} is longer than its table")
        self._ttl -= 1
        return _DESC.unpack_from(self._table, index * VIRTQ_DESC_SIZE)

    def _enter_indirect(self, addr: int, length: int, flags: int) -> None:
        if self._in_indirect:
            raise NestedIndirectError("indirect descriptor inside an indirect table")
        if not self._indirect_ok:
            raise IndirectNotNegotiatedError("VIRTIO_F_INDIRECT_DESC was not negotiated")
        if flags & VIRTQ_DESC_F_NEXT:
            raise IndirectTableError("indirect descriptor with VIRTQ_DESC_F_NEXT")
        count, rem = divmod(length, VIRTQ_DESC_SIZE)
        if rem or count == 0:
            raise IndirectTableError(f"indirect table of {length} bytes")
        # A chain may not be longer than the queue (§2.7.5.2), indirect or not.
        if count > self._table_len:
            raise IndirectTableError(f"indirect table of {count} descriptors, queue has {self._table_len}")
        try:
            table = self.mem.view(addr, length)
        except GuestMemoryError:
            raise IndirectTableError(f"indirect table at {addr:#x}+{length:#x} not in one RAM region") from None
        self._in_indirect = True
        self._table, self._table_len, self._index, self._ttl = table, count, 0, count

    def direct_three(self) -> tuple[tuple[int, int, int, int], ...] | None:
        """:func:`direct_three` for this chain, which must not have been advanced: ``None``
        inside an indirect table or past the head."""
        if self._in_indirect or self._index != self.head:
            return None
        return direct_three(self.mem, self._table, self.head)

    def _checked(self, desc: Descriptor) -> Descriptor:
        if desc.flags & VIRTQ_DESC_F_WRITE:
            self._seen_write = True
        elif self._seen_write:
            raise DescriptorDirectionError("device-readable descriptor after a device-writable one")
        if not in_guest_memory(self.mem, desc.addr, desc.len):
            raise DescriptorRangeError(f"buffer {desc.addr:#x}+{desc.len:#x} outside guest memory")
        return desc


def direct_three(mem: GuestMemory, table: memoryview, head: int) -> tuple[tuple[int, int, int, int], ...] | None:
    """The ``(addr, len, flags, next)`` descriptors of the chain at ``head`` in ``table`` (a
    queue's descriptor table) if it is three direct ones that :func:`collect` would accept,
    all in the RAM below ``low_ram_end``; else ``None`` (walk it with :func:`collect`, which
    names the defect).  A length may be 0 (which :func:`collect` leaves out of its streams).

    The usual block request (header, data, status) is this shape; reading its three
    descriptors here costs no :class:`DescriptorChain`, no iterator, no :class:`Segments`
    and no per-descriptor range lookup.
    """
    size = len(table) // VIRTQ_DESC_SIZE
    # Three descriptors fit any table of three or more, so the time-to-live cannot run out.
    if head >= size or size < 3:
        return None
    unpack = _DESC.unpack_from
    first = unpack(table, head * VIRTQ_DESC_SIZE)
    if first[2] & _LINKS != VIRTQ_DESC_F_NEXT or first[3] >= size:
        return None
    second = unpack(table, first[3] * VIRTQ_DESC_SIZE)
    if second[2] & _LINKS != VIRTQ_DESC_F_NEXT or second[3] >= size:
        return None
    last = unpack(table, second[3] * VIRTQ_DESC_SIZE)
    if last[2] & _LINKS:
        return None
    # §2.7.4.2: readable before writable.
    if (first[2] & ~second[2] | second[2] & ~last[2]) & VIRTQ_DESC_F_WRITE:
        return None
    low_end = mem.low_ram_end     # addr and len are unsigned: below it is RAM
    if (first[0] + first[1] > low_end or second[0] + second[1] > low_end
            or last[0] + last[1] > low_end or first[1] + second[1] + last[1] > MAX_CHAIN_BYTES):
        return None
    return first, second, last


class Segments:
    """A byte stream scattered over guest buffers: ``(gpa, len)`` pieces in order."""

    __slots__ = ("parts", "length")

    def __init__(self, parts: list[tuple[int, int]] | None = None) -> None:
        self.parts: list[tuple[int, int]] = []
        self.length = 0
        if parts:
            for addr, n in parts:
                self.append(addr, n)

    def append(self, addr: int, length: int) -> None:
        if length:
            self.parts.append((addr, length))
            self.length += length

    def __len__(self) -> int:
        return self.length

    def slice(self, offset: int, length: int) -> "Segments":
        """The sub-stream ``[offset, offset+length)``; must lie within the stream."""
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"slice {offset}+{length} of a {self.length}-byte stream")
        out = Segments()
        if offset == 0 and length == self.length:
            out.parts, out.length = list(self.parts), length
            return out
        for addr, n in self.parts:
            if length == 0:
                break
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            out.append(addr + offset, take)
            offset, length = 0, length - take
        return out

    def split_last_byte(self) -> tuple["Segments", "Segments"]:
        """``(slice(0, len - 1), slice(len - 1, 1))`` of a non-empty stream, without the walk."""
        if not self.length:
            raise ValueError("split_last_byte of an empty stream")
        *rest, (addr, n) = self.parts
        head, tail = Segments(), Segments()
        if n > 1:
            rest.append((addr, n - 1))
        head.parts, head.length = rest, self.length - 1
        tail.parts, tail.length = [(addr + n - 1, 1)], 1
        return head, tail

    def after(self, offset: int) -> "Segments":
        """``slice(offset, len - offset)``; a header that is a whole first part costs no walk."""
        parts = self.parts
        if parts and parts[0][1] == offset:
            out = Segments()
            out.parts, out.length = parts[1:], self.length - offset
            return out
        return self.slice(offset, self.length - offset)

    def views(self, mem: GuestMemory) -> list[memoryview]:
        """Zero-copy windows on the whole stream, for ``os.preadv``/``os.pwritev``."""
        out = []
        for addr, n in self.parts:
            try:
                out.append(mem.view(addr, n))
            except GuestMemoryError:         # spans adjacent regions
                out.extend(mem.views(addr, n))
        return out

    def read(self, mem: GuestMemory) -> bytes:
        return b"".join([bytes(v) for v in self.views(mem)])

    def write(self, mem: GuestMemory, data: bytes | memoryview) -> int:
        """Copy ``data`` to the front of the stream; returns the bytes written."""
        src = memoryview(data)
        done = 0
        for view in self.views(mem):
            if done == len(src):
                break
            n = min(len(view), len(src) - done)
            view[:n] = src[done:done + n]
            done += n
        return done


@dataclass(slots=True)
class ChainBuffers:
    """A chain split into what the device may read and what it may write."""

    head: int
    readable: Segments
    writable: Segments


def collect(chain: DescriptorChain) -> ChainBuffers:
    """Walk ``chain`` to its end; raises a :class:`ChainError` on any defect.

    The same walk as iterating the chain, with the same checks in the same
    order, written as one loop: this runs for every request of every device,
    and the iterator's per-descriptor calls and tuples were a fifth of the
    block device's Python time per request (docs/benchmarks.md).
    """
    readable, writable = Segments(), Segments()
    rparts, wparts = readable.parts, writable.parts
    rlen = wlen = 0
    mem = chain.mem
    contains = mem.contains
    low_end = mem.low_ram_end            # addr and length are unsigned: below it is RAM
    unpack = _DESC.unpack_from
    while not chain._done:
        index = chain._index
        if index >= chain._table_len:
            raise DescriptorIndexError(f"descriptor {index} outside a table of {chain._table_len}")
        if chain._ttl == 0:
            raise ChainLoopError(f"chain from head {chain.head} is longer than its table")
        chain._ttl -= 1
        addr, length, flags, nxt = unpack(chain._table, index * VIRTQ_DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            chain._enter_indirect(addr, length, flags)
            continue
        if flags & VIRTQ_DESC_F_NEXT:
            chain._index = nxt
        else:
            chain._done = True
        if flags & VIRTQ_DESC_F_WRITE:
            chain._seen_write = True
        elif chain._seen_write:
            raise DescriptorDirectionError("device-readable descriptor after a device-writable one")
        if (length and addr + length > low_end and not contains(addr, length)
                and not in_guest_memory(mem, addr, length)):
            raise DescriptorRangeError(f"buffer {addr:#x}+{length:#x} outside guest memory")
        if not length:
            continue
        if flags & VIRTQ_DESC_F_WRITE:
            wparts.append((addr, length))
            wlen += length
        else:
            rparts.append((addr, length))
            rlen += length
    readable.length, writable.length = rlen, wlen
    if rlen > MAX_CHAIN_BYTES or wlen > MAX_CHAIN_BYTES:
        raise ChainLengthError(f"chain from head {chain.head} exceeds {MAX_CHAIN_BYTES} bytes")
    return ChainBuffers(chain.head, readable, writable)
