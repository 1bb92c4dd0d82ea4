"""The vhost userspace ABI as ctypes structures, in kernel field order.

Each class mirrors one C struct of ``<linux/vhost_types.h>`` and is named
after it.  ``struct vhost_memory`` ends in a flexible array of regions; it is
declared as its fixed header and :func:`vhost_memory_with` builds a sized
variant for one call.  The unit tier compares every size and offset here
with the kernel headers compiled by gcc (``tests/unit/devices/vhost``).
No I/O here.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint32, c_uint64

u32, u64, s32 = c_uint32, c_uint64, c_int32


class _Struct(ctypes.Structure):
    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, *_ in self._fields_
                           if not n.endswith("padding"))
        return f"{type(self).__name__}({fields})"


class vhost_vring_state(_Struct):
    """struct vhost_vring_state { unsigned int index; unsigned int num; };"""
    _fields_ = [("index", u32), ("num", u32)]


class vhost_vring_file(_Struct):
    """struct vhost_vring_file { unsigned int index; int fd; /* Pass -1 to unbind from file. */ };"""
    _fields_ = [("index", u32), ("fd", s32)]


#: ``vhost_vring_file.fd`` that unbinds (``VHOST_FILE_UNBIND``).
VHOST_FILE_UNBIND = -1


class vhost_vring_addr(_Struct):
    """struct vhost_vring_addr { unsigned int index; unsigned int flags;
    __u64 desc_user_addr; __u64 used_user_addr; __u64 avail_user_addr; __u64 log_guest_addr; };"""
    _fields_ = [("index", u32), ("flags", u32), ("desc_user_addr", u64), ("used_user_addr", u64),
                ("avail_user_addr", u64), ("log_guest_addr", u64)]


#: ``vhost_vring_addr.flags`` bit: ``log_guest_addr`` is valid and used-ring writes are logged.
VHOST_VRING_F_LOG = 0


class vhost_memory_region(_Struct):
    """struct vhost_memory_region { __u64 guest_phys_addr; __u64 memory_size; /* bytes */
    __u64 userspace_addr; __u64 flags_padding; /* No flags are currently specified. */ };"""
    _fields_ = [("guest_phys_addr", u64), ("memory_size", u64), ("userspace_addr", u64),
                ("flags_padding", u64)]


class vhost_memory(_Struct):
    """struct vhost_memory { __u32 nregions; __u32 padding; struct vhost_memory_region regions[0]; };"""
    _fields_ = [("nregions", u32), ("padding", u32)]


def vhost_memory_with(regions: list[vhost_memory_region]) -> ctypes.Structure:
    """A ``struct vhost_memory`` followed by ``regions``, as one buffer for VHOST_SET_MEM_TABLE."""
    sized = type("vhost_memory", (_Struct,), {
        "_fields_": [*vhost_memory._fields_, ("regions", vhost_memory_region * len(regions))]})
    mem = sized(nregions=len(regions))
    for i, region in enumerate(regions):
        mem.regions[i] = region
    return mem


# Feature bits of <linux/vhost_types.h> (beside the virtio ones the device offers).
VHOST_F_LOG_ALL = 26                 # log all writes to guest memory (live migration)
VHOST_NET_F_VIRTIO_NET_HDR = 27      # vhost-net adds/strips the virtio-net header itself

__all__ = ["VHOST_FILE_UNBIND", "VHOST_F_LOG_ALL", "VHOST_NET_F_VIRTIO_NET_HDR", "VHOST_VRING_F_LOG",
           "vhost_memory", "vhost_memory_region", "vhost_memory_with",
           "vhost_vring_addr", "vhost_vring_file", "vhost_vring_state"]
