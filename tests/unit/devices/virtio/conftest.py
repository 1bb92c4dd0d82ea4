"""Fixtures for virtio tests: bytearray guest memory and a device behind a real transport."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio.mmio import VirtioMmioTransport
from asyncvmm.memory import GuestMemory
from tests.fakes.irq import CountingIrqLine
from tests.fakes.virtio_driver import Allocator, FakeDriver

MEM_SIZE = 16 << 20


@dataclass
class Rig:
    mem: GuestMemory
    transport: VirtioMmioTransport
    driver: FakeDriver
    irq: CountingIrqLine
    alloc: Allocator

    def close(self) -> None:
        for evt in self.transport.queue_events:
            evt.close()


def make_rig(device, mem: GuestMemory | None = None, loop: asyncio.AbstractEventLoop | None = None) -> Rig:
    mem = mem or GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
    irq = CountingIrqLine()
    events = [EventFd() for _ in range(device.num_queues)]
    transport = VirtioMmioTransport(device, mem=mem, irq=irq, queue_events=events,
                                    loop=loop or asyncio.get_running_loop())
    alloc = Allocator(0x1000, mem.end)
    return Rig(mem, transport, FakeDriver(transport, mem, alloc), irq, alloc)


@pytest.fixture
def guest_mem() -> GuestMemory:
    return GuestMemory.from_buffers([(0, bytearray(MEM_SIZE))])
