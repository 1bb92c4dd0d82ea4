"""The i8042 keyboard controller with a keyboard behind it.

Two jobs in a microVM: a guest that pulses the reset line (controller
command 0xFE, as Linux does with ``reboot=k``, or an output-port write with
bit 0 clear) ends the VMM with exit code 0; and ``SendCtrlAltDel`` types
Ctrl-Alt-Del so the guest's init reboots cleanly.  To get there the Linux
i8042 and atkbd drivers must probe successfully, so the controller answers
the self tests, the command byte and the keyboard's reset/identify commands;
there is no auxiliary (mouse) port.

Ports (as bus offsets from 0x60): 0 = data (0x60), 4 = status/command (0x64).
Register logic only: the reset action and the interrupt are injected.
Scancodes are queued in set 2; when the command byte's translate bit is on
(the usual PC setting) the controller delivers set 1, as the real part does.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import msgspec

from ...metrics import MetricGroup
from ..irq import IrqLine

DATA_OFFSET = 0
CMD_OFFSET = 4

# Status register bits.
SR_OBF = 0x01      # output buffer full
SR_SYS = 0x04      # system flag (self test passed)
SR_CMD = 0x08      # last write was a command
SR_UNLOCKED = 0x10

# Command byte (controller configuration) bits.
CB_KBD_INT = 0x01
CB_SYS = 0x04
CB_KBD_DISABLE = 0x10
CB_AUX_DISABLE = 0x20
CB_XLATE = 0x40

# Controller commands (written to port 0x64).
CMD_READ_CB = 0x20
CMD_WRITE_CB = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

# Keyboard commands and replies (on port 0x60).
KBD_SET_LEDS = 0xED
KBD_ECHO = 0xEE
KBD_SCANCODE_SET = 0xF0
KBD_GET_ID = 0xF2
KBD_SET_RATE = 0xF3
KBD_ENABLE = 0xF4
KBD_DISABLE = 0xF5
KBD_RESET = 0xFF
KBD_ACK = 0xFA
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)

OUTBUF_LIMIT = 64

# Ctrl down, Alt down, Del down, then the releases, in scancode set 2.
CTRL_ALT_DEL_SET2 = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
# Set-2 to set-1 for the keys above (what the controller's translation yields).
_XLATE = {0x14: 0x1D, 0x11: 0x38, 0x71: 0x53}


def translate_set2(codes: list[int]) -> list[int]:
    """Set-2 make/break codes to set 1 (break = make | 0x80; E0 prefixes kept)."""
    out: list[int] = []
    release = False
    for c in codes:
        if c == 0xF0:
            release = True
            continue
        if c == 0xE0:
            out.append(c)
            continue
        code = _XLATE.get(c, c)
        out.append(code | 0x80 if release else code)
        release = False
    return out


@dataclasses.dataclass
class I8042Metrics(MetricGroup):
    """Firecracker's ``i8042`` metrics group."""
    error_count: int = 0
    missed_read_count: int = 0
    missed_write_count: int = 0
    read_count: int = 0
    reset_count: int = 0
    write_count: int = 0


class I8042State(msgspec.Struct, forbid_unknown_fields=True, tag="i8042-v1"):
    """The controller's registers and output buffer in a snapshot (untrusted on load)."""

    control: int
    status: int
    output_port: int
    pending_cmd: int | None
    pending_kbd: int | None
    out: bytes


class I8042:
    def __init__(self, irq: IrqLine, on_reset: Callable[[], None],
                 metrics: I8042Metrics | None = None) -> None:
        self._irq = irq
        self._on_reset = on_reset
        self.metrics = metrics or I8042Metrics()
        self._lock = threading.Lock()
        self._out: collections.deque[int] = collections.deque()
        self._cb = CB_KBD_INT | CB_SYS | CB_XLATE
        self._status = SR_SYS | SR_UNLOCKED
        self._pending_cmd: int | None = None      # controller command awaiting its data byte
        self._pending_kbd: int | None = None      # keyboard command awaiting its parameter
        self._outp = 0x01                         # output port: bit 0 = reset line (1 = running)

    # -- output buffer ------------------------------------------------------

    def _push(self, *values: int) -> None:
        for v in values:
            if len(self._out) >= OUTBUF_LIMIT:
                self.metrics.missed_write_count += 1
                return
            self._out.append(v)
        self._notify()

    def _notify(self) -> None:
        if self._out and self._cb & CB_KBD_INT and not self._cb & CB_KBD_DISABLE:
            self._irq.trigger()

    # -- bus ---------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read(offset)
        return bytes([value]).ljust(size, b"\x00")

    def _read(self, offset: int) -> int:
        if offset == CMD_OFFSET:
            return self._status | (SR_OBF if self._out else 0)
        if offset == DATA_OFFSET:
            if not self._out:
                self.metrics.missed_read_count += 1
                return 0
            self.metrics.read_count += 1
            value = self._out.popleft()
            self._notify()   # the next byte raises its own interrupt
            return value
        return 0xFF

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        reset = False
        with self._lock:
            self.metrics.write_count += 1
            if offset == CMD_OFFSET:
                reset = self._command(data[0])
            elif offset == DATA_OFFSET:
                reset = self._data(data[0])
        if reset:
            self.metrics.reset_count += 1
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        self._status |= SR_CMD
        self._pending_cmd = None
        if cmd == CMD_READ_CB:
            self._push(self._cb)
        elif cmd in (CMD_WRITE_CB, CMD_WRITE_OUTP, CMD_WRITE_KBD_OUTBUF,
                     CMD_WRITE_AUX_OUTBUF, CMD_WRITE_AUX):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._push(0x55)
        elif cmd == CMD_KBD_TEST:
            self._push(0x00)
        elif cmd == CMD_AUX_TEST:
            self._push(0xFF)          # no auxiliary port
        elif cmd == CMD_KBD_DISABLE:
            self._cb |= CB_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self._cb &= ~CB_KBD_DISABLE
            self._notify()
        elif cmd == CMD_AUX_DISABLE:
            self._cb |= CB_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self._cb &= ~CB_AUX_DISABLE
        elif cmd == CMD_READ_OUTP:
            self._push(self._outp)
        elif cmd == CMD_PULSE_RESET:
            return True
        else:
            self.metrics.error_count += 1
        return False

    def _data(self, value: int) -> bool:
        self._status &= ~SR_CMD
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CB:
            self._cb = value
            self._notify()
        elif cmd == CMD_WRITE_OUTP:
            self._outp = value
            return not value & 0x01
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._push(value)
        elif cmd == CMD_WRITE_AUX_OUTBUF or cmd == CMD_WRITE_AUX:
            pass                       # no auxiliary device: dropped
        else:
            self._keyboard(value)
        return False

    def _keyboard(self, value: int) -> None:
        pending, self._pending_kbd = self._pending_kbd, None
        if pending is not None:
            if pending == KBD_SCANCODE_SET and value == 0:
                self._push(KBD_ACK, 0x02)
            else:
                self._push(KBD_ACK)
            return
        if value in (KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_RATE):
            self._pending_kbd = value
            self._push(KBD_ACK)
        elif value == KBD_ECHO:
            self._push(KBD_ECHO)
        elif value == KBD_GET_ID:
            self._push(KBD_ACK, *KBD_ID)
        elif value == KBD_RESET:
            self._push(KBD_ACK, KBD_BAT_OK)
        else:
            self._push(KBD_ACK)

    # -- host side ---------------------------------------------------------

    def send_ctrl_alt_del(self) -> None:
        """Type Ctrl-Alt-Del (called on the loop)."""
        with self._lock:
            codes = CTRL_ALT_DEL_SET2
            if self._cb & CB_XLATE:
                codes = translate_set2(codes)
            self._push(*codes)

    # -- snapshots -----------------------------------------------------------------

    def save_state(self) -> I8042State:
        with self._lock:
            return I8042State(control=self._cb, status=self._status, output_port=self._outp,
                              pending_cmd=self._pending_cmd, pending_kbd=self._pending_kbd,
                              out=bytes(self._out))

    def restore_state(self, state: I8042State) -> None:
        """Take a snapshot's registers, each checked; nothing changes if one is bad."""
        for name in ("control", "status", "output_port", "pending_cmd", "pending_kbd"):
            value = getattr(state, name)
            if value is not None and not 0 <= value <= 0xFF:
                raise ValueError(f"i8042 state: {name} {value} is not a byte")
        if len(state.out) > OUTBUF_LIMIT:
            raise ValueError(f"i8042 state: {len(state.out)} bytes in a {OUTBUF_LIMIT}-byte buffer")
        with self._lock:
            self._cb = state.control
            self._status = state.status
            self._outp = state.output_port
            self._pending_cmd = state.pending_cmd
            self._pending_kbd = state.pending_kbd
            self._out = collections.deque(state.out)
