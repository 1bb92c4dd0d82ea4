"""virtio-mem: the request parser, the block/slot state machine, and the device driven by the
fake driver through virtio-mmio, including requests no honest driver sends."""

from __future__ import annotations

import asyncio
import os
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncvmm.devices.virtio.mem import VirtioMem, VirtioMemError
from asyncvmm.devices.virtio.mem.backing import HotplugBacking
from asyncvmm.devices.virtio.mem.handler import Release, SlotChange
from asyncvmm.devices.virtio.mem.protocol import (
    CONFIG,
    RESP,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
    Request,
    RequestError,
    parse_request,
    response,
)
from asyncvmm.devices.virtio.mmio import VIRTIO_MMIO_INT_CONFIG
from asyncvmm.devices.virtio.spec import VIRTIO_F_VERSION_1, bit
from asyncvmm.memory import GuestMemory, GuestMemoryError
from tests.fakes.virtio_driver import Allocator, Buf, FakeDriver, FakeVirtqueue, wait_used
from tests.unit.devices.virtio.conftest import MEM_SIZE, make_rig

MiB = 1 << 20
ADDR = 1 << 30                     # the region, well above the fake guest's 16 MiB of RAM
TOTAL_MIB, SLOT_MIB, BLOCK_MIB = 512, 128, 2
BLOCK = BLOCK_MIB * MiB
CONFIG_BASE = 0x100


class Slots:
    """Records what KVM would be told: slot index -> (guest address, size)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.present: dict[int, int] = {}

    def __call__(self, index: int, gpa: int, size: int, host_addr: int) -> None:
        self.calls.append((index, gpa, size))
        if size:
            self.present[index] = gpa
        else:
            self.present.pop(index, None)


def make_device(mem: GuestMemory | None = None) -> tuple[VirtioMem, HotplugBacking, Slots]:
    slots = Slots()
    backing = HotplugBacking(ADDR, TOTAL_MIB * MiB, SLOT_MIB * MiB, slots)
    dev = VirtioMem(addr=ADDR, total_size_mib=TOTAL_MIB, block_size_mib=BLOCK_MIB, slot_size_mib=SLOT_MIB,
                    backing=backing)
    backing.region.accessible = dev.accessible
    if mem is not None:
        mem.add_hotplug_region(backing.region)
    return dev, backing, slots


# -- the wire format --------------------------------------------------------------------------

def test_request_parser_reads_the_spec_layout() -> None:
    raw = struct.pack("<HHHHQHHHH", VIRTIO_MEM_REQ_PLUG, 0, 0, 0, ADDR, 7, 0, 0, 0)
    assert parse_request(raw) == Request(VIRTIO_MEM_REQ_PLUG, ADDR, 7)
    assert parse_request(raw + b"extra") == Request(VIRTIO_MEM_REQ_PLUG, ADDR, 7)
    assert parse_request(Request(VIRTIO_MEM_REQ_STATE, 4096, 3).pack()) == Request(VIRTIO_MEM_REQ_STATE, 4096, 3)
    # UNPLUG_ALL carries no range: whatever the union holds is ignored.
    raw_all = struct.pack("<HHHHQHHHH", VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0, 0, 123, 9, 0, 0, 0)
    assert parse_request(raw_all) == Request(VIRTIO_MEM_REQ_UNPLUG_ALL)
    assert parse_request(struct.pack("<H22x", 77)).type == 77          # unknown types reach the device
    for short in (b"", b"\0" * 23):
        with pytest.raises(RequestError):
            parse_request(short)
    assert response(VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED) == struct.pack("<HHHHH", 0, 0, 0, 0, 2)
    assert CONFIG.size == 56 and RESP.size == 10


# -- the state machine without a transport ------------------------------------------------------

def active(dev: VirtioMem, requested_mib: int) -> VirtioMem:
    """As if a driver had activated it (``handler`` set), with a requested size."""
    dev.handler = object()            # type: ignore[assignment]
    dev.update_requested_size(requested_mib)
    return dev


def test_requested_size_rules_and_messages() -> None:
    dev, backing, _ = make_device()
    with pytest.raises(VirtioMemError, match="^Device is not active$"):
        dev.update_requested_size(128)
    active(dev, 0)
    for mib in (3, TOTAL_MIB + 2):
        with pytest.raises(VirtioMemError) as err:
            dev.update_requested_size(mib)
        assert str(err.value) == (f"Size {mib * MiB} is invalid: it must be a multiple of block size and "
                                  "less than the total size")
    dev.update_requested_size(130)
    # usable_region_size grows to whole slots and never shrinks here.
    assert (dev.requested_size, dev.usable_region_size) == (130 * MiB, 256 * MiB)
    dev.update_requested_size(2)
    assert (dev.requested_size, dev.usable_region_size) == (2 * MiB, 256 * MiB)
    assert dev.status() == {"block_size_mib": 2, "total_size_mib": 512, "slot_size_mib": 128,
                            "plugged_size_mib": 0, "requested_size_mib": 2}
    backing.close()


def test_plug_unplug_effects_and_slots() -> None:
    dev, backing, _ = make_device()
    active(dev, 256)
    kind, _, effects = dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR + 126 * MiB, 2))
    # Two blocks straddling slots 0 and 1: both slots become KVM slots, before the ACK.
    assert kind == VIRTIO_MEM_RESP_ACK and effects == [SlotChange(0, True), SlotChange(1, True)]
    assert dev.plugged_size == 4 * MiB and dev.status()["plugged_size_mib"] == 4
    kind, _, effects = dev.handle_request(Request(VIRTIO_MEM_REQ_UNPLUG, ADDR + 128 * MiB, 1))
    assert kind == VIRTIO_MEM_RESP_ACK
    assert effects == [SlotChange(1, False), Release(128 * MiB, BLOCK)]   # slot out first
    kind, _, effects = dev.handle_request(Request(VIRTIO_MEM_REQ_UNPLUG_ALL))
    assert kind == VIRTIO_MEM_RESP_ACK and effects == [SlotChange(0, False), Release(0, TOTAL_MIB * MiB)]
    assert dev.plugged_size == 0 and dev.usable_region_size == 256 * MiB
    dev.update_requested_size(0)
    dev.handle_request(Request(VIRTIO_MEM_REQ_UNPLUG_ALL))
    assert dev.usable_region_size == 0           # UNPLUG_ALL may shrink it to what is requested
    m = dev.metrics
    assert (m.plug_count, m.plug_bytes, m.unplug_count, m.unplug_bytes, m.unplug_all_count) == (1, 4 * MiB, 1,
                                                                                                2 * MiB, 2)
    backing.close()


@pytest.mark.parametrize("req,expected", [
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR + 4096, 1), VIRTIO_MEM_RESP_ERROR),               # unaligned
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR, 0), VIRTIO_MEM_RESP_ERROR),                      # no blocks
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR - BLOCK, 1), VIRTIO_MEM_RESP_ERROR),              # below the region
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR + 128 * MiB, 1), VIRTIO_MEM_RESP_ERROR),          # past usable
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR + 126 * MiB, 2), VIRTIO_MEM_RESP_ERROR),          # runs past usable
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR + 1024 * MiB, 1), VIRTIO_MEM_RESP_ERROR),         # outside the region
    (Request(VIRTIO_MEM_REQ_PLUG, 2**64 - BLOCK, 0xFFFF), VIRTIO_MEM_RESP_ERROR),        # wraps
    (Request(VIRTIO_MEM_REQ_PLUG, ADDR, 9), VIRTIO_MEM_RESP_NACK),                       # beyond requested
    (Request(VIRTIO_MEM_REQ_UNPLUG, ADDR + 2 * BLOCK, 1), VIRTIO_MEM_RESP_ERROR),         # not plugged
    (Request(VIRTIO_MEM_REQ_UNPLUG, ADDR, 2), VIRTIO_MEM_RESP_ERROR),                    # partly plugged
    (Request(VIRTIO_MEM_REQ_STATE, ADDR + 1, 1), VIRTIO_MEM_RESP_ERROR),
    (Request(VIRTIO_MEM_REQ_STATE, ADDR, 64), VIRTIO_MEM_RESP_ACK),
    (Request(99, ADDR, 1), VIRTIO_MEM_RESP_ERROR),                                        # unknown type
])
def test_hostile_requests_are_refused_and_change_nothing(req: Request, expected: int) -> None:
    dev, backing, _ = make_device()
    active(dev, 16)                                   # 8 blocks may be plugged, usable = 128 MiB
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR, 1))[0] == VIRTIO_MEM_RESP_ACK
    before = (bytes(dev.plugged), dev.plugged_size, list(dev.slot_present), dev._config)
    kind, _, effects = dev.handle_request(req)
    assert kind == expected and effects == []
    assert (bytes(dev.plugged), dev.plugged_size, list(dev.slot_present), dev._config) == before
    backing.close()


def test_plugging_plugged_blocks_is_an_error() -> None:
    dev, backing, _ = make_device()
    active(dev, 16)
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR + BLOCK, 2))[0] == VIRTIO_MEM_RESP_ACK
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR, 2))[0] == VIRTIO_MEM_RESP_ERROR
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_STATE, ADDR, 2))[1] == VIRTIO_MEM_STATE_MIXED
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_STATE, ADDR + BLOCK, 2))[1] == VIRTIO_MEM_STATE_PLUGGED
    assert dev.handle_request(Request(VIRTIO_MEM_REQ_STATE, ADDR + 3 * BLOCK, 5))[1] == VIRTIO_MEM_STATE_UNPLUGGED
    assert dev.metrics.plug_fails == 1
    backing.close()


_REQUESTS = st.builds(
    Request,
    st.sampled_from([VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_UNPLUG_ALL,
                     VIRTIO_MEM_REQ_STATE, 7]),
    st.one_of(st.integers(ADDR - 4 * BLOCK, ADDR + (TOTAL_MIB + 8) * MiB).map(lambda a: a & ~0xFFF),
              st.integers(0, 2**64 - 1)),
    st.integers(0, 0xFFFF),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_REQUESTS, st.integers(0, TOTAL_MIB // BLOCK_MIB).map(lambda n: n * BLOCK_MIB)),
                max_size=40))
def test_any_request_sequence_keeps_the_books_straight(steps) -> None:
    dev, backing, slots = make_device()
    active(dev, 0)
    per_slot = SLOT_MIB // BLOCK_MIB
    for step in steps:
        if isinstance(step, int):
            dev.update_requested_size(step)
            continue
        kind, _, effects = dev.handle_request(step)
        for effect in effects:
            if isinstance(effect, SlotChange):
                backing.set_slot(effect.index, effect.present)
        assert kind in (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_NACK, VIRTIO_MEM_RESP_ERROR)
        assert dev.plugged_size == sum(dev.plugged) * BLOCK
        assert set(dev.plugged) <= {0, 1}
        assert dev.plugged_size <= dev.usable_region_size <= dev.region_size
        for slot, present in enumerate(dev.slot_present):
            assert present == any(dev.plugged[slot * per_slot:(slot + 1) * per_slot])
            assert (slot in slots.present) == present
        config = CONFIG.unpack(dev._config)
        assert config[5] == dev.plugged_size and config[4] == dev.usable_region_size
    backing.close()


# -- through the transport, driven by the fake driver -----------------------------------------

@pytest.fixture
async def rig():
    made = []

    async def make(*, features: int | None = None):
        mem = GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
        dev, backing, slots = make_device(mem)
        r = make_rig(dev, mem=mem)
        vqs = await r.driver.init(features)
        made.append((r, dev, backing))
        return r, dev, backing, slots, vqs
    yield make
    for r, dev, backing in made:
        dev.deactivate()
        r.close()
        backing.close()


async def send(r, vq: FakeVirtqueue, req: Request | bytes, *, resp_len: int = RESP.size) -> tuple[int, bytes]:
    """One request chain; ``(used length, response bytes)``."""
    raw = req.pack() if isinstance(req, Request) else req
    req_addr = r.alloc.alloc(max(len(raw), 1))
    r.mem.write(req_addr, raw)
    resp_addr = r.alloc.alloc(max(resp_len, 1))
    bufs = [Buf(req_addr, len(raw))] if raw else []
    if resp_len:
        bufs.append(Buf(resp_addr, resp_len, write=True))
    vq.offer(vq.add_chain(bufs))
    r.driver.kick(vq)
    (_, length), = await wait_used(vq, 1)
    return length, r.mem.read(resp_addr, resp_len) if resp_len else b""


def config_fields(r) -> tuple[int, ...]:
    raw = b"".join(r.transport.read(CONFIG_BASE + off, 8) for off in range(0, CONFIG.size, 8))
    return CONFIG.unpack(raw)


async def test_identity_config_space_and_features(rig) -> None:
    r, dev, _, _, _ = await rig()
    assert VirtioMem.device_type == VIRTIO_ID_MEM == 24 and dev.num_queues == 1
    assert dev.avail_features == bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    assert config_fields(r) == (BLOCK, 0, ADDR, TOTAL_MIB * MiB, 0, 0, 0)
    r.transport.write(CONFIG_BASE + 48, b"\xff" * 8)                      # read-only for the driver
    assert config_fields(r)[6] == 0


async def test_a_driver_without_unplugged_inaccessible_is_not_activated(rig) -> None:
    r, dev, _, _, _ = await rig(features=bit(VIRTIO_F_VERSION_1))
    assert dev.handler is None and dev.metrics.activate_fails == 1
    with pytest.raises(VirtioMemError, match="Device is not active"):
        dev.update_requested_size(2)


async def test_plug_use_and_unplug_through_the_queue(rig) -> None:
    r, dev, backing, slots, (vq,) = await rig()
    r.driver.ack_interrupts()
    dev.update_requested_size(8)
    assert r.driver.ack_interrupts() & VIRTIO_MMIO_INT_CONFIG                   # told by a config change
    assert config_fields(r)[4:] == (SLOT_MIB * MiB, 0, 8 * MiB)

    length, resp = await send(r, vq, Request(VIRTIO_MEM_REQ_PLUG, ADDR, 4))
    assert (length, resp) == (RESP.size, response(VIRTIO_MEM_RESP_ACK))
    assert slots.present == {0: ADDR} and config_fields(r)[5] == 8 * MiB

    # The guest may put anything in plugged memory, rings included; the VMM accepts those
    # accesses and refuses the unplugged block next to them.
    r.mem.write(ADDR + 4096, b"guest data")
    assert r.mem.read(ADDR + 4096, 10) == b"guest data"
    with pytest.raises(GuestMemoryError, match="unplugged"):
        r.mem.read(ADDR + 4 * BLOCK - 4, 8)
    ring_alloc = Allocator(ADDR + BLOCK, ADDR + 2 * BLOCK)
    FakeVirtqueue(r.mem, ring_alloc, 0, 16)                                    # lays itself out there

    length, resp = await send(r, vq, Request(VIRTIO_MEM_REQ_PLUG, ADDR + 4 * BLOCK, 1))
    assert resp == response(VIRTIO_MEM_RESP_NACK)                              # past requested_size
    length, resp = await send(r, vq, Request(VIRTIO_MEM_REQ_STATE, ADDR, 8))
    assert resp == response(VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)

    length, resp = await send(r, vq, Request(VIRTIO_MEM_REQ_UNPLUG, ADDR, 4))
    assert resp == response(VIRTIO_MEM_RESP_ACK) and slots.present == {}
    with pytest.raises(GuestMemoryError):
        r.mem.read(ADDR + 4096, 10)
    # Released to the host: plugged again, the block reads zeros (MADV_DONTNEED, anonymous).
    await send(r, vq, Request(VIRTIO_MEM_REQ_PLUG, ADDR, 1))
    assert r.mem.read(ADDR + 4096, 10) == bytes(10)
    assert dev.status()["plugged_size_mib"] == 2


async def test_malformed_chains_are_answered_without_a_response(rig) -> None:
    r, dev, _, _, (vq,) = await rig()
    dev.update_requested_size(8)
    fails = dev.metrics.queue_event_fails
    assert (await send(r, vq, b"\0" * 23))[0] == 0                             # short request
    assert (await send(r, vq, Request(VIRTIO_MEM_REQ_PLUG, ADDR, 1), resp_len=9))[0] == 0
    assert (await send(r, vq, Request(VIRTIO_MEM_REQ_PLUG, ADDR, 1), resp_len=0))[0] == 0
    assert (await send(r, vq, b""))[0] == 0                                    # only a response buffer
    assert dev.metrics.queue_event_fails == fails + 4 and dev.plugged_size == 0
    # A request whose response buffer lies in unplugged hotplug memory is not answered there.
    req_addr = r.alloc.alloc(24)
    r.mem.write(req_addr, Request(VIRTIO_MEM_REQ_PLUG, ADDR, 1).pack())
    vq.offer(vq.add_chain([Buf(req_addr, 24), Buf(ADDR + 8 * BLOCK, RESP.size, write=True)]))
    r.driver.kick(vq)
    await asyncio.sleep(0.05)
    assert dev.plugged_size == 0
    # The device still answers honest requests (or was marked for reset, never crashed the loop).
    assert dev.handler is not None


# -- snapshots -------------------------------------------------------------------------------

def test_state_round_trip_brings_blocks_and_slots_back() -> None:
    dev, backing, _ = make_device()
    active(dev, 300)
    dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR, 3))
    dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR + 256 * MiB, 2))
    state = dev.save_state(file_offset=16 * MiB)
    assert state.plugged == [(0, 3), (128, 2)] and state.file_offset == 16 * MiB
    assert state.usable_region_size == 384 * MiB and state.requested_size == 300 * MiB
    fresh, fresh_backing, _ = make_device()
    effects = fresh.restore_state(state)
    assert effects == [SlotChange(0, True), SlotChange(2, True)]
    assert fresh.status() == dev.status() and fresh._config == dev._config
    assert fresh.accessible(0, 3 * BLOCK) and not fresh.accessible(3 * BLOCK, 1)
    backing.close()
    fresh_backing.close()


@pytest.mark.parametrize("change", [
    {"addr": ADDR + 128 * MiB}, {"block_size": 4 * MiB}, {"slot_size": 256 * MiB},
    {"usable_region_size": 100 * MiB}, {"usable_region_size": 1024 * MiB},
    {"requested_size": 3 * MiB}, {"requested_size": 1024 * MiB},
    {"plugged": [(2, 1), (0, 1)]}, {"plugged": [(0, 0)]}, {"plugged": [(60, 10)]}, {"plugged": [(-1, 2)]},
])
def test_a_bad_state_is_refused_and_changes_nothing(change: dict) -> None:
    dev, backing, _ = make_device()
    active(dev, 16)
    good = dev.save_state(file_offset=0)
    bad = msgspec.structs.replace(good, **change)
    fresh, fresh_backing, _ = make_device()
    before = fresh._config
    with pytest.raises(ValueError):
        fresh.restore_state(bad)
    assert fresh._config == before and fresh.plugged_size == 0
    backing.close()
    fresh_backing.close()


def test_memory_file_holds_plugged_blocks_and_a_restore_maps_them(tmp_path) -> None:
    mem = GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
    dev, backing, _ = make_device(mem)
    active(dev, 8)
    dev.handle_request(Request(VIRTIO_MEM_REQ_PLUG, ADDR + BLOCK, 2))
    mem.write(ADDR + BLOCK + 5, b"kept")
    path = tmp_path / "mem"
    path.write_bytes(b"r" * MEM_SIZE)                   # boot RAM comes first in the file
    backing.write_file(str(path), MEM_SIZE, dev.plugged_runs(), BLOCK)
    assert path.stat().st_size == MEM_SIZE + TOTAL_MIB * MiB
    with open(path, "rb") as f:
        f.seek(MEM_SIZE + BLOCK + 5)
        assert f.read(4) == b"kept"
    fd = os.open(path, os.O_RDONLY)
    try:
        slots = Slots()
        restored = HotplugBacking(ADDR, TOTAL_MIB * MiB, SLOT_MIB * MiB, slots, file=(fd, MEM_SIZE))
    finally:
        os.close(fd)                                    # the private mapping keeps the file
    view = restored.region.view
    assert bytes(view[BLOCK + 5:BLOCK + 9]) == b"kept"
    view[BLOCK:BLOCK + 4] = b"COW!"                     # copy-on-write: the file is not written
    with open(path, "rb") as f:
        f.seek(MEM_SIZE + BLOCK)
        assert f.read(4) == bytes(4)
    # Released blocks read zeros afterwards, not the file's pages.
    restored.release(BLOCK, BLOCK)
    assert bytes(view[BLOCK + 5:BLOCK + 9]) == bytes(4)
    restored.close()
    backing.close()
