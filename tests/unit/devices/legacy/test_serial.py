from hypothesis import given, strategies as st

from asyncvmm.devices.legacy import serial as s
from asyncvmm.devices.rate_limiter import TokenBucket
from tests.fakes.irq import CountingIrqLine


def make(**kw):
    irq = CountingIrqLine()
    out = bytearray()
    dev = s.Serial(irq, out.extend, **kw)
    return dev, irq, out


def rd(dev, off):
    return dev.read(off, 1)[0]


def test_transmit_reaches_the_sink():
    dev, irq, out = make()
    for b in b"hi\n":
        dev.write(s.DATA, bytes([b]))
    assert out == b"hi\n"
    assert irq.count == 0          # THRE interrupt not enabled
    assert rd(dev, s.LSR) & (s.LSR_THRE | s.LSR_TEMT) == s.LSR_THRE | s.LSR_TEMT


def test_thre_interrupt_on_enable_and_after_each_byte_and_cleared_by_iir_read():
    dev, irq, out = make()
    dev.write(s.IER, bytes([s.IER_THRE]))
    assert irq.count == 1
    assert rd(dev, s.IIR) & 0x0F == s.IIR_THRE
    assert rd(dev, s.IIR) & 0x0F == s.IIR_NO_INT
    dev.write(s.DATA, b"x")
    assert irq.count == 2


def test_input_raises_rda_and_is_read_in_order():
    dev, irq, _ = make()
    dev.write(s.IER, bytes([s.IER_RDA]))
    assert dev.enqueue_input(b"ab") == 2
    assert irq.count == 1
    assert rd(dev, s.LSR) & s.LSR_DR
    assert rd(dev, s.IIR) & 0x0F == s.IIR_RDA
    assert rd(dev, s.DATA) == ord("a")
    assert rd(dev, s.DATA) == ord("b")
    assert not rd(dev, s.LSR) & s.LSR_DR
    assert rd(dev, s.IIR) & 0x0F == s.IIR_NO_INT


def test_full_fifo_backpressure_and_space_callback():
    called = []
    dev, _, _ = make(on_rx_space=lambda: called.append(1))
    assert dev.enqueue_input(b"x" * (s.FIFO_SIZE + 10)) == s.FIFO_SIZE
    assert dev.enqueue_input(b"y") == 0
    for _ in range(s.FIFO_SIZE):
        rd(dev, s.DATA)
    assert called == [1]
    assert dev.rx_room() == s.FIFO_SIZE


def test_divisor_latch_does_not_transmit():
    dev, _, out = make()
    dev.write(s.LCR, bytes([s.LCR_DLAB]))
    dev.write(s.DATA, b"\x01")
    dev.write(s.IER, b"\x00")
    assert rd(dev, s.DATA) == 1 and rd(dev, s.IER) == 0
    dev.write(s.LCR, b"\x03")
    assert out == b""


def test_loopback_echoes_and_reflects_modem_lines():
    dev, _, out = make()
    dev.write(s.MCR, bytes([s.MCR_LOOP | 0x0F]))
    dev.write(s.DATA, b"Z")
    assert out == b""
    assert rd(dev, s.DATA) == ord("Z")
    assert rd(dev, s.MSR) & 0xF0 == 0xF0
    dev.write(s.MCR, b"\x08")
    assert rd(dev, s.MSR) == s.MSR_DEFAULT


def test_reading_empty_rx_counts_a_miss():
    dev, _, _ = make()
    assert rd(dev, s.DATA) == 0
    assert dev.metrics.missed_read_count == 1


def test_sink_errors_are_counted_not_raised():
    def broken(_):
        raise BrokenPipeError()
    dev = s.Serial(CountingIrqLine(), broken)
    dev.write(s.DATA, b"x")
    assert dev.metrics.missed_write_count == 1


@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 255), st.booleans()), max_size=200))
def test_any_register_sequence_is_safe(ops):
    dev, _, _ = make()
    for off, val, is_write in ops:
        if is_write:
            dev.write(off, bytes([val]))
        else:
            assert len(dev.read(off, 1)) == 1


def test_the_output_rate_limiter_drops_bytes_beyond_its_budget_and_counts_them():
    now = [0]
    bucket = TokenBucket(4, 1000, clock=lambda: now[0])      # 4 bytes per second
    dev, irq, out = make(out_limiter=bucket)
    dev.write(s.IER, bytes([s.IER_THRE]))
    before = irq.count
    for b in b"abcdefgh":
        dev.write(s.DATA, bytes([b]))
    assert out == b"abcd"
    assert dev.metrics.rate_limiter_dropped_bytes == 4 and dev.metrics.write_count == 4
    assert irq.count == before + 8        # a dropped byte still empties the transmitter
    now[0] += 500_000_000                 # half a second refills two tokens
    for b in b"xyz":
        dev.write(s.DATA, bytes([b]))
    assert out == b"abcdxy" and dev.metrics.rate_limiter_dropped_bytes == 5
