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

The userfaultfd comes from ``/dev/userfaultfd`` (``USERFAULTFD_IOC_NEW``, Linux 6.1+), whose file
permissions let a jailed, unprivileged VMM have one, and from the ``userfaultfd(2)`` call when
the device is absent, refused or too old: Firecracker's order (its userfaultfd crate falls back
only when the device is absent).  It
is enabled with ``UFFD_FEATURE_EVENT_REMOVE``, as in Firecracker: the balloon's
``MADV_DONTNEED`` then reaches the handler as a ``UFFD_EVENT_REMOVE`` message, so it answers
later faults there with zero pages instead of the stale snapshot contents.
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
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_REMOVE = 0x15
USERFAULTFD_DEVICE = "/dev/userfaultfd"
USERFAULTFD_IOC_NEW = 0xAA00         # _IO(0xAA, 0x00) on /dev/userfaultfd
PAGE_SIZE = 4096

FEATURES = UFFD_FEATURE_EVENT_REMOVE  # what the VMM asks UFFDIO_API for
FEATURE_NAMES = {UFFD_FEATURE_EVENT_REMOVE: "UFFD_FEATURE_EVENT_REMOVE (Linux 4.11+)"}
# The device is missing (kernel before 6.1, or not made in the jail), not ours to open, or
# does not know the ioctl: userfaultfd(2) may still work.  Other errors are reported.
_DEVICE_FALLBACK = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTTY})

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


def _os_error(what: str, err: int) -> str:
    return f"{what}: {os.strerror(err)} (os error {err})"


def open_userfaultfd(device: str = USERFAULTFD_DEVICE) -> int:
    """A new userfaultfd (``O_CLOEXEC | O_NONBLOCK``, not yet through ``UFFDIO_API``):
    ``USERFAULTFD_IOC_NEW`` on ``device``, else the ``userfaultfd(2)`` call."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    tried = ""
    try:
        dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno not in _DEVICE_FALLBACK:
            raise UffdError(_os_error(f"cannot open {device}", e.errno)) from None
        tried = _os_error(f"{device}", e.errno)
    else:
        try:
            fd = _libc.ioctl(dev, ctypes.c_ulong(USERFAULTFD_IOC_NEW), flags)
            err = ctypes.get_errno()
        finally:
            os.close(dev)
        if fd >= 0:
            return fd
        if err not in _DEVICE_FALLBACK:
            raise UffdError(_os_error(f"USERFAULTFD_IOC_NEW on {device} failed", err))
        tried = _os_error(f"USERFAULTFD_IOC_NEW on {device}", err)
    fd = _libc.syscall(NR_USERFAULTFD, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise UffdError(f"cannot create a userfaultfd: {tried}; {_os_error('userfaultfd(2)', err)}")
    return fd


def create_userfaultfd(features: int = FEATURES, device: str = USERFAULTFD_DEVICE) -> int:
    """A userfaultfd through ``UFFDIO_API`` with ``features``; a kernel without one of them is
    refused with its name."""
    fd = open_userfaultfd(device)
    api = uffdio_api(api=UFFD_API, features=features)
    if _libc.ioctl(fd, ctypes.c_ulong(UFFDIO_API), ctypes.byref(api)) >= 0:
        return fd
    err = ctypes.get_errno()
    os.close(fd)
    missing = features & ~_kernel_features(device) if err == errno.EINVAL else 0
    if missing:
        names = [FEATURE_NAMES.get(bit, hex(bit)) for bit in (1 << i for i in range(64)) if missing & bit]
        raise UffdError(f"the host kernel's userfaultfd lacks {', '.join(names)}, which the Uffd "
                        "memory backend needs (the page-fault handler must hear of balloon removals)")
    raise UffdError(_os_error("UFFDIO_API failed", err))


def _kernel_features(device: str) -> int:
    """The features this kernel's userfaultfd offers (``UFFDIO_API`` asking for none, on a
    descriptor of its own: the call is allowed once per descriptor)."""
    fd = open_userfaultfd(device)
    try:
        api = uffdio_api(api=UFFD_API, features=0)
        _ioctl(fd, UFFDIO_API, api, "UFFDIO_API")
        return api.features
    finally:
        os.close(fd)


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
