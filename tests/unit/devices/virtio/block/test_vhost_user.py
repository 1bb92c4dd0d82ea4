"""VhostUserBlock behind a real virtio-mmio transport, its back end a fake over a Unix socket.

What the back end receives at activation (features, the memory table with the
memfd, ring addresses as this process's addresses, the kick and call fds) is
checked message by message; the fds are checked by using them.  Then the back
end dies or talks nonsense mid-run: the VMM lives on, logs it once, the
device needs a reset and answers new requests with an I/O error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

import pytest

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.vhost_user import protocol as p
from asyncvmm.devices.vhost_user.protocol import Request
from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.block.device import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO
from asyncvmm.devices.virtio.block.vhost_user import (VhostUserBlock, VhostUserBlockError,
                                                      VhostUserBlockMetrics)
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.queue import Queue
from asyncvmm.devices.virtio.spec import (DEVICE_NEEDS_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                          VIRTIO_F_VERSION_1, bit)
from asyncvmm.memory import GuestMemory
from tests.fakes.vhost_user_backend import FakeBackend
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.block.helpers import header
from tests.unit.devices.virtio.conftest import MEM_SIZE, make_rig

PROTO = bit(p.VHOST_USER_F_PROTOCOL_FEATURES)
BACKEND_FEATURES = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC)
                    | bit(VIRTIO_BLK_F_FLUSH) | PROTO | bit(2) | bit(6))
BACKEND_PROTOCOL = (bit(p.VHOST_USER_PROTOCOL_F_CONFIG) | bit(p.VHOST_USER_PROTOCOL_F_REPLY_ACK)
                    | bit(p.VHOST_USER_PROTOCOL_F_MQ))
CONFIG = struct.pack("<Q", 2048) + bytes(52)          # capacity 2048 sectors


@pytest.fixture
def backend(tmp_path):
    made = []

    def start(**kw) -> tuple[FakeBackend, str]:
        kw.setdefault("features", BACKEND_FEATURES)
        kw.setdefault("protocol_features", BACKEND_PROTOCOL)
        kw.setdefault("config", CONFIG)
        b = FakeBackend(**kw)
        path = str(tmp_path / f"vu{len(made)}.sock")
        b.listen(path)
        made.append(b)
        return b, path

    yield start
    for b in made:
        b.hang_up() if b.sock is not None else None
        b.join()
        b.close()


def shared_mem() -> GuestMemory:
    return GuestMemory.memfd([(0, MEM_SIZE)])


async def wait_for(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def offer_read(rig, vq, sector: int = 0):
    """A one-sector read; returns (head, status byte address)."""
    hdr = rig.alloc.alloc(16)
    rig.mem.write(hdr, header(rq.VIRTIO_BLK_T_IN, sector))
    data = rig.alloc.alloc(512)
    status = rig.alloc.alloc(1)
    rig.mem.write(status, b"\xee")
    from tests.fakes.virtio_driver import Buf
    head = vq.add_chain([Buf(hdr, 16), Buf(data, 512, True), Buf(status, 1, True)])
    vq.offer(head)
    return head, status


def test_a_socket_with_no_back_end_is_refused_with_firecrackers_words(tmp_path):
    with pytest.raises(VhostUserBlockError) as e:
        VhostUserBlock("vu", str(tmp_path / "none.sock"))
    assert str(e.value) == ("Vhost-user error: Failed to connect to UDS Unix stream: "
                            "No such file or directory (os error 2)")


def test_construction_negotiates_and_reads_the_config(backend):
    b, path = backend()
    dev = VhostUserBlock("vu", path)
    try:
        assert b.requests()[:4] == [Request.VHOST_USER_SET_OWNER, Request.VHOST_USER_GET_FEATURES,
                                    Request.VHOST_USER_GET_PROTOCOL_FEATURES,
                                    Request.VHOST_USER_SET_PROTOCOL_FEATURES]
        asked = struct.unpack("<Q", b.last(Request.VHOST_USER_SET_PROTOCOL_FEATURES).payload)[0]
        assert asked == bit(p.VHOST_USER_PROTOCOL_F_CONFIG) | bit(p.VHOST_USER_PROTOCOL_F_REPLY_ACK)
        # Firecracker's set: no INDIRECT_DESC, no FLUSH with Unsafe, nothing else of the back end's.
        assert dev.avail_features == bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX)
        assert not dev.read_only
        assert dev.read_config(0, 8) == struct.pack("<Q", 2048)
        assert len(dev._config) == 60
    finally:
        dev.close()


def test_writeback_asks_for_flush_and_a_read_only_back_end_is_read_only(backend):
    b, path = backend(features=BACKEND_FEATURES | bit(VIRTIO_BLK_F_RO))
    dev = VhostUserBlock("vu", path, cache_type="Writeback")
    try:
        assert dev.avail_features & bit(VIRTIO_BLK_F_FLUSH)
        assert dev.read_only and dev.avail_features & bit(VIRTIO_BLK_F_RO)
    finally:
        dev.close()


async def test_activation_hands_the_back_end_memory_rings_and_fds(backend):
    b, path = backend()
    dev = VhostUserBlock("vu", path)
    mem = shared_mem()
    rig = make_rig(dev, mem=mem)
    try:
        [vq] = await rig.driver.init()
        region = mem.regions[0]
        assert b.requests()[4] == Request.VHOST_USER_GET_CONFIG
        order = b.requests()[5:]
        assert order == [Request.VHOST_USER_SET_FEATURES, Request.VHOST_USER_SET_MEM_TABLE,
                         Request.VHOST_USER_SET_VRING_NUM, Request.VHOST_USER_SET_VRING_ADDR,
                         Request.VHOST_USER_SET_VRING_BASE, Request.VHOST_USER_SET_VRING_KICK,
                         Request.VHOST_USER_SET_VRING_CALL, Request.VHOST_USER_SET_VRING_ENABLE]
        # REPLY_ACK: every one asked for its ack (the fake acks), so activation knew it worked.
        assert all(m.flags & p.VHOST_USER_NEED_REPLY_MASK for m in b.got[5:])
        features = struct.unpack("<Q", b.last(Request.VHOST_USER_SET_FEATURES).payload)[0]
        assert features == bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | PROTO
        mt = b.last(Request.VHOST_USER_SET_MEM_TABLE)
        assert mt.payload == p.memory_table([p.MemoryRegion(0, MEM_SIZE, region.host_addr, 0)])
        assert os.fstat(mt.fds[0]).st_ino == os.fstat(region.shared_fd).st_ino
        assert b.last(Request.VHOST_USER_SET_VRING_NUM).payload == p.vring_state(0, 256)
        assert b.last(Request.VHOST_USER_SET_VRING_ADDR).payload == p.vring_addr(p.VringAddr(
            0, 0, region.host_addr + vq.desc, region.host_addr + vq.used, region.host_addr + vq.avail))
        assert b.last(Request.VHOST_USER_SET_VRING_BASE).payload == p.vring_state(0, 0)
        assert b.last(Request.VHOST_USER_SET_VRING_ENABLE).payload == p.vring_state(0, 1)
        # The kick fd is the queue's notification eventfd (KVM's ioeventfd in a VM).
        rig.driver.write32(r.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        assert os.eventfd_read(b.last(Request.VHOST_USER_SET_VRING_KICK).fds[0]) == 1
        # virtio-mmio: a call goes through the loop, InterruptStatus first, then the interrupt.
        os.eventfd_write(b.last(Request.VHOST_USER_SET_VRING_CALL).fds[0], 1)
        await wait_for(lambda: rig.irq.count == 1)
        assert rig.driver.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) == r.VIRTIO_MMIO_INT_VRING
        assert dev.metrics.activate_time_us > 0 and dev.metrics.init_time_us > 0
        # A reset stops the ring in the back end before the status write completes.
        await rig.driver.reset()
        assert b.requests()[-1] == Request.VHOST_USER_GET_VRING_BASE
    finally:
        dev.close()
        rig.close()


async def test_with_a_transport_irqfd_the_back_end_signals_it_directly(backend):
    """virtio-pci: the call fd is the queue's MSI-X irqfd; nothing of ours is in the path."""
    b, path = backend()
    dev = VhostUserBlock("vu", path)
    mem = shared_mem()
    irqfd = EventFd()
    relayed = []

    class PciInterrupts:
        def irqfd(self, queue):
            return irqfd

        def signal_used(self, queue=None):
            relayed.append(queue)

        def signal_config(self):
            pass

        def needs_reset(self, reason):
            pass

    queue = Queue(max_size=256, size=256, ready=True, desc_table=0x1000, avail_ring=0x3000,
                  used_ring=0x4000)
    kick = EventFd()
    act = Activation(mem=mem, queues=[queue], queue_events=[kick], acked_features=bit(VIRTIO_F_VERSION_1),
                     interrupts=PciInterrupts(), loop=asyncio.get_running_loop())
    try:
        dev.activate(act)
        call = b.last(Request.VHOST_USER_SET_VRING_CALL).fds[0]
        assert os.fstat(call).st_ino == os.fstat(irqfd.fd).st_ino
        os.eventfd_write(call, 1)
        await settle()
        assert irqfd.read() == 1 and relayed == []
    finally:
        dev.close()
        mem.close()
        irqfd.close()
        kick.close()


async def test_memory_that_is_not_shareable_fails_the_activation(backend):
    b, path = backend()
    dev = VhostUserBlock("vu", path, metrics=VhostUserBlockMetrics())
    rig = make_rig(dev)          # a bytearray: no memfd
    try:
        await rig.driver.init()
        assert rig.driver.status & DEVICE_NEEDS_RESET
        assert dev.metrics.activate_fails == 1
    finally:
        dev.close()
        rig.close()


@pytest.mark.parametrize("how", ["hang up", "garbage"])
async def test_a_back_end_lost_mid_run_costs_the_guest_errors_not_the_vmm(backend, caplog, how):
    b, path = backend()
    dev = VhostUserBlock("vu", path)
    rig = make_rig(dev, mem=shared_mem())
    try:
        [vq] = await rig.driver.init()
        taken, _ = offer_read(rig, vq)                   # the back end "has" this one
        if how == "hang up":
            b.hang_up()
        else:
            b.sock.sendall(b"\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00")
        caplog.set_level(logging.ERROR)
        await wait_for(lambda: dev.lost is not None)
        assert rig.driver.status & DEVICE_NEEDS_RESET
        lines = [rec for rec in caplog.records if "lost the back end" in rec.getMessage()]
        assert len(lines) == 1 and path in lines[0].getMessage()
        # A request made now is answered with an I/O error; the one the back end took is lost.
        head, status = offer_read(rig, vq)
        rig.driver.kick(vq)
        used = await rig.driver.wait_used(vq, 1)
        assert used == [(head, 1)] and head != taken
        assert rig.mem.read(status, 1) == bytes([rq.VIRTIO_BLK_S_IOERR])
        assert dev.metrics.backend_failures == 1 and dev.metrics.failed_reqs_count == 1
        # After the guest's reset and a new activation the drive still answers errors, no hang.
        [vq] = await rig.driver.init()
        head, status = offer_read(rig, vq)
        rig.driver.kick(vq)
        assert await rig.driver.wait_used(vq, 1) == [(head, 1)]
        assert rig.mem.read(status, 1) == bytes([rq.VIRTIO_BLK_S_IOERR])
        assert len([rec for rec in caplog.records if "lost the back end" in rec.getMessage()]) == 1
    finally:
        dev.close()
        rig.close()


async def test_a_back_end_that_refuses_the_memory_table_is_dropped_and_the_guest_gets_errors(backend):
    b, path = backend()
    b.refuse = Request.VHOST_USER_SET_MEM_TABLE
    dev = VhostUserBlock("vu", path)
    rig = make_rig(dev, mem=shared_mem())
    try:
        [vq] = await rig.driver.init()
        assert rig.driver.status & DEVICE_NEEDS_RESET
        assert dev.metrics.activate_fails == 1 and "Set mem table failed" in dev.lost
        head, status = offer_read(rig, vq)
        rig.driver.kick(vq)
        assert await rig.driver.wait_used(vq, 1) == [(head, 1)]
        assert rig.mem.read(status, 1) == bytes([rq.VIRTIO_BLK_S_IOERR])
    finally:
        dev.close()
        rig.close()


async def test_config_update_reads_the_back_ends_config_again_and_interrupts(backend):
    b, path = backend()
    dev = VhostUserBlock("vu", path)
    rig = make_rig(dev, mem=shared_mem())
    try:
        await rig.driver.init()
        b.config = struct.pack("<Q", 4096) + bytes(52)
        generation = rig.driver.read32(r.VIRTIO_MMIO_CONFIG_GENERATION)
        dev.config_update()
        assert rig.driver.read32(r.VIRTIO_MMIO_CONFIG + 0) == 4096
        assert rig.driver.read32(r.VIRTIO_MMIO_CONFIG_GENERATION) != generation
        assert rig.driver.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) & r.VIRTIO_MMIO_INT_CONFIG
    finally:
        dev.close()
        rig.close()
