"""The ACPI power-management device: the hardware-reduced sleep control and status registers.

Contract: a :class:`~asyncvmm.devices.bus.BusDevice` on the port-I/O bus at
:data:`ACPI_PM_PORT_BASE` covering :data:`ACPI_PM_PORT_SIZE` bytes; no I/O of
its own.  A guest request to enter S5 (soft off) calls the injected
``on_poweroff()`` once; nothing else a guest writes has an effect beyond the
register state, and no access raises.

Primer (ACPI 6.4 section 4.8.3.7).  A hardware-reduced platform has no PM1
control block; the FADT's SLEEP_CONTROL_REG and SLEEP_STATUS_REG name two
8-bit registers instead:

    SLEEP_CONTROL_REG   bits 4-2 SLP_TYPx, bit 5 SLP_EN (write-only, reads 0)
    SLEEP_STATUS_REG    bit 7 WAK_STS (write 1 to clear)

To power off, Linux (ACPICA ``acpi_hw_extended_sleep``) clears WAK_STS,
writes ``SLP_TYP << 2 | SLP_EN`` with SLP_TYP taken from the first element
of the DSDT's ``\\_S5_`` package, then polls WAK_STS.  The DSDT built by
:mod:`asyncvmm.arch.x86_64.acpi` advertises :data:`S5_SLP_TYP`; the FADT
points both registers at the ports below.
"""

from __future__ import annotations

import logging
from typing import Callable

logger = logging.getLogger(__name__)

# Port numbers the FADT names.  0x600 is outside every legacy ISA range that
# a PC guest probes (COM ports, i8042, PIC, PIT, CMOS, VGA, LPT).
ACPI_PM_PORT_BASE = 0x600
ACPI_PM_PORT_SIZE = 2
SLEEP_CONTROL_PORT = ACPI_PM_PORT_BASE
SLEEP_STATUS_PORT = ACPI_PM_PORT_BASE + 1

# The SLP_TYP value of \_S5_: any 3-bit value works as long as the DSDT and
# this device agree; 5 reads naturally as "S5".
S5_SLP_TYP = 5

# Register bits, named as ACPICA names them (actbl.h, "V5 FADT").
ACPI_X_SLEEP_TYPE_MASK = 0x1C
ACPI_X_SLEEP_TYPE_POSITION = 2
ACPI_X_SLEEP_ENABLE = 0x20
ACPI_X_WAKE_STATUS = 0x80

_CONTROL = SLEEP_CONTROL_PORT - ACPI_PM_PORT_BASE
_STATUS = SLEEP_STATUS_PORT - ACPI_PM_PORT_BASE


class AcpiPm:
    """Sleep control/status registers; S5 with SLP_EN means power off."""

    def __init__(self, on_poweroff: Callable[[], None]) -> None:
        self._on_poweroff = on_poweroff
        self._slp_typ = 0
        self._wak_sts = False
        self.powered_off = False

    # -- BusDevice ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            self._write_byte(offset + i, value)

    # -- registers --------------------------------------------------------------

    def _read_byte(self, offset: int) -> int:
        if offset == _CONTROL:
            return self._slp_typ << ACPI_X_SLEEP_TYPE_POSITION    # SLP_EN always reads 0
        if offset == _STATUS:
            return ACPI_X_WAKE_STATUS if self._wak_sts else 0
        return 0xFF                                              # nothing decodes here

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == _CONTROL:
            self._write_control(value)
        elif offset == _STATUS and value & ACPI_X_WAKE_STATUS:
            self._wak_sts = False
        else:
            logger.debug("acpi_pm: ignored write %#04x at offset %d", value, offset)

    def _write_control(self, value: int) -> None:
        self._slp_typ = (value & ACPI_X_SLEEP_TYPE_MASK) >> ACPI_X_SLEEP_TYPE_POSITION
        if not value & ACPI_X_SLEEP_ENABLE:
            return
        if self._slp_typ == S5_SLP_TYP:
            if not self.powered_off:
                self.powered_off = True
                logger.info("acpi_pm: guest requested ACPI power-off (S5)")
                self._on_poweroff()
            return
        # The DSDT offers no other sleep state; a guest that asks anyway gets
        # an immediate wake so that its WAK_STS poll ends instead of spinning.
        logger.warning("acpi_pm: guest requested unsupported sleep type %d; waking it",
                       self._slp_typ)
        self._wak_sts = True
