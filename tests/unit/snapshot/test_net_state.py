"""virtio-net in a snapshot: receive buffers the device holds (popped for frames to come) are
given back, so a restored device takes them again and the next frame lands in the guest."""

from __future__ import annotations

from asyncvmm.devices.virtio.net import Net
from tests.fakes.virtio_driver import settle
from tests.unit.devices.virtio.conftest import make_rig
from tests.unit.devices.virtio.net.conftest import GUEST_MAC, NetRig, SocketTap, frame, make_net_rig


async def test_held_receive_buffers_are_given_back_and_taken_again():
    n = await make_net_rig(post=4)
    await settle()
    live = n.rig.transport.activation.queues[0]
    held = n.dev.held_chains(0)
    assert held >= 1 and live.next_avail - live.next_used == held
    assert n.rig.transport.in_flight() == 0
    state = n.rig.transport.save_state()
    assert state.queues[0].next_avail == (live.next_avail - held) & 0xFFFF
    n.dev.deactivate()          # the old process is gone

    tap = SocketTap()
    dev = Net("eth0", tap, guest_mac=GUEST_MAC)
    rig = make_rig(dev, mem=n.rig.mem)
    rig.transport.restore_state(state)
    restored = NetRig(rig, dev, tap, n.rxq, n.txq, rx_bufs=n.rx_bufs)
    rig.driver.queues = n.driver.queues
    tap.inject(frame(100, seq=7))
    got = await restored.wait_received(1)
    assert len(got[0][1]) == 100
    restored.close()
    n.tap.shutdown()
    n.rig.close()
