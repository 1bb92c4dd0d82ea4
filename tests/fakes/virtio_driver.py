"""A fake virtio driver: the guest's half of virtio-mmio and split virtqueues.

It does what Linux's virtio_mmio and virtio_ring do, in guest memory that is
a ``bytearray``: walks a device through §3.1.1 *through the transport's
registers*, lays out descriptor tables and rings, offers chains, kicks the
queue's eventfd (as KVM's ioeventfd would) or writes QueueNotify, reads the
used ring and acknowledges interrupts.  It can also build what no honest
driver would: cycles, out-of-range indices and addresses, nested or
misaligned indirect tables, readable-after-writable chains, huge lengths,
avail indices that jump.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

from asyncvmm.devices.virtio import mmio as r
from asyncvmm.devices.virtio.spec import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from asyncvmm.memory import GuestMemory

_DESC = struct.Struct("<QIHH")


class Allocator:
    """A bump allocator of guest-physical memory for rings and buffers."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"fake guest out of memory allocating {size}")
        self.next = addr + size
        return addr


@dataclass
class Buf:
    """One buffer of a chain: ``addr``/``len`` in guest memory, device-writable or not."""

    addr: int
    len: int
    write: bool = False


class FakeVirtqueue:
    """The driver's side of one split virtqueue in guest memory."""

    def __init__(self, mem: GuestMemory, alloc: Allocator, index: int, size: int) -> None:
        self.mem = mem
        self.alloc = alloc
        self.index = index
        self.size = size
        self.desc = alloc.alloc(16 * size, 16)
        self.avail = alloc.alloc(6 + 2 * size, 2)
        self.used = alloc.alloc(6 + 8 * size, 4)
        for addr, n in ((self.desc, 16 * size), (self.avail, 6 + 2 * size), (self.used, 6 + 8 * size)):
            mem.fill(addr, n, 0)
        self.avail_idx = 0
        self.last_used = 0
        self.free = list(range(size))
        self.chain_descs: dict[int, list[int]] = {}

    # -- descriptors --------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(self.desc + 16 * index, _DESC.pack(addr, length, flags, nxt))

    def add_chain(self, bufs: list[Buf]) -> int:
        """Link ``bufs`` through free descriptors; returns the head (not yet offered)."""
        if len(bufs) > len(self.free):
            raise RuntimeError("no free descriptors")
        idxs = [self.free.pop(0) for _ in bufs]
        for i, (idx, b) in enumerate(zip(idxs, bufs)):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(idx, b.addr, b.len, flags, 0 if last else idxs[i + 1])
        self.chain_descs[idxs[0]] = idxs
        return idxs[0]

    def add_indirect_chain(self, bufs: list[Buf], direct: list[Buf] = ()) -> int:
        """``direct`` buffers in the ring, then one descriptor naming a table holding ``bufs``."""
        table = self.alloc.alloc(16 * len(bufs), 16)
        for i, b in enumerate(bufs):
            last = i == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(table + 16 * i, _DESC.pack(b.addr, b.len, flags, 0 if last else i + 1))
        idxs = [self.free.pop(0) for _ in range(len(direct) + 1)]
        for i, (idx, b) in enumerate(zip(idxs, direct)):
            flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | VIRTQ_DESC_F_NEXT
            self.write_desc(idx, b.addr, b.len, flags, idxs[i + 1])
        self.write_desc(idxs[-1], table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        self.chain_descs[idxs[0]] = idxs
        return idxs[0]

    def recycle(self, head: int) -> None:
        self.free.extend(self.chain_descs.pop(head, []))

    # -- available ring -----------------------------------------------------

    def offer(self, head: int) -> None:
        """Put ``head`` in the next avail slot and publish it (slot first, then idx)."""
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    # -- used ring ----------------------------------------------------------

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def take_used(self) -> list[tuple[int, int]]:
        """New used elements ``(id, len)`` since the last call; their descriptors are freed."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.last_used % self.size
            elem = self.used + 4 + 8 * slot
            out.append((self.mem.read_u32(elem), self.mem.read_u32(elem + 4)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        for head, _ in out:
            self.recycle(head)
        return out


class FakeDriver:
    """Drives one :class:`VirtioMmioTransport` as a guest driver would."""

    def __init__(self, transport, mem: GuestMemory, alloc: Allocator) -> None:
        self.t = transport
        self.mem = mem
        self.alloc = alloc
        self.queues: dict[int, FakeVirtqueue] = {}

    # -- registers ----------------------------------------------------------

    def read32(self, offset: int) -> int:
        return struct.unpack("<I", self.t.read(offset, 4))[0]

    def write32(self, offset: int, value: int) -> None:
        self.t.write(offset, struct.pack("<I", value & 0xFFFF_FFFF))

    @property
    def status(self) -> int:
        return self.read32(r.VIRTIO_MMIO_STATUS)

    def add_status(self, bits: int) -> None:
        self.write32(r.VIRTIO_MMIO_STATUS, self.status | bits)

    def device_features(self) -> int:
        self.write32(r.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.read32(r.VIRTIO_MMIO_DEVICE_FEATURES)
        self.write32(r.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read32(r.VIRTIO_MMIO_DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write32(r.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.write32(r.VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel))

    # -- §3.1.1 -------------------------------------------------------------

    def negotiate(self, features: int | None = None, *, mask: int = ~0) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; whether the device accepted."""
        assert self.read32(r.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
        assert self.read32(r.VIRTIO_MMIO_VERSION) == 2
        self.write32(r.VIRTIO_MMIO_STATUS, 0)
        self.add_status(ACKNOWLEDGE)
        self.add_status(DRIVER)
        if features is None:
            features = self.device_features() & mask
        self.write_features(features)
        self.add_status(FEATURES_OK)
        return bool(self.status & FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None) -> FakeVirtqueue:
        self.write32(r.VIRTIO_MMIO_QUEUE_SEL, index)
        assert self.read32(r.VIRTIO_MMIO_QUEUE_READY) == 0
        qmax = self.read32(r.VIRTIO_MMIO_QUEUE_NUM_MAX)
        assert qmax, f"queue {index} not available"
        vq = FakeVirtqueue(self.mem, self.alloc, index, size or qmax)
        self.write32(r.VIRTIO_MMIO_QUEUE_NUM, vq.size)
        for low, addr in ((r.VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc), (r.VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail),
                          (r.VIRTIO_MMIO_QUEUE_USED_LOW, vq.used)):
            self.write32(low, addr)
            self.write32(low + 4, addr >> 32)
        self.write32(r.VIRTIO_MMIO_QUEUE_READY, 1)
        self.queues[index] = vq
        return vq

    async def init(self, features: int | None = None, *, mask: int = ~0,
                   queue_sizes: dict[int, int] | None = None) -> list[FakeVirtqueue]:
        """The whole of §3.1.1, then let the loop run the activation."""
        if not self.negotiate(features, mask=mask):
            raise RuntimeError("device refused the features")
        nq = 0
        while True:
            self.write32(r.VIRTIO_MMIO_QUEUE_SEL, nq)
            if not self.read32(r.VIRTIO_MMIO_QUEUE_NUM_MAX):
                break
            nq += 1
        vqs = [self.setup_queue(i, (queue_sizes or {}).get(i)) for i in range(nq)]
        self.add_status(DRIVER_OK)
        await settle()
        return vqs

    async def reset(self) -> None:
        self.write32(r.VIRTIO_MMIO_STATUS, 0)
        await settle()

    # -- notifications ------------------------------------------------------

    def kick(self, vq: FakeVirtqueue, *, via_mmio: bool = False) -> None:
        if via_mmio:
            self.write32(r.VIRTIO_MMIO_QUEUE_NOTIFY, vq.index)
        else:
            self.t.queue_events[vq.index].write(1)      # what KVM's ioeventfd does

    def ack_interrupts(self) -> int:
        pending = self.read32(r.VIRTIO_MMIO_INTERRUPT_STATUS)
        if pending:
            self.write32(r.VIRTIO_MMIO_INTERRUPT_ACK, pending)
        return pending

    async def wait_used(self, vq: FakeVirtqueue, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
        return await wait_used(vq, count, timeout)


async def wait_used(vq: FakeVirtqueue, count: int, timeout: float = 10.0) -> list[tuple[int, int]]:
    """Collect ``count`` used elements, letting the loop (and I/O threads) run meanwhile."""
    got: list[tuple[int, int]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got.extend(vq.take_used())
        if len(got) >= count:
            return got
        if loop.time() > deadline:
            raise TimeoutError(f"{len(got)} of {count} used elements after {timeout}s")
        await asyncio.sleep(0 if len(got) == 0 else 0.0005)


async def settle(rounds: int = 5) -> None:
    """Let callbacks posted with call_soon(_threadsafe) run."""
    for _ in range(rounds):
        await asyncio.sleep(0)
