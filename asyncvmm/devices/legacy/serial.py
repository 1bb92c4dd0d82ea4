"""An 8250/16550A UART: the guest's serial console.

Register logic only; no I/O.  Transmitted bytes go to an injected ``out``
callable (the VMM wires stdout or a file); received bytes are pushed in with
:meth:`Serial.enqueue_input` by the console's event handler on the loop.
Register accesses come from vCPU threads and input from the loop, so every
entry point takes the device's own lock.

Interrupt identification follows the 16550 priority order: line status (not
generated: the line never errors), received data available, transmitter
holding register empty, modem status (not generated).  Transmission is
instantaneous, so THR/TSR are always empty and a THRE interrupt is raised
whenever the guest enables it or writes a byte with it enabled; reading IIR
while THRE is the reported source clears it (16550 datasheet, "IIR").
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import msgspec

from ...metrics import MetricGroup
from ..irq import IrqLine
from ..rate_limiter import TokenBucket

# Register offsets from the base port (0x3F8 for COM1).
DATA = 0        # RBR (read) / THR (write); DLL when DLAB is set
IER = 1         # interrupt enable; DLM when DLAB is set
IIR = 2         # interrupt identification (read) / FCR (write)
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_ENABLED = 0xC0

LCR_DLAB = 0x80
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

# Modem status with carrier, data-set-ready and clear-to-send asserted, so
# that gettys and the kernel's flow control see a connected line.
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_DCD = 0x80
MSR_DEFAULT = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_SIZE = 1024


@dataclasses.dataclass
class SerialMetrics(MetricGroup):
    """Firecracker's ``uart`` metrics group."""
    error_count: int = 0
    flush_count: int = 0
    missed_read_count: int = 0
    missed_write_count: int = 0
    read_count: int = 0
    write_count: int = 0
    rate_limiter_dropped_bytes: int = 0   # output bytes the serial rate limiter dropped


class SerialState(msgspec.Struct, forbid_unknown_fields=True, tag="serial-v1"):
    """The UART's registers and receive FIFO in a snapshot (untrusted on load)."""

    ier: int
    iir: int
    lcr: int
    mcr: int
    msr: int
    scr: int
    dll: int
    dlm: int
    rx: bytes


def _byte(name: str, value: int) -> int:
    if not 0 <= value <= 0xFF:
        raise ValueError(f"serial state: {name} {value} is not a byte")
    return value


class Serial:
    def __init__(self, irq: IrqLine, out: Callable[[bytes], None] | None,
                 metrics: SerialMetrics | None = None,
                 on_rx_space: Callable[[], None] | None = None,
                 out_limiter: TokenBucket | None = None) -> None:
        self._irq = irq
        self._out = out
        # PUT /serial rate_limiter: one token per output byte; a byte without one is dropped
        # (counted, never queued), as Firecracker 1.16 does, so a chatty guest cannot flood
        # the host's log or disk.
        self._out_limiter = out_limiter
        self._on_rx_space = on_rx_space
        self.metrics = metrics or SerialMetrics()
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self._rx_was_full = False
        self._ier = 0
        self._iir = IIR_NO_INT
        self._lcr = 0x03    # 8N1
        self._mcr = 0x08    # OUT2
        self._msr = MSR_DEFAULT
        self._scr = 0
        self._dll = 0x0C    # 9600 baud
        self._dlm = 0

    # -- interrupt state -------------------------------------------------

    def _raise(self, source: int) -> None:
        self._iir = source
        self._irq.trigger()

    def _update_rda(self) -> None:
        if self._ier & IER_RDA and self._rx:
            self._raise(IIR_RDA)
        elif self._iir == IIR_RDA:
            self._iir = IIR_NO_INT

    # -- guest side (vCPU threads) -----------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_reg(offset)
        return bytes([value]).ljust(size, b"\x00")

    def _read_reg(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                return self._dll
            return self._pop_rx()
        if offset == IER:
            return self._dlm if dlab else self._ier
        if offset == IIR:
            iir = self._iir
            if iir == IIR_THRE:
                self._iir = IIR_NO_INT
            return iir | IIR_FIFO_ENABLED
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT
            if self._rx:
                lsr |= LSR_DR
            return lsr
        if offset == MSR:
            if self._mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self._mcr
                return (((m & 0x01) << 5) | ((m & 0x02) << 3) | ((m & 0x04) << 4)
                        | ((m & 0x08) << 4))
            return self._msr
        if offset == SCR:
            return self._scr
        return 0xFF

    def _pop_rx(self) -> int:
        if not self._rx:
            self.metrics.missed_read_count += 1
            return 0
        value = self._rx.popleft()
        self.metrics.read_count += 1
        self._update_rda()
        if not self._rx and self._rx_was_full:
            self._rx_was_full = False
            if self._on_rx_space is not None:
                self._on_rx_space()
        return value

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._write_reg(offset, data[0])

    def _write_reg(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == DATA:
            if dlab:
                self._dll = value
            elif self._mcr & MCR_LOOP:
                self._push_rx(bytes([value]))
            else:
                self._transmit(value)
        elif offset == IER:
            if dlab:
                self._dlm = value
            else:
                self._ier = value & IER_MASK
                if self._ier & IER_THRE:
                    self._raise(IIR_THRE)
                elif self._iir == IIR_THRE:
                    self._iir = IIR_NO_INT
                self._update_rda()
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._mcr = value & MCR_MASK
        elif offset == SCR:
            self._scr = value
        # FCR, LSR and MSR writes have no effect on an always-ready line.

    def _transmit(self, value: int) -> None:
        if self._out_limiter is not None and not self._out_limiter.consume(1):
            self.metrics.rate_limiter_dropped_bytes += 1
        elif self._out is not None:
            try:
                self._out(bytes([value]))
                self.metrics.write_count += 1
            except OSError:
                self.metrics.missed_write_count += 1
        if self._ier & IER_THRE:
            self._raise(IIR_THRE)

    # -- host side (the loop) --------------------------------------------------

    def _push_rx(self, data: bytes) -> int:
        room = FIFO_SIZE - len(self._rx)
        accepted = data[:room]
        self._rx.extend(accepted)
        if len(accepted) < len(data) or len(self._rx) == FIFO_SIZE:
            self._rx_was_full = True
        if accepted:
            self._update_rda()
        return len(accepted)

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest; returns how many fit (the rest must wait)."""
        with self._lock:
            return self._push_rx(data)

    def rx_room(self) -> int:
        with self._lock:
            return FIFO_SIZE - len(self._rx)

    # -- snapshots -----------------------------------------------------------------

    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(ier=self._ier, iir=self._iir, lcr=self._lcr, mcr=self._mcr,
                               msr=self._msr, scr=self._scr, dll=self._dll, dlm=self._dlm,
                               rx=bytes(self._rx))

    def restore_state(self, state: SerialState) -> None:
        """Take a snapshot's registers, each checked; nothing changes if one is bad."""
        if len(state.rx) > FIFO_SIZE:
            raise ValueError(f"serial state: {len(state.rx)} bytes in a {FIFO_SIZE}-byte FIFO")
        values = {name: _byte(name, getattr(state, name))
                  for name in ("ier", "iir", "lcr", "mcr", "msr", "scr", "dll", "dlm")}
        with self._lock:
            self._ier = values["ier"] & IER_MASK
            self._iir = values["iir"]
            self._lcr = values["lcr"]
            self._mcr = values["mcr"] & MCR_MASK
            self._msr = values["msr"]
            self._scr = values["scr"]
            self._dll = values["dll"]
            self._dlm = values["dlm"]
            self._rx = collections.deque(state.rx)
            self._rx_was_full = False
