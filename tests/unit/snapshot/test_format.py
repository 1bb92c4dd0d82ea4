"""The state file container: round trip, and every damage refused with a message naming it."""

from __future__ import annotations

import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm.devices.legacy.i8042 import I8042, I8042State
from asyncvmm.devices.legacy.serial import Serial, SerialState
from asyncvmm.snapshot.format import (FORMAT_VERSION, MAGIC, MemoryRegionState, SnapshotFormatError,
                                     SnapshotState, VcpuState, VmState, crc64, decode_state,
                                     encode_state, file_version)


class _Irq:
    def trigger(self) -> None:
        pass


def sample_state() -> SnapshotState:
    vcpu = VcpuState(regs=b"r" * 144, sregs=b"s" * 312, fpu=b"f" * 416, xsave=None, xcrs=None,
                     lapic=b"l" * 1024, msrs=[(0x10, 12345), (0xC0000080, 0xD01)], events=b"e" * 64,
                     mp_state=0, debugregs=b"d" * 128, tsc_khz=2_000_000)
    return SnapshotState(
        asyncvmm_version="0.1.0", snapshot_type="Full", config=b'{"machine-config": {}}',
        memory=[MemoryRegionState(guest_addr=0, size=64 << 20, file_offset=0)],
        memory_file_size=64 << 20,
        vm=VmState(pic_master=b"p", pic_slave=b"q", ioapic=b"i", pit=b"t", clock=b"c"),
        vcpus=[vcpu],
        devices={"serial": Serial(_Irq(), None).save_state(), "i8042": I8042(_Irq(), lambda: None).save_state()})


def test_crc64_is_crc64_xz() -> None:
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA
    assert crc64(b"") == 0


def test_round_trip_and_version() -> None:
    data = encode_state(sample_state())
    assert data[:8] == MAGIC and file_version(data) == FORMAT_VERSION
    state = decode_state(data)
    assert state.vcpus[0].msrs == [(0x10, 12345), (0xC0000080, 0xD01)]
    assert msgspec.convert(state.devices["serial"], SerialState) == Serial(_Irq(), None).save_state()


def test_truncation_anywhere_is_refused() -> None:
    data = encode_state(sample_state())
    for cut in (0, 5, 23, 24, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotFormatError, match="truncated|bad magic"):
            decode_state(data[:cut])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data_strategy) -> None:
    data = bytearray(encode_state(sample_state()))
    at = data_strategy.draw(st.integers(0, len(data) - 1))
    data[at] ^= data_strategy.draw(st.integers(1, 255))
    with pytest.raises(SnapshotFormatError):
        decode_state(bytes(data))


def test_foreign_file_other_version_and_trailing_bytes() -> None:
    data = encode_state(sample_state())
    with pytest.raises(SnapshotFormatError, match="not an asyncvmm snapshot"):
        decode_state(b"\x7fELF" + data[4:])
    other = bytearray(data)
    struct.pack_into("<I", other, 8, FORMAT_VERSION + 1)
    with pytest.raises(SnapshotFormatError, match=f"format version {FORMAT_VERSION + 1}"):
        decode_state(bytes(other))
    with pytest.raises(SnapshotFormatError, match="after its checksum"):
        decode_state(data + b"x")


def test_a_body_with_a_good_checksum_but_wrong_types_is_refused() -> None:
    body = msgspec.msgpack.encode({"asyncvmm_version": 1})
    head = struct.pack("<8sIIQ", MAGIC, FORMAT_VERSION, 0, len(body)) + body
    with pytest.raises(SnapshotFormatError, match="does not decode"):
        decode_state(head + struct.pack("<Q", crc64(head)))


def test_serial_and_i8042_state_round_trip_and_bad_values_change_nothing() -> None:
    serial = Serial(_Irq(), None)
    serial.write(3, bytes([0x1B]))           # LCR
    serial.enqueue_input(b"abc")
    saved = serial.save_state()
    other = Serial(_Irq(), None)
    other.restore_state(saved)
    assert other.save_state() == saved and other.read(0, 1) == b"a"
    before = other.save_state()
    with pytest.raises(ValueError):
        other.restore_state(msgspec.structs.replace(saved, lcr=300))
    with pytest.raises(ValueError):
        other.restore_state(msgspec.structs.replace(saved, rx=bytes(5000)))
    assert other.save_state() == before
    kbd = I8042(_Irq(), lambda: None)
    state = kbd.save_state()
    kbd2 = I8042(_Irq(), lambda: None)
    kbd2.restore_state(state)
    assert kbd2.save_state() == state
    with pytest.raises(ValueError):
        kbd2.restore_state(msgspec.structs.replace(state, out=bytes(1000)))
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"type": "serial-v1", "ier": "x"}, SerialState)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(msgspec.to_builtins(state), SerialState)     # another device's state
    assert isinstance(msgspec.convert(msgspec.to_builtins(state), I8042State), I8042State)


class _FakeVm:
    def __init__(self) -> None:
        self.clock = None

    def set_pit2(self, pit) -> None:
        pass

    def set_clock(self, clock) -> None:
        self.clock = clock

    def set_irqchip(self, chip) -> None:
        pass


def _vm_state(clock_value: int, flags: int, realtime_ns: int) -> VmState:
    import ctypes
    from asyncvmm.kvm import structs as s
    chips = []
    for chip_id in (0, 1, 2):
        chips.append(bytes(s.kvm_irqchip(chip_id=chip_id)))
    clock = s.kvm_clock_data(clock=clock_value, flags=flags, realtime=123)
    return VmState(pic_master=chips[0], pic_slave=chips[1], ioapic=chips[2],
                   pit=bytes(ctypes.sizeof(s.kvm_pit_state2)), clock=bytes(clock),
                   host_realtime_ns=realtime_ns)


def test_clock_realtime_advances_kvmclock_by_the_host_time_since_the_snapshot() -> None:
    from asyncvmm.snapshot.kvmstate import KVM_CLOCK_REALTIME, restore_vm
    vm = _FakeVm()
    restore_vm(vm, _vm_state(1_000, 0, 5_000), now_realtime_ns=lambda: 9_000)
    assert (vm.clock.clock, vm.clock.flags) == (1_000, 0)               # without: as saved
    restore_vm(vm, _vm_state(1_000, 0, 5_000), clock_realtime=True, now_realtime_ns=lambda: 9_000)
    assert (vm.clock.clock, vm.clock.flags) == (5_000, 0)               # +4000 ns
    restore_vm(vm, _vm_state(1_000, 0, 5_000), clock_realtime=True, now_realtime_ns=lambda: 4_000)
    assert vm.clock.clock == 1_000                                      # never backwards
    restore_vm(vm, _vm_state(1_000, KVM_CLOCK_REALTIME, 5_000), clock_realtime=True,
               now_realtime_ns=lambda: 9_000)
    assert (vm.clock.clock, vm.clock.flags, vm.clock.realtime) == (1_000, KVM_CLOCK_REALTIME, 123)


def test_rate_limiter_budgets_round_trip_and_bad_ones_change_nothing() -> None:
    from asyncvmm.devices.rate_limiter import RateLimiter, RateLimiterState, TokenBucket, TokenType
    now = [0]
    clock = lambda: now[0]          # noqa: E731
    limiter = RateLimiter(bandwidth=TokenBucket(1000, 100, 500, clock=clock),
                          ops=TokenBucket(10, 100, clock=clock), clock=clock)
    assert limiter.consume(700, TokenType.BYTES) and limiter.consume(4, TokenType.OPS)
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(limiter.save_state()), type=RateLimiterState)
    other = RateLimiter(bandwidth=TokenBucket(1000, 100, 500, clock=clock),
                        ops=TokenBucket(10, 100, clock=clock), clock=clock)
    other.restore_state(saved)
    assert other.save_state() == limiter.save_state()
    assert other.bandwidth.one_time_burst == 0 and other.ops.budget == 6
    fresh = RateLimiter(bandwidth=TokenBucket(1000, 100, 500, clock=clock), clock=clock)
    before = fresh.save_state()
    with pytest.raises(ValueError, match="ops budget"):
        fresh.restore_state(saved)                      # a bucket this limiter does not have
    bad = msgspec.structs.replace(saved, bandwidth=msgspec.structs.replace(saved.bandwidth,
                                                                             one_time_burst=501))
    with pytest.raises(ValueError, match="one_time_burst"):
        other.restore_state(bad)
    assert fresh.save_state() == before


def test_balloon_state_round_trip_and_bad_values_change_nothing() -> None:
    from asyncvmm.devices.virtio.balloon import Balloon
    from asyncvmm.devices.virtio.balloon.device import BalloonState

    def balloon() -> Balloon:
        return Balloon(amount_mib=4, deflate_on_oom=False, stats_polling_interval_s=1,
                       free_page_reporting=False, mem_size_mib=64)
    a = balloon()
    a.write_config(4, (700).to_bytes(4, "little"))        # the driver's `actual`
    a.latest_stats = {"free_memory": 123}
    saved = msgspec.msgpack.decode(msgspec.msgpack.encode(a.save_state()), type=BalloonState)
    b = balloon()
    b.restore_state(saved)
    # Everything comes back but a hinting command: a restore always asks for DONE (Firecracker's rule).
    from asyncvmm.devices.virtio.balloon.device import VIRTIO_BALLOON_CMD_ID_DONE
    assert b.save_state() == msgspec.structs.replace(a.save_state(), hint_cmd_id=VIRTIO_BALLOON_CMD_ID_DONE)
    assert b.read_config(4, 4) == (700).to_bytes(4, "little")
    before = b.save_state()
    for bad in ({"actual_pages": 64 * 256 + 1}, {"hint_cmd_id": 1 << 32},
                {"latest_stats": {"no_such_stat": 1}}):
        with pytest.raises(ValueError):
            b.restore_state(msgspec.structs.replace(saved, **bad))
        assert b.save_state() == before
