"""virtio-pmem's host side: the file's mapping and the regions' placement (no KVM needed)."""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import tempfile

import pytest

from asyncvmm.arch.x86_64 import layout
from asyncvmm.kvm.ioctls import KVM_CAP_NR_MEMSLOTS
from asyncvmm.kvm.structs import KVM_MEM_READONLY
from asyncvmm.pmemslots import PmemBacking, PmemError, PmemRegions

MiB = 1 << 20
GiB = 1 << 30


class FakeVm:
    def __init__(self, nr_memslots: int = 32764) -> None:
        self.nr = nr_memslots
        self.calls: list[tuple[int, int, int, int, int]] = []

    def check_extension(self, cap: int) -> int:
        assert cap == KVM_CAP_NR_MEMSLOTS
        return self.nr

    def set_user_memory_region(self, slot, gpa, size, hva, flags=0) -> None:
        self.calls.append((slot, gpa, size, hva, flags))


def _file(tmp_path, size: int, fill: bytes = b"") -> str:
    path = tmp_path / "pmem.img"
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(fill)
    return str(path)


def test_window_follows_the_64_bit_pci_window():
    assert layout.pmem_window(1 * GiB) == (512 * GiB, 512 * GiB)
    start, size = layout.pci_mmio64_window(300 * GiB)
    assert layout.pmem_window(300 * GiB) == (start + size, 512 * GiB)


def test_mapping_is_aligned_and_shared(tmp_path):
    path = _file(tmp_path, 3 * MiB + 5, b"hello")
    backing = PmemBacking(path, read_only=False)
    try:
        assert backing.file_len == 3 * MiB + 5 and backing.mmap_len == 4 * MiB
        view = (ctypes.c_char * backing.mmap_len).from_address(backing.host_addr)
        assert view[:5] == b"hello"
        view[0:5] = b"HELLO"
        view[4 * MiB - 1] = b"x"                 # the anonymous tail takes writes, never the file
        assert backing.flush()
        with open(path, "rb") as f:
            assert f.read(5) == b"HELLO"
        assert os.path.getsize(path) == 3 * MiB + 5
    finally:
        backing.close()
    assert not backing.flush()                  # after close: nothing to write back
    backing.close()                             # twice is fine


def test_exactly_aligned_file_maps_without_a_tail(tmp_path):
    backing = PmemBacking(_file(tmp_path, 2 * MiB), read_only=True)
    try:
        assert backing.mmap_len == backing.file_len == 2 * MiB
        assert backing.read_only
    finally:
        backing.close()


def _check_read_only_file(path: str) -> None:
    with pytest.raises(PmemError, match=r"^Error accessing backing file: Permission denied"):
        PmemBacking(path, read_only=False)
    backing = PmemBacking(path, read_only=True)
    backing.close()


def test_read_only_file_opens_without_write_permission():
    # Root ignores file permissions, so the check runs in a child that became `nobody`
    # (in a directory that user can enter; pytest's tmp_path is root's alone).
    tmp = tempfile.mkdtemp(prefix="pmem-ro-")
    try:
        os.chmod(tmp, 0o755)
        path = _file(pathlib.Path(tmp), MiB, b"ro")
        os.chmod(path, 0o444)
        if os.access(path, os.W_OK) and os.geteuid() != 0:
            pytest.fail("the file is writable although its mode is 0444")
        pid = os.fork()
        if pid == 0:                                  # the child: never returns into pytest
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                _check_read_only_file(path)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(tmp)


def test_missing_and_empty_files_are_refused(tmp_path):
    with pytest.raises(PmemError) as e:
        PmemBacking(str(tmp_path / "nope"), read_only=False)
    assert str(e.value) == "Error accessing backing file: No such file or directory (os error 2)"
    with pytest.raises(PmemError, match="^Error backing file size is 0$"):
        PmemBacking(_file(tmp_path, 0), read_only=False)


def test_regions_first_fit_and_slots_from_the_top(tmp_path):
    vm = FakeVm(nr_memslots=509)
    regions = PmemRegions(vm, ram_end=128 * MiB)
    base = 512 * GiB
    a = PmemBacking(_file(tmp_path, 3 * MiB), read_only=False)
    b_path = tmp_path / "b.img"
    b_path.write_bytes(b"")
    os.truncate(b_path, MiB)
    b = PmemBacking(str(b_path), read_only=True)
    try:
        start_a = regions.allocate(a.mmap_len)
        assert start_a == base
        regions.map(a, start_a)
        start_b = regions.allocate(b.mmap_len)
        assert start_b == base + 4 * MiB
        regions.map(b, start_b)
        assert vm.calls == [(508, base, 4 * MiB, a.host_addr, 0),
                            (507, base + 4 * MiB, 2 * MiB, b.host_addr, KVM_MEM_READONLY)]
        regions.unmap(start_a)
        assert vm.calls[-1] == (508, base, 0, 0, 0)
        assert regions.allocate(2 * MiB) == base            # the freed hole is used again
        assert regions.allocate(6 * MiB) == base + 6 * MiB  # too big for the hole
        regions.unmap(start_a)                              # twice: nothing more
        assert len(vm.calls) == 3
    finally:
        a.close()
        b.close()


def test_saved_placements_are_checked(tmp_path):
    regions = PmemRegions(FakeVm(), ram_end=GiB)
    base = 512 * GiB
    regions.check(base, 2 * MiB)
    backing = PmemBacking(_file(tmp_path, 2 * MiB), read_only=False)
    try:
        regions.map(backing, base)
        for start, size in ((base, 2 * MiB), (base + MiB, 2 * MiB), (base - 2 * MiB, 2 * MiB),
                            (base + 256 * GiB - 2 * MiB, 4 * MiB), (base + 2 * MiB, 3 * MiB)):
            with pytest.raises(PmemError):
                regions.check(start, size)
        regions.check(base + 2 * MiB, 2 * MiB)
    finally:
        backing.close()


def test_full_window_is_refused():
    regions = PmemRegions(FakeVm(), ram_end=GiB)
    assert regions.allocate(256 * GiB) == 512 * GiB
    with pytest.raises(PmemError, match="^Failed to allocate memory region$"):
        regions.allocate(256 * GiB + 2 * MiB)   # the upper half is hotpluggable memory's


def test_old_kernels_without_the_capability_get_509_slots(tmp_path):
    vm = FakeVm(nr_memslots=0)
    regions = PmemRegions(vm, ram_end=GiB)
    backing = PmemBacking(_file(tmp_path, 2 * MiB), read_only=False)
    try:
        regions.map(backing, regions.allocate(backing.mmap_len))
        assert vm.calls[0][0] == 508
    finally:
        backing.close()
