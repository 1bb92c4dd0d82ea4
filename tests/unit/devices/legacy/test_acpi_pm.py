"""The ACPI sleep control/status registers, driven the way ACPICA drives them."""

from __future__ import annotations

from hypothesis import given, strategies as st

from asyncvmm.devices.bus import Bus
from asyncvmm.devices.legacy.acpi_pm import (
    ACPI_PM_PORT_BASE, ACPI_PM_PORT_SIZE, ACPI_X_SLEEP_ENABLE, ACPI_X_WAKE_STATUS, S5_SLP_TYP,
    SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT, AcpiPm)

CONTROL = SLEEP_CONTROL_PORT - ACPI_PM_PORT_BASE
STATUS = SLEEP_STATUS_PORT - ACPI_PM_PORT_BASE


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def sleep_control(slp_typ: int) -> bytes:
    return bytes([(slp_typ << 2) | ACPI_X_SLEEP_ENABLE])


def test_ports_are_the_two_registers() -> None:
    assert (SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT) == (ACPI_PM_PORT_BASE, ACPI_PM_PORT_BASE + 1)
    assert ACPI_PM_PORT_SIZE == 2


def test_acpica_power_off_sequence_calls_on_poweroff_once() -> None:
    # acpi_hw_extended_sleep: clear WAK_STS, write SLP_TYP|SLP_EN, poll WAK_STS.
    off = Counter()
    bus = Bus("pio")
    dev = AcpiPm(off)
    bus.insert(ACPI_PM_PORT_BASE, ACPI_PM_PORT_SIZE, dev)
    bus.write(SLEEP_STATUS_PORT, bytes([ACPI_X_WAKE_STATUS]))
    assert off.calls == 0
    bus.write(SLEEP_CONTROL_PORT, sleep_control(S5_SLP_TYP))
    assert off.calls == 1 and dev.powered_off
    assert bus.read(SLEEP_STATUS_PORT, 1) == b"\x00"     # the machine is off: no wake
    bus.write(SLEEP_CONTROL_PORT, sleep_control(S5_SLP_TYP))
    assert off.calls == 1


def test_slp_typ_without_slp_en_only_latches_the_type() -> None:
    off = Counter()
    dev = AcpiPm(off)
    dev.write(CONTROL, bytes([S5_SLP_TYP << 2]))
    assert off.calls == 0
    # SLP_TYP reads back; SLP_EN is write-only and reads 0.
    assert dev.read(CONTROL, 1) == bytes([S5_SLP_TYP << 2])
    dev.write(CONTROL, sleep_control(S5_SLP_TYP))
    assert dev.read(CONTROL, 1) == bytes([S5_SLP_TYP << 2])
    assert off.calls == 1


def test_unsupported_sleep_state_wakes_immediately() -> None:
    off = Counter()
    dev = AcpiPm(off)
    dev.write(CONTROL, sleep_control(3))
    assert off.calls == 0
    assert dev.read(STATUS, 1)[0] & ACPI_X_WAKE_STATUS
    dev.write(STATUS, b"\x00")                            # writing 0 leaves it set
    assert dev.read(STATUS, 1)[0] & ACPI_X_WAKE_STATUS
    dev.write(STATUS, bytes([ACPI_X_WAKE_STATUS]))        # write-1-to-clear
    assert dev.read(STATUS, 1) == b"\x00"


def test_wide_access_covers_both_registers() -> None:
    off = Counter()
    dev = AcpiPm(off)
    dev.write(CONTROL, sleep_control(S5_SLP_TYP) + bytes([ACPI_X_WAKE_STATUS]))
    assert off.calls == 1
    assert dev.read(CONTROL, 2) == bytes([S5_SLP_TYP << 2, 0])


def test_out_of_range_offsets_are_harmless() -> None:
    off = Counter()
    dev = AcpiPm(off)
    dev.write(5, sleep_control(S5_SLP_TYP))
    assert off.calls == 0
    assert dev.read(1, 4) == b"\x00\xff\xff\xff"


@given(st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=1, max_size=4)), max_size=30))
def test_any_guest_writes_never_raise_and_power_off_only_on_s5(writes) -> None:
    off = Counter()
    dev = AcpiPm(off)
    expected = False
    for offset, data in writes:
        dev.write(offset, data)
        for i, value in enumerate(data):
            if offset + i == CONTROL and value & ACPI_X_SLEEP_ENABLE and (value >> 2) & 7 == S5_SLP_TYP:
                expected = True
        assert len(dev.read(offset, len(data))) == len(data)
    assert off.calls == (1 if expected else 0)
