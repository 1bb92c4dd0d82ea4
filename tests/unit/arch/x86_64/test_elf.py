"""ELF vmlinux loading: segments by p_paddr, bss, entry conversion, the PVH note, hostile images."""

from __future__ import annotations

import io
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.arch.x86_64 import layout
from asyncvmm.arch.x86_64.bootparams import setup_header
from asyncvmm.arch.x86_64.loader import KernelLoad, LoaderError, load_kernel
from asyncvmm.memory import GuestMemory
from tests.conftest import require

from .kernel_images import Seg, find_real_kernels, make_elf, note, note_seg, xen_pvh_note

MiB = 1 << 20
KERNEL = 0x1000000
LINK = 0xFFFFFFFF81000000


def guest(size: int = 64 * MiB, fill: int = 0xAA) -> GuestMemory:
    mem = GuestMemory.from_buffers([(0, bytearray([fill]) * size)])
    return mem


def load(mem: GuestMemory, image: bytes) -> KernelLoad:
    return load_kernel(mem, io.BytesIO(image))


def test_segments_land_at_paddr_and_bss_is_zeroed():
    text, data = b"\x0f\x01" * 100, b"DATA" * 10
    image = make_elf([Seg(KERNEL, text, vaddr=LINK),
                      Seg(KERNEL + 0x200000, data, memsz=0x3000, vaddr=LINK + 0x200000)],
                     entry=KERNEL)
    mem = guest()
    k = load(mem, image)
    assert mem.read(KERNEL, len(text)) == text
    assert mem.read(KERNEL + 0x200000, len(data)) == data
    assert mem.read(KERNEL + 0x200000 + len(data), 0x3000 - len(data)) == bytes(0x3000 - len(data))
    assert mem.read_u8(KERNEL + 0x200000 + 0x3000) == 0xAA       # nothing past p_memsz
    assert mem.read_u8(KERNEL + len(text)) == 0xAA
    assert (k.kind, k.load_addr, k.kernel_end, k.entry) == ("elf", KERNEL, KERNEL + 0x203000, KERNEL)
    assert k.pvh_entry is None and k.setup_header is None
    assert k.initrd_addr_max == 0x37FFFFFF
    assert k.cmdline_max_len == layout.CMDLINE_MAX_SIZE - 1


def test_virtual_entry_is_translated_to_physical():
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000, vaddr=LINK)], entry=LINK + 0x40)
    assert load(guest(), image).entry == KERNEL + 0x40


def test_physical_entry_wins_over_a_segment_linked_at_zero():
    # Linux's per-CPU segment has p_vaddr 0; a physical e_entry must not be read through it.
    image = make_elf([Seg(0x200000, b"\x90" * 0x100, vaddr=0),
                      Seg(KERNEL, b"\x90" * 0x1000, vaddr=LINK)], entry=KERNEL + 8)
    assert load(guest(), image).entry == KERNEL + 8


def test_entry_outside_every_segment_is_refused():
    image = make_elf([Seg(KERNEL, b"\x90" * 0x100)], entry=KERNEL + 0x100)
    with pytest.raises(LoaderError, match="entry point"):
        load(guest(), image)


@pytest.mark.parametrize("size", [4, 8])
def test_pvh_note_gives_the_32bit_entry(size):
    notes = note(b"GNU\0", 3, b"\x11" * 20) + xen_pvh_note(KERNEL + 0x850, size)
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000), note_seg(notes)], entry=KERNEL)
    assert load(guest(), image).pvh_entry == KERNEL + 0x850


def test_pvh_note_with_8_byte_note_alignment():
    notes = note(b"GNU\0", 5, b"\x22" * 12, align=8) + note(b"Xen\0", 18, (KERNEL + 4).to_bytes(8, "little"), align=8)
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000), note_seg(notes, align=8)], entry=KERNEL)
    assert load(guest(), image).pvh_entry == KERNEL + 4


def test_other_xen_notes_are_not_the_pvh_entry():
    notes = note(b"Xen\0", 1, b"\0" * 8) + note(b"Linux\0", 18, KERNEL.to_bytes(8, "little"))
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000), note_seg(notes)], entry=KERNEL)
    assert load(guest(), image).pvh_entry is None


@pytest.mark.parametrize("desc, match", [
    ((KERNEL + 0x5000).to_bytes(8, "little"), "outside every loaded segment"),
    ((1 << 32).to_bytes(8, "little"), "not a 32-bit address"),
    (b"\x00\x00\x00", "3-byte value"),
])
def test_bad_pvh_notes_are_refused(desc, match):
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000), note_seg(note(b"Xen\0", 18, desc))], entry=KERNEL)
    with pytest.raises(LoaderError, match=match):
        load(guest(), image)


def test_truncated_note_is_refused():
    broken = xen_pvh_note(KERNEL)[:-4]
    image = make_elf([Seg(KERNEL, b"\x90" * 0x1000), note_seg(broken)], entry=KERNEL)
    with pytest.raises(LoaderError, match="note"):
        load(guest(), image)


@pytest.mark.parametrize("paddr, memsz, match", [
    (64 * MiB - 0x800, 0x1000, "does not fit"),
    (KERNEL + 0x1000, 1 << 40, "does not fit"),
    (0x80000, 0x1000, "below"),
])
def test_segment_outside_ram_is_refused_before_anything_is_written(paddr, memsz, match):
    image = make_elf([Seg(KERNEL, b"\x11" * 0x100), Seg(paddr, b"\x22" * 0x100, memsz=memsz)],
                     entry=KERNEL)
    mem = guest()
    with pytest.raises(LoaderError, match=match):
        load(mem, image)
    assert mem.read(KERNEL, 0x100) == b"\xaa" * 0x100


def test_segment_in_ram_above_the_gap_is_refused():
    mem = GuestMemory.from_buffers([(0, bytearray(32 * MiB)), (1 << 32, bytearray(MiB))])
    image = make_elf([Seg(1 << 32, b"\x90" * 0x100)], entry=1 << 32)
    with pytest.raises(LoaderError, match="does not fit"):
        load(mem, image)


def test_overlapping_segments_are_refused():
    image = make_elf([Seg(KERNEL, b"\x90" * 0x2000), Seg(KERNEL + 0x1000, b"\x90" * 0x100)], entry=KERNEL)
    with pytest.raises(LoaderError, match="overlap"):
        load(guest(), image)


def test_no_loadable_segment_is_refused():
    image = make_elf([note_seg(xen_pvh_note(KERNEL))], entry=KERNEL)
    with pytest.raises(LoaderError, match="no loadable segment"):
        load(guest(), image)


def test_filesz_beyond_memsz_or_file_is_refused():
    with pytest.raises(LoaderError, match="exceeds memory size"):
        load(guest(), make_elf([Seg(KERNEL, b"\x90" * 0x100, memsz=0x80)], entry=KERNEL))
    image = make_elf([Seg(KERNEL, b"\x90" * 0x100)], entry=KERNEL)
    with pytest.raises(LoaderError, match="past the end of the file"):
        load(guest(), image[:-1])


@pytest.mark.parametrize("cut", [4, 20, 63])
def test_truncated_header_is_refused(cut):
    image = make_elf([Seg(KERNEL, b"\x90" * 0x100)], entry=KERNEL)
    with pytest.raises(LoaderError, match="truncated ELF header"):
        load(guest(), image[:cut])


def test_truncated_program_headers_are_refused():
    image = make_elf([Seg(KERNEL, b"")] * 3, entry=KERNEL)
    with pytest.raises(LoaderError, match="truncated"):
        load(guest(), image[:64 + 56 + 10])


def _with_ident(byte_index: int, value: int) -> bytes:
    image = bytearray(make_elf([Seg(KERNEL, b"\x90" * 0x100)], entry=KERNEL))
    image[byte_index] = value
    return bytes(image)


@pytest.mark.parametrize("image, match", [
    (_with_ident(4, 1), "ELFCLASS64"),
    (_with_ident(5, 2), "little-endian"),
    (_with_ident(6, 0), "EV_CURRENT"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_type=3), "ET_EXEC"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_machine=3), "EM_X86_64"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_version=2), "EV_CURRENT"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_phentsize=32), "program header size"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_phnum=0), "program header count"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_phnum=0xFFFF), "program header count"),
    (make_elf([Seg(KERNEL, b"\x90")], entry=KERNEL, e_phnum=129), "program header count"),
])
def test_bad_elf_header_fields_are_refused(image, match):
    with pytest.raises(LoaderError, match=match):
        load(guest(), image)


def test_loads_from_a_path(tmp_path):
    image = make_elf([Seg(KERNEL, b"PATH" * 64)], entry=KERNEL)
    (tmp_path / "vmlinux").write_bytes(image)
    mem = guest()
    assert load_kernel(mem, tmp_path / "vmlinux").entry == KERNEL
    assert mem.read(KERNEL, 4) == b"PATH"


def test_missing_file_is_a_loader_error(tmp_path):
    with pytest.raises(LoaderError, match="cannot open"):
        load_kernel(guest(), tmp_path / "nope")


_VALID = make_elf([Seg(KERNEL, b"\x90" * 0x200, vaddr=LINK, memsz=0x400),
                   note_seg(xen_pvh_note(KERNEL + 0x10))], entry=KERNEL)
_SMALL_MEM = GuestMemory.from_buffers([(0, bytearray(20 * MiB))])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_garbage_is_a_loader_error(data):
    with pytest.raises(LoaderError):
        load_kernel(_SMALL_MEM, io.BytesIO(data))


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_elf_loads_or_is_a_loader_error(mutations):
    image = bytearray(_VALID)
    for pos, value in mutations:
        image[pos] = value
    try:
        k = load_kernel(_SMALL_MEM, io.BytesIO(bytes(image)))
    except LoaderError:
        return
    assert layout.HIMEM_START <= k.load_addr < k.kernel_end <= 20 * MiB
    assert k.load_addr <= k.entry < k.kernel_end


def _real_vmlinux() -> bytes:
    """A real vmlinux: from the image cache or /boot, or unpacked from a real bzImage's payload."""
    kernels = find_real_kernels()
    require(bool(kernels), "no real kernel (build images: python -m asyncvmm_tools.images build)")
    for path in kernels:
        data = path.read_bytes()
        if data[:4] == b"\x7fELF":
            return data
    for path in kernels:
        data = path.read_bytes()
        if data[0x202:0x206] == b"HdrS":
            return _unpack_payload(data)
    require(False, "no real kernel with an ELF vmlinux inside")


def _unpack_payload(bz: bytes) -> bytes:
    hdr = setup_header.from_buffer_copy(bz, 0x1F1)
    start = ((hdr.setup_sects or 4) + 1) * 512 + hdr.payload_offset
    payload = bz[start:start + hdr.payload_length]
    tools = {b"\x02\x21\x4c\x18": ["lz4", "-dc"], b"\xfd7zX": ["xz", "-dc"], b"\x1f\x8b": ["gzip", "-dc"],
             b"\x28\xb5\x2f\xfd": ["zstd", "-dc"]}
    for magic, cmd in tools.items():
        if payload.startswith(magic):
            require(shutil.which(cmd[0]) is not None, f"{cmd[0]} is needed to unpack the kernel")
            # zstd/lz4 payloads carry trailing size bytes that the tools warn about; the ELF is intact.
            return subprocess.run(cmd, input=payload, capture_output=True).stdout
    require(False, f"unknown kernel compression {payload[:4].hex()}")


def test_real_vmlinux_loads_with_a_pvh_entry():
    image = _real_vmlinux()
    mem = GuestMemory.anonymous(layout.ram_layout(256 * MiB))
    k = load_kernel(mem, io.BytesIO(image))
    assert k.kind == "elf"
    assert k.load_addr <= k.entry < k.kernel_end
    # Debian's and the project's kernels enable CONFIG_PVH; the note is how we boot them.
    assert k.pvh_entry is not None and k.load_addr <= k.pvh_entry < k.kernel_end
    assert mem.read(k.load_addr, 16) != bytes(16)
