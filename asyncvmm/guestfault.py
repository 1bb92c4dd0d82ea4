"""Guest faults: counted always, logged a few at a time, so no guest can flood the host's log.

A *guest fault* is something the guest did wrong that the VMM survives by
ignoring it: a write to a read-only virtio-mmio register, an access of the
wrong size, an invalid device-status transition, an access no device claims.
Each one used to be a log line, and a guest can do it in a loop (50,000
read-only-register writes made 7 MB of log).  :class:`GuestFaults` counts
every fault in the ``guest_faults`` metrics group and logs at most
:attr:`GuestFaults.burst` lines per kind in each :attr:`GuestFaults.interval_s`
window; the first fault of a later window logs how many were suppressed
before it.  So the log holds the first few faults of each kind verbatim and
then at most a couple of lines per kind per window, whatever the guest does.

Any thread may report (vCPU threads for port I/O, the loop for virtio-mmio):
the few words of state are behind one lock, taken only on fault paths.
The clock is injected for tests.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

from asyncvmm.metrics import MetricGroup

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GuestFaultMetrics(MetricGroup):
    """The ``guest_faults`` metrics group: one counter per kind, and the log lines held back."""

    mmio_unclaimed: int = 0          # an MMIO access no device claims
    pio_unclaimed: int = 0           # a port access no device claims
    virtio_mmio_access: int = 0      # bad size/alignment, read-only or unknown register
    virtio_mmio_protocol: int = 0    # a register written in the wrong device status
    virtio_config: int = 0           # device configuration space outside its bounds or read-only
    virtio_pci_access: int = 0       # virtio-pci BAR0: bad size/alignment, read-only or unknown field
    virtio_pci_protocol: int = 0     # virtio-pci: a common-config field written in the wrong status
    pci_msix: int = 0                # an MSI-X table/PBA access that is not an aligned DWORD/QWORD in range
    pci_config: int = 0              # a PCI configuration access of a bad size, alignment or offset
    pci_bar: int = 0                 # a BAR the guest placed outside the windows or over another
    msi_address: int = 0             # an unmasked MSI-X vector whose address is not the local APICs'
    other: int = 0                   # a kind this group has no field for
    log_lines_suppressed: int = 0


@dataclasses.dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class GuestFaults:
    """The one reporter of guest faults for a microVM (or a default one for tests and tools)."""

    def __init__(self, metrics: GuestFaultMetrics | None = None, *, burst: int = 10,
                 interval_s: float = 60.0, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = metrics if metrics is not None else GuestFaultMetrics()
        self.burst = burst
        self.interval_s = interval_s
        self._log = logger or log
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def report(self, kind: str, fmt: str, *args, level: int = logging.WARNING) -> None:
        """Count one fault of ``kind`` (a field of the metrics group) and maybe log it.

        ``fmt % args`` is only formatted when the line is actually logged.
        """
        counter = kind if kind in _KINDS else "other"
        with self._lock:
            setattr(self.metrics, counter, getattr(self.metrics, counter) + 1)
            now = self._clock()
            w = self._windows.get(kind)
            held_back = 0
            if w is None or now - w.start >= self.interval_s:
                held_back = w.suppressed if w is not None else 0
                w = self._windows[kind] = _Window(now)
            if w.logged >= self.burst:
                w.suppressed += 1
                self.metrics.log_lines_suppressed += 1
                return
            w.logged += 1
            last_of_burst = w.logged == self.burst
        if held_back:
            self._log.warning("guest fault %s: %d more suppressed in the previous %.0f s",
                              kind, held_back, self.interval_s)
        self._log.log(level, "guest fault %s: " + fmt, kind, *args)
        if last_of_burst:
            self._log.log(level, "guest fault %s: further faults of this kind are counted in "
                          "metrics (guest_faults.%s); at most %d lines per %.0f s",
                          kind, counter, self.burst, self.interval_s)


_KINDS = frozenset(f.name for f in dataclasses.fields(GuestFaultMetrics)) - {"log_lines_suppressed"}

#: For code built without a microVM's reporter (unit tests, tools): rate-limited, counted nowhere
#: that is flushed.
DEFAULT = GuestFaults()
