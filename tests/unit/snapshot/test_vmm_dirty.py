"""The VMM's own dirty log (GuestMemory.track_dirty): every path by which the VMM writes
guest memory marks its pages, reads do not, a snapshot takes it (cleared) together with
KVM's log, and a virtio device's writes (used ring, writable buffers) are in it."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest

from asyncvmm.memory import DIRTY_PAGE, GuestMemory
from asyncvmm.snapshot.memfile import dirty_ranges
from asyncvmm.vmm import Vmm
from tests.fakes.virtio_driver import Buf
from tests.unit.devices.virtio.conftest import make_rig
from tests.unit.devices.virtio.test_mmio import EchoDevice

HIGH = 0x1_0000_0000


def _mem() -> GuestMemory:
    mem = GuestMemory.from_buffers([(0, bytearray(64 * DIRTY_PAGE)), (HIGH, bytearray(64 * DIRTY_PAGE))])
    mem.track_dirty()
    return mem


def _pages(mem: GuestMemory) -> set[int]:
    """Guest-physical page addresses marked, taking (and so clearing) the log."""
    out = set()
    for region in mem.regions:
        for start, length in dirty_ranges(region.take_dirty(), region.guest_addr):
            out.update(range(start, start + length, DIRTY_PAGE))
    return out


class _Pair(ctypes.Structure):
    _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint32)]


@pytest.mark.parametrize("write, pages", [
    (lambda m: m.write(0x1ffe, b"abcd"), {0x1000, 0x2000}),          # straddles two pages
    (lambda m: m.fill(0x5000, 3 * DIRTY_PAGE, 7), {0x5000, 0x6000, 0x7000}),
    (lambda m: m.write_u8(0x3000, 1), {0x3000}),
    (lambda m: m.write_u16(HIGH + 0x4000, 1), {HIGH + 0x4000}),
    (lambda m: m.write_u32(0x9004, 1), {0x9000}),
    (lambda m: m.write_u64(0xa008, 1), {0xa000}),
    (lambda m: m.write_struct(0xb000, _Pair(1, 2)), {0xb000}),
    (lambda m: m.view(0xc010, 0x1000), {0xc000, 0xd000}),            # a view may be written
    (lambda m: list(m.views(HIGH - 0x10, 0x20)), set()),             # not RAM below HIGH: fails
    (lambda m: m.discard(0xe000, DIRTY_PAGE), {0xe000}),
    (lambda m: m.mark_dirty(0x3f000, 0x2000), {0x3f000}),            # clipped at the region end
])
def test_every_write_path_marks_its_pages(write, pages) -> None:
    mem = _mem()
    try:
        write(mem)
    except Exception:
        assert not pages
    assert _pages(mem) == pages
    assert _pages(mem) == set()          # taken means cleared


def test_views_across_adjacent_regions_mark_both() -> None:
    mem = GuestMemory.from_buffers([(0, bytearray(4 * DIRTY_PAGE)),
                                    (4 * DIRTY_PAGE, bytearray(4 * DIRTY_PAGE))])
    mem.track_dirty()
    assert [len(v) for v in mem.views(3 * DIRTY_PAGE + 8, DIRTY_PAGE)] == [DIRTY_PAGE - 8, 8]
    assert _pages(mem) == {3 * DIRTY_PAGE, 4 * DIRTY_PAGE}


def test_reads_do_not_mark_and_nothing_is_kept_without_tracking() -> None:
    mem = _mem()
    mem.read(0x1000, 10), mem.read_u32(0x2000), mem.read_struct(0x3000, _Pair)
    assert _pages(mem) == set()
    untracked = GuestMemory.from_buffers([(0, bytearray(4 * DIRTY_PAGE))])
    untracked.write(0, b"x")
    untracked.view(0, 8)
    assert not untracked.tracking_dirty and untracked.regions[0].take_dirty() == b""
    assert untracked.marker(0, 8) is None


def test_a_snapshot_takes_the_union_of_kvm_and_vmm_logs_and_clears_both() -> None:
    mem = _mem()
    mem.write(0x2000, b"device")                       # the VMM wrote page 2 of region 0
    kvm_logs = {0: bytearray(8), 1: bytearray(8)}
    kvm_logs[0][0] = 1 << 5                            # the guest wrote page 5 of region 0
    kvm_logs[1][0] = 1 << 1                            # ... and page 1 of region 1

    def get_dirty_log(slot, size):
        out = bytes(kvm_logs[slot])
        kvm_logs[slot][:] = bytes(8)
        return out

    machine = SimpleNamespace(mem=mem, vm=SimpleNamespace(get_dirty_log=get_dirty_log))
    region_size = 64 * DIRTY_PAGE
    assert Vmm._dirty_ranges(machine) == [(0x2000, DIRTY_PAGE), (0x5000, DIRTY_PAGE),
                                          (region_size + 0x1000, DIRTY_PAGE)]
    assert Vmm._dirty_ranges(machine) == []


async def test_a_virtio_device_writes_are_in_the_log() -> None:
    rig = make_rig(EchoDevice())
    d = rig.driver
    vq0, _ = await d.init()
    rig.mem.track_dirty()
    rig.mem.write(0x200000, b"one")
    vq0.offer(vq0.add_chain([Buf(0x200000, 3), Buf(0x300000, 3, True)]))
    used_page = vq0.used // DIRTY_PAGE * DIRTY_PAGE
    _pages(rig.mem)                      # forget the driver's (the guest's) own writes
    d.kick(vq0)
    assert await d.wait_used(vq0, 1) == [(0, 3)]
    assert rig.mem.read(0x300000, 3) == b"one"
    marked = _pages(rig.mem)
    assert {0x300000, used_page} <= marked
    # The next request's used-ring write marks the ring again (a view held since activation).
    vq0.offer(vq0.add_chain([Buf(0x200000, 3), Buf(0x310000, 3, True)]))
    _pages(rig.mem)
    d.kick(vq0)
    await d.wait_used(vq0, 1)
    assert {0x310000, used_page} <= _pages(rig.mem)
    rig.close()
