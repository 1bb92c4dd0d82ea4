"""Interrupt lines as seen by devices.

A device raises its interrupt by calling :meth:`IrqLine.trigger`.  In a VM the
line is an eventfd registered with ``KVM_IRQFD`` for the device's GSI, so a
trigger from any thread (the loop or a vCPU) injects an edge into the
in-kernel IOAPIC without a trip through userspace.  Tests use a counting
fake from ``tests/fakes``.
"""

from __future__ import annotations

import os
from typing import Protocol


class IrqLine(Protocol):
    def trigger(self) -> None: ...


class EventFd:
    """A non-blocking, close-on-exec eventfd (the kernel counter object)."""

    def __init__(self, initval: int = 0) -> None:
        self.fd = os.eventfd(initval, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def write(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Read and reset the counter; 0 when it was not signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass


class EventFdIrqLine:
    """An interrupt line backed by an irqfd: each trigger is one edge."""

    def __init__(self, gsi: int, eventfd: EventFd | None = None) -> None:
        self.gsi = gsi
        self.eventfd = eventfd or EventFd()

    def trigger(self) -> None:
        self.eventfd.write(1)
