"""Linux KVM bindings: C structs, ioctl numbers, fd wrappers and typed exits.

Three tiers, as in the kernel's own headers: :mod:`.structs` (ctypes
mirrors of ``struct kvm_*``), :mod:`.ioctls` (request numbers computed from
those types), :mod:`.fd` (one wrapper class per fd kind raising
:class:`KvmError`) and :mod:`.exits` (``kvm_run`` decoded into objects).
Nothing here knows about devices: the vCPU loop hands exits to a bus.
"""

from .exits import decode_exit
from .fd import Kvm, KvmError, KvmUnavailableError, VcpuFd, VmFd

__all__ = ["Kvm", "KvmError", "KvmUnavailableError", "VcpuFd", "VmFd", "decode_exit"]
