"""vhost ioctl request numbers (``<linux/vhost.h>``), computed from the argument types.

The generic encoding of ``<asm-generic/ioctl.h>`` (direction in bits 30-31,
argument size in bits 16-29, type in bits 8-15, number in bits 0-7) with
the type ``VHOST_VIRTIO`` = 0xAF.  A wrong struct size gives a wrong
number, which the unit tier catches against the kernel headers.  Kept apart
from :mod:`asyncvmm.kvm.ioctls` on purpose: ``devices/`` does not import
``kvm/``.
"""

from __future__ import annotations

import ctypes

from . import structs as s

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
VHOST_VIRTIO = 0xAF


def _IOC(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | nr


def _IO(nr: int) -> int:
    return _IOC(_IOC_NONE, nr, 0)


def _IOR(nr: int, arg: type) -> int:
    return _IOC(_IOC_READ, nr, ctypes.sizeof(arg))


def _IOW(nr: int, arg: type) -> int:
    return _IOC(_IOC_WRITE, nr, ctypes.sizeof(arg))


def _IOWR(nr: int, arg: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(arg))


# Every vhost fd.
VHOST_GET_FEATURES = _IOR(0x00, ctypes.c_uint64)
VHOST_SET_FEATURES = _IOW(0x00, ctypes.c_uint64)
VHOST_SET_OWNER = _IO(0x01)
VHOST_RESET_OWNER = _IO(0x02)
VHOST_SET_MEM_TABLE = _IOW(0x03, s.vhost_memory)        # the header's size, not the regions'
VHOST_SET_LOG_BASE = _IOW(0x04, ctypes.c_uint64)
VHOST_SET_LOG_FD = _IOW(0x07, ctypes.c_int)
VHOST_SET_VRING_NUM = _IOW(0x10, s.vhost_vring_state)
VHOST_SET_VRING_ADDR = _IOW(0x11, s.vhost_vring_addr)
VHOST_SET_VRING_BASE = _IOW(0x12, s.vhost_vring_state)
VHOST_GET_VRING_BASE = _IOWR(0x12, s.vhost_vring_state)
VHOST_SET_VRING_KICK = _IOW(0x20, s.vhost_vring_file)
VHOST_SET_VRING_CALL = _IOW(0x21, s.vhost_vring_file)
VHOST_SET_VRING_ERR = _IOW(0x22, s.vhost_vring_file)

# vhost-net only.
VHOST_NET_SET_BACKEND = _IOW(0x30, s.vhost_vring_file)

#: What the VMM issues once the microVM runs (activation, reset, hot-plug): the seccomp allowlist.
RUNTIME_IOCTLS = (VHOST_GET_FEATURES, VHOST_SET_FEATURES, VHOST_SET_OWNER, VHOST_SET_MEM_TABLE,
                  VHOST_SET_VRING_NUM, VHOST_SET_VRING_ADDR, VHOST_SET_VRING_BASE, VHOST_GET_VRING_BASE,
                  VHOST_SET_VRING_KICK, VHOST_SET_VRING_CALL, VHOST_SET_VRING_ERR, VHOST_NET_SET_BACKEND)
