from hypothesis import given, strategies as st

from asyncvmm.devices.legacy import i8042 as k
from tests.fakes.irq import CountingIrqLine


def make():
    resets = []
    irq = CountingIrqLine()
    return k.I8042(irq, lambda: resets.append(1)), irq, resets


def cmd(dev, c):
    dev.write(k.CMD_OFFSET, bytes([c]))


def data(dev, v):
    dev.write(k.DATA_OFFSET, bytes([v]))


def drain(dev):
    out = []
    while dev.read(k.CMD_OFFSET, 1)[0] & k.SR_OBF:
        out.append(dev.read(k.DATA_OFFSET, 1)[0])
    return out


def test_pulse_reset_command_resets():
    dev, _, resets = make()
    cmd(dev, k.CMD_PULSE_RESET)
    assert resets == [1]
    assert dev.metrics.reset_count == 1


def test_output_port_reset_bit():
    dev, _, resets = make()
    cmd(dev, k.CMD_WRITE_OUTP)
    data(dev, 0x01)
    assert resets == []
    cmd(dev, k.CMD_WRITE_OUTP)
    data(dev, 0x00)
    assert resets == [1]


def test_self_tests_and_command_byte():
    dev, _, _ = make()
    cmd(dev, k.CMD_SELF_TEST)
    assert drain(dev) == [0x55]
    cmd(dev, k.CMD_KBD_TEST)
    assert drain(dev) == [0x00]
    cmd(dev, k.CMD_AUX_TEST)
    assert drain(dev) == [0xFF]
    cmd(dev, k.CMD_WRITE_CB)
    data(dev, 0x45)
    cmd(dev, k.CMD_READ_CB)
    assert drain(dev) == [0x45]


def test_keyboard_probe_sequence():
    dev, _, _ = make()
    data(dev, k.KBD_RESET)
    assert drain(dev) == [k.KBD_ACK, k.KBD_BAT_OK]
    data(dev, k.KBD_GET_ID)
    assert drain(dev) == [k.KBD_ACK, 0xAB, 0x83]
    data(dev, k.KBD_SET_LEDS)
    data(dev, 0x07)
    assert drain(dev) == [k.KBD_ACK, k.KBD_ACK]
    data(dev, k.KBD_SCANCODE_SET)
    data(dev, 0)
    assert drain(dev) == [k.KBD_ACK, k.KBD_ACK, 0x02]
    data(dev, k.KBD_ECHO)
    assert drain(dev) == [k.KBD_ECHO]


def test_ctrl_alt_del_translated_and_raw():
    dev, irq, _ = make()
    dev.send_ctrl_alt_del()
    assert drain(dev) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    assert irq.count >= 8            # one edge per byte delivered
    cmd(dev, k.CMD_WRITE_CB)
    data(dev, k.CB_KBD_INT)          # translation off
    dev.send_ctrl_alt_del()
    assert drain(dev) == k.CTRL_ALT_DEL_SET2


def test_no_interrupt_when_disabled():
    dev, irq, _ = make()
    cmd(dev, k.CMD_WRITE_CB)
    data(dev, 0)
    before = irq.count
    dev.send_ctrl_alt_del()
    assert irq.count == before
    assert drain(dev)                # still readable by polling


def test_output_buffer_is_bounded():
    dev, _, _ = make()
    for _ in range(k.OUTBUF_LIMIT * 2):
        data(dev, k.KBD_ECHO)
    assert len(drain(dev)) == k.OUTBUF_LIMIT


@given(st.lists(st.tuples(st.sampled_from([0, 4, 1, 7]), st.integers(0, 255), st.booleans()), max_size=200))
def test_any_access_sequence_is_safe(ops):
    dev, _, _ = make()
    for off, val, is_write in ops:
        if is_write:
            dev.write(off, bytes([val]))
        else:
            assert len(dev.read(off, 1)) == 1
