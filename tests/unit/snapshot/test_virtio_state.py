"""A virtio-mmio transport's snapshot state: the same guest memory restored into a new transport
continues the queues where they were; bad state is refused and changes nothing."""

from __future__ import annotations

import msgspec
import pytest

from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.mmio import SnapshotStateError, TransportState
from tests.fakes.virtio_driver import Buf
from tests.unit.devices.virtio.conftest import make_rig
from tests.unit.devices.virtio.test_mmio import EchoDevice


async def test_a_restored_transport_continues_the_queue():
    rig = make_rig(EchoDevice())
    d = rig.driver
    vq0, _ = await d.init()
    rig.mem.write(0x200000, b"one")
    vq0.offer(vq0.add_chain([Buf(0x200000, 3), Buf(0x300000, 3, True)]))
    d.kick(vq0)
    assert await d.wait_used(vq0, 1) == [(0, 3)]
    assert rig.transport.in_flight() == 0
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(rig.transport.save_state()), type=TransportState)
    assert state.queues[0].next_avail == 1 and state.queues[0].next_used == 1
    rig.close()

    # A new transport on the same memory (what a restored process has), then the driver goes on.
    rig.mem.write(0x300000, b"XXX")      # re-processing the first request would write "one" here
    new = make_rig(EchoDevice(), mem=rig.mem)
    new.transport.restore_state(state)
    assert new.transport.device.activations == 1
    assert new.transport.status & r.DRIVER_OK
    d.t = new.transport                  # the same driver state, now talking to the new window
    rig.mem.write(0x200100, b"two")
    vq0.offer(vq0.add_chain([Buf(0x200100, 3), Buf(0x300100, 3, True)]))
    d.kick(vq0)
    used = await d.wait_used(vq0, 1)
    assert used[0][1] == 3 and rig.mem.read(0x300100, 3) == b"two"
    assert rig.mem.read(0x300000, 3) == b"XXX"
    live = new.transport.activation.queues[0]
    assert (live.next_avail, live.next_used) == (2, 2)
    new.close()


@pytest.mark.parametrize("change,match", [
    ({"device_type": 1}, "device type"),
    ({"driver_features": 1 << 40}, "does not offer"),
    ({"status": 1 << 40}, "out of range"),
])
async def test_bad_transport_state_is_refused_and_changes_nothing(change, match):
    rig = make_rig(EchoDevice())
    await rig.driver.init()
    state = rig.transport.save_state()
    other = make_rig(EchoDevice(), mem=rig.mem)
    before = other.transport.save_state()
    with pytest.raises(SnapshotStateError, match=match):
        other.transport.restore_state(msgspec.structs.replace(state, **change))
    assert other.transport.save_state() == before and other.transport.device.activations == 0
    rig.close()
    other.close()


async def test_a_queue_outside_guest_memory_is_refused():
    rig = make_rig(EchoDevice())
    await rig.driver.init()
    state = rig.transport.save_state()
    queues = list(state.queues)
    queues[0] = msgspec.structs.replace(queues[0], desc_table=1 << 40)
    other = make_rig(EchoDevice(), mem=rig.mem)
    with pytest.raises(SnapshotStateError):
        other.transport.restore_state(msgspec.structs.replace(state, queues=queues))
    assert other.transport.device.activations == 0
    rig.close()
    other.close()
