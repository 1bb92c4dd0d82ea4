"""The device-status transition table (§2.1, §3.1.1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncvmm.devices.virtio import status as s
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET, DRIVER_OK, FAILED, FEATURES_OK


def test_the_init_sequence_is_allowed_step_by_step():
    assert s.transition(s.RESET, s.S_ACKNOWLEDGE) is s.Action.NONE
    assert s.transition(s.S_ACKNOWLEDGE, s.S_DRIVER) is s.Action.NONE
    assert s.transition(s.S_DRIVER, s.S_FEATURES_OK) is s.Action.NEGOTIATE
    assert s.transition(s.S_FEATURES_OK, s.S_DRIVER_OK) is s.Action.ACTIVATE


@pytest.mark.parametrize("skip_from,skip_to", [
    (s.RESET, s.S_DRIVER),                    # DRIVER before ACKNOWLEDGE
    (s.S_ACKNOWLEDGE, s.S_FEATURES_OK),       # features before DRIVER
    (s.S_DRIVER, s.S_DRIVER | DRIVER_OK),     # DRIVER_OK without FEATURES_OK (legacy only)
    (s.S_FEATURES_OK, s.S_DRIVER),            # clearing a bit
    (s.S_DRIVER_OK, s.S_FEATURES_OK),
])
def test_skipping_or_clearing_steps_is_refused(skip_from, skip_to):
    assert s.transition(skip_from, skip_to) is None


@pytest.mark.parametrize("state", [s.RESET, s.S_ACKNOWLEDGE, s.S_DRIVER, s.S_FEATURES_OK, s.S_DRIVER_OK])
def test_reset_and_failed_from_every_state(state):
    assert s.transition(state, 0) is s.Action.RESET
    assert s.transition(state, state | FAILED) is s.Action.FAIL
    assert s.transition(state | FAILED, 0) is s.Action.RESET
    # Once failed only a reset helps.
    assert s.transition(state | FAILED, s.S_DRIVER_OK | FAILED) in (None, s.Action.NONE)


def test_rewriting_the_same_value_is_harmless():
    assert s.transition(s.S_DRIVER_OK, s.S_DRIVER_OK) is s.Action.NONE


def test_device_needs_reset_is_the_devices_bit():
    # The driver's read-modify-write carries the bit back; it must not confuse the table.
    assert s.transition(s.S_FEATURES_OK | DEVICE_NEEDS_RESET, s.S_DRIVER_OK | DEVICE_NEEDS_RESET) \
        is s.Action.ACTIVATE


@given(st.integers(0, 255), st.integers(0, 255))
def test_table_only_ever_adds_one_bit_or_resets(current, written):
    action = s.transition(current, written)
    if action in (None, s.Action.RESET) or written & ~DEVICE_NEEDS_RESET == current & ~DEVICE_NEEDS_RESET:
        return
    added = (written & ~current) & ~DEVICE_NEEDS_RESET
    # Nothing cleared (DEVICE_NEEDS_RESET is the device's bit, not the driver's: left out on both sides).
    assert written & current & ~DEVICE_NEEDS_RESET == current & ~DEVICE_NEEDS_RESET
    assert bin(added).count("1") == 1
    if action is s.Action.NEGOTIATE:
        assert added == FEATURES_OK
