"""The base QueueHandler's effect mechanism: handle_chain decides, carry_out does it.

A scripted device: the first readable byte of each chain says what its
handler returns, so each test lays out chains and checks the used ring, the
interrupts and what the device's ``perform`` was asked to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from asyncvmm.devices.virtio.chain import collect
from asyncvmm.devices.virtio.device import VirtioDevice
from asyncvmm.devices.virtio.handler import Effect, QueueHandler, Stall, Used
from asyncvmm.devices.virtio.spec import VIRTIO_F_VERSION_1, bit
from tests.fakes.virtio_driver import Buf, settle
from tests.unit.devices.virtio.conftest import make_rig

DATA = 0x200000


@dataclass(frozen=True, slots=True)
class Io(Effect):
    tag: int


class ScriptedHandler(QueueHandler):
    def __init__(self, act, name):
        super().__init__(act, name)
        self.performed: list[int] = []
        self.backend_full = False
        self.deferred: list[int] = []

    def handle_chain(self, queue_index, chain):
        op = collect(chain).readable.read(self.mem)[:1]
        if op == b"U":
            return [Used(chain.head, 7)]
        if op == b"S":
            return [Stall("scripted")]
        if op == b"I":
            return [Io(chain.head), Used(chain.head, 1)]
        if op == b"D":                      # answered later, by complete()
            self.deferred.append(chain.head)
            return []
        if op == b"Y":                      # a synchronous backend completes inside the drain
            self.complete(queue_index, [Used(chain.head, 5)])
            return []
        if op == b"T":                      # a handler written before effects
            self.act.queues[queue_index].add_used(self.mem, chain.head, 9)
            return True
        return False                        # "F": the old way to stall

    def perform(self, queue_index, effect):
        if isinstance(effect, Io):
            if self.backend_full:
                return False
            self.performed.append(effect.tag)
            return True
        return super().perform(queue_index, effect)


class ScriptedDevice(VirtioDevice):
    device_type = 42
    queue_max_sizes = (16,)

    def __init__(self):
        super().__init__()
        self.handler = None

    @property
    def avail_features(self):
        return bit(VIRTIO_F_VERSION_1)

    def activate(self, act):
        self.handler = ScriptedHandler(act, "scripted")
        self.handler.start()

    def deactivate(self):
        if self.handler:
            self.handler.stop()
            self.handler = None


@pytest.fixture
async def rig():
    rig = make_rig(ScriptedDevice())
    yield rig
    rig.close()


def offer(rig, vq, ops: bytes) -> list[int]:
    heads = []
    for i, op in enumerate(ops):
        addr = DATA + 16 * len(vq.chain_descs)
        rig.mem.write(addr, bytes([op]))
        head = vq.add_chain([Buf(addr, 1)])
        vq.offer(head)
        heads.append(head)
    return heads


def handler(rig) -> ScriptedHandler:
    return rig.transport.device.handler


async def test_used_effects_are_carried_out_in_order_with_one_interrupt_per_batch(rig):
    vq, = await rig.driver.init()
    heads = offer(rig, vq, b"UUT")
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 3) == [(heads[0], 7), (heads[1], 7), (heads[2], 9)]
    assert rig.irq.count == 1


async def test_device_io_comes_before_used_and_a_full_backend_puts_the_chain_back(rig):
    vq, = await rig.driver.init()
    h = handler(rig)
    h.backend_full = True
    heads = offer(rig, vq, b"UI")
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 1) == [(heads[0], 7)]
    await settle()
    assert vq.take_used() == [] and h.performed == []          # not answered, not lost
    h.backend_full = False
    h.schedule(0)                                              # what a writable fd would do
    assert await rig.driver.wait_used(vq, 1) == [(heads[1], 1)]
    assert h.performed == [heads[1]]                           # carried out exactly once


async def test_stall_and_false_both_put_the_chain_back_and_stop_the_drain(rig):
    vq, = await rig.driver.init()
    offer(rig, vq, b"SU")
    rig.driver.kick(vq)
    await settle()
    assert vq.take_used() == []
    q = rig.transport.queues[0]
    assert q.next_avail == 0                                   # the stalled chain is next again
    # The same for a handler that answers False.
    rig.mem.write(DATA, b"F")
    handler(rig).schedule(0)
    await settle()
    assert vq.take_used() == [] and q.next_avail == 0


async def test_a_later_completion_answers_the_chain_and_notifies_once(rig):
    vq, = await rig.driver.init()
    heads = offer(rig, vq, b"DD")
    rig.driver.kick(vq)
    await settle()
    assert vq.take_used() == [] and rig.irq.count == 0
    h = handler(rig)
    h.complete(0, [Used(head, 3) for head in h.deferred])     # e.g. an I/O engine's batch
    assert vq.take_used() == [(heads[0], 3), (heads[1], 3)]
    assert rig.irq.count == 1


async def test_a_completion_inside_the_drain_joins_the_batch_interrupt(rig):
    vq, = await rig.driver.init()
    heads = offer(rig, vq, b"YYU")
    rig.driver.kick(vq)
    assert await rig.driver.wait_used(vq, 3) == [(heads[0], 5), (heads[1], 5), (heads[2], 7)]
    assert rig.irq.count == 1


async def test_an_effect_the_device_cannot_carry_out_needs_a_reset_not_a_crash(rig):
    vq, = await rig.driver.init()
    h = handler(rig)
    h.handle_chain = lambda index, chain: [object.__new__(Effect)]
    offer(rig, vq, b"U")
    rig.driver.kick(vq)
    await settle()
    assert h.stopped
    assert rig.transport.needs_reset                           # DEVICE_NEEDS_RESET (§2.1.2)
