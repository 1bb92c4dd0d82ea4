"""The boot timer: a guest write of 123 to its MMIO address marks "booted".

Firecracker's convention for measuring boot time: the guest's init writes
the magic byte to guest-physical 0xC000_0000 and the VMM logs

    Guest-boot-time = <us> us <ms> ms, <cpu us> CPU us <cpu ms> CPU ms

measured from the InstanceStart request (wall clock) and from the VMM's CPU
time at that request.  Clocks are injected; the log line goes to an
injected sink, so no I/O here.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

MAGIC_VALUE = 123

log = logging.getLogger(__name__)


class BootTimer:
    def __init__(self, start_ns: int, start_cpu_ns: int, *,
                 clock: Callable[[], int] = time.monotonic_ns,
                 cpu_clock: Callable[[], int] = time.process_time_ns,
                 report: Callable[[str], None] = log.info) -> None:
        self._start_ns = start_ns
        self._start_cpu_ns = start_cpu_ns
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._report = report
        self.boot_time_us: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not data or data[0] != MAGIC_VALUE:
            return
        wall_us = (self._clock() - self._start_ns) // 1000
        cpu_us = (self._cpu_clock() - self._start_cpu_ns) // 1000
        self.boot_time_us = wall_us
        self._report(f"Guest-boot-time = {wall_us:>6} us {wall_us // 1000} ms, "
                     f"{cpu_us:>6} CPU us {cpu_us // 1000} CPU ms")
