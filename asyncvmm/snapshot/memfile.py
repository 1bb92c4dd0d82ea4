"""The snapshot memory file: guest RAM regions back to back, holes where RAM is zero.

A Full snapshot writes every region in guest-physical order (the state file
records each region's offset).  Chunks that are all zero are not written but
left as holes (``ftruncate`` sets the final size), so a guest that touched
little makes a small file on disk while its size stays the guest's; a
restore maps the file privately and reads holes as zero pages.

A Diff snapshot writes only the pages dirtied since the last snapshot (KVM's
dirty log), each as it is (a page the guest zeroed is written too), at its
offset in the same layout; the state file lists the ranges written, and
:func:`merge_diff` copies exactly those onto the base memory file.
"""

from __future__ import annotations

import os

from ..memory import GuestMemory

CHUNK = 1 << 16
_ZERO = bytes(CHUNK)


_PAGEMAP_PRESENT_OR_SWAPPED = (1 << 63) | (1 << 62)


def _touched_chunks(region) -> list[bool] | None:
    """For anonymous memory, which CHUNKs hold a page that is present or swapped
    (``/proc/self/pagemap``); the others were never touched and are zero.  None when
    unknown (file-backed memory, a test's bytearray, no pagemap): every chunk is read."""
    if not region.anonymous or region.host_addr % PAGE:
        return None
    pages = region.size // PAGE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            data = os.pread(f.fileno(), pages * 8, region.host_addr // PAGE * 8)
    except OSError:
        return None
    if len(data) != pages * 8:
        return None
    entries = memoryview(data).cast("Q")
    per = CHUNK // PAGE
    return [any(e & _PAGEMAP_PRESENT_OR_SWAPPED for e in entries[i:i + per])
            for i in range(0, pages, per)]


def write_memory_file(path: str, mem: GuestMemory) -> int:
    """Write ``mem`` to ``path``; returns the file's size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for region in mem.regions:
            view = region.view
            touched = _touched_chunks(region)
            for start in range(0, region.size, CHUNK):
                if touched is not None and not touched[start // CHUNK]:
                    continue
                piece = view[start:start + CHUNK]
                if piece != _ZERO[:len(piece)]:
                    _pwrite_all(fd, piece, offset + start)
            offset += region.size
        os.ftruncate(fd, offset)
        return offset
    finally:
        os.close(fd)


PAGE = 4096


def dirty_ranges(bitmap: bytes, region_offset: int) -> list[tuple[int, int]]:
    """(file offset, length) runs of the pages set in a KVM dirty bitmap (bit i = page i)."""
    ranges: list[tuple[int, int]] = []
    for word_index in range(0, len(bitmap), 8):
        word = int.from_bytes(bitmap[word_index:word_index + 8], "little")
        while word:
            low = word & -word
            bit = low.bit_length() - 1
            page = word_index * 8 + bit
            start = region_offset + page * PAGE
            if ranges and ranges[-1][0] + ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + PAGE)
            else:
                ranges.append((start, PAGE))
            word ^= low
    return ranges


def write_diff_file(path: str, mem: GuestMemory, ranges: list[tuple[int, int]]) -> int:
    """Write the pages of ``ranges`` (file offsets) of ``mem`` to ``path``, the rest holes."""
    layout = []
    offset = 0
    for region in mem.regions:
        layout.append((offset, region))
        offset += region.size
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for start, length in ranges:
            for base, region in layout:
                if base <= start < base + region.size:
                    if start + length > base + region.size:
                        raise ValueError(f"dirty range {start:#x}+{length:#x} crosses a region")
                    _pwrite_all(fd, region.view[start - base:start - base + length], start)
                    break
            else:
                raise ValueError(f"dirty range {start:#x}+{length:#x} is outside guest memory")
        os.ftruncate(fd, offset)
        return offset
    finally:
        os.close(fd)


def merge_diff(base_path: str, diff_path: str, ranges: list[tuple[int, int]] | None) -> int:
    """Copy a Diff snapshot's pages onto its base memory file; returns the bytes copied.

    ``ranges`` are the state file's ``dirty_ranges``; without them the diff file's data
    extents (``SEEK_DATA``/``SEEK_HOLE``) are taken, as for Firecracker's diff files.
    """
    with open(diff_path, "rb") as diff, open(base_path, "r+b") as base:
        size = os.fstat(diff.fileno()).st_size
        if os.fstat(base.fileno()).st_size != size:
            raise ValueError(f"the base memory file has {os.fstat(base.fileno()).st_size} bytes, "
                             f"the diff {size}: they are not of one microVM")
        if ranges is None:
            ranges = list(_data_extents(diff.fileno(), size))
        copied = 0
        for start, length in ranges:
            if start < 0 or length < 0 or start + length > size:
                raise ValueError(f"range {start:#x}+{length:#x} is outside the {size}-byte file")
            done = 0
            while done < length:
                n = min(CHUNK * 16, length - done)
                data = os.pread(diff.fileno(), n, start + done)
                if len(data) != n:
                    raise ValueError(f"short read of the diff file at {start + done:#x}")
                _pwrite_all(base.fileno(), memoryview(data), start + done)
                done += n
            copied += length
        return copied


def _data_extents(fd: int, size: int):
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:          # ENXIO: no data after offset
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def rate_limiters(machine) -> dict:
    """Every rate limiter of ``machine``'s devices, by a stable name (snapshot state)."""
    limiters = {}
    for drive_id, block in machine.blocks.items():
        limiters[f"block:{drive_id}"] = block.rate_limiter
    for iface_id, net in machine.nets.items():
        limiters[f"net-rx:{iface_id}"] = net.rx_rate_limiter
        limiters[f"net-tx:{iface_id}"] = net.tx_rate_limiter
    if machine.rng is not None:
        limiters["entropy"] = machine.rng.rate_limiter
    for pmem_id, pmem in getattr(machine, "pmems", {}).items():
        limiters[f"pmem:{pmem_id}"] = pmem.rate_limiter
    return limiters

