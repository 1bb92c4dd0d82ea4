"""Small kernel images built byte by byte for the loader tests, and a finder for real ones."""

from __future__ import annotations

import ctypes
import glob
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from asyncvmm.arch.x86_64.bootparams import (
    BOOT_FLAG_MAGIC, HDRS_MAGIC, LOADED_HIGH, SETUP_HEADER_OFFSET, XLF_KERNEL_64, setup_header)
from asyncvmm.arch.x86_64.loader.elf import (
    EM_X86_64, ET_EXEC, PT_LOAD, PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY, Elf64_Ehdr, Elf64_Phdr)

EHDR_SIZE = ctypes.sizeof(Elf64_Ehdr)
PHDR_SIZE = ctypes.sizeof(Elf64_Phdr)


@dataclass
class Seg:
    paddr: int
    data: bytes
    memsz: int | None = None     # default: len(data), i.e. no bss
    vaddr: int | None = None     # default: paddr
    type: int = PT_LOAD
    align: int = 0x1000


def note(name: bytes, ntype: int, desc: bytes, align: int = 4) -> bytes:
    """One ELF note record, name and desc padded to ``align``."""
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % align)
    return struct.pack("<III", len(name), len(desc), ntype) + pad(name) + pad(desc)


def xen_pvh_note(entry: int, size: int = 8) -> bytes:
    return note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, entry.to_bytes(size, "little"))


def make_elf(segments: list[Seg], *, entry: int, **ehdr_overrides: int) -> bytes:
    """An ELF64 x86-64 EXEC with one program header per ``Seg`` and data after the headers."""
    offset = EHDR_SIZE + PHDR_SIZE * len(segments)
    phdrs, blobs = [], []
    for s in segments:
        phdrs.append(Elf64_Phdr(p_type=s.type, p_flags=5, p_offset=offset,
                                p_vaddr=s.paddr if s.vaddr is None else s.vaddr, p_paddr=s.paddr,
                                p_filesz=len(s.data),
                                p_memsz=len(s.data) if s.memsz is None else s.memsz,
                                p_align=s.align))
        blobs.append(s.data)
        offset += len(s.data)
    ehdr = Elf64_Ehdr(e_type=ET_EXEC, e_machine=EM_X86_64, e_version=1, e_entry=entry,
                      e_phoff=EHDR_SIZE, e_ehsize=EHDR_SIZE, e_phentsize=PHDR_SIZE,
                      e_phnum=len(segments))
    ehdr.e_ident[:7] = list(b"\x7fELF\x02\x01\x01")
    for field, value in ehdr_overrides.items():
        setattr(ehdr, field, value)
    return bytes(ehdr) + b"".join(bytes(p) for p in phdrs) + b"".join(blobs)


def note_seg(data: bytes, align: int = 4) -> Seg:
    return Seg(paddr=0, data=data, type=PT_NOTE, align=align)


def make_bzimage(payload: bytes = b"\x90" * 0x1000, *, setup_sects: int = 4,
                 header_end: int = 0x26C, **fields: int) -> bytes:
    """A bzImage: setup sectors holding a header, then ``payload`` as the protected-mode kernel."""
    hdr = setup_header(setup_sects=setup_sects, boot_flag=BOOT_FLAG_MAGIC, header=HDRS_MAGIC,
                       version=0x020F, loadflags=LOADED_HIGH, xloadflags=XLF_KERNEL_64,
                       kernel_alignment=0x200000, relocatable_kernel=1,
                       pref_address=0x1000000, init_size=0x200000, cmdline_size=2047,
                       initrd_addr_max=0x7FFFFFFF, syssize=len(payload) // 16)
    hdr.jump = 0xEB | (header_end - 0x202) << 8
    for field, value in fields.items():
        setattr(hdr, field, value)
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    raw = bytes(hdr)
    setup[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(raw)] = raw
    return bytes(setup) + payload


def find_real_kernels() -> list[Path]:
    """Real kernel files on this machine: the guest-image cache, /boot, $ASYNCVMM_TEST_KERNEL."""
    found: list[Path] = []
    if os.environ.get("ASYNCVMM_TEST_KERNEL"):
        found.append(Path(os.environ["ASYNCVMM_TEST_KERNEL"]))
    try:
        from asyncvmm_tools.images import load_manifest
        images = load_manifest()
        found += [p for p in (images.bzimage, images.vmlinux, images.minikernel,
                              images.minikernel_bzimage) if p]
    except Exception:  # noqa: BLE001 -- no built images (or no images package): look elsewhere
        pass
    found += [Path(p) for p in sorted(glob.glob("/boot/vmlinu[xz]-*"))]
    return [p for p in found if p.is_file() and os.access(p, os.R_OK)]
