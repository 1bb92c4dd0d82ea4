"""virtio-net identity, features, config space, MAC, and the tap offloads from acked features."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest

from asyncvmm.guestfault import GuestFaults

from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.net import Net, random_mac
from asyncvmm.devices.virtio.net import header as h
from asyncvmm.devices.virtio.spec import (DRIVER_OK, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1,
                                          VIRTIO_ID_NET, bit)
from asyncvmm.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.conftest import make_rig
from tests.unit.devices.virtio.net.conftest import SocketTap, frame, make_net_rig


def test_identity_and_queues():
    dev = Net("eth0", SocketTap())
    assert dev.device_type == VIRTIO_ID_NET == 1
    assert dev.queue_max_sizes == (256, 256)


def test_offered_features():
    feats = Net("eth0", SocketTap()).avail_features
    for f in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, h.VIRTIO_NET_F_MAC, h.VIRTIO_NET_F_MRG_RXBUF,
              h.VIRTIO_NET_F_CSUM, h.VIRTIO_NET_F_GUEST_CSUM, h.VIRTIO_NET_F_GUEST_TSO4,
              h.VIRTIO_NET_F_GUEST_TSO6, h.VIRTIO_NET_F_GUEST_UFO, h.VIRTIO_NET_F_HOST_TSO4,
              h.VIRTIO_NET_F_HOST_TSO6, h.VIRTIO_NET_F_HOST_UFO):
        assert feats & bit(f), f
    assert not feats & bit(h.VIRTIO_NET_F_MTU)
    assert not feats & bit(h.VIRTIO_NET_F_STATUS)
    assert Net("eth0", SocketTap(), mtu=9000).avail_features & bit(h.VIRTIO_NET_F_MTU)


def test_config_space_layout():
    dev = Net("eth0", SocketTap(), guest_mac="AA:FC:00:00:00:01", mtu=1400)
    raw = dev.read_config(0, 12)
    mac, status, pairs, mtu = struct.unpack("<6sHHH", raw)
    assert mac == bytes.fromhex("aafc00000001")
    assert (status, pairs, mtu) == (h.VIRTIO_NET_S_LINK_UP, 1, 1400)
    # Byte-wise reads (what Linux's virtio_cread8 of the mac does) see the same bytes.
    assert b"".join(dev.read_config(i, 1) for i in range(6)) == mac
    assert dev.metrics.cfg_fails == 0
    assert dev.read_config(10, 4) == struct.pack("<H", 1400) + b"\0\0"
    assert dev.metrics.cfg_fails == 1


def test_generated_mac_is_unicast_and_locally_administered():
    for _ in range(64):
        mac = random_mac()
        assert len(mac) == 6 and mac[0] & 1 == 0 and mac[0] & 2 == 2
    dev = Net("eth0", SocketTap(), make_mac=lambda: b"\x02\x11\x22\x33\x44\x55")
    assert dev.read_config(0, 6) == b"\x02\x11\x22\x33\x44\x55"
    assert dev.mac_address == "02:11:22:33:44:55"
    assert not dev.guest_mac_configured


def test_bad_mtu_and_mac_are_refused():
    with pytest.raises(ValueError):
        Net("eth0", SocketTap(), mtu=67)
    with pytest.raises(ValueError):
        Net("eth0", SocketTap(), guest_mac="aa:bb:cc")


def test_driver_writes_to_mac_are_taken_others_refused():
    dev = Net("eth0", SocketTap(), guest_mac="aa:fc:00:00:00:01")
    dev.write_config(0, b"\x02\x00\x00\x00\x00\x07")
    assert dev.read_config(0, 6) == b"\x02\x00\x00\x00\x00\x07"
    assert dev.metrics.mac_address_updates == 1
    dev.write_config(6, b"\x00\x00")                 # status is read-only
    dev.write_config(4, b"\x01\x02\x03")             # straddles mac and status
    assert dev.metrics.cfg_fails == 2
    assert dev.read_config(0, 8) == b"\x02\x00\x00\x00\x00\x07\x01\x00"


@pytest.mark.parametrize("acked, expected", [
    ((), 0),
    ((h.VIRTIO_NET_F_GUEST_TSO4,), 0),                                    # no TSO without GUEST_CSUM
    ((h.VIRTIO_NET_F_GUEST_CSUM,), TUN_F_CSUM),
    ((h.VIRTIO_NET_F_GUEST_CSUM, h.VIRTIO_NET_F_GUEST_TSO4, h.VIRTIO_NET_F_GUEST_TSO6,
      h.VIRTIO_NET_F_GUEST_UFO), TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO),
])
async def test_tap_offload_follows_the_guest_features(acked, expected):
    features = bit(VIRTIO_F_VERSION_1)
    for f in acked:
        features |= bit(f)
    n = await make_net_rig(features=features)
    assert n.tap.offloads == [expected]
    assert n.dev.tap_offload == expected
    n.close()


class PickyTap(SocketTap):
    """A tap on a kernel that refuses UFO/ECN offload (EINVAL), or every offload."""

    def __init__(self, refuse_all: bool = False) -> None:
        super().__init__()
        self.refuse_all = refuse_all

    def set_offload(self, flags: int) -> None:
        if self.refuse_all or flags & (TUN_F_UFO | TUN_F_TSO_ECN):
            raise OSError(22, "Invalid argument")
        super().set_offload(flags)


async def test_offload_falls_back_without_ufo():
    n = await make_net_rig(tap=PickyTap())
    assert n.tap.offloads == [TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6]
    assert n.dev.handler is not None
    n.close()


async def test_a_tap_refusing_offloads_fails_activation_not_the_vmm():
    n = await make_net_rig(tap=PickyTap(refuse_all=True))
    assert n.dev.handler is None
    assert n.dev.metrics.activate_fails == 1
    assert n.needs_reset()
    n.close()


async def test_both_queues_must_be_ready():
    tap = SocketTap()
    dev = Net("eth0", tap)
    rig = make_rig(dev)
    assert rig.driver.negotiate()
    rig.driver.setup_queue(0)                       # the transmit queue is never set up
    rig.driver.add_status(DRIVER_OK)
    await settle()
    assert dev.handler is None and dev.metrics.activate_fails == 1
    assert rig.driver.read32(r.VIRTIO_MMIO_STATUS) & 64
    dev.close()
    tap.shutdown()
    rig.close()


async def test_reset_stops_reading_the_tap_and_reactivation_works():
    n = await make_net_rig(post=4)
    assert n.handler.reading
    await n.driver.reset()
    assert n.dev.handler is None
    # remove_reader answers whether a reader was still registered.
    assert not asyncio.get_running_loop().remove_reader(n.tap.fileno())
    n.rig.alloc.next = 0x1000
    n.rxq, n.txq = await n.driver.init()
    n.rx_bufs.clear()
    n.post_rx(2)
    n.tap.inject(frame(100))
    [(hdr, data)] = await n.wait_received(1)
    assert data == frame(100)
    n.close()


def test_a_flood_of_refused_config_writes_is_counted_and_the_log_stays_bounded(caplog):
    dev = Net("eth0", SocketTap(), guest_mac="aa:fc:00:00:00:01")
    dev.guest_faults = GuestFaults(burst=3)
    with caplog.at_level(logging.WARNING):
        for _ in range(5000):
            dev.write_config(6, b"\x00\x00")          # status is read-only
    assert dev.metrics.cfg_fails == 5000
    assert dev.guest_faults.metrics.virtio_config == 5000
    assert len([r for r in caplog.records if "refused a 2-byte config write" in r.getMessage()]) == 3
