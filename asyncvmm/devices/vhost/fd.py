"""One open vhost character device (``/dev/vhost-net``): thin ioctl wrappers and their errors.

Primer (drivers/vhost/vhost.c, net.c).  Opening ``/dev/vhost-net`` gives one
in-kernel virtio-net back end.  ``VHOST_SET_OWNER`` binds it to the calling
process (its memory map and a kernel worker); from then on the kernel reads
and writes the rings and buffers through the *userspace* addresses of
guest memory given by ``VHOST_SET_MEM_TABLE``.  Per virtqueue the VMM sets
the size (``VHOST_SET_VRING_NUM``), the index the back end starts from
(``VHOST_SET_VRING_BASE``), the ring addresses (``VHOST_SET_VRING_ADDR``,
userspace addresses again), the eventfd the guest's kick signals
(``VHOST_SET_VRING_KICK``) and the one the back end signals for a used
buffer (``VHOST_SET_VRING_CALL``); ``VHOST_NET_SET_BACKEND`` with a tap fd
starts the queue, with -1 stops it, after which ``VHOST_GET_VRING_BASE``
says where the back end stopped.

Every failure is a :class:`VhostError` naming the ioctl and the errno.  This
module does the I/O; what to set comes from :mod:`.net`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from . import ioctls as io
from . import structs as s

VHOST_NET_PATH = "/dev/vhost-net"


class VhostError(OSError):
    """A vhost operation failed; the message names it and the kernel's reason."""

    def __init__(self, err: int, what: str, hint: str = "") -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}{hint}")


class VhostUnavailableError(VhostError):
    """``/dev/vhost-net`` cannot be opened (no ``vhost_net`` module, no permission)."""


def open_vhost_net(path: str = VHOST_NET_PATH) -> int:
    """Open ``path`` read-write, close-on-exec; :class:`VhostUnavailableError` with a hint."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        hint = " (is the vhost_net module loaded? modprobe vhost_net)" if e.errno == errno.ENOENT else ""
        raise VhostUnavailableError(e.errno or errno.EIO, f"cannot open {path}", hint) from None


def check_vhost_net(path: str = VHOST_NET_PATH) -> None:
    """Whether ``path`` opens (what the API checks at PUT); closes what it opened."""
    os.close(open_vhost_net(path))


class VhostFd:
    """An open vhost fd; one method per ioctl."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _ioctl(self, request: int, arg: int | ctypes.Structure | ctypes.c_uint64, what: str) -> None:
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            raise VhostError(e.errno or errno.EIO, what) from None

    def set_owner(self) -> None:
        self._ioctl(io.VHOST_SET_OWNER, 0, "VHOST_SET_OWNER")

    def get_features(self) -> int:
        value = ctypes.c_uint64()
        self._ioctl(io.VHOST_GET_FEATURES, value, "VHOST_GET_FEATURES")
        return value.value

    def set_features(self, features: int) -> None:
        self._ioctl(io.VHOST_SET_FEATURES, ctypes.c_uint64(features), f"VHOST_SET_FEATURES {features:#x}")

    def set_mem_table(self, regions: list[s.vhost_memory_region]) -> None:
        self._ioctl(io.VHOST_SET_MEM_TABLE, s.vhost_memory_with(regions),
                    f"VHOST_SET_MEM_TABLE ({len(regions)} regions)")

    def set_vring_num(self, index: int, num: int) -> None:
        self._ioctl(io.VHOST_SET_VRING_NUM, s.vhost_vring_state(index, num),
                    f"VHOST_SET_VRING_NUM {index}: {num}")

    def set_vring_base(self, index: int, num: int) -> None:
        self._ioctl(io.VHOST_SET_VRING_BASE, s.vhost_vring_state(index, num),
                    f"VHOST_SET_VRING_BASE {index}: {num}")

    def get_vring_base(self, index: int) -> int:
        state = s.vhost_vring_state(index, 0)
        self._ioctl(io.VHOST_GET_VRING_BASE, state, f"VHOST_GET_VRING_BASE {index}")
        return state.num

    def set_vring_addr(self, addr: s.vhost_vring_addr) -> None:
        self._ioctl(io.VHOST_SET_VRING_ADDR, addr, f"VHOST_SET_VRING_ADDR {addr.index}")

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._ioctl(io.VHOST_SET_VRING_KICK, s.vhost_vring_file(index, fd), f"VHOST_SET_VRING_KICK {index}")

    def set_vring_call(self, index: int, fd: int) -> None:
        self._ioctl(io.VHOST_SET_VRING_CALL, s.vhost_vring_file(index, fd), f"VHOST_SET_VRING_CALL {index}")

    def set_vring_err(self, index: int, fd: int) -> None:
        self._ioctl(io.VHOST_SET_VRING_ERR, s.vhost_vring_file(index, fd), f"VHOST_SET_VRING_ERR {index}")

    def net_set_backend(self, index: int, fd: int) -> None:
        self._ioctl(io.VHOST_NET_SET_BACKEND, s.vhost_vring_file(index, fd),
                    f"VHOST_NET_SET_BACKEND {index}: fd {fd}")

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
