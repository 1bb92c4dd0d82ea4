"""What every kernel loader shares: the error type, the result, and file copying.

Contract: loaders read the kernel with ordinary file I/O and write only into
:class:`~asyncvmm.memory.GuestMemory`; they validate an image completely
before the first byte reaches guest memory, so a bad image leaves RAM as it
was.  Every failure is a :class:`LoaderError`; nothing in a kernel file can
raise anything else.  No vCPU state is touched here: the result says where
the kernel is and where to enter it, and the vCPU setup acts on that.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Union

from asyncvmm.arch.x86_64.layout import HIMEM_START
from asyncvmm.memory import GuestMemory, GuestMemoryError

PAGE_SIZE = 0x1000
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: the limit for kernels that do not state one

# Chunk for zero-filling bss without allocating its whole size at once.
_ZERO_CHUNK = bytes(1 << 20)

KernelSource = Union[str, os.PathLike, BinaryIO]


class LoaderError(Exception):
    """A kernel or initrd image that cannot be loaded into this guest."""


@dataclass(frozen=True)
class KernelLoad:
    """Where a kernel was put and how to enter it (all guest-physical)."""

    kind: str                    # "elf" or "bzimage"
    load_addr: int               # lowest byte written
    kernel_end: int              # one past the highest byte the kernel may use early on
    entry: int                   # 64-bit entry (Linux 64-bit boot protocol)
    pvh_entry: int | None        # 32-bit PVH entry from the Xen note, if any
    setup_header: bytes | None   # bzImage: bytes 0x1F1..end of header, for the zero page
    initrd_addr_max: int         # highest byte an initrd may occupy
    cmdline_max_len: int         # longest command line, excluding the NUL


def align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def align_down(value: int, align: int) -> int:
    return value // align * align


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM region that starts at guest address 0.

    Kernels and initrds live there: the boot page tables identity-map only
    the low 4 GiB and the 32-bit entry points cannot reach higher.
    """
    regions = mem.regions
    if not regions or regions[0].guest_addr != 0:
        raise LoaderError("guest RAM does not start at address 0")
    return regions[0].end


class ImageFile:
    """A seekable kernel/initrd file: a path (opened and closed here) or a binary file object."""

    def __init__(self, source: KernelSource) -> None:
        self._owned = isinstance(source, (str, os.PathLike))
        try:
            self._f: BinaryIO = open(source, "rb") if self._owned else source  # type: ignore[arg-type]
            self.size = self._f.seek(0, io.SEEK_END)
        except OSError as e:
            raise LoaderError(f"cannot open image: {e}") from e

    def __enter__(self) -> "ImageFile":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned:
            self._f.close()

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or LoaderError if the file is shorter."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise LoaderError(f"image truncated: need {length:#x} bytes at {offset:#x}, "
                              f"file has {self.size:#x}")
        buf = bytearray(length)
        self.read_into(offset, memoryview(buf))
        return bytes(buf)

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` from the file at ``offset``; readinto avoids an extra copy."""
        done = 0
        try:
            self._f.seek(offset)
            while done < len(view):
                n = self._f.readinto(view[done:])
                if not n:
                    # The file shrank after we measured it.
                    raise LoaderError(f"image truncated while reading at {offset + done:#x}")
                done += n
        except OSError as e:
            raise LoaderError(f"cannot read image: {e}") from e


def copy_to_guest(img: ImageFile, mem: GuestMemory, gpa: int, offset: int, length: int) -> None:
    """Copy ``length`` file bytes from ``offset`` straight into guest RAM at ``gpa``."""
    try:
        view = mem.view(gpa, length)
    except GuestMemoryError as e:
        raise LoaderError(str(e)) from e
    img.read_into(offset, view)


def zero_guest(mem: GuestMemory, gpa: int, length: int) -> None:
    """Zero a guest range in bounded chunks (bss may be tens of MiB)."""
    try:
        view = mem.view(gpa, length)
    except GuestMemoryError as e:
        raise LoaderError(str(e)) from e
    for start in range(0, length, len(_ZERO_CHUNK)):
        n = min(len(_ZERO_CHUNK), length - start)
        view[start:start + n] = _ZERO_CHUNK[:n]


def check_fits(mem: GuestMemory, start: int, end: int, what: str) -> None:
    """``[start, end)`` must lie in low RAM at or above 1 MiB."""
    limit = low_ram_end(mem)
    if start < HIMEM_START:
        raise LoaderError(f"{what} at {start:#x} is below {HIMEM_START:#x}, "
                          "where the boot structures live")
    if end > limit:
        raise LoaderError(f"{what} {start:#x}..{end:#x} does not fit in guest RAM "
                          f"below {limit:#x}")
