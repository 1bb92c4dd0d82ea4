"""The virtio-mmio transport driven through its registers by the fake driver."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncvmm.devices.irq import EventFd

from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.chain import ChainError, collect
from asyncvmm.devices.virtio.device import VirtioDevice
from asyncvmm.devices.virtio.handler import QueueHandler
from asyncvmm.devices.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    bit,
)
from tests.fakes.irq import CountingIrqLine
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.conftest import make_rig

CUSTOM_FEATURE = 3


class _EchoHandler(QueueHandler):
    def handle_chain(self, queue_index, chain):
        try:
            bufs = collect(chain)
        except ChainError:
            self.act.queues[queue_index].add_used(self.mem, chain.head, 0)
            return True
        n = bufs.writable.write(self.mem, bufs.readable.read(self.mem))
        self.act.queues[queue_index].add_used(self.mem, chain.head, n)
        return True


class EchoDevice(VirtioDevice):
    """Copies each chain's readable bytes into its writable part."""

    device_type = 42
    queue_max_sizes = (16, 8)

    def __init__(self):
        super().__init__()
        self._config = b"ABCDEFGH"
        self.handler = None
        self.activations = 0
        self.deactivations = 0
        self.failures = []

    @property
    def avail_features(self):
        return (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                | bit(CUSTOM_FEATURE))

    def write_config(self, offset, data):
        config = bytearray(self._config)
        config[offset:offset + len(data)] = data
        self._config = bytes(config[:len(self._config)])

    def activate(self, act):
        self.activations += 1
        self.act = act
        self.handler = _EchoHandler(act, "echo")
        self.handler.start()

    def deactivate(self):
        self.deactivations += 1
        if self.handler:
            self.handler.stop()
            self.handler = None

    def activation_failed(self, reason):
        self.failures.append(reason)


@pytest.fixture
async def rig():
    rig = make_rig(EchoDevice())
    yield rig
    rig.close()


def test_identification_registers(rig):
    d = rig.driver
    assert d.read32(r.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert d.read32(r.VIRTIO_MMIO_VERSION) == 2
    assert d.read32(r.VIRTIO_MMIO_DEVICE_ID) == 42
    assert d.read32(r.VIRTIO_MMIO_VENDOR_ID) == r.VENDOR_ID


def test_device_features_are_read_32_bits_at_a_time(rig):
    assert rig.driver.device_features() == rig.transport.device.avail_features
    rig.driver.write32(r.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7)
    assert rig.driver.read32(r.VIRTIO_MMIO_DEVICE_FEATURES) == 0


def test_queue_num_max_per_queue_and_zero_beyond(rig):
    d = rig.driver
    for sel, expect in ((0, 16), (1, 8), (2, 0), (0xFFFF_FFFF, 0)):
        d.write32(r.VIRTIO_MMIO_QUEUE_SEL, sel)
        assert d.read32(r.VIRTIO_MMIO_QUEUE_NUM_MAX) == expect


async def test_full_init_activates_on_the_loop_and_echoes(rig):
    d = rig.driver
    vq0, vq1 = await d.init()
    assert d.status == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    assert rig.transport.device.activations == 1
    rig.mem.write(0x200000, b"hello")
    vq0.offer(vq0.add_chain([Buf(0x200000, 5), Buf(0x300000, 5, True)]))
    d.kick(vq0)
    assert await d.wait_used(vq0, 1) == [(0, 5)]
    assert rig.mem.read(0x300000, 5) == b"hello"
    assert d.ack_interrupts() == r.VIRTIO_MMIO_INT_VRING
    assert rig.irq.count == 1
    assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 0


async def test_queue_notify_register_signals_the_same_eventfd(rig):
    d = rig.driver
    vq0, _ = await d.init()
    vq0.offer(vq0.add_chain([Buf(0x200000, 1), Buf(0x300000, 1, True)]))
    d.kick(vq0, via_mmio=True)
    assert len(await d.wait_used(vq0, 1)) == 1
    d.write32(r.VIRTIO_MMIO_QUEUE_NOTIFY, 99)           # no such queue: ignored


def test_features_the_device_did_not_offer_are_refused(rig):
    d = rig.driver
    assert not d.negotiate(rig.transport.device.avail_features | bit(40))
    assert d.status == ACKNOWLEDGE | DRIVER                 # FEATURES_OK stays clear


def test_feature_words_beyond_64_bits_are_refused(rig):
    d = rig.driver
    d.write32(r.VIRTIO_MMIO_STATUS, 0)
    d.add_status(ACKNOWLEDGE)
    d.add_status(DRIVER)
    d.write_features(bit(VIRTIO_F_VERSION_1))
    d.write32(r.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2)
    d.write32(r.VIRTIO_MMIO_DRIVER_FEATURES, 1)
    d.add_status(FEATURES_OK)
    assert not d.status & FEATURES_OK


def test_version_1_is_required(rig):
    assert not rig.driver.negotiate(bit(CUSTOM_FEATURE))
    assert rig.driver.negotiate(bit(VIRTIO_F_VERSION_1) | bit(CUSTOM_FEATURE))
    assert rig.transport.driver_features == bit(VIRTIO_F_VERSION_1) | bit(CUSTOM_FEATURE)


def test_driver_features_are_ignored_outside_the_driver_state(rig):
    d = rig.driver
    assert d.negotiate(bit(VIRTIO_F_VERSION_1))
    d.write_features(bit(VIRTIO_F_VERSION_1) | bit(CUSTOM_FEATURE))    # after FEATURES_OK
    assert rig.transport.driver_features == bit(VIRTIO_F_VERSION_1)


def test_queue_registers_only_between_features_ok_and_driver_ok(rig):
    d = rig.driver
    d.write32(r.VIRTIO_MMIO_QUEUE_SEL, 0)
    d.write32(r.VIRTIO_MMIO_QUEUE_NUM, 4)                   # status 0: ignored
    assert rig.transport.queues[0].size == 16
    assert d.negotiate()
    d.write32(r.VIRTIO_MMIO_QUEUE_NUM, 4)
    d.write32(r.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)
    d.write32(r.VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x2)
    q = rig.transport.queues[0]
    assert (q.size, q.desc_table) == (4, 0x2_0000_1000)
    d.write32(r.VIRTIO_MMIO_QUEUE_READY, 1)
    d.write32(r.VIRTIO_MMIO_QUEUE_NUM, 8)                   # ready: frozen
    assert q.size == 4 and d.read32(r.VIRTIO_MMIO_QUEUE_READY) == 1


async def test_skipped_status_steps_are_ignored(rig):
    d = rig.driver
    d.write32(r.VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    assert d.status == 0
    await settle()
    assert rig.transport.device.activations == 0


async def test_bad_queue_address_at_driver_ok_sets_needs_reset(rig):
    d = rig.driver
    assert d.negotiate()
    d.setup_queue(0)
    d.write32(r.VIRTIO_MMIO_QUEUE_SEL, 1)
    d.write32(r.VIRTIO_MMIO_QUEUE_USED_LOW, 0x3)             # misaligned used ring
    d.write32(r.VIRTIO_MMIO_QUEUE_READY, 1)
    d.add_status(DRIVER_OK)
    await settle()
    assert d.status & DEVICE_NEEDS_RESET
    assert rig.transport.device.activations == 0
    assert rig.transport.device.failures
    assert d.ack_interrupts() == r.VIRTIO_MMIO_INT_CONFIG    # §2.1.2: told by a config interrupt


async def test_avail_index_jump_sets_needs_reset(rig):
    d = rig.driver
    vq0, _ = await d.init()
    vq0.set_avail_idx(100)
    d.kick(vq0)
    await settle()
    assert d.status & DEVICE_NEEDS_RESET
    assert d.ack_interrupts() & r.VIRTIO_MMIO_INT_CONFIG
    # The device stopped: further kicks do nothing, and a reset brings it back.
    await d.reset()
    assert d.status == 0
    vq0, _ = await d.init()
    vq0.offer(vq0.add_chain([Buf(0x200000, 1), Buf(0x300000, 1, True)]))
    d.kick(vq0)
    assert len(await d.wait_used(vq0, 1)) == 1


async def test_reset_deactivates_and_returns_registers_to_initial_values(rig):
    d = rig.driver
    await d.init()
    rig.transport.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
    await d.reset()
    t = rig.transport
    assert t.device.deactivations == 1
    assert (d.status, d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS), t.driver_features) == (0, 0, 0)
    assert all(not q.ready and q.size == q.max_size for q in t.queues)
    assert t.activation is None


async def test_failed_is_latched_until_reset(rig):
    d = rig.driver
    d.add_status(ACKNOWLEDGE)
    d.add_status(FAILED)
    d.add_status(DRIVER)
    assert d.status == ACKNOWLEDGE | FAILED
    await d.reset()
    assert d.status == 0


def test_config_space_and_generation(rig):
    d = rig.driver
    assert rig.transport.read(r.VIRTIO_MMIO_CONFIG + 2, 2) == b"CD"
    rig.transport.write(r.VIRTIO_MMIO_CONFIG, b"xy")
    assert rig.transport.read(r.VIRTIO_MMIO_CONFIG, 4) == b"xyCD"
    gen = d.read32(r.VIRTIO_MMIO_CONFIG_GENERATION)
    rig.transport.device.config_changed()
    assert d.read32(r.VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert rig.irq.count == 0                                # not live: no interrupt


async def test_config_change_interrupts_a_live_device(rig):
    d = rig.driver
    await d.init()
    rig.transport.device.config_changed()
    assert d.ack_interrupts() == r.VIRTIO_MMIO_INT_CONFIG


@pytest.mark.parametrize("offset,size", [(0x70, 2), (0x71, 4), (0x00, 1), (0x04, 8)])
def test_odd_register_accesses_are_harmless(rig, offset, size):
    assert rig.transport.read(offset, size) == bytes(size)
    rig.transport.write(offset, bytes(size))
    assert rig.driver.status == 0


def test_shared_memory_registers_report_no_region(rig):
    for off in (r.VIRTIO_MMIO_SHM_LEN_LOW, r.VIRTIO_MMIO_SHM_LEN_HIGH):
        assert rig.driver.read32(off) == 0xFFFF_FFFF


async def test_eventfd_count_must_match_queues(guest_mem):
    with pytest.raises(ValueError):
        r.VirtioMmioTransport(EchoDevice(), mem=guest_mem, irq=CountingIrqLine(),
                              queue_events=[EventFd()], loop=asyncio.get_running_loop())


async def test_queue_num_zero_fails_activation(rig):
    d = rig.driver
    assert d.negotiate()
    d.setup_queue(0)
    d.write32(r.VIRTIO_MMIO_QUEUE_SEL, 1)
    d.write32(r.VIRTIO_MMIO_QUEUE_NUM, 0)
    d.write32(r.VIRTIO_MMIO_QUEUE_READY, 1)
    d.add_status(DRIVER_OK)
    await settle()
    assert d.status & DEVICE_NEEDS_RESET and rig.transport.device.activations == 0


async def test_interrupt_ack_clears_only_acknowledged_bits(rig):
    t = rig.transport
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING | r.VIRTIO_MMIO_INT_CONFIG)
    rig.driver.write32(r.VIRTIO_MMIO_INTERRUPT_ACK, r.VIRTIO_MMIO_INT_VRING)
    assert rig.driver.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == r.VIRTIO_MMIO_INT_CONFIG
    assert struct.unpack("<I", t.read(r.VIRTIO_MMIO_INTERRUPT_STATUS, 4))[0] == 2



async def test_an_edge_only_when_interrupt_status_gains_a_bit(rig, monkeypatch):
    t, d = rig.transport, rig.driver
    now = [100.0]
    monkeypatch.setattr(r.time, "monotonic", lambda: now[0])
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)             # not acknowledged yet: no second edge
    assert rig.irq.count == 1 and t.interrupts_coalesced == 1
    t.raise_interrupt(r.VIRTIO_MMIO_INT_CONFIG)            # a new bit: an edge
    assert rig.irq.count == 2
    assert d.ack_interrupts() == r.VIRTIO_MMIO_INT_VRING | r.VIRTIO_MMIO_INT_CONFIG
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)             # acknowledged: an edge again
    assert rig.irq.count == 3
    now[0] += 2 * r.REASSERT_S                             # pending too long: an edge lost?
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
    assert rig.irq.count == 4
    assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == r.VIRTIO_MMIO_INT_VRING

register_ops = st.lists(st.tuples(
    st.booleans(),                                            # write?
    st.one_of(st.sampled_from([0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84,
                               0x90, 0x94, 0xA0, 0xA4, 0xAC, 0xC0, 0xFC, 0x100, 0x104]),
              st.integers(0, 0xFFF)),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.sampled_from([0, 1, 3, 11, 15, 0x80, 0xFFFF_FFFF]), st.integers(0, 2**32 - 1)),
), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=register_ops)
async def test_random_register_traffic_never_raises(ops):
    rig = make_rig(EchoDevice())
    try:
        for write, offset, size, value in ops:
            if write:
                rig.transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            else:
                assert len(rig.transport.read(offset, size)) == size
        await settle()
        status = rig.driver.status & ~(DEVICE_NEEDS_RESET | FAILED)
        assert status in (0, ACKNOWLEDGE, ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK,
                          ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
    finally:
        await rig.driver.reset()
        rig.close()


# -- one owner: the loop (activation and reset happen inside the register write) ----------

def test_driver_ok_activates_and_reset_deactivates_within_the_register_write(rig):
    d = rig.driver
    assert d.negotiate()
    d.setup_queue(0)
    d.add_status(DRIVER_OK)                                   # no loop turn in between
    t = rig.transport
    assert t.device.activations == 1
    act = t.activation
    d.write32(r.VIRTIO_MMIO_STATUS, 0)
    assert t.device.deactivations == 1 and t.activation is None
    assert not act.gate.is_open                               # nothing of it touches memory again
    act.interrupts.signal_used()                              # a late interrupt of the old activation
    assert rig.irq.count == 0 and d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 0


def test_reset_completes_only_after_an_access_outside_the_loop_left_the_gate(rig):
    """An access the kernel or a worker thread is still making holds the reset write."""
    import threading
    import time
    d = rig.driver
    assert d.negotiate()
    d.setup_queue(0)
    d.add_status(DRIVER_OK)
    gate = rig.transport.activation.gate
    inside, order = threading.Event(), []

    def worker():
        with gate.access():
            inside.set()
            time.sleep(0.2)
            order.append("access done")

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    d.write32(r.VIRTIO_MMIO_STATUS, 0)
    order.append("reset done")
    thread.join()
    assert order == ["access done", "reset done"]


# -- InterruptStatus / InterruptACK on the vCPU thread ------------------------------------

async def test_interrupt_registers_are_answered_inline_and_nothing_else(rig):
    t = rig.transport
    t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING | r.VIRTIO_MMIO_INT_CONFIG)
    assert t.read_inline(r.VIRTIO_MMIO_INTERRUPT_STATUS, 4) == struct.pack("<I", 3)
    assert t.write_inline(r.VIRTIO_MMIO_INTERRUPT_ACK, struct.pack("<I", r.VIRTIO_MMIO_INT_VRING))
    assert t.read_inline(r.VIRTIO_MMIO_INTERRUPT_STATUS, 4) == struct.pack("<I", r.VIRTIO_MMIO_INT_CONFIG)
    assert t.read_inline(r.VIRTIO_MMIO_INTERRUPT_STATUS, 2) is None      # odd size: the loop reports it
    assert t.read_inline(r.VIRTIO_MMIO_STATUS, 4) is None
    assert t.read_inline(r.VIRTIO_MMIO_CONFIG, 4) is None
    assert not t.write_inline(r.VIRTIO_MMIO_STATUS, b"\0\0\0\0")
    assert not t.write_inline(r.VIRTIO_MMIO_QUEUE_NOTIFY, b"\0\0\0\0")
    assert rig.driver.status == 0


# -- guest faults: counted, logged a few times -------------------------------------------

async def test_a_flood_of_read_only_register_writes_is_counted_not_logged(caplog):
    from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults
    device = EchoDevice()
    faults = GuestFaults(GuestFaultMetrics(), burst=10)
    rig = make_rig(device)
    rig.transport.faults = faults
    try:
        with caplog.at_level("DEBUG"):
            for _ in range(50_000):
                rig.driver.write32(r.VIRTIO_MMIO_MAGIC_VALUE, 0x1234)
            rig.transport.read(r.VIRTIO_MMIO_STATUS, 2)                   # bad size
            rig.driver.write32(r.VIRTIO_MMIO_STATUS, DRIVER)              # skips ACKNOWLEDGE
        assert faults.metrics.virtio_mmio_access == 50_001
        assert faults.metrics.virtio_mmio_protocol == 1
        assert len(caplog.records) <= 10 + 1 + 2
        assert "write of 0x1234 to read-only or unknown register 0x0 ignored" in caplog.records[0].getMessage()
    finally:
        rig.close()


async def test_a_back_end_signalling_the_irqfd_itself_keeps_the_used_bit_set_until_reset(guest_mem):
    # vhost-net and vhost-user write the device's irqfd without the transport: from the
    # activation that handed the fd out until the driver resets, InterruptStatus reports
    # a used buffer, so the guest's handler always looks at the rings.
    from asyncvmm.devices.irq import EventFdIrqLine
    from tests.fakes.virtio_driver import Allocator, FakeDriver

    device = EchoDevice()
    line = EventFdIrqLine(5)
    t = r.VirtioMmioTransport(device, mem=guest_mem, irq=line,
                              queue_events=[EventFd() for _ in range(device.num_queues)],
                              loop=asyncio.get_running_loop())
    d = FakeDriver(t, guest_mem, Allocator(0x1000, guest_mem.end))
    try:
        await d.init()
        assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 0          # not handed out yet
        assert device.act.interrupts.irqfd(0) == line.eventfd.fd
        assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == r.VIRTIO_MMIO_INT_VRING
        d.write32(r.VIRTIO_MMIO_INTERRUPT_ACK, r.VIRTIO_MMIO_INT_VRING)
        assert struct.unpack("<I", t.read_inline(r.VIRTIO_MMIO_INTERRUPT_STATUS, 4))[0] == 1
        t.raise_interrupt(r.VIRTIO_MMIO_INT_CONFIG)                   # config changes still say so
        assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 3
        await d.reset()
        assert d.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
        assert device.act.interrupts.irqfd(0) is None                 # that activation is over
    finally:
        line.eventfd.close()


class FakeKernelAck:
    """KVM's side of mmio.KernelVringAck: whether it takes the ioeventfd, and its ACK count."""

    def __init__(self):
        self.calls, self.answer, self.count = [], True, 0

    def switch(self, on):
        self.calls.append(on)
        return self.answer

    def taken(self):
        n, self.count = self.count, 0
        return n


async def test_kvm_completes_the_used_bit_ack_from_activation_to_reset(guest_mem):
    # With KVM completing the ACK of the used-buffer bit (an ioeventfd with datamatch 1), that
    # bit reads set from DRIVER_OK to reset and raises coalesce until KVM has counted an ACK;
    # the config bit keeps its ACK.  A switch KVM refuses leaves the ACK-cleared register.
    from asyncvmm.devices.irq import EventFdIrqLine
    from tests.fakes.virtio_driver import Allocator, FakeDriver

    kvm = FakeKernelAck()
    device = EchoDevice()
    line = EventFdIrqLine(5)
    t = r.VirtioMmioTransport(device, mem=guest_mem, irq=line,
                              queue_events=[EventFd() for _ in range(device.num_queues)],
                              loop=asyncio.get_running_loop(), kernel_vring_ack=kvm)
    d = FakeDriver(t, guest_mem, Allocator(0x1000, guest_mem.end))
    status = lambda: struct.unpack("<I", t.read_inline(r.VIRTIO_MMIO_INTERRUPT_STATUS, 4))[0]  # noqa: E731
    try:
        assert status() == 0 and kvm.calls == []                    # nothing before DRIVER_OK
        kvm.count = 5                                                 # ACKs of an earlier life
        await d.init()
        assert kvm.calls == [True] and status() == r.VIRTIO_MMIO_INT_VRING and kvm.count == 0
        device.act.interrupts.irqfd(0)
        device.act.interrupts.irqfd(1)
        assert kvm.calls == [True]                                    # one ioeventfd, not one per queue
        line.eventfd.read()
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)                    # not acknowledged yet
        status()                                                      # reading says nothing
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
        assert line.eventfd.read() == 1 and t.interrupts_coalesced == 2
        kvm.count = 1                                                 # KVM completed its ACK
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)                    # a new edge, though the bit is set
        assert line.eventfd.read() == 1 and t.interrupts_coalesced == 2
        t.raise_interrupt(r.VIRTIO_MMIO_INT_CONFIG)                   # a new bit: an edge at once
        assert status() == 3 and line.eventfd.read() == 1
        t.write_inline(r.VIRTIO_MMIO_INTERRUPT_ACK, struct.pack("<I", 3))   # what still exits
        assert status() == r.VIRTIO_MMIO_INT_VRING
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)                    # that ACK counts too
        assert line.eventfd.read() == 1 and t.interrupts_coalesced == 2
        await d.reset()
        assert kvm.calls == [True, False] and status() == 0
        kvm.answer = False                                            # KVM refuses: as before
        await d.init()
        assert kvm.calls == [True, False, True] and status() == 0
        t.raise_interrupt(r.VIRTIO_MMIO_INT_VRING)
        t.write_inline(r.VIRTIO_MMIO_INTERRUPT_ACK, struct.pack("<I", 1))
        assert status() == 0
        await d.reset()
        assert kvm.calls == [True, False, True]                       # never on: nothing to undo
    finally:
        line.eventfd.close()


# -- the register page: the guest reads a read-only page the transport keeps current -------

def _page_words(page):
    return {off: struct.unpack_from("<I", page, off)[0] for off in range(0, r.VIRTIO_MMIO_CONFIG, 4)}


def _assert_page_answers_as_reads(t, page):
    """Every word below the config space, and the config bytes, as a read that exits says."""
    for off, word in _page_words(page).items():
        assert word == struct.unpack("<I", t.read(off, 4))[0], hex(off)
    config = t.device._config
    assert bytes(page[r.VIRTIO_MMIO_CONFIG:r.VIRTIO_MMIO_CONFIG + len(config)]) == config
    assert not any(page[r.VIRTIO_MMIO_CONFIG + len(config):])


def _paged_rig(device=None, kvm=None):
    rig = make_rig(device or EchoDevice())
    if kvm is not None:
        rig.transport._kernel_ack = kvm
    page = memoryview(bytearray(r.PAGE_SIZE))
    rig.transport.attach_register_page(page)
    return rig, page


async def test_the_register_page_answers_as_reads_through_a_whole_device_life():
    rig, page = _paged_rig(kvm=FakeKernelAck())
    t, d = rig.transport, rig.driver
    try:
        words = _page_words(page)
        assert words[r.VIRTIO_MMIO_MAGIC_VALUE] == r.MMIO_MAGIC_VALUE and words[r.VIRTIO_MMIO_VERSION] == 2
        assert words[r.VIRTIO_MMIO_DEVICE_ID] == 42 and words[r.VIRTIO_MMIO_SHM_LEN_LOW] == 0xFFFF_FFFF
        _assert_page_answers_as_reads(t, page)
        for sel in (1, 0, 2):                                       # features, per select
            d.write32(r.VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
            _assert_page_answers_as_reads(t, page)
        d.add_status(ACKNOWLEDGE)
        d.add_status(DRIVER)
        assert d.negotiate()
        assert _page_words(page)[r.VIRTIO_MMIO_STATUS] == ACKNOWLEDGE | DRIVER | FEATURES_OK
        for q in (1, 0, 7):                                         # queue size and ready, per select
            d.write32(r.VIRTIO_MMIO_QUEUE_SEL, q)
            _assert_page_answers_as_reads(t, page)
        d.setup_queue(0)
        assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_QUEUE_READY)[0] == 1
        d.setup_queue(1)
        d.add_status(DRIVER_OK)
        _assert_page_answers_as_reads(t, page)
        assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_INTERRUPT_STATUS)[0] == r.VIRTIO_MMIO_INT_VRING
        t.write(r.VIRTIO_MMIO_CONFIG + 1, b"zz")                      # a config write exits
        assert bytes(page[r.VIRTIO_MMIO_CONFIG:r.VIRTIO_MMIO_CONFIG + 4]) == b"AzzD"
        gen = struct.unpack_from("<I", page, r.VIRTIO_MMIO_CONFIG_GENERATION)[0]
        t.device._config = b"new"                                    # the host changes it (shorter)
        t.device.config_changed()
        assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_CONFIG_GENERATION)[0] == gen + 1
        assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_INTERRUPT_STATUS)[0] == 3
        _assert_page_answers_as_reads(t, page)
        t.set_needs_reset()
        assert _page_words(page)[r.VIRTIO_MMIO_STATUS] & DEVICE_NEEDS_RESET
        await d.reset()
        _assert_page_answers_as_reads(t, page)
        assert _page_words(page)[r.VIRTIO_MMIO_STATUS] == 0
        assert _page_words(page)[r.VIRTIO_MMIO_INTERRUPT_STATUS] == 0
    finally:
        rig.close()


async def test_the_page_has_the_interrupt_bit_before_the_edge_is_sent():
    rig, page = _paged_rig()
    seen = []
    rig.transport.irq.trigger = lambda: seen.append(struct.unpack_from("<I", page, r.VIRTIO_MMIO_INTERRUPT_STATUS)[0])
    try:
        rig.transport.raise_interrupt(r.VIRTIO_MMIO_INT_CONFIG)
        assert seen == [r.VIRTIO_MMIO_INT_CONFIG]
        rig.transport.write_inline(r.VIRTIO_MMIO_INTERRUPT_ACK, struct.pack("<I", 2))   # the ACK exits
        assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_INTERRUPT_STATUS)[0] == 0
    finally:
        rig.close()


def test_a_register_page_is_one_writable_page_and_can_be_taken_away(rig):
    with pytest.raises(ValueError):
        rig.transport.attach_register_page(memoryview(bytearray(100)))
    with pytest.raises(ValueError):
        rig.transport.attach_register_page(memoryview(bytes(r.PAGE_SIZE)))
    page = memoryview(bytearray(b"\xee" * r.PAGE_SIZE))
    rig.transport.attach_register_page(page)
    assert not any(page[r.VIRTIO_MMIO_CONFIG + 8:])                # stale bytes cleared
    rig.transport.attach_register_page(None)                        # KVM refused the slot
    rig.driver.write32(r.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    assert struct.unpack_from("<I", page, r.VIRTIO_MMIO_DEVICE_FEATURES)[0] != \
        rig.driver.read32(r.VIRTIO_MMIO_DEVICE_FEATURES)             # no longer kept, reads exit


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=register_ops)
async def test_random_register_traffic_keeps_the_page_equal_to_the_registers(ops):
    rig, page = _paged_rig(kvm=FakeKernelAck())
    try:
        for write, offset, size, value in ops:
            if write:
                rig.transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            _assert_page_answers_as_reads(rig.transport, page)
        await settle()
        _assert_page_answers_as_reads(rig.transport, page)
    finally:
        await rig.driver.reset()
        rig.close()


async def test_no_irqfd_for_a_line_without_one(rig):
    await rig.driver.init()
    assert rig.transport.device.act.interrupts.irqfd(1) is None
    assert rig.driver.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
