"""The virtio device-status lifecycle as a transition table.

The driver walks a device through §3.1.1 (Driver Requirements: Device
Initialization) by writing the whole status byte each time, ORing in one new
bit per step::

    0 --ACKNOWLEDGE--> 1 --DRIVER--> 3 --FEATURES_OK--> 11 --DRIVER_OK--> 15

Writing 0 resets the device from any state (§2.4, §4.2.2.1).  Setting FAILED
(§2.1) records that the driver gave up; only a reset leaves it.
DEVICE_NEEDS_RESET is the device's own bit (§2.1.2): the transport keeps it
apart and masks it out of what the driver writes.

:func:`transition` looks a write up in :data:`TRANSITIONS` and returns the
action the transport must take, or ``None`` for a write the table does not
allow (the transport ignores it and logs).  Pure data, no I/O.
"""

from __future__ import annotations

import enum

from asyncvmm.devices.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
)

# The five states of a well-behaved initialisation, named after their newest bit.
RESET = 0
S_ACKNOWLEDGE = ACKNOWLEDGE
S_DRIVER = ACKNOWLEDGE | DRIVER
S_FEATURES_OK = ACKNOWLEDGE | DRIVER | FEATURES_OK
S_DRIVER_OK = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK

_LIVE_STATES = (RESET, S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK, S_DRIVER_OK)


class Action(enum.Enum):
    NONE = "none"              # accept the new value, nothing else to do
    NEGOTIATE = "negotiate"    # accept FEATURES_OK only if the driver's features are acceptable
    ACTIVATE = "activate"      # DRIVER_OK: validate the queues and start the device
    RESET = "reset"            # 0: stop the device and return every register to its initial value
    FAIL = "fail"              # FAILED: latch the bit; the device keeps its state until reset


TRANSITIONS: dict[tuple[int, int], Action] = {
    # §3.1.1 steps 2-3: the guest noticed the device, then found a driver for it.
    (RESET, S_ACKNOWLEDGE): Action.NONE,
    (S_ACKNOWLEDGE, S_DRIVER): Action.NONE,
    # §3.1.1 steps 4-6: the driver wrote its feature subset and asks the device to accept it.
    (S_DRIVER, S_FEATURES_OK): Action.NEGOTIATE,
    # §3.1.1 steps 7-8: queues are set up; the device is live.
    (S_FEATURES_OK, S_DRIVER_OK): Action.ACTIVATE,
    # §2.1: FAILED may be set at any step; FAILED | x with x already failed is a no-op below.
    **{(s, s | FAILED): Action.FAIL for s in _LIVE_STATES},
    # §2.4 / §4.2.2.1: writing zero resets the device, whatever it was doing.
    **{(s, RESET): Action.RESET for s in _LIVE_STATES},
    **{(s | FAILED, RESET): Action.RESET for s in _LIVE_STATES},
}


def transition(current: int, written: int) -> Action | None:
    """The action for a driver writing ``written`` while the status is ``current``.

    DEVICE_NEEDS_RESET is the device's bit, so it is ignored on both sides.
    Rewriting the current value is harmless (a read-modify-write that added
    nothing) and maps to :attr:`Action.NONE`.
    """
    current &= ~DEVICE_NEEDS_RESET & 0xFF
    written &= ~DEVICE_NEEDS_RESET & 0xFF
    if written == current and written != RESET:
        return Action.NONE
    return TRANSITIONS.get((current, written))
