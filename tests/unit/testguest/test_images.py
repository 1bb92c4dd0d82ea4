"""The built images have the formats asyncvmm's loaders and QEMU expect."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import require
from tests.unit.testguest.elfview import PT_LOAD, PT_NOTE, parse_elf, parse_setup_header

HIMEM = 0x100000
ENTRY64 = 0x100200
XEN_ELFNOTE_PHYS32_ENTRY = 18
CLI = 0xFA                       # both entries start with cli


@pytest.fixture(scope="module")
def elf_pvh(images):
    return parse_elf(images.elf_pvh.read_bytes())


@pytest.fixture(scope="module")
def elf(images):
    return parse_elf(images.elf.read_bytes())


def test_variants_are_the_three_image_files(images):
    assert set(images.variants()) == {"elf_pvh", "elf", "bzimage"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in images.variants().values())


@pytest.mark.parametrize("which", ["elf_pvh", "elf"])
def test_elf_header_is_an_x86_64_executable_entered_at_1mib_plus_0x200(request, which):
    e = request.getfixturevalue(which)
    assert e.ident[:4] == b"\x7fELF"
    assert e.ident[4] == 2 and e.ident[5] == 1          # ELFCLASS64, little-endian
    assert e.type == 2 and e.machine == 62              # ET_EXEC, EM_X86_64
    assert e.entry == ENTRY64
    assert e.bytes_at(ENTRY64, 1)[0] == CLI


@pytest.mark.parametrize("which", ["elf_pvh", "elf"])
def test_every_pt_load_is_identity_mapped_at_or_above_1mib(request, which):
    loads = [s for s in request.getfixturevalue(which).segments if s.type == PT_LOAD]
    assert loads
    for s in loads:
        assert s.paddr >= HIMEM and s.vaddr == s.paddr
        assert s.memsz >= s.filesz
    assert min(s.paddr for s in loads) == HIMEM


def test_pvh_note_points_at_the_32_bit_entry(elf_pvh):
    xen = [n for n in elf_pvh.notes() if n[0] == b"Xen" and n[1] == XEN_ELFNOTE_PHYS32_ENTRY]
    assert len(xen) == 1
    _, _, desc, align = xen[0]
    # 8 bytes like Linux; QEMU reads a u64 at the 4-aligned descriptor
    assert len(desc) == 8 and align == 4
    entry32 = int.from_bytes(desc, "little")
    assert entry32 == HIMEM
    assert elf_pvh.bytes_at(entry32, 1)[0] == CLI


def test_elf_without_pvh_has_no_notes_at_all(elf):
    assert not [s for s in elf.segments if s.type == PT_NOTE]
    assert elf.notes() == []


def test_both_elfs_load_the_same_code_and_data(elf_pvh, elf):
    def loads(e):
        return [(s.paddr, s.memsz, e.data[s.offset:s.offset + s.filesz])
                for s in e.segments if s.type == PT_LOAD]
    with_note, without = loads(elf_pvh), loads(elf)
    assert len(with_note) == len(without)
    for (pa, _, a), (pb, _, b) in zip(with_note, without):
        assert pa == pb and a.startswith(b)      # the note only appends to the text segment
    assert with_note[-1] == without[-1]          # .data/.bss identical


def test_bzimage_setup_header(images, elf):
    image = images.bzimage.read_bytes()
    hdr = parse_setup_header(image)
    assert hdr["boot_flag"] == 0xAA55 and hdr["header"] == b"HdrS"
    assert hdr["version"] >= 0x020C
    assert hdr["loadflags"] & 0x01                       # LOADED_HIGH
    assert hdr["xloadflags"] & 0x01                      # XLF_KERNEL_64
    assert hdr["pref_address"] == HIMEM == hdr["code32_start"]
    assert hdr["relocatable_kernel"] == 0
    align = hdr["kernel_alignment"]
    assert align and align & (align - 1) == 0 and HIMEM % align == 0
    assert hdr["cmdline_size"] >= 255
    assert 1 <= hdr["setup_sects"]
    version_at = 0x200 + hdr["kernel_version"]
    assert image[version_at:image.index(b"\0", version_at)] == b"asyncvmm testguest"


def test_bzimage_payload_is_the_flat_image_with_the_64_bit_entry_at_0x200(images, elf):
    image = images.bzimage.read_bytes()
    hdr = parse_setup_header(image)
    payload = image[(hdr["setup_sects"] + 1) * 512:]
    flat = images.payload.read_bytes()
    assert len(payload) == hdr["syssize"] * 16              # exactly what loaders check
    assert payload[:len(flat)] == flat and not payload[len(flat):].strip(b"\0")
    assert payload[0] == CLI and payload[0x200] == CLI
    assert payload[:0x400] == elf.bytes_at(HIMEM, 0x400)
    load_end = max(s.paddr + s.memsz for s in elf.segments if s.type == PT_LOAD)
    assert hdr["init_size"] >= load_end - HIMEM      # .bss included
    assert hdr["init_size"] % 4096 == 0


def test_bzimage_jump_lands_on_the_real_mode_stub_inside_the_setup_area(images):
    image = images.bzimage.read_bytes()
    hdr = parse_setup_header(image)
    assert hdr["jump"] & 0xFF == 0xEB                    # jmp short
    target = 0x202 + (hdr["jump"] >> 8)
    assert 0x26C <= target < (hdr["setup_sects"] + 1) * 512
    assert image[target] == CLI


def disassembly(path) -> str:
    require(shutil.which("objdump") is not None, "objdump (binutils) is needed")
    out = subprocess.run(["objdump", "-d", "-M", "suffix", str(path)],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_no_instruction_that_kvm_pvm_cannot_run(images):
    # .head and ap_start32 hold 32-bit code that objdump decodes as 64-bit;
    # none of the forbidden encodings appear in them either way.
    text = disassembly(images.elf)
    for bad in ("cmpxchg16b", "xsave", "xrstor", "fxsave", "fxrstor", "int3", "%xmm", "%ymm",
                "%zmm", "%st", "syscall"):
        assert not re.search(rf"\s{re.escape(bad)}", text), bad


def test_only_the_gated_ring_0_stretch_uses_privileged_instructions(images):
    """hlt, ltr, lidt, wrmsr and CR writes belong to entry.S, never to C code."""
    text = disassembly(images.elf)
    current = None
    offenders = set()
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <([^>]+)>:", line)
        if m:
            current = m.group(1)
        elif re.search(r"\s(hlt|ltr|lidt|lgdt|wrmsr|rdmsr|mov\w*\s+%\w+,%cr\d)\b", line):
            offenders.add(current)
    assert offenders <= {"start32", "start64", "common64", "enter_ring3", "ud_entry",
                         "ap_start32", "ap_start64", "ring3_triple_fault"}, offenders
