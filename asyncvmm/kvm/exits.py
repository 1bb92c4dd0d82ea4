"""Decoding ``struct kvm_run`` after ``KVM_RUN`` returns into typed exit objects.

One function, :func:`decode_exit`, reads the exit reason and the matching
member of the exit union.  Port I/O and MMIO reads carry a ``complete``
method that writes the device's answer back into the shared page, where
KVM picks it up on the next ``KVM_RUN``.  MMIO, the exit a running guest
makes most (virtio-mmio's InterruptStatus and InterruptACK on every
interrupt), is read from a memoryview of the page with one ``struct`` unpack
when the caller has one: each ctypes field access makes an object, and the
ctypes decode was a fifth of the vCPU thread's Python time per exit.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from .structs import KVM_EXIT_IO_OUT, kvm_run

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

EXIT_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_EXIT_") and isinstance(v, int)}

_REASON_AT = kvm_run.exit_reason.offset
_U32 = struct.Struct("<I")
_MMIO_AT = kvm_run.exit.offset
_MMIO = struct.Struct("<Q8sIB")        # the exit union's mmio: phys_addr, data[8], len, is_write
_MMIO_DATA_AT = _MMIO_AT + 8


@dataclass(slots=True)
class IoOut:
    port: int
    data: bytes          # size * count bytes (rep outs repeats the access)
    size: int


@dataclass(slots=True)
class IoIn:
    port: int
    size: int
    count: int
    _page: object
    _offset: int

    def complete(self, data: bytes) -> None:
        """Store the device's answer (``size * count`` bytes) for the guest."""
        n = self.size * self.count
        ctypes.memmove(ctypes.addressof(self._page) + self._offset, bytes(data[:n]).ljust(n, b"\xff"), n)


@dataclass(slots=True)
class MmioWrite:
    addr: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    addr: int
    size: int
    _run: kvm_run
    _view: memoryview | None = None      # the same page as bytes, when the decoder had one

    def complete(self, data: bytes) -> None:
        buf = bytes(data[:self.size]).ljust(self.size, b"\xff")
        if self._view is not None:
            self._view[_MMIO_DATA_AT:_MMIO_DATA_AT + self.size] = buf
        else:
            ctypes.memmove(self._run.exit.mmio.data, buf, self.size)


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """The guest triple-faulted (or otherwise entered shutdown)."""


@dataclass(slots=True)
class SystemEvent:
    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class Interrupted:
    """``KVM_RUN`` returned because of a signal or ``immediate_exit``."""


@dataclass(slots=True)
class FailEntry:
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]


@dataclass(slots=True)
class Unhandled:
    """Any other exit reason; the vCPU reports it and stops."""
    reason: int

    @property
    def name(self) -> str:
        return EXIT_NAMES.get(self.reason, f"exit reason {self.reason}")


Exit = (IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | SystemEvent | Interrupted
        | FailEntry | InternalError | Unhandled)


def decode_exit(run: kvm_run, view: memoryview | None = None) -> Exit:
    """The exit ``run`` describes; ``view``: the same page as bytes, for a quicker MMIO decode."""
    if view is not None and _U32.unpack_from(view, _REASON_AT)[0] == KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(view, _MMIO_AT)
        size = min(length, 8)
        if is_write:
            return MmioWrite(addr, data[:size])
        return MmioRead(addr, size, run, view)
    reason = run.exit_reason
    if reason == KVM_EXIT_MMIO:
        m = run.exit.mmio
        size = min(m.len, 8)
        if m.is_write:
            return MmioWrite(m.phys_addr, bytes(m.data[:size]))
        return MmioRead(m.phys_addr, size, run)
    if reason == KVM_EXIT_IO:
        io = run.exit.io
        if io.direction == KVM_EXIT_IO_OUT:
            data = ctypes.string_at(ctypes.addressof(run) + io.data_offset, io.size * io.count)
            return IoOut(io.port, data, io.size)
        return IoIn(io.port, io.size, io.count, run, io.data_offset)
    if reason == KVM_EXIT_HLT:
        return Hlt()
    if reason == KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == KVM_EXIT_SYSTEM_EVENT:
        ev = run.exit.system_event
        return SystemEvent(ev.type, tuple(ev.data[:min(ev.ndata, 16)]))
    if reason == KVM_EXIT_INTR:
        return Interrupted()
    if reason == KVM_EXIT_FAIL_ENTRY:
        f = run.exit.fail_entry
        return FailEntry(f.hardware_entry_failure_reason, f.cpu)
    if reason == KVM_EXIT_INTERNAL_ERROR:
        ie = run.exit.internal
        return InternalError(ie.suberror, tuple(ie.data[:min(ie.ndata, 16)]))
    return Unhandled(reason)
