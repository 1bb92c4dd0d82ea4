"""The virtio-pci transport driven through config space and BAR0 by the fake PCI driver."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio import pci as p
from asyncvmm.devices.virtio.block import Block
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.pci import PciTransportState, VirtioPciTransport
from asyncvmm.devices.virtio.rng import Rng
from asyncvmm.devices.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_RNG,
)
from asyncvmm.devices.virtio.transport import SnapshotStateError
from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults
from asyncvmm.memory import GuestMemory
from asyncvmm.pci import config as c
from asyncvmm.pci import msix as m
from tests.fakes.virtio_driver import Allocator, Buf, settle
from tests.fakes.virtio_pci_driver import MSI_ADDRESS, MSI_DATA_BASE, FakePciDriver
from tests.unit.devices.virtio.block.conftest import disk_bytes
from tests.unit.devices.virtio.block.helpers import header, lay_out
from tests.unit.devices.virtio.conftest import MEM_SIZE
from tests.unit.devices.virtio.test_mmio import EchoDevice

NO_VECTOR = p.VIRTIO_MSI_NO_VECTOR


@dataclass
class PciRig:
    mem: GuestMemory
    transport: VirtioPciTransport
    driver: FakePciDriver
    alloc: Allocator
    faults: GuestFaults
    sent: list[int] = field(default_factory=list)          # MSI-X vectors delivered
    routes: list[int] = field(default_factory=list)        # vectors whose route changed
    bar_changes: list[int | None] = field(default_factory=list)

    def close(self) -> None:
        for evt in self.transport.queue_events:
            evt.close()

    @property
    def metrics(self) -> GuestFaultMetrics:
        return self.faults.metrics


def make_pci_rig(device, mem: GuestMemory | None = None) -> PciRig:
    mem = mem or GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
    faults = GuestFaults(GuestFaultMetrics())
    sent: list[int] = []
    routes: list[int] = []
    changes: list[int | None] = []
    holder: list[VirtioPciTransport] = []
    transport = VirtioPciTransport(
        device, mem=mem, queue_events=[EventFd() for _ in range(device.num_queues)],
        loop=asyncio.get_running_loop(), faults=faults, deliver=sent.append,
        on_route_change=routes.append, on_bar_change=lambda: changes.append(holder[0].bar_mapping()))
    holder.append(transport)
    alloc = Allocator(0x1000, mem.end)
    return PciRig(mem, transport, FakePciDriver(transport, mem, alloc), alloc, faults, sent, routes, changes)


@pytest.fixture
async def rig():
    rig = make_pci_rig(EchoDevice())
    yield rig
    if rig.transport.activation is not None:
        rig.transport.device.deactivate()
    rig.close()


async def echo(rig: PciRig, vq, payload: bytes, *, via_bar: bool = False) -> bytes:
    src, dst = rig.alloc.alloc(len(payload)), rig.alloc.alloc(len(payload))
    rig.mem.write(src, payload)
    head = vq.add_chain([Buf(src, len(payload)), Buf(dst, len(payload), True)])
    vq.set_used_event(vq.last_used)                 # with EVENT_IDX: interrupt me for this one
    vq.offer(head)
    rig.driver.kick(vq, via_bar=via_bar)
    assert await rig.driver.wait_used(vq, 1) == [(head, len(payload))]
    return rig.mem.read(dst, len(payload))


# -- identity, BAR0 and capabilities -------------------------------------------------

async def test_identity_as_lspci_sees_it(disk_path):
    rng = make_pci_rig(Rng())
    blk_dev = Block("d", str(disk_path), read_only=True)
    blk = make_pci_rig(blk_dev)
    try:
        for rig, dtype, klass in ((rng, VIRTIO_ID_RNG, 0xFF0000), (blk, VIRTIO_ID_BLOCK, 0x018000)):
            d = rig.driver
            assert d.cfg_read(c.PCI_VENDOR_ID, 2) == 0x1AF4
            assert d.cfg_read(c.PCI_DEVICE_ID, 2) == 0x1040 + dtype
            assert d.cfg_read(c.PCI_REVISION_ID, 1) == 1
            assert d.cfg_read(c.PCI_CLASS_REVISION, 4) >> 8 == klass
            assert d.cfg_read(c.PCI_SUBSYSTEM_VENDOR_ID, 2) == 0x1AF4
            assert d.cfg_read(c.PCI_SUBSYSTEM_ID, 2) == 0x0040
            assert d.cfg_read(c.PCI_INTERRUPT_PIN, 1) == 0             # MSI-X only
            assert d.size_bar0() == p.BAR0_SIZE == 0x8000
    finally:
        blk_dev.file.retire()
        rng.close()
        blk.close()


@pytest.fixture
def disk_path(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(disk_bytes())
    return path


async def test_capabilities_name_each_structure_in_bar0(rig):
    d = rig.driver
    d.probe()
    assert [cap_id for cap_id, _ in d.walk_capabilities()] == [c.PCI_CAP_ID_VNDR] * 5 + [c.PCI_CAP_ID_MSIX]
    layout = {t: (cap.bar, cap.offset, cap.length) for t, cap in d.caps.items()}
    assert layout == {
        p.VIRTIO_PCI_CAP_COMMON_CFG: (0, 0x0000, 0x38),
        p.VIRTIO_PCI_CAP_NOTIFY_CFG: (0, 0x3000, 4 * 2),
        p.VIRTIO_PCI_CAP_ISR_CFG: (0, 0x1000, 1),
        p.VIRTIO_PCI_CAP_DEVICE_CFG: (0, 0x2000, 0x1000),
        p.VIRTIO_PCI_CAP_PCI_CFG: (0, 0, 0),
    }
    assert d.notify_off_multiplier == 4
    assert d.cfg_read(d.caps[p.VIRTIO_PCI_CAP_COMMON_CFG].at + 2, 1) == 16     # cap_len
    assert d.cfg_read(d.caps[p.VIRTIO_PCI_CAP_NOTIFY_CFG].at + 2, 1) == 20
    assert d.msix_vectors() == 3                                                # 2 queues + config
    assert (d.msix_table(), d.msix_pba()) == (0x4000, 0x6000)
    assert [rig.transport.notify_address(0xA000_0000, q) for q in (0, 1)] == [0xA000_3000, 0xA000_3004]


async def test_bar_mapping_follows_memory_decoding_and_the_bar(rig):
    t, d = rig.transport, rig.driver
    assert t.bar_mapping() is None
    assert d.size_bar0() == 0x8000
    assert rig.bar_changes == []                        # sizing with decoding off maps nothing
    d.place_bar0(0x2_0000_0000)
    assert t.bar_mapping() is None and rig.bar_changes == []
    d.enable_device()
    assert rig.bar_changes == [0x2_0000_0000]
    d.place_bar0(0x3_0000_8000)                         # low half, then high half: two moves
    assert rig.bar_changes[1:] == [0x2_0000_8000, 0x3_0000_8000]
    d.cfg_write(c.PCI_COMMAND, 2, 0)
    assert rig.bar_changes[-1] is None
    d.cfg_write(c.PCI_COMMAND, 2, 0)
    d.cfg_write(c.PCI_INTERRUPT_LINE, 1, 5)
    assert len(rig.bar_changes) == 4                    # no change, no call


# -- virtio-rng and virtio-blk doing I/O ---------------------------------------------------

async def test_rng_fills_a_buffer_and_signals_the_queue_vector():
    rig = make_pci_rig(Rng(random_bytes=lambda n: b"\x5a" * n))
    try:
        [vq] = await rig.driver.init()
        assert rig.transport.activation is not None
        buf = rig.alloc.alloc(64)
        head = vq.add_chain([Buf(buf, 64, True)])
        vq.offer(head)
        rig.driver.kick(vq)
        assert await rig.driver.wait_used(vq, 1) == [(head, 64)]
        assert rig.mem.read(buf, 64) == b"\x5a" * 64
        assert rig.sent == [1]                          # queue 0 -> vector 1
        assert rig.transport.msix.message(1) == (MSI_ADDRESS, MSI_DATA_BASE + 1)
        assert rig.driver.read_isr() == p.VIRTIO_PCI_ISR_QUEUE
        assert rig.driver.read_isr() == 0               # read-to-clear
    finally:
        rig.transport.device.deactivate()
        rig.close()


async def test_block_reads_and_writes_through_bar0(disk_path):
    dev = Block("d", str(disk_path), read_only=False, io_engine="Sync")
    rig = make_pci_rig(dev)
    try:
        [vq] = await rig.driver.init()
        assert int.from_bytes(rig.driver.read_config(0, 8), "little") == 64     # capacity
        area = rig.alloc.next

        async def request(req_type, sector, data=b"", read_len=0, *, via_bar=False):
            rig.alloc.next = area
            bufs, answer = lay_out(rig.mem, rig.alloc, header(req_type, sector) + data, read_len + 1)
            head = vq.add_chain(bufs)
            vq.set_used_event(vq.last_used)
            vq.offer(head)
            rig.driver.kick(vq, via_bar=via_bar)
            assert await rig.driver.wait_used(vq, 1) == [(head, read_len + 1)]
            return answer.read(rig.mem)

        answer = await request(rq.VIRTIO_BLK_T_IN, 2, read_len=1024)
        assert answer == disk_bytes()[1024:2048] + bytes([rq.VIRTIO_BLK_S_OK])
        answer = await request(rq.VIRTIO_BLK_T_OUT, 5, b"\xab" * 512, via_bar=True)
        assert answer == bytes([rq.VIRTIO_BLK_S_OK])
        assert disk_path.read_bytes()[5 * 512:6 * 512] == b"\xab" * 512
        assert rig.sent == [1, 1]
    finally:
        dev.deactivate()
        dev.close()
        rig.close()


# -- MSI-X delivery -----------------------------------------------------------------------

async def test_each_queue_signals_its_own_vector_and_config_changes_the_config_vector(rig):
    vq0, vq1 = await rig.driver.init()
    assert await echo(rig, vq0, b"zero") == b"zero"
    assert await echo(rig, vq1, b"one", via_bar=True) == b"one"
    assert rig.sent == [1, 2]
    generation = rig.driver.common_read(p.VIRTIO_PCI_COMMON_CFGGENERATION, 1)
    rig.transport.device.config_changed()
    assert rig.sent == [1, 2, 0]
    assert rig.driver.common_read(p.VIRTIO_PCI_COMMON_CFGGENERATION, 1) == (generation + 1) & 0xFF
    assert rig.driver.read_isr() == p.VIRTIO_PCI_ISR_QUEUE | p.VIRTIO_PCI_ISR_CONFIG


async def test_queues_may_share_a_vector_or_have_none(rig):
    d = rig.driver
    d.probe()
    d.enable_msix()
    assert d.negotiate()
    vq0 = d.setup_queue(0, vector=1)
    vq1 = d.setup_queue(1, vector=1)
    d.enable_queue(0)
    d.enable_queue(1)
    d.add_status(DRIVER_OK)
    await echo(rig, vq0, b"a")
    await echo(rig, vq1, b"b")
    assert rig.sent == [1, 1]
    rig.transport.device.config_changed()               # config vector never set: NO_VECTOR
    assert rig.sent == [1, 1]
    assert d.read_isr() == p.VIRTIO_PCI_ISR_QUEUE | p.VIRTIO_PCI_ISR_CONFIG


async def test_a_masked_vector_is_pending_and_fires_on_unmask(rig):
    d = rig.driver
    [vq0, _] = await d.init()
    d.set_vector_mask(1, True)
    await echo(rig, vq0, b"held")
    assert rig.sent == []
    assert d.bar_read(d.msix_pba(), 8) == 1 << 1
    d.set_vector_mask(1, False)
    assert rig.sent == [1]
    assert d.bar_read(d.msix_pba(), 8) == 0


async def test_the_function_mask_holds_every_vector_until_cleared(rig):
    d = rig.driver
    vq0, vq1 = await d.init()
    d.msix_control(m.PCI_MSIX_FLAGS_ENABLE | m.PCI_MSIX_FLAGS_MASKALL)
    await echo(rig, vq0, b"x")
    await echo(rig, vq1, b"y")
    assert rig.sent == []
    d.msix_control(m.PCI_MSIX_FLAGS_ENABLE)
    assert sorted(rig.sent) == [1, 2]


async def test_route_changes_reach_the_glue(rig):
    d = rig.driver
    d.probe()
    d.enable_msix()
    assert set(rig.routes) == {0, 1, 2}
    rig.routes.clear()
    d.bar_write(d.msix_table() + 16 * 2 + m.PCI_MSIX_ENTRY_DATA, 4, 0x77)
    assert rig.routes == [2] and rig.transport.msix.message(2) == (MSI_ADDRESS, 0x77)


# -- hostile and careless drivers --------------------------------------------------------

async def test_vectors_beyond_the_table_read_back_as_no_vector(rig):
    d = rig.driver
    d.probe()
    assert d.negotiate()
    assert d.set_config_vector(3) == NO_VECTOR          # 3 vectors: 0..2
    assert d.set_config_vector(2) == 2
    assert d.set_queue_vector(0, 0x8000) == NO_VECTOR
    assert d.set_queue_vector(1, 0) == 0
    assert d.set_queue_vector(5, 1) == NO_VECTOR         # no such queue: nothing mapped
    assert rig.metrics.virtio_pci_protocol == 3


async def test_read_only_fields_ignore_writes(rig):
    d = rig.driver
    d.probe()
    d.select(1)
    for fld, size in ((p.VIRTIO_PCI_COMMON_DF, 4), (p.VIRTIO_PCI_COMMON_NUMQ, 2),
                      (p.VIRTIO_PCI_COMMON_CFGGENERATION, 1), (p.VIRTIO_PCI_COMMON_Q_NOFF, 2)):
        before = d.common_read(fld, size)
        d.common_write(fld, size, 0xDEAD)
        assert d.common_read(fld, size) == before
    assert (d.num_queues(), d.common_read(p.VIRTIO_PCI_COMMON_Q_NOFF, 2)) == (2, 1)
    assert rig.metrics.virtio_pci_access == 4


@pytest.mark.parametrize("offset,size", [(0x14, 2), (0x16, 1), (0x16, 4), (0x10, 4), (0x22, 4),
                                         (0x21, 1), (0x04, 8), (0x38, 4), (0x37, 1)])
async def test_odd_common_config_accesses_are_ignored_and_reported(rig, offset, size):
    t = rig.transport
    assert t.read(offset, size) == bytes(size)
    t.write(offset, b"\xff" * size)
    assert t.status == 0 and t.queue_sel == 0 and t.device_features_sel == 0
    assert t.queues[0].desc_table == 0
    assert rig.metrics.virtio_pci_access == 2


async def test_64_bit_queue_fields_take_both_halves_or_one_access(rig):
    d = rig.driver
    d.probe()
    assert d.negotiate()
    d.select(0)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_DESCLO, 8, 0x1_2345_6780)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_DESCHI, 4) == 1
    d.common_write(p.VIRTIO_PCI_COMMON_Q_DESCHI, 4, 2)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_DESCLO, 8) == 0x2_2345_6780
    assert rig.transport.queues[0].desc_table == 0x2_2345_6780


@pytest.mark.parametrize("offset,size", [
    (0x1000, 4), (0x1001, 1), (0x0800, 4), (0x2FFE, 4), (0x3008, 2), (0x3002, 2), (0x3000, 1),
    (0x4000 + 16 * 3, 4), (0x4002, 2), (0x5000, 4), (0x6008, 8), (0x7FF0, 8), (0x8000, 4), (0x2000, 16)])
async def test_bar0_accesses_outside_every_structure_are_ignored(rig, offset, size):
    t = rig.transport
    assert t.read(offset, size) == bytes(size)
    t.write(offset, b"\x01" * size)
    assert [e.read() for e in t.queue_events] == [0, 0]
    assert t.msix.message(0) == (0, 0) and t.msix.masked(0)
    assert rig.metrics.virtio_pci_access + rig.metrics.pci_msix == 2


async def test_queue_setup_outside_features_ok_is_ignored(rig):
    d = rig.driver
    d.probe()
    d.select(0)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_SIZE, 2, 4)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    d.add_status(ACKNOWLEDGE)
    d.write_features(1 << 32)                             # before DRIVER
    assert rig.transport.driver_features == 0
    assert rig.metrics.virtio_pci_protocol == 4


async def test_queue_fields_of_an_enabled_queue_read_back_unchanged(rig):
    """What Firecracker's test_queue_config_immutable pokes with devmem after boot."""
    d = rig.driver
    await d.init()
    d.select(0)
    for fld, size, poison in ((p.VIRTIO_PCI_COMMON_Q_SIZE, 2, 0), (p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0),
                              (p.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0xDEADBEEF),
                              (p.VIRTIO_PCI_COMMON_Q_DESCHI, 4, 0xDEADBEEF),
                              (p.VIRTIO_PCI_COMMON_Q_AVAILLO, 4, 0xDEADBEEF),
                              (p.VIRTIO_PCI_COMMON_Q_AVAILHI, 4, 0xDEADBEEF),
                              (p.VIRTIO_PCI_COMMON_Q_USEDLO, 4, 0xDEADBEEF),
                              (p.VIRTIO_PCI_COMMON_Q_USEDHI, 4, 0xDEADBEEF)):
        before = d.common_read(fld, size)
        d.common_write(fld, size, poison)
        assert d.common_read(fld, size) == before, hex(fld)
    assert rig.transport.activation.queues[0].ready


async def test_an_enabled_queue_keeps_its_setup_before_driver_ok_too(rig):
    d = rig.driver
    d.probe()
    assert d.negotiate()
    vq = d.setup_queue(0)
    d.enable_queue(0)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_SIZE, 2, 2)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0)     # §4.1.4.3.2: never 0
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_SIZE, 2) == vq.size
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 1


async def test_queue_size_not_a_power_of_two_needs_reset_at_driver_ok(rig):
    d = rig.driver
    d.probe()
    d.enable_msix()
    assert d.negotiate()
    assert d.set_config_vector(0) == 0
    d.setup_queue(0, size=12)
    d.enable_queue(0)
    d.add_status(DRIVER_OK)
    assert d.status & DEVICE_NEEDS_RESET
    assert rig.transport.activation is None and rig.transport.device.failures
    assert rig.sent == [0]                                # told through the config vector
    await d.reset()
    assert d.status == 0


async def test_queue_enable_with_addresses_outside_memory_needs_reset(rig):
    d = rig.driver
    d.probe()
    assert d.negotiate()
    d.setup_queue(0)
    d.write_queue_address(p.VIRTIO_PCI_COMMON_Q_USEDLO, MEM_SIZE - 8)
    d.enable_queue(0)
    d.add_status(DRIVER_OK)
    assert d.status == ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET
    assert rig.metrics.virtio_pci_protocol == 1


async def test_a_broken_ring_needs_reset_through_the_config_vector(rig):
    vq0, _ = await rig.driver.init()
    vq0.set_avail_idx(vq0.size + 5)
    rig.driver.kick(vq0)
    for _ in range(50):
        await asyncio.sleep(0.001)
        if rig.driver.status & DEVICE_NEEDS_RESET:
            break
    assert rig.driver.status & DEVICE_NEEDS_RESET
    assert 0 in rig.sent


async def test_absent_queue_reads_zero_size_and_takes_no_setup(rig):
    d = rig.driver
    d.probe()
    assert d.negotiate()
    d.select(7)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_MSIX, 2) == NO_VECTOR
    d.common_write(p.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x1000)
    d.common_write(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert rig.metrics.virtio_pci_protocol == 2


async def test_notify_writes_for_absent_queues_are_ignored(rig):
    rig.transport.write(p.NOTIFY_OFFSET + 4 * 2, struct.pack("<H", 2))
    rig.transport.write(p.NOTIFY_OFFSET + 4 * 0, struct.pack("<H", 0))
    assert [e.read() for e in rig.transport.queue_events] == [1, 0]
    assert rig.metrics.virtio_pci_access == 1


_FIELDS = [*p._COMMON_FIELDS, p.VIRTIO_PCI_COMMON_Q_DESCHI, p.ISR_OFFSET, p.DEVICE_CFG_OFFSET,
           p.NOTIFY_OFFSET, p.NOTIFY_OFFSET + 4, p.MSIX_TABLE_OFFSET + 12, p.MSIX_TABLE_OFFSET + 16,
           p.MSIX_PBA_OFFSET]
_access = hs.tuples(
    hs.sampled_from(["bar", "cfg"]),
    hs.one_of(hs.sampled_from(_FIELDS), hs.integers(0, 0x8010)),
    hs.sampled_from([1, 2, 3, 4, 8]),
    hs.one_of(hs.sampled_from([b"\0" * 8, b"\xff" * 8, b"\x01" + b"\0" * 7, b"\x0f" + b"\0" * 7]),
              hs.binary(min_size=8, max_size=8)),
    hs.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=hs.lists(_access, max_size=80))
async def test_any_access_sequence_after_init_is_survived(accesses):
    """Whatever a guest does to BAR0 and config space: no exception, and the registers stay sane."""
    rig = make_pci_rig(EchoDevice())
    try:
        await rig.driver.init()
        t = rig.transport
        for space, offset, size, data, write in accesses:
            if space == "cfg":
                offset %= 0x1000
            writer, reader = (t.config_write, t.config_read) if space == "cfg" else (t.write, t.read)
            if write:
                writer(offset, data[:size])
            else:
                assert len(reader(offset, size)) == size
        await settle()
        assert t.status & ~(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | 0x80) == 0
        assert all(v == NO_VECTOR or v < 3 for v in [t.config_msix_vector, *t.queue_msix_vectors])
        assert t.isr <= 3 and t.config_generation <= 0xFF
        assert all(q.ready is False for q in t.queues) or t.status & FEATURES_OK
    finally:
        if rig.transport.activation is not None:
            rig.transport.device.deactivate()
        rig.close()


# -- the PCI configuration access capability (§4.1.4.9) -------------------------------------

async def test_pci_cfg_window_reads_and_writes_bar0_through_config_space(rig):
    d = rig.driver
    d.probe()
    cap = d.caps[p.VIRTIO_PCI_CAP_PCI_CFG].at
    d.cfg_write(cap + 4, 1, 0)                                  # cap.bar
    d.cfg_write(cap + 8, 4, p.VIRTIO_PCI_COMMON_NUMQ)           # cap.offset
    d.cfg_write(cap + 12, 4, 2)                                 # cap.length
    assert d.cfg_read(cap + 16, 4) & 0xFFFF == 2                # num_queues
    d.cfg_write(cap + 8, 4, p.VIRTIO_PCI_COMMON_Q_SELECT)
    d.cfg_write(cap + 16, 4, 1)
    assert rig.transport.queue_sel == 1
    d.cfg_write(cap + 8, 4, p.VIRTIO_PCI_COMMON_STATUS)
    d.cfg_write(cap + 12, 4, 1)
    d.cfg_write(cap + 16, 1, ACKNOWLEDGE)
    assert rig.transport.status == ACKNOWLEDGE


@pytest.mark.parametrize("bar,offset,length",
                         [(1, 0, 4), (0, 0, 3), (0, 2, 4), (0, 0x8000, 4), (0, 0x7FFE, 4)])
async def test_pci_cfg_window_refuses_what_no_bar_access_could_be(rig, bar, offset, length):
    d = rig.driver
    d.probe()
    cap = d.caps[p.VIRTIO_PCI_CAP_PCI_CFG].at
    d.cfg_write(cap + 4, 1, bar)
    d.cfg_write(cap + 8, 4, offset)
    d.cfg_write(cap + 12, 4, length)
    d.cfg_write(cap + 16, 4, 0x0F)
    assert d.cfg_read(cap + 16, 4) == 0x0F
    assert rig.transport.status == 0
    assert rig.metrics.virtio_pci_access == 2


async def test_reading_the_whole_config_space_touches_nothing(rig):
    """lspci -xxxx reads every dword, pci_cfg_data included, before any window is set."""
    for offset in range(0, 4096, 4):
        rig.transport.config_read(offset, 4)
    assert rig.metrics.virtio_pci_access == 0 and rig.transport.isr == 0


# -- reset and snapshots ---------------------------------------------------------------

async def test_reset_deactivates_and_returns_the_common_config_to_initial_values(rig):
    d = rig.driver
    vq0, _ = await d.init()
    dev = rig.transport.device
    await d.reset()
    assert dev.deactivations == 1 and rig.transport.activation is None
    assert d.common_read(p.VIRTIO_PCI_COMMON_MSIX, 2) == NO_VECTOR
    d.select(0)
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 16
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_ENABLE, 2) == 0
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_MSIX, 2) == NO_VECTOR
    assert d.common_read(p.VIRTIO_PCI_COMMON_Q_DESCLO, 4) == 0
    assert rig.transport.msix.enabled                       # MSI-X is PCI's, not virtio's
    rig.alloc.next = 0x1000
    vq0, _ = await d.init()
    assert await echo(rig, vq0, b"again") == b"again"
    assert dev.activations == 2


async def test_snapshot_round_trip_continues_the_queues_and_vectors(rig):
    d = rig.driver
    vq0, vq1 = await d.init()
    await echo(rig, vq0, b"before")
    d.set_vector_mask(2, True)
    await echo(rig, vq1, b"pending")
    assert rig.sent == [1]
    rig.transport.device.deactivate()
    raw = msgspec.json.encode(rig.transport.save_state())
    state = msgspec.json.decode(raw, type=PciTransportState)

    new = make_pci_rig(EchoDevice(), mem=rig.mem)
    try:
        new.transport.restore_state(state)
        t = new.transport
        assert t.activation is not None and new.routes and new.bar_changes == [d.bar_base]
        assert t.config.state() == rig.transport.config.state()
        assert t.msix.pending(2) and t.config_msix_vector == 0 and t.queue_msix_vectors == [1, 2]
        new.driver.caps, new.driver.msix_cap = d.caps, d.msix_cap
        new.driver.notify_off_multiplier = 4
        new.alloc.next = rig.alloc.next
        new.driver.set_vector_mask(2, False)
        assert new.sent == [2]
        assert await echo(new, vq0, b"after") == b"after"
        assert new.sent == [2, 1]
        assert new.transport.save_state().queues[0].next_used == 2
    finally:
        new.transport.device.deactivate()
        new.close()


def _state_with(state: PciTransportState, **changes) -> PciTransportState:
    return msgspec.structs.replace(state, **changes)


async def test_restore_refuses_state_that_does_not_fit(rig):
    await rig.driver.init()
    good = rig.transport.save_state()
    control_at = rig.driver.msix_cap + m.PCI_MSIX_FLAGS
    space = bytearray(good.config_space)
    space[c.PCI_VENDOR_ID] ^= 1
    bad_states = [
        _state_with(good, device_type=4),
        _state_with(good, config_msix_vector=3),
        _state_with(good, queue_msix_vectors=[1]),
        _state_with(good, queue_msix_vectors=[1, 0x8000]),
        _state_with(good, isr=4),
        _state_with(good, queue_sel=1 << 16),
        _state_with(good, config_generation=256),
        _state_with(good, config_space=bytes(space)),
        _state_with(good, config_space=good.config_space[:256]),
        _state_with(good, msix=msgspec.structs.replace(good.msix, enabled=False)),
        _state_with(good, msix=msgspec.structs.replace(good.msix, table=good.msix.table[:2])),
    ]
    assert good.config_space[control_at + 1] & 0x80           # enabled: the MSI-X check is real
    rig.transport.device.deactivate()
    for bad in bad_states:
        fresh = make_pci_rig(EchoDevice(), mem=rig.mem)
        try:
            with pytest.raises(SnapshotStateError):
                fresh.transport.restore_state(bad)
            assert fresh.transport.activation is None and fresh.routes == [] and fresh.bar_changes == []
            assert fresh.transport.config.state() == make_pci_rig(EchoDevice()).transport.config.state()
        finally:
            fresh.close()


async def test_status_transitions_follow_the_shared_table(rig):
    d = rig.driver
    d.probe()
    d.common_write(p.VIRTIO_PCI_COMMON_STATUS, 1, DRIVER)            # skips ACKNOWLEDGE
    assert d.status == 0
    assert not d.negotiate(1 << 3)                                    # no VERSION_1
    assert d.status == ACKNOWLEDGE | DRIVER
    assert rig.metrics.virtio_pci_protocol == 2
    await settle()


async def test_a_used_notification_without_a_queue_signals_every_queue_vector_once(rig):
    await rig.driver.init()
    rig.transport.activation.interrupts.signal_used()
    assert sorted(rig.sent) == [1, 2]


async def test_a_reset_activation_raises_no_more_interrupts(rig):
    await rig.driver.init()
    act = rig.transport.activation
    await rig.driver.reset()
    act.interrupts.signal_used(0)
    act.interrupts.signal_config()
    act.interrupts.needs_reset("late")
    assert rig.sent == [] and rig.transport.isr == 0 and rig.driver.status == 0
