"""vhost-net behind the real transports, with a fake /dev/vhost-net that records its ioctls.

The fake plays the kernel's part the tests can see: it keeps what it was
told, and its ``signal_call``/``signal_err`` write the eventfds the device
handed over, as the vhost worker would.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.vhost import net as vn
from asyncvmm.devices.vhost import structs as s
from asyncvmm.devices.vhost.fd import VhostError, VhostUnavailableError, check_vhost_net
from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.net.header import (VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                                                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC,
                                                VIRTIO_NET_F_MRG_RXBUF)
from asyncvmm.devices.virtio.pci import VirtioPciTransport
from asyncvmm.devices.virtio.spec import (DEVICE_NEEDS_RESET, DRIVER_OK, VIRTIO_F_EVENT_IDX,
                                          VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, bit)
from asyncvmm.guestfault import GuestFaultMetrics, GuestFaults
from asyncvmm.memory import GuestMemory
from asyncvmm.net.tap import TUN_F_CSUM, TUN_F_TSO4
from tests.fakes.virtio_driver import Allocator, settle
from tests.fakes.virtio_pci_driver import FakePciDriver
from tests.unit.devices.virtio.conftest import MEM_SIZE, make_rig
from tests.unit.devices.virtio.net.conftest import SocketTap

# What a 6.x kernel's VHOST_GET_FEATURES says (drivers/vhost/net.c VHOST_NET_FEATURES).
KERNEL = (bit(24) | bit(VIRTIO_F_INDIRECT_DESC) | bit(VIRTIO_F_EVENT_IDX) | bit(s.VHOST_F_LOG_ALL)
          | bit(s.VHOST_NET_F_VIRTIO_NET_HDR) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_F_VERSION_1)
          | bit(33))


class FakeVhost:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[tuple] = []
        self.features = None
        self.regions: list[s.vhost_memory_region] = []
        self.addrs: dict[int, s.vhost_vring_addr] = {}
        self.kick: dict[int, int] = {}
        self.call: dict[int, int] = {}
        self.err: dict[int, int] = {}
        self.backend: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.fail = fail
        self.closed = False

    def _record(self, name: str, *args) -> None:
        self.calls.append((name, *args))
        if name == self.fail:
            raise VhostError(22, name.upper())

    def set_features(self, features):
        self._record("set_features", features)
        self.features = features

    def set_mem_table(self, regions):
        self._record("set_mem_table", len(regions))
        self.regions = list(regions)

    def set_vring_num(self, index, num):
        self._record("set_vring_num", index, num)

    def set_vring_base(self, index, num):
        self._record("set_vring_base", index, num)
        self.base[index] = num

    def get_vring_base(self, index):
        self._record("get_vring_base", index)
        return self.base.get(index, 0)

    def set_vring_addr(self, addr):
        self._record("set_vring_addr", addr.index)
        self.addrs[addr.index] = addr

    def set_vring_kick(self, index, fd):
        self._record("set_vring_kick", index, fd)
        self.kick[index] = fd

    def set_vring_call(self, index, fd):
        self._record("set_vring_call", index, fd)
        self.call[index] = fd

    def set_vring_err(self, index, fd):
        self._record("set_vring_err", index, fd)
        self.err[index] = fd

    def net_set_backend(self, index, fd):
        self._record("net_set_backend", index, fd)
        self.backend[index] = fd

    def close(self):
        self.closed = True

    # -- the kernel's side ------------------------------------------------------

    def signal_call(self, index: int) -> None:
        EventFdView(self.call[index]).write()

    def signal_err(self, index: int) -> None:
        EventFdView(self.err[index]).write()


class EventFdView:
    """Writes an eventfd the fake does not own."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self) -> None:
        os.eventfd_write(self.fd, 1)


def make_device(kernel: int = KERNEL, fail: str | None = None):
    tap, vhost = SocketTap(), FakeVhost(fail)
    return vn.VhostNet("eth0", tap, vhost, kernel, guest_mac="aa:fc:00:00:00:01"), tap, vhost


async def wait_for(predicate, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


# -- features and the plan (pure) --------------------------------------------------

def test_offered_features_drop_only_the_kernel_bits_the_kernel_lacks():
    net = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_NET_F_MRG_RXBUF)
           | bit(VIRTIO_NET_F_MAC))
    assert vn.offered_features(net, KERNEL) == net
    no_event_idx = KERNEL & ~bit(VIRTIO_F_EVENT_IDX)
    assert vn.offered_features(net, no_event_idx) == net & ~bit(VIRTIO_F_EVENT_IDX)
    # The tap's offloads are not the kernel's business: they stay whatever vhost says.
    assert vn.offered_features(bit(VIRTIO_NET_F_CSUM), 0) == bit(VIRTIO_NET_F_CSUM)


def test_vhost_gets_the_drivers_choice_of_its_own_bits_only():
    acked = (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_NET_F_MAC)
             | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF))
    got = vn.vhost_features(acked, KERNEL)
    assert got == bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_EVENT_IDX) | bit(VIRTIO_NET_F_MRG_RXBUF)
    # Never the header in the kernel (the tap keeps it) nor dirty logging.
    assert not got & (bit(s.VHOST_NET_F_VIRTIO_NET_HDR) | bit(s.VHOST_F_LOG_ALL))


def test_memory_table_and_ring_addresses_are_this_process_addresses():
    mem = GuestMemory.from_buffers([(0, bytearray(1 << 20)), (0x1_0000_0000, bytearray(1 << 20))])
    low, high = mem.regions
    table = vn.memory_regions(mem)
    assert [(t.guest_phys_addr, t.memory_size, t.userspace_addr) for t in table] == [
        (0, 1 << 20, low.host_addr), (0x1_0000_0000, 1 << 20, high.host_addr)]
    assert vn.host_address(mem, 0x1_0000_0100, 16) == high.host_addr + 0x100
    with pytest.raises(ValueError):
        vn.host_address(mem, (1 << 20) - 8, 16)          # runs off the first region


def test_a_missing_dev_vhost_net_says_what_to_load(tmp_path):
    with pytest.raises(VhostUnavailableError, match="modprobe vhost_net"):
        check_vhost_net(str(tmp_path / "vhost-net"))


# -- virtio-mmio: the call eventfd goes through the loop -----------------------------

async def test_activation_hands_the_rings_to_the_kernel_and_reset_takes_them_back():
    dev, tap, vhost = make_device()
    rig = make_rig(dev)
    try:
        offered = rig.driver.device_features()
        assert offered & bit(VIRTIO_F_EVENT_IDX) and offered & bit(VIRTIO_NET_F_GUEST_TSO4)
        rx, tx = await rig.driver.init(offered & ~bit(VIRTIO_F_INDIRECT_DESC))
        assert vhost.features == vn.vhost_features(offered & ~bit(VIRTIO_F_INDIRECT_DESC), KERNEL)
        assert [(t.guest_phys_addr, t.userspace_addr) for t in vhost.regions] == [
            (0, rig.mem.regions[0].host_addr)]
        base = rig.mem.regions[0].host_addr
        for vq in (rx, tx):
            a = vhost.addrs[vq.index]
            assert (a.desc_user_addr, a.avail_user_addr, a.used_user_addr) == (
                base + vq.desc, base + vq.avail, base + vq.used)
            assert vhost.kick[vq.index] == rig.transport.queue_events[vq.index].fd
            assert vhost.backend[vq.index] == tap.fileno()
        assert ("set_vring_num", 0, rx.size) in vhost.calls
        # The backend starts last, after every queue is set up.
        assert [c[0] for c in vhost.calls[-2:]] == ["net_set_backend", "net_set_backend"]
        assert tap.offloads[-1] & (TUN_F_CSUM | TUN_F_TSO4) == TUN_F_CSUM | TUN_F_TSO4

        vhost.base = {0: 7, 1: 3}
        await rig.driver.reset()
        assert vhost.backend == {0: s.VHOST_FILE_UNBIND, 1: s.VHOST_FILE_UNBIND}
        assert dev.vring_bases == [7, 3]
        assert vhost.kick == {0: -1, 1: -1} and vhost.call == {0: -1, 1: -1}
        # Stopped before the bases were read.
        names = [c[:2] for c in vhost.calls]
        assert names.index(("net_set_backend", 0)) < names.index(("get_vring_base", 0))
    finally:
        dev.close()
        rig.close()
    assert vhost.closed and tap.closed


async def test_a_kernel_call_on_mmio_sets_interrupt_status_and_triggers_the_line():
    dev, _, vhost = make_device()
    rig = make_rig(dev)
    try:
        await rig.driver.init()
        assert vhost.call[1] not in (e.fd for e in rig.transport.queue_events)
        before = rig.irq.count
        vhost.signal_call(1)
        await wait_for(lambda: rig.irq.count > before, "the irq line")
        assert rig.driver.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS) & r.VIRTIO_MMIO_INT_VRING
    finally:
        dev.close()
        rig.close()


async def test_a_kernel_error_on_a_ring_needs_reset():
    dev, _, vhost = make_device()
    rig = make_rig(dev)
    try:
        await rig.driver.init()
        vhost.signal_err(0)
        await wait_for(lambda: rig.driver.status & DEVICE_NEEDS_RESET, "DEVICE_NEEDS_RESET")
        assert dev.metrics.event_fails == 1
    finally:
        dev.close()
        rig.close()


@pytest.mark.parametrize("fail", ["set_mem_table", "set_vring_addr", "net_set_backend"])
async def test_a_vhost_failure_at_activation_needs_reset_and_leaves_nothing_running(fail):
    dev, _, vhost = make_device(fail=fail)
    rig = make_rig(dev)
    try:
        await rig.driver.init()
        assert rig.driver.status & DEVICE_NEEDS_RESET
        assert dev.metrics.activate_fails == 1
        assert all(fd == s.VHOST_FILE_UNBIND for fd in vhost.backend.values())
        assert dev._own_fds == []
    finally:
        dev.close()
        rig.close()


async def test_rate_limiter_updates_are_refused():
    dev, _, _ = make_device()
    with pytest.raises(ValueError, match="no rate limiters"):
        dev.update_rate_limiters(None, None)
    dev.close()


# -- virtio-pci: the call fd is the vector's irqfd ------------------------------------

async def test_on_pci_the_call_fd_is_the_queue_vectors_irqfd_unless_masked():
    dev, _, vhost = make_device()
    mem = GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
    vector_fds = [EventFd() for _ in range(dev.num_queues + 1)]
    sent: list[int] = []
    transport = VirtioPciTransport(
        dev, mem=mem, queue_events=[EventFd() for _ in range(dev.num_queues)],
        loop=asyncio.get_running_loop(), faults=GuestFaults(GuestFaultMetrics()), deliver=sent.append,
        on_route_change=lambda v: None, on_bar_change=lambda: None, vector_eventfd=vector_fds.__getitem__)
    driver = FakePciDriver(transport, mem, Allocator(0x1000, mem.end))
    try:
        await driver.init()                    # vector 0: config; queue i: vector i + 1
        assert vhost.call == {0: vector_fds[1].fd, 1: vector_fds[2].fd}
        # Start again with queue 1's vector masked: its notifications must take the loop,
        # where Msix keeps them pending until the guest unmasks the vector.
        await driver.reset()
        driver.set_vector_mask(2, True)
        assert driver.negotiate()
        assert driver.set_config_vector(0) == 0
        for i in range(2):
            driver.setup_queue(i, vector=i + 1)
            driver.enable_queue(i)
        driver.add_status(DRIVER_OK)
        await settle()
        assert vhost.call[0] == vector_fds[1].fd
        assert vhost.call[1] not in (e.fd for e in vector_fds)
        vhost.signal_call(1)
        await wait_for(lambda: transport.msix.pending(2), "queue 1's pending bit")
        assert sent == []
        driver.set_vector_mask(2, False)
        assert sent == [2]
    finally:
        dev.close()
        for e in transport.queue_events + vector_fds:
            e.close()
