"""Memory files: zero chunks are holes, dirty bitmaps become ranges, a diff merges onto its base."""

from __future__ import annotations

import os

import pytest

from asyncvmm.memory import GuestMemory
from asyncvmm.snapshot.memfile import PAGE, dirty_ranges, merge_diff, write_diff_file, write_memory_file


def _mem(size: int = 1 << 20) -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(size)), (0x10_0000_0000, bytearray(size))])


def test_dirty_bitmap_to_ranges() -> None:
    bitmap = bytearray(16)
    for page in (0, 1, 2, 63, 64, 100):
        bitmap[page // 8] |= 1 << (page % 8)
    assert dirty_ranges(bytes(bitmap), 1 << 30) == [
        ((1 << 30), 3 * PAGE), ((1 << 30) + 63 * PAGE, 2 * PAGE), ((1 << 30) + 100 * PAGE, PAGE)]
    assert dirty_ranges(bytes(16), 0) == []


def test_full_file_has_the_guest_size_and_holes_where_ram_is_zero(tmp_path) -> None:
    mem = _mem()
    mem.write(0x5000, b"abc")
    mem.write(0x10_0000_0000 + 0x8000, b"xyz")
    path = str(tmp_path / "m")
    assert write_memory_file(path, mem) == 2 << 20
    data = open(path, "rb").read()
    assert len(data) == 2 << 20 and data[0x5000:0x5003] == b"abc"
    assert data[(1 << 20) + 0x8000:(1 << 20) + 0x8003] == b"xyz"
    assert os.stat(path).st_blocks * 512 < 1 << 20          # holes, not written zeros


@pytest.mark.parametrize("with_ranges", [True, False])
def test_a_diff_merged_onto_its_base_equals_the_memory_now(tmp_path, with_ranges: bool) -> None:
    mem = _mem()
    mem.write(0x1000, b"old page" * 10)
    base, diff, now = (str(tmp_path / n) for n in ("base", "diff", "now"))
    write_memory_file(base, mem)
    mem.write(0x3000, b"new page")
    mem.fill(0x1000, PAGE, 0)                          # a page the guest zeroed goes too
    ranges = [(0x1000, PAGE), (0x3000, PAGE)]
    write_diff_file(diff, mem, ranges)
    write_memory_file(now, mem)
    copied = merge_diff(base, diff, ranges if with_ranges else None)
    assert copied >= 2 * PAGE
    assert open(base, "rb").read() == open(now, "rb").read()


def test_a_diff_of_another_size_or_a_range_outside_is_refused(tmp_path) -> None:
    base, diff = str(tmp_path / "b"), str(tmp_path / "d")
    open(base, "wb").write(bytes(8192))
    open(diff, "wb").write(bytes(4096))
    with pytest.raises(ValueError, match="not of one microVM"):
        merge_diff(base, diff, None)
    open(diff, "wb").write(bytes(8192))
    with pytest.raises(ValueError, match="outside"):
        merge_diff(base, diff, [(4096, 8192)])


def test_untouched_anonymous_memory_is_skipped_and_touched_pages_are_written(tmp_path) -> None:
    mem = GuestMemory.anonymous([(0, 8 << 20)])
    try:
        mem.write(0x123456, b"touched")
        mem.write(0x700000, bytes(10))          # touched, but zero: still a hole
        path = str(tmp_path / "m")
        write_memory_file(path, mem)
        data = open(path, "rb").read()
        assert len(data) == 8 << 20 and data[0x123456:0x12345D] == b"touched"
        assert data.count(0) == len(data) - 7
    finally:
        mem.close()
