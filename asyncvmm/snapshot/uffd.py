"""The Uffd memory backend: guest memory served by an external page-fault handler.

Firecracker's protocol (docs/snapshotting/handling-page-faults-on-snapshot-resume.md in
Firecracker): the VMM maps guest memory anonymous and private, creates a userfaultfd,
registers every region for missing-page faults, connects to the handler's Unix socket
(``mem_backend.backend_path``) and sends, in one message, a JSON array describing the
regions with the userfaultfd attached (``SCM_RIGHTS``)::

    [{"base_host_virt_addr": 140..., "size": 134217728, "offset": 0,
      "page_size": 4096, "page_size_kib": 4}, ...]

``offset`` is where the region starts in the snapshot's memory file.  The handler then
answers each fault (``UFFDIO_COPY`` from the memory file, or zero pages) for as long as the
microVM lives.  A handler that is not listening fails the load before the microVM exists.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket

from ..memory import GuestMemory

NR_USERFAULTFD = 323                 # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F              # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00         # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_COPY = 0xC028AA03             # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
PAGE_SIZE = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class UffdError(Exception):
    """The Uffd backend could not be set up; the message is for the API client."""


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> None:
    if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg)) < 0:
        err = ctypes.get_errno()
        raise UffdError(f"{what} failed: {os.strerror(err)} (os error {err})")


def create_userfaultfd() -> int:
    fd = _libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        err = ctypes.get_errno()
        raise UffdError(f"cannot create a userfaultfd: {os.strerror(err)} (os error {err})")
    try:
        _ioctl(fd, UFFDIO_API, uffdio_api(api=UFFD_API), "UFFDIO_API")
    except UffdError:
        os.close(fd)
        raise
    return fd


def register_and_send(mem: GuestMemory, offsets: list[int], backend_path: str) -> int:
    """Register ``mem`` on a new userfaultfd and hand it to the handler at ``backend_path``.

    Returns the userfaultfd (the VMM keeps it open while the microVM lives)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(backend_path)
    except OSError as e:
        sock.close()
        raise UffdError(f"cannot connect to the page-fault handler at {backend_path}: "
                        f"{os.strerror(e.errno) if e.errno else e}") from None
    fd = create_userfaultfd()
    try:
        mappings = []
        for region, offset in zip(mem.regions, offsets):
            _ioctl(fd, UFFDIO_REGISTER, uffdio_register(start=region.host_addr, len=region.size,
                                                        mode=UFFDIO_REGISTER_MODE_MISSING),
                   "UFFDIO_REGISTER")
            mappings.append({"base_host_virt_addr": region.host_addr, "size": region.size,
                             "offset": offset, "page_size": region.page_size,
                             "page_size_kib": region.page_size // 1024})
        body = json.dumps(mappings).encode()
        try:
            sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
        except OSError as e:
            raise UffdError(f"cannot send the userfaultfd to the page-fault handler: "
                            f"{os.strerror(e.errno) if e.errno else e}") from None
    except BaseException:
        os.close(fd)
        raise
    finally:
        sock.close()
    return fd


def copy_page(uffd: int, dst: int, src: int, length: int) -> None:
    """UFFDIO_COPY (for handlers, tests among them): ``length`` bytes at host address ``src``
    into the faulting range at ``dst``; a page another fault already filled is fine."""
    while True:
        arg = uffdio_copy(dst=dst, src=src, len=length, mode=0)
        if _libc.ioctl(uffd, ctypes.c_ulong(UFFDIO_COPY), ctypes.byref(arg)) >= 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return
        if err != errno.EAGAIN:     # EAGAIN: the address space changed meanwhile; try again
            raise UffdError(f"UFFDIO_COPY failed: {os.strerror(err)} (os error {err})")
