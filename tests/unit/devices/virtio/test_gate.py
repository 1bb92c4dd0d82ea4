"""DmaGate: close() refuses new accesses and waits for the ones inside."""

import threading
import time

import pytest

from asyncvmm.devices.virtio.gate import DmaGate, GateClosedError


def test_close_waits_for_the_access_inside_and_refuses_new_ones():
    gate = DmaGate()
    assert gate.enter()
    closed = threading.Event()
    result = []

    def closer():
        result.append(gate.close(timeout=10))
        closed.set()

    t = threading.Thread(target=closer)
    t.start()
    deadline = time.monotonic() + 5
    while gate.is_open and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not gate.is_open
    assert not gate.enter()                   # refused once closing
    assert not closed.wait(0.1)               # still waiting for the access inside
    gate.exit()                               # the last one out wakes close()
    assert closed.wait(5)
    t.join()
    assert result == [True]


def test_batched_exits_wake_close_only_when_the_last_leaves():
    gate = DmaGate()
    assert gate.enter(3)
    done = threading.Event()
    t = threading.Thread(target=lambda: (gate.close(timeout=10), done.set()))
    t.start()
    while gate.is_open:
        time.sleep(0.001)
    gate.exit(2)
    assert not done.wait(0.1)
    gate.exit()
    assert done.wait(5)
    t.join()


def test_close_times_out_on_a_stuck_access():
    gate = DmaGate()
    assert gate.enter()
    assert gate.close(timeout=0.05) is False
    with pytest.raises(GateClosedError):
        with gate.access():
            pass


def test_accesses_on_an_open_gate_leave_it_open():
    gate = DmaGate()
    for _ in range(3):
        with gate.access():
            pass
    assert gate.is_open
    assert gate.close(timeout=1) is True
