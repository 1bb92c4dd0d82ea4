"""The guest-fault reporter: every fault counted, the log bounded per kind and window."""

from __future__ import annotations

import logging

from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_is_counted_but_logs_only_the_burst(caplog):
    clock = Clock()
    faults = GuestFaults(GuestFaultMetrics(), burst=5, interval_s=60.0, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="asyncvmm.guestfault"):
        for i in range(50_000):
            faults.report("virtio_mmio_access", "write of %#x ignored", i)
    assert faults.metrics.virtio_mmio_access == 50_000
    assert faults.metrics.log_lines_suppressed == 50_000 - 5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6                           # five faults, then "further faults ... counted"
    assert lines[0] == "guest fault virtio_mmio_access: write of 0x0 ignored"
    assert "guest_faults.virtio_mmio_access" in lines[5]


def test_the_next_window_says_how_many_were_suppressed(caplog):
    clock = Clock()
    faults = GuestFaults(burst=2, interval_s=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="asyncvmm.guestfault"):
        for _ in range(10):
            faults.report("mmio_unclaimed", "read at %#x", 0x1234)
        clock.now += 61
        faults.report("mmio_unclaimed", "read at %#x", 0x1234)
    messages = [r.getMessage() for r in caplog.records]
    assert "guest fault mmio_unclaimed: 8 more suppressed in the previous 60 s" in messages
    assert messages[-1] == "guest fault mmio_unclaimed: read at 0x1234"


def test_kinds_have_their_own_budgets_and_unknown_kinds_count_as_other(caplog):
    faults = GuestFaults(burst=1, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="asyncvmm.guestfault"):
        faults.report("pio_unclaimed", "a")
        faults.report("virtio_config", "b")
        faults.report("something_new", "c")
    assert (faults.metrics.pio_unclaimed, faults.metrics.virtio_config, faults.metrics.other) == (1, 1, 1)
    assert sum("guest fault" in r.getMessage() and r.getMessage().endswith(("a", "b", "c"))
               for r in caplog.records) == 3


def test_level_is_respected(caplog):
    faults = GuestFaults(clock=Clock())
    with caplog.at_level(logging.INFO, logger="asyncvmm.guestfault"):
        faults.report("pio_unclaimed", "probe", level=logging.DEBUG)
    assert faults.metrics.pio_unclaimed == 1
    assert not caplog.records
