"""Guest physical memory: mmap-backed regions and one bounds-checked access type.

Every access the VMM makes to guest RAM goes through :class:`GuestMemory`.  A
guest-physical address that is not RAM, or a range that runs off the end of a
region, raises :class:`GuestMemoryError`; no access can reach host memory
outside the regions.  The same type serves tests: regions may be backed by
any writable buffer (``bytearray`` or ``mmap``), so devices are tested on
exactly the code that runs in production.

No KVM here: the builder registers :meth:`GuestMemory.regions` with
``KVM_SET_USER_MEMORY_REGION`` using :attr:`GuestRegion.host_addr`.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

# Linux's MAP_NORESERVE (asm-generic/mman-common.h); Python's mmap module names it only from 3.12 on.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
# Linux's MAP_HUGETLB and MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT); 2 MiB huge pages.
MAP_HUGETLB = getattr(mmap, "MAP_HUGETLB", 0x40000)
MAP_HUGE_2MB = 21 << 26
# memfd_create's MFD_HUGE_2MB (the same 21 << MFD_HUGE_SHIFT encoding).
MFD_HUGE_2MB = 21 << 26
HUGE_PAGE_2M = 2 << 20
# Set to 1 to offer guest RAM to KSM (docs/density.md): identical pages of many guests merge.
KSM_ENV = "ASYNCVMM_KSM"

# The granularity of KVM's dirty log and of the VMM's own (GuestRegion.dirty).
DIRTY_PAGE = 4096

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def store_u16(buf: memoryview | bytearray, offset: int, value: int) -> None:
    """Store a little-endian u16 with one machine store.

    ``struct.pack_into`` zeroes the field before writing the value, so another
    CPU reading the field meanwhile (a guest polling a ring index) can see 0.
    Item assignment through a cast memoryview copies the value in one go.
    x86-64 is little-endian, so the native format is the wire format.
    """
    memoryview(buf)[offset:offset + 2].cast("H")[0] = value


def store_u32(buf: memoryview | bytearray, offset: int, value: int) -> None:
    """Store a little-endian u32 with one machine store (see :func:`store_u16`)."""
    memoryview(buf)[offset:offset + 4].cast("I")[0] = value


def store_u64(buf: memoryview | bytearray, offset: int, value: int) -> None:
    """Store a little-endian u64 with one machine store (see :func:`store_u16`)."""
    memoryview(buf)[offset:offset + 8].cast("Q")[0] = value


_STORES = {1: lambda buf, off, v: buf.__setitem__(off, v), 2: store_u16, 4: store_u32, 8: store_u64}


class GuestMemoryError(Exception):
    """A guest-physical range that is not (entirely) guest RAM."""

    def __init__(self, gpa: int, length: int, why: str = "not in guest memory") -> None:
        super().__init__(f"guest range {gpa:#x}+{length:#x}: {why}")
        self.gpa = gpa
        self.length = length


@dataclass(eq=False)
class GuestRegion:
    """One contiguous stretch of guest RAM backed by a host buffer."""

    guest_addr: int
    buffer: mmap.mmap | bytearray
    view: memoryview = field(init=False, repr=False)
    # Private anonymous memory: a page never touched (not present, not swapped) reads as zero,
    # which lets a snapshot skip it without reading it (asyncvmm.snapshot.memfile).
    anonymous: bool = False
    page_size: int = 4096                # the host page size behind it (2 MiB: huge pages)
    # With dirty page tracking: the 4 KiB pages the VMM wrote (or handed out a view of) since
    # the last snapshot, bit i = page i as in KVM's dirty log; None without tracking.
    dirty: bytearray | None = field(default=None, init=False, repr=False)
    # A shared file mapping another process may map too (vhost-user): the file and where in it
    # the region starts; None for private memory.
    shared_fd: int | None = None
    file_offset: int = 0
    # Hotpluggable memory (virtio-mem): ``accessible(off, length)`` says whether the whole range
    # is plugged; the VMM refuses the rest like an address outside RAM.  None: all accessible.
    accessible: Callable[[int, int], bool] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.buffer).cast("B")
        if self.view.readonly:
            raise ValueError("guest memory must be writable")

    @property
    def size(self) -> int:
        return len(self.view)

    @property
    def end(self) -> int:
        return self.guest_addr + len(self.view)

    def close(self) -> None:
        """Unmap now if nothing else still views the buffer; otherwise at garbage collection."""
        self.view.release()
        if isinstance(self.buffer, mmap.mmap):
            try:
                self.buffer.close()
            except BufferError:
                pass

    def mark_dirty(self, off: int, length: int) -> None:
        """Note that the VMM may have written ``[off, off+length)`` (no-op without tracking)."""
        bitmap = self.dirty
        if bitmap is None or length <= 0:
            return
        for page in range(off // DIRTY_PAGE, (off + length - 1) // DIRTY_PAGE + 1):
            bitmap[page >> 3] |= 1 << (page & 7)

    def take_dirty(self) -> bytes:
        """The VMM's dirty bitmap so far, cleared (empty bytes without tracking)."""
        bitmap = self.dirty
        if bitmap is None:
            return b""
        out = bytes(bitmap)
        bitmap[:] = bytes(len(bitmap))
        return out

    @property
    def host_addr(self) -> int:
        """Host virtual address of the buffer, for KVM_SET_USER_MEMORY_REGION.

        ``from_buffer`` pins the buffer (a bytearray cannot be resized and an
        mmap cannot be closed while it is exported), so the address stays valid
        for the region's lifetime.
        """
        return ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))


class GuestMemory:
    """Guest RAM as a sorted set of non-overlapping regions."""

    def __init__(self, regions: Iterable[GuestRegion]) -> None:
        self._ram = sorted(regions, key=lambda r: r.guest_addr)
        self._index(self._ram)
        first = self._regions[0] if self._regions else None
        self._low = first if first is not None and first.guest_addr == 0 else None
        # One past the RAM region at guest address 0 (0: none).  A range below it is RAM with
        # no lookup: the hot paths (descriptor checks) test against it first.
        self.low_ram_end = self._low.size if self._low is not None else 0
        # Whether track_dirty() ran.  A plain attribute, not a property: every virtqueue's
        # view cache checks it on each ring access (Queue.rings).
        self.tracking_dirty = False

    def _index(self, regions: list[GuestRegion]) -> None:
        self._regions = sorted(regions, key=lambda r: r.guest_addr)
        for a, b in zip(self._regions, self._regions[1:]):
            if a.end > b.guest_addr:
                raise ValueError(f"guest regions overlap at {b.guest_addr:#x}")
        self._starts = [r.guest_addr for r in self._regions]

    def add_hotplug_region(self, region: GuestRegion) -> None:
        """Accept accesses to ``region`` (virtio-mem) where its ``accessible`` says so.

        It is not boot RAM: :attr:`regions`, :attr:`total_size` and :attr:`end` (what KVM
        slots, the boot memory map and snapshots are made of) leave it out.
        """
        self._index([*self._regions, region])

    # -- construction -------------------------------------------------------

    @classmethod
    def anonymous(cls, layout: Iterable[tuple[int, int]], *,
                  mergeable: bool | None = None) -> "GuestMemory":
        """Private anonymous mappings for each ``(guest_addr, size)``.

        ``MAP_NORESERVE``, as Firecracker maps guest memory: no swap or commit
        is reserved up front, pages are only backed when touched, so a thousand
        idle guests reserve nothing and a guest larger than host RAM starts
        (the host runs out only if the guest really touches that much).
        ``mergeable`` (default: ``ASYNCVMM_KSM=1`` in the environment) marks
        the RAM ``MADV_MERGEABLE`` so the kernel's KSM, when enabled, may merge
        identical pages across guests; an opt-in, because merging costs the
        host CPU and lets co-tenants time copy-on-write faults.
        """
        if mergeable is None:
            mergeable = os.environ.get(KSM_ENV) == "1"
        regions = []
        for gpa, size in layout:
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
            if mergeable:
                buf.madvise(mmap.MADV_MERGEABLE)
            regions.append(GuestRegion(gpa, buf, anonymous=True))
        return cls(regions)

    @classmethod
    def hugetlb_2m(cls, layout: Iterable[tuple[int, int]]) -> "GuestMemory":
        """Private anonymous mappings backed by the host's 2 MiB huge pages (hugetlbfs).

        The pages come from the host's pool (``/proc/sys/vm/nr_hugepages``) and are reserved
        at mmap (no ``MAP_NORESERVE``: with it a guest touching a page the pool no longer has
        would kill the VMM with SIGBUS; without it a pool too small fails here, ENOMEM).
        Every region must be a multiple of 2 MiB.
        """
        regions = []
        for gpa, size in layout:
            if size % HUGE_PAGE_2M or gpa % HUGE_PAGE_2M:
                raise ValueError(f"region {gpa:#x}+{size:#x} is not 2 MiB aligned")
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | MAP_HUGETLB | MAP_HUGE_2MB)
            regions.append(GuestRegion(gpa, buf, page_size=HUGE_PAGE_2M))
        return cls(regions)

    @classmethod
    def memfd(cls, layout: Iterable[tuple[int, int]], *, huge_pages: bool = False) -> "GuestMemory":
        """Regions of one memfd laid out back to back, mapped ``MAP_SHARED``, so that another
        process (a vhost-user backend) can map the same pages from the fd and the offsets
        (:attr:`GuestRegion.shared_fd`, :attr:`GuestRegion.file_offset`).

        ``MAP_NORESERVE`` as in :meth:`anonymous`; with ``huge_pages`` the memfd is on
        hugetlbfs (``MFD_HUGETLB | MFD_HUGE_2MB``) and reserves its pages at mmap, as
        :meth:`hugetlb_2m` does.  The memfd is closed with the memory (:meth:`close`).
        """
        layout = list(layout)
        flags = os.MFD_CLOEXEC
        if huge_pages:
            flags |= os.MFD_HUGETLB | MFD_HUGE_2MB
            for gpa, size in layout:
                if size % HUGE_PAGE_2M or gpa % HUGE_PAGE_2M:
                    raise ValueError(f"region {gpa:#x}+{size:#x} is not 2 MiB aligned")
        fd = os.memfd_create("asyncvmm-guest-ram", flags)
        regions = []
        try:
            os.ftruncate(fd, sum(size for _, size in layout))
            offset = 0
            map_flags = mmap.MAP_SHARED | (0 if huge_pages else MAP_NORESERVE)
            for gpa, size in layout:
                buf = mmap.mmap(fd, size, flags=map_flags, offset=offset)
                regions.append(GuestRegion(gpa, buf, page_size=HUGE_PAGE_2M if huge_pages else 4096,
                                           shared_fd=fd, file_offset=offset))
                offset += size
        except BaseException:
            for region in regions:
                region.close()
            os.close(fd)
            raise
        mem = cls(regions)
        mem._memfd = fd
        return mem

    @classmethod
    def from_file(cls, fd: int, layout: Iterable[tuple[int, int]], *, private: bool) -> "GuestMemory":
        """Map regions of a file laid out back to back (snapshot restore).

        ``private`` gives copy-on-write pages, so the guest never writes the file.
        """
        regions = []
        offset = 0
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        for gpa, size in layout:
            buf = mmap.mmap(fd, size, flags=flags, offset=offset)
            regions.append(GuestRegion(gpa, buf))
            offset += size
        return cls(regions)

    @classmethod
    def from_buffers(cls, layout: Iterable[tuple[int, bytearray | mmap.mmap]]) -> "GuestMemory":
        return cls(GuestRegion(gpa, buf) for gpa, buf in layout)

    def close(self) -> None:
        for region in self._regions:
            region.close()
        fd, self._memfd = self._memfd, None
        if fd is not None:
            os.close(fd)

    #: The memfd behind :meth:`memfd` memory (owned: closed by :meth:`close`).
    _memfd: int | None = None

    def track_dirty(self) -> None:
        """Start the VMM-side dirty log: from now on every write and every view handed out
        marks its pages in the region's :attr:`GuestRegion.dirty` (a view may be written,
        so taking it counts as writing: conservative, never missing a page).  KVM's log does
        not see the VMM's writes; a Diff snapshot takes the union of both."""
        for region in self._ram:
            if region.dirty is None:
                pages = -(-region.size // DIRTY_PAGE)
                # Whole u64 words, like KVM's bitmap, so the two combine word by word.
                region.dirty = bytearray(-(-pages // 64) * 8)
        self.tracking_dirty = bool(self._ram)

    def marker(self, gpa: int, length: int) -> Callable[[], None] | None:
        """A call that marks ``[gpa, gpa+length)`` written, for an area the VMM writes
        through a view it holds (a used ring); None without tracking."""
        if not self.tracking_dirty:
            return None
        return lambda: self.mark_dirty(gpa, length)

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Mark ``[gpa, gpa+length)`` written (areas the VMM writes through long-held views,
        such as a virtqueue's used ring)."""
        for region in self._regions:
            lo, hi = max(gpa, region.guest_addr), min(gpa + length, region.end)
            if lo < hi:
                region.mark_dirty(lo - region.guest_addr, hi - lo)

    # -- queries ------------------------------------------------------------

    @property
    def regions(self) -> list[GuestRegion]:
        """Boot RAM (hotplug regions are not listed)."""
        return list(self._ram)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._ram)

    @property
    def end(self) -> int:
        """One past the highest boot RAM address."""
        return self._ram[-1].end if self._ram else 0

    def _find(self, gpa: int, length: int) -> tuple[GuestRegion, int]:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(gpa, length, "negative address or length")
        # Fast path: nearly every access of a guest under 3 GiB hits the low region.
        low = self._low
        if low is not None and gpa + length <= self.low_ram_end:
            return low, gpa
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            off = gpa - region.guest_addr
            if off + length <= region.size:
                if region.accessible is not None and not region.accessible(off, length):
                    raise GuestMemoryError(gpa, length, "unplugged hotplug memory")
                return region, off
        raise GuestMemoryError(gpa, length)

    def contains(self, gpa: int, length: int = 1) -> bool:
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # -- access -------------------------------------------------------------

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window on guest RAM; the range must lie in one region.

        Use it for I/O straight into or out of the guest (``os.preadv``).
        """
        region, off = self._find(gpa, length)
        if region.dirty is not None:
            region.mark_dirty(off, length)
        return region.view[off:off + length]

    def views(self, gpa: int, length: int) -> Iterator[memoryview]:
        """Zero-copy windows covering a range that may span adjacent regions."""
        while length:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i < 0 or gpa >= self._regions[i].end:
                raise GuestMemoryError(gpa, length)
            region = self._regions[i]
            off = gpa - region.guest_addr
            n = min(length, region.size - off)
            if region.accessible is not None and not region.accessible(off, n):
                raise GuestMemoryError(gpa, length, "unplugged hotplug memory")
            if region.dirty is not None:
                region.mark_dirty(off, n)
            yield region.view[off:off + n]
            gpa += n
            length -= n

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._find(gpa, length)
        return bytes(region.view[off:off + length])

    def unpack(self, fmt: struct.Struct, gpa: int) -> tuple:
        """``fmt.unpack`` of the ``fmt.size`` bytes at ``gpa``, without copying them first."""
        region, off = self._find(gpa, fmt.size)
        return fmt.unpack_from(region.view, off)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        region, off = self._find(gpa, length)
        region.view[off:off + length] = data
        if region.dirty is not None:
            region.mark_dirty(off, length)

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        region, off = self._find(gpa, length)
        region.view[off:off + length] = bytes([value]) * length
        region.mark_dirty(off, length)

    def discard(self, gpa: int, length: int) -> None:
        """Give the host memory behind ``[gpa, gpa+length)`` back (a balloon's pages).

        The range must be page-aligned and entirely RAM (it may span adjacent
        regions); otherwise :class:`GuestMemoryError` and nothing is discarded.
        An mmap region gets ``MADV_DONTNEED``: its resident pages are freed at
        once, and a later guest access faults in a zero page (anonymous
        memory) or the file's page (a private file mapping).  A ``bytearray``
        region (tests) is zeroed, which is what the guest sees either way.
        """
        if gpa % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise GuestMemoryError(gpa, length, "not page-aligned")
        pieces = []
        start, left = gpa, length
        while left:
            i = bisect.bisect_right(self._starts, start) - 1
            if i < 0 or start >= self._regions[i].end:
                raise GuestMemoryError(gpa, length)
            region = self._regions[i]
            off = start - region.guest_addr
            n = min(left, region.size - off)
            if region.accessible is not None and not region.accessible(off, n):
                raise GuestMemoryError(gpa, length, "unplugged hotplug memory")
            pieces.append((region, off, n))
            start, left = start + n, left - n
        for region, off, n in pieces:
            region.mark_dirty(off, n)
            if isinstance(region.buffer, mmap.mmap) and region.guest_addr % mmap.PAGESIZE == 0:
                # A shared memfd's pages outlive MADV_DONTNEED (the file keeps them): remove them.
                advice = mmap.MADV_DONTNEED if region.shared_fd is None else mmap.MADV_REMOVE
                region.buffer.madvise(advice, off, n)
            else:
                region.view[off:off + n] = bytes(n)

    def _read_fmt(self, fmt: struct.Struct, gpa: int) -> int:
        region, off = self._find(gpa, fmt.size)
        return fmt.unpack_from(region.view, off)[0]

    def _write_fmt(self, fmt: struct.Struct, gpa: int, value: int) -> None:
        if not 0 <= value < 1 << (8 * fmt.size):
            raise OverflowError(f"{value} does not fit in {fmt.size} bytes")
        region, off = self._find(gpa, fmt.size)
        # A guest may be reading this field right now: one store, never a zeroed field.
        _STORES[fmt.size](region.view, off, value)
        if region.dirty is not None:
            region.mark_dirty(off, fmt.size)

    def read_u8(self, gpa: int) -> int:
        return self._read_fmt(_U8, gpa)

    def read_u16(self, gpa: int) -> int:
        return self._read_fmt(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._read_fmt(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._read_fmt(_U64, gpa)

    def write_u8(self, gpa: int, value: int) -> None:
        self._write_fmt(_U8, gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._write_fmt(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._write_fmt(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._write_fmt(_U64, gpa, value)

    def read_struct(self, gpa: int, ctype: type[ctypes.Structure]) -> ctypes.Structure:
        """A copy of a C struct read from guest memory."""
        return ctype.from_buffer_copy(self.read(gpa, ctypes.sizeof(ctype)))

    def write_struct(self, gpa: int, value: ctypes.Structure) -> None:
        self.write(gpa, bytes(value))
