"""GuestMemory.memfd: guest RAM another process can map (vhost-user back ends)."""

from __future__ import annotations

import mmap
import os

import pytest

from asyncvmm.memory import GuestMemory


def test_regions_share_one_memfd_laid_out_back_to_back():
    mem = GuestMemory.memfd([(0, 0x10000), (0x100000, 0x8000)])
    try:
        low, high = mem.regions
        assert low.shared_fd == high.shared_fd is not None
        assert (low.file_offset, high.file_offset) == (0, 0x10000)
        assert os.fstat(low.shared_fd).st_size == 0x18000
        assert not low.anonymous
    finally:
        mem.close()


def test_another_mapping_of_the_fd_sees_the_guests_bytes_both_ways():
    mem = GuestMemory.memfd([(0, 0x10000), (0x100000, 0x8000)])
    try:
        high = mem.regions[1]
        other = mmap.mmap(high.shared_fd, high.size, flags=mmap.MAP_SHARED, offset=high.file_offset)
        mem.write(0x100010, b"guest")
        assert other[0x10:0x15] == b"guest"
        other[0x20:0x27] = b"backend"                   # what a back end writes, the VMM reads
        assert mem.read(0x100020, 7) == b"backend"
        other.close()
    finally:
        mem.close()


def test_close_closes_the_memfd():
    mem = GuestMemory.memfd([(0, 0x4000)])
    fd = mem.regions[0].shared_fd
    mem.close()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_discard_gives_the_pages_back_to_the_file():
    mem = GuestMemory.memfd([(0, 0x10000)])
    try:
        mem.write(0x2000, b"x" * 4096)
        mem.discard(0x2000, 0x1000)
        assert mem.read(0x2000, 4096) == bytes(4096)    # MADV_REMOVE punched the page out
    finally:
        mem.close()


def test_huge_pages_need_2m_alignment():
    with pytest.raises(ValueError, match="2 MiB aligned"):
        GuestMemory.memfd([(0, 0x10000)], huge_pages=True)


def test_private_memory_is_not_shareable():
    mem = GuestMemory.anonymous([(0, 0x4000)])
    try:
        assert mem.regions[0].shared_fd is None
    finally:
        mem.close()
