"""Build (and cache) the kvm-tier test guest images.

``build_test_guest()`` compiles the freestanding guest in this directory with
gcc, links it twice (with and without the PVH note), and packs a bzImage
around the flat payload.  Outputs are cached under
``~/.cache/asyncvmm/testguest/<key>/`` where ``key`` is the sha256 of the
sources, this file, the flags and the tool versions; a missing directory is
rebuilt.  A build happens in a private temporary directory that is renamed
into place, so concurrent test processes never see half-written images.

Run ``python -m tests.guest.build`` to build and print the image paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
OBJECTS_C = ("main.c", "console.c", "lib.c", "acpi.c", "smp.c", "virtio.c", "vdev.c", "blkbench.c", "blkreset.c", "vsock.c", "balloon.c", "pci.c", "cpuid.c")
OBJECTS_S = ("entry.S",)
PVH_NOTE = "pvhnote.S"
SETUP_STUB = "setup.S"
LINKER_SCRIPT = "link.ld"

# Code that ring 0 of kvm_pvm must never meet (no SSE/x87/MMX state, so no
# xsave/xrstor; no cmpxchg16b) and nothing that needs a libc or relocation.
CFLAGS = (
    "-m64", "-O2", "-std=gnu11", "-Wall", "-Wextra",
    "-ffreestanding", "-nostdlib", "-fno-builtin", "-fno-pic", "-fno-pie",
    "-mno-red-zone", "-mgeneral-regs-only", "-mno-sse", "-mno-mmx", "-mno-80387",
    "-mcmodel=small", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns", "-fcf-protection=none", "-fno-common",
)
LDFLAGS = ("-m", "elf_x86_64", "-static", "-nostdlib", "--build-id=none",
           "-z", "max-page-size=0x1000", "-z", "noexecstack")

LOAD_ADDRESS = 0x100000          # HIMEM: where the payload (and the ELF) live
ENTRY64_OFFSET = 0x200           # boot.rst: 64-bit entry = load address + 0x200
STUB_OFFSET = 0x280              # real-mode stub, after the setup header
SECTOR = 512

# struct setup_header fields (offset in the boot sector / boot_params, format)
HDR_FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "vid_mode": (0x1FA, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "4s"),
    "version": (0x206, "H"),
    "kernel_version": (0x20E, "H"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "min_alignment": (0x235, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}
BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
BOOT_PROTOCOL = 0x020C           # 2.12: xloadflags and the 64-bit entry
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
VID_MODE_NORMAL = 0xFFFF
CMDLINE_SIZE = 4095              # asyncvmm's CMDLINE_MAX_SIZE minus the NUL
KERNEL_VERSION = b"asyncvmm testguest\0"


class TestGuestBuildError(RuntimeError):
    """gcc/ld/objcopy are missing or failed; the message has their output."""

    __test__ = False             # not a pytest test class, despite the name


@dataclasses.dataclass(frozen=True)
class TestGuestImages:
    """Paths of one cached build.  Every variant runs the same code."""

    __test__ = False

    directory: Path
    elf_pvh: Path                # ELF64 with e_entry (64-bit) and the PVH note
    elf: Path                    # same ELF64 without the PVH note
    bzimage: Path                # setup sectors + flat payload
    payload: Path                # the flat payload alone (loaded at LOAD_ADDRESS)

    def variants(self) -> dict[str, Path]:
        return {"elf_pvh": self.elf_pvh, "elf": self.elf, "bzimage": self.bzimage}


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asyncvmm" / "testguest"


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise TestGuestBuildError(f"{tool} not found on PATH (install gcc and binutils)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else path


def cache_key() -> str:
    """sha256 over every input that can change the images."""
    h = hashlib.sha256()
    for name in sorted(p.name for p in SOURCE_DIR.iterdir()
                       if p.suffix in (".c", ".h", ".S", ".ld") or p.name == "build.py"):
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    for part in (*CFLAGS, *LDFLAGS, _tool_version("gcc"), _tool_version("ld"),
                 _tool_version("objcopy")):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def _run(argv: list[str], cwd: Path) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise TestGuestBuildError(f"{' '.join(argv)} failed:\n{proc.stdout}{proc.stderr}")


def _elf_load_end(elf: bytes) -> int:
    """End of the highest PT_LOAD (p_paddr + p_memsz) of an ELF64 image."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    end = 0
    for i in range(phnum):
        p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 1:
            end = max(end, p_paddr + p_memsz)
    return end


def pack_bzimage(payload: bytes, stub: bytes, init_size: int) -> bytes:
    """A bzImage: boot sector + setup sectors (header, real-mode stub), then payload.

    The payload must be the flat image linked at LOAD_ADDRESS with its
    64-bit entry at offset 0x200; it is zero-padded to a multiple of 16.  ``init_size`` is the memory the payload
    needs from LOAD_ADDRESS, .bss included.
    """
    if len(payload) <= ENTRY64_OFFSET:
        raise ValueError("payload has no 64-bit entry at offset 0x200")
    # syssize counts 16-byte paragraphs and loaders check it against the file,
    # so the protected-mode part is padded to a whole number of them.
    payload = payload + bytes(-len(payload) % 16)
    version_at = STUB_OFFSET + len(stub)
    setup_end = version_at + len(KERNEL_VERSION)
    setup_sects = max(1, -(-setup_end // SECTOR) - 1)
    setup = bytearray((setup_sects + 1) * SECTOR)
    setup[STUB_OFFSET:version_at] = stub
    setup[version_at:setup_end] = KERNEL_VERSION
    values = {
        "setup_sects": setup_sects,
        "syssize": len(payload) // 16,
        "vid_mode": VID_MODE_NORMAL,
        "boot_flag": BOOT_FLAG,
        "jump": 0xEB | (STUB_OFFSET - 0x202) << 8,     # jmp short to the stub
        "header": HDRS,
        "version": BOOT_PROTOCOL,
        "kernel_version": version_at - 0x200,
        "loadflags": LOADED_HIGH,
        "code32_start": LOAD_ADDRESS,
        "initrd_addr_max": 0x7FFF_FFFF,
        "kernel_alignment": LOAD_ADDRESS,
        "relocatable_kernel": 0,
        "min_alignment": LOAD_ADDRESS.bit_length() - 1,
        "xloadflags": XLF_KERNEL_64,
        "cmdline_size": CMDLINE_SIZE,
        "pref_address": LOAD_ADDRESS,
        "init_size": -(-init_size // 4096) * 4096,
    }
    for name, (offset, fmt) in HDR_FIELDS.items():
        struct.pack_into("<" + fmt, setup, offset, values[name])
    return bytes(setup) + payload


def _compile_all(out: Path) -> None:
    """One gcc per source, all at once: a build is mostly compiler start-up."""
    jobs = [["gcc", *CFLAGS, "-c", str(SOURCE_DIR / n)]
            for n in (*OBJECTS_C, *OBJECTS_S, PVH_NOTE)]
    jobs.append(["gcc", *CFLAGS, f"-DSTUB_OFFSET={STUB_OFFSET:#x}", "-c",
                 str(SOURCE_DIR / SETUP_STUB), "-o", "setup.o"])
    procs = [(argv, subprocess.Popen(argv, cwd=out, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)) for argv in jobs]
    failures = []
    for argv, proc in procs:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"{' '.join(argv)} failed:\n{output}")
    if failures:
        raise TestGuestBuildError("\n".join(failures))


def _compile_and_link(out: Path) -> None:
    _compile_all(out)
    objs = [Path(n).with_suffix(".o").name for n in (*OBJECTS_C, *OBJECTS_S)]
    script = ["-T", str(SOURCE_DIR / LINKER_SCRIPT)]
    _run(["ld", *LDFLAGS, *script, "-o", "testguest-pvh.elf", *objs, "pvhnote.o"], out)
    _run(["ld", *LDFLAGS, *script, "-o", "testguest.elf", *objs], out)
    _run(["objcopy", "-O", "binary", "testguest.elf", "testguest.bin"], out)
    _run(["objcopy", "-O", "binary", "-j", ".text", "setup.o", "setup.bin"], out)
    payload = (out / "testguest.bin").read_bytes()
    init_size = _elf_load_end((out / "testguest.elf").read_bytes()) - LOAD_ADDRESS
    stub = (out / "setup.bin").read_bytes()
    (out / "bzImage").write_bytes(pack_bzimage(payload, stub, init_size))
    for obj in out.glob("*.o"):
        obj.unlink()
    (out / "setup.bin").unlink()


def _images(directory: Path) -> TestGuestImages:
    return TestGuestImages(directory=directory,
                           elf_pvh=directory / "testguest-pvh.elf",
                           elf=directory / "testguest.elf",
                           bzimage=directory / "bzImage",
                           payload=directory / "testguest.bin")


def _complete(images: TestGuestImages) -> bool:
    return all(p.is_file() for p in (*images.variants().values(), images.payload))


def build_test_guest(cache_root: Path | None = None, *, force: bool = False) -> TestGuestImages:
    """Return the cached images, compiling them first if they are missing."""
    root = cache_root if cache_root is not None else default_cache_root()
    images = _images(root / cache_key())
    if not force and _complete(images):
        return images
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    tmp.chmod(0o755)            # mkdtemp's 0700 would hide the images from other users
    try:
        _compile_and_link(tmp)
        if images.directory.exists() and (force or not _complete(images)):
            shutil.rmtree(images.directory, ignore_errors=True)
        try:
            tmp.rename(images.directory)
        except OSError:
            if not images.directory.is_dir():   # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return images


def main() -> int:
    images = build_test_guest(force="--force" in sys.argv[1:])
    for name, path in images.variants().items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
