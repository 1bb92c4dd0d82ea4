"""Thin wrappers around the three kinds of KVM file descriptor.

:class:`Kvm` is ``/dev/kvm`` (system ioctls), :class:`VmFd` a VM, and
:class:`VcpuFd` one vCPU with its mmap'ed ``kvm_run`` page.  Each method is
one ioctl; errno becomes :class:`KvmError` (one family, with the ioctl name
and errno kept).  ioctls go through libc via ctypes: the call releases the
GIL for its duration (so ``KVM_RUN`` blocks only its own thread), and
unsigned 64-bit integer arguments pass unchanged.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
from typing import Sequence

from . import ioctls as io
from . import structs as s
from .exits import Exit, Interrupted, decode_exit

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

KVM_API_VERSION = 12


class KvmError(OSError):
    """A KVM ioctl failed; ``.errno`` is the kernel's answer, ``.op`` the ioctl."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        msg = f"{op} failed: {os.strerror(err)}" + (f" ({detail})" if detail else "")
        super().__init__(err, msg)
        self.op = op


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing, not accessible, or speaks another API version."""


_EINTR_RETRIES = 100


def _ioctl(fd: int, op: str, request: int, arg: int | ctypes._CData | None = None) -> int:
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        ptr = ctypes.addressof(arg)
    # A signal can interrupt an ioctl before KVM did anything (KVM_CREATE_VM was seen failing
    # with EINTR under load); it is then simply asked again.  KVM_RUN does not come here.
    for _ in range(_EINTR_RETRIES):
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            break
    raise KvmError(op, err)


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Kvm(_Fd):
    """``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailableError(f"open {path}", e.errno or _errno.ENODEV) from e
        super().__init__(fd)
        version = _ioctl(fd, "KVM_GET_API_VERSION", io.KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError("KVM_GET_API_VERSION", _errno.EINVAL,
                                      f"API version {version}, need {KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", io.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE", io.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[s.kvm_cpuid_entry2]:
        return self._cpuid_list(io.KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID")

    def _cpuid_list(self, request: int, op: str) -> list[s.kvm_cpuid_entry2]:
        n = 128
        while True:
            buf = s.with_entries(s.kvm_cpuid2, s.kvm_cpuid_entry2, n)()
            buf.nent = n
            try:
                _ioctl(self.fd, op, request, buf)
            except KvmError as e:
                if e.errno == _errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [s.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def _msr_list(self, request: int, op: str) -> list[int]:
        probe = s.kvm_msr_list()
        try:
            _ioctl(self.fd, op, request, probe)
        except KvmError as e:
            if e.errno != _errno.E2BIG:
                raise
        buf = s.with_entries(s.kvm_msr_list, ctypes.c_uint32, probe.nmsrs)()
        buf.nmsrs = probe.nmsrs
        _ioctl(self.fd, op, request, buf)
        return list(buf.entries[:buf.nmsrs])

    def msr_index_list(self) -> list[int]:
        return self._msr_list(io.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list(io.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def create_vm(self) -> "VmFd":
        fd = _ioctl(self.fd, "KVM_CREATE_VM", io.KVM_CREATE_VM, 0)
        return VmFd(fd, self.vcpu_mmap_size())


class VmFd(_Fd):
    """One VM."""

    def __init__(self, fd: int, run_size: int) -> None:
        super().__init__(fd)
        self._run_size = run_size

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, "KVM_CHECK_EXTENSION", io.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = s.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", io.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_address(self, addr: int) -> None:
        _ioctl(self.fd, "KVM_SET_TSS_ADDR", io.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_address(self, addr: int) -> None:
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", io.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, "KVM_CREATE_IRQCHIP", io.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = s.KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, "KVM_CREATE_PIT2", io.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, "KVM_IRQ_LINE", io.KVM_IRQ_LINE, s.kvm_irq_level(irq, level))

    def register_irqfd(self, eventfd: int, gsi: int, *, deassign: bool = False) -> None:
        arg = s.kvm_irqfd(fd=eventfd, gsi=gsi, flags=s.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, "KVM_IRQFD", io.KVM_IRQFD, arg)

    def set_gsi_routing(self, entries: Sequence[s.kvm_irq_routing_entry]) -> None:
        """Replace the VM's whole GSI routing table with ``entries`` (KVM keeps no other route)."""
        buf = s.with_entries(s.kvm_irq_routing, s.kvm_irq_routing_entry, len(entries))()
        buf.nr = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, "KVM_SET_GSI_ROUTING", io.KVM_SET_GSI_ROUTING, buf)

    def signal_msi(self, address: int, data: int) -> int:
        """Inject one MSI; > 0 delivered, 0 blocked by the guest (e.g. a masked LAPIC), per the
        KVM API document."""
        msi = s.kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return _ioctl(self.fd, "KVM_SIGNAL_MSI", io.KVM_SIGNAL_MSI, msi)

    def register_ioeventfd(self, eventfd: int, addr: int, length: int, *,
                           datamatch: int | None = None, pio: bool = False,
                           deassign: bool = False) -> None:
        flags = ((s.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (s.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
                 | (s.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        arg = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=eventfd, flags=flags)
        _ioctl(self.fd, "KVM_IOEVENTFD", io.KVM_IOEVENTFD, arg)

    def get_clock(self) -> s.kvm_clock_data:
        data = s.kvm_clock_data()
        _ioctl(self.fd, "KVM_GET_CLOCK", io.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, data: s.kvm_clock_data) -> None:
        _ioctl(self.fd, "KVM_SET_CLOCK", io.KVM_SET_CLOCK, data)

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        chip = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, "KVM_GET_IRQCHIP", io.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, "KVM_SET_IRQCHIP", io.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        pit = s.kvm_pit_state2()
        _ioctl(self.fd, "KVM_GET_PIT2", io.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, "KVM_SET_PIT2", io.KVM_SET_PIT2, pit)

    def get_dirty_log(self, slot: int, memory_size: int) -> bytes:
        """The dirty-page bitmap of ``slot`` since the last call (one bit per 4 KiB page)."""
        nbits = (memory_size + 4095) // 4096
        bitmap = (ctypes.c_uint64 * ((nbits + 63) // 64))()
        log = s.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _ioctl(self.fd, "KVM_GET_DIRTY_LOG", io.KVM_GET_DIRTY_LOG, log)
        return bytes(bitmap)

    def enable_cap(self, cap: int, *args: int) -> None:
        arg = s.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            arg.args[i] = a
        _ioctl(self.fd, "KVM_ENABLE_CAP", io.KVM_ENABLE_CAP, arg)

    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        fd = _ioctl(self.fd, "KVM_CREATE_VCPU", io.KVM_CREATE_VCPU, vcpu_id)
        return VcpuFd(fd, vcpu_id, self._run_size)


class VcpuFd(_Fd):
    """One vCPU and its ``kvm_run`` page."""

    def __init__(self, fd: int, vcpu_id: int, run_size: int) -> None:
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        self._run_map = mmap.mmap(fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = s.kvm_run.from_buffer(self._run_map)
        self._run_view = memoryview(self._run_map)

    def close(self) -> None:
        if self.fd >= 0:
            del self.run_page
            self._run_view.release()
            self._run_map.close()
        super().close()

    def run(self) -> Exit:
        """One ``KVM_RUN``; a signal or ``immediate_exit`` gives :class:`Interrupted`."""
        ret = _libc.ioctl(self.fd, io.KVM_RUN, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (_errno.EINTR, _errno.EAGAIN):
                return Interrupted()
            raise KvmError("KVM_RUN", err)
        return decode_exit(self.run_page, self._run_view)

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page.immediate_exit = 1 if value else 0

    def _get(self, op: str, request: int, ctype: type):
        value = ctype()
        _ioctl(self.fd, op, request, value)
        return value

    def get_regs(self) -> s.kvm_regs:
        return self._get("KVM_GET_REGS", io.KVM_GET_REGS, s.kvm_regs)

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", io.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        return self._get("KVM_GET_SREGS", io.KVM_GET_SREGS, s.kvm_sregs)

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", io.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> s.kvm_fpu:
        return self._get("KVM_GET_FPU", io.KVM_GET_FPU, s.kvm_fpu)

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        _ioctl(self.fd, "KVM_SET_FPU", io.KVM_SET_FPU, fpu)

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get("KVM_GET_LAPIC", io.KVM_GET_LAPIC, s.kvm_lapic_state)

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", io.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> s.kvm_mp_state:
        return self._get("KVM_GET_MP_STATE", io.KVM_GET_MP_STATE, s.kvm_mp_state)

    def set_mp_state(self, state: s.kvm_mp_state) -> None:
        _ioctl(self.fd, "KVM_SET_MP_STATE", io.KVM_SET_MP_STATE, state)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return self._get("KVM_GET_VCPU_EVENTS", io.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events)

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, "KVM_SET_VCPU_EVENTS", io.KVM_SET_VCPU_EVENTS, events)

    def get_xsave(self) -> s.kvm_xsave:
        return self._get("KVM_GET_XSAVE", io.KVM_GET_XSAVE, s.kvm_xsave)

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        _ioctl(self.fd, "KVM_SET_XSAVE", io.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get("KVM_GET_XCRS", io.KVM_GET_XCRS, s.kvm_xcrs)

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        _ioctl(self.fd, "KVM_SET_XCRS", io.KVM_SET_XCRS, xcrs)

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get("KVM_GET_DEBUGREGS", io.KVM_GET_DEBUGREGS, s.kvm_debugregs)

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        _ioctl(self.fd, "KVM_SET_DEBUGREGS", io.KVM_SET_DEBUGREGS, regs)

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, "KVM_GET_TSC_KHZ", io.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl(self.fd, "KVM_SET_TSC_KHZ", io.KVM_SET_TSC_KHZ, khz)

    def kvmclock_ctrl(self) -> None:
        _ioctl(self.fd, "KVM_KVMCLOCK_CTRL", io.KVM_KVMCLOCK_CTRL)

    def set_cpuid2(self, entries: Sequence[s.kvm_cpuid_entry2]) -> None:
        buf = s.with_entries(s.kvm_cpuid2, s.kvm_cpuid_entry2, len(entries))()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, "KVM_SET_CPUID2", io.KVM_SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = 256) -> list[s.kvm_cpuid_entry2]:
        buf = s.with_entries(s.kvm_cpuid2, s.kvm_cpuid_entry2, max_entries)()
        buf.nent = max_entries
        _ioctl(self.fd, "KVM_GET_CPUID2", io.KVM_GET_CPUID2, buf)
        return [s.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def set_msrs(self, msrs: Sequence[tuple[int, int]]) -> int:
        """Set ``(index, value)`` pairs; returns how many KVM accepted."""
        buf = s.with_entries(s.kvm_msrs, s.kvm_msr_entry, len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, data) in enumerate(msrs):
            buf.entries[i].index = index
            buf.entries[i].data = data
        return _ioctl(self.fd, "KVM_SET_MSRS", io.KVM_SET_MSRS, buf)

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Values of the MSRs KVM could read, in order, stopping at the first it could not."""
        buf = s.with_entries(s.kvm_msrs, s.kvm_msr_entry, len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = _ioctl(self.fd, "KVM_GET_MSRS", io.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def nmi(self) -> None:
        _ioctl(self.fd, "KVM_NMI", io.KVM_NMI)
