"""The Python data path's own cost per request, in process, without KVM.

The block and net benchmarks time whole VMs on a shared machine, where a
round's rate moves several-fold with the load; this one isolates what the
VMM's Python code costs per request so that a change to it can be measured
in seconds.  A virtio-block or virtio-net device runs behind the real
virtio-mmio transport on its own asyncio loop (uvloop, as the VMM), driven
by the fake guest driver of the unit tests (``tests/fakes/virtio_driver``):
descriptors laid out once, chains re-offered as they come back, kicks on the
queue's eventfd only when EVENT_IDX's ``avail_event`` asks for one.

Workloads (``--workloads``; each repeated ``--repeats`` times, medians):

* ``block-sync-qd1`` / ``block-sync-qd32`` / ``block-async-qd1`` /
  ``block-async-qd32``: 4 KiB random reads from a cached file (Sync or
  io_uring engine), 1 or 32 in flight;
* ``net-tx``: 1514-byte frames the guest transmits (a socket stands in for
  the tap, as in the unit tests), 64 per kick;
* ``net-tx-small``: 106-byte frames the guest transmits one per kick, each
  waited for (a ping's reply, a small-packet stream at a low rate);
* ``net-rx``: 1514-byte frames the host sends, into 2 KiB receive buffers;
* ``net-rx-small``: 106-byte frames (a 64-byte UDP datagram, what the net
  benchmark's small-packet runs carry) sent one at a time, each waited for:
  every frame pays the loop's whole wake-up, as one packet in flight at a
  time does (a request and its answer);
* ``net-rx-gso``: 64 KiB TCP segmentation-offload frames (what a tap with
  TSO on hands over in a bulk host-to-guest transfer) into 4 KiB mergeable
  receive buffers, 16 per frame, as Linux's virtio-net driver posts them;
* ``net-tx-gso``: 64 KiB TSO frames the guest transmits, each a chain of
  17 descriptors (the virtio header, then 4 KiB pieces, as a Linux sk_buff's
  fragments are laid out).

Per workload: ``device_us`` (CPU time inside the device's loop callbacks:
queue kicks, engine completions, tap readiness, per request), ``process_us``
(CPU time of the whole process per request, the fake driver included) and
``interrupts`` (irqfd edges per request).  ``--profile`` prints cProfile's
top functions for each workload instead.  Nothing is written to
``benchmarks/results/``: the numbers are for comparing two builds on one
machine, and docs/benchmarks.md quotes them with the commit.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.virtio.block import Block
from asyncvmm.devices.virtio.handler import QueueHandler
from asyncvmm.devices.virtio.mmio import VirtioMmioTransport
from asyncvmm.devices.virtio.queue import vring_need_event
from asyncvmm.devices.virtio.spec import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from asyncvmm.memory import GuestMemory
from tests.fakes.irq import CountingIrqLine
from tests.fakes.virtio_driver import Allocator, FakeDriver, settle

MEM = 64 << 20
BUF_BASE = 16 << 20
DISK_BYTES = 64 << 20
BLOCK = 4096
_DESC = struct.Struct("<QIHH")
_HDR = struct.Struct("<IIQ")

WORKLOADS = ("block-sync-qd1", "block-sync-qd32", "block-async-qd1", "block-async-qd32",
             "net-tx", "net-tx-small", "net-rx", "net-rx-small", "net-rx-gso", "net-tx-gso")


class DeviceClock:
    """Time spent inside the device's loop callbacks (patched onto the handler classes)."""

    def __init__(self) -> None:
        self.ns = 0
        self._patched: list[tuple[type, str, object]] = []

    def wrap(self, cls: type, name: str) -> None:
        orig = getattr(cls, name)
        clock = self

        def timed(*args, **kw):
            t0 = time.thread_time_ns()
            try:
                return orig(*args, **kw)
            finally:
                clock.ns += time.thread_time_ns() - t0
        setattr(cls, name, timed)
        self._patched.append((cls, name, orig))

    def restore(self) -> None:
        for cls, name, orig in reversed(self._patched):
            setattr(cls, name, orig)
        self._patched.clear()


def _rig(device):
    mem = GuestMemory.anonymous([(0, MEM)])
    irq = CountingIrqLine()
    events = [EventFd() for _ in range(device.num_queues)]
    transport = VirtioMmioTransport(device, mem=mem, irq=irq, queue_events=events,
                                    loop=asyncio.get_running_loop())
    driver = FakeDriver(transport, mem, Allocator(0x1000, BUF_BASE))
    return mem, irq, transport, driver


class Ring:
    """The guest side of one queue, fast enough not to dominate what is measured."""

    def __init__(self, mem: GuestMemory, vq, driver: FakeDriver) -> None:
        self.vq, self.driver = vq, driver
        self.avail = mem.view(vq.avail, 6 + 2 * vq.size)
        self.used = mem.view(vq.used, 6 + 8 * vq.size)
        self.desc = mem.view(vq.desc, 16 * vq.size)
        self.size = vq.size
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_at = 0

    def offer(self, heads) -> None:
        for head in heads:
            struct.pack_into("<H", self.avail, 4 + 2 * (self.avail_idx % self.size), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        struct.pack_into("<H", self.avail, 2, self.avail_idx)
        struct.pack_into("<H", self.avail, 4 + 2 * self.size, self.last_used)   # used_event
        event = struct.unpack_from("<H", self.used, 4 + 8 * self.size)[0]      # avail_event
        if vring_need_event(event, self.avail_idx, self.kicked_at):
            self.driver.kick(self.vq)
        self.kicked_at = self.avail_idx

    def take_used(self) -> list[int]:
        idx = struct.unpack_from("<H", self.used, 2)[0]
        heads = []
        while self.last_used != idx:
            heads.append(struct.unpack_from("<I", self.used, 4 + 8 * (self.last_used % self.size))[0])
            self.last_used = (self.last_used + 1) & 0xFFFF
        struct.pack_into("<H", self.avail, 4 + 2 * self.size, self.last_used)
        return heads


async def _until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    spins = 0
    while not cond():
        spins += 1
        if spins % 64 == 0 and time.monotonic() > deadline:
            raise TimeoutError("the device stopped answering")
        await asyncio.sleep(0)


async def run_block(engine: str, depth: int, count: int, disk: Path) -> dict:
    clock = DeviceClock()
    _patch(clock)                 # before the device exists: its loop readers bind the methods
    dev = Block("bench", str(disk), read_only=True, io_engine=engine)
    mem, irq, transport, driver = _rig(dev)
    [vq] = await driver.init()
    ring = Ring(mem, vq, driver)
    blocks = DISK_BYTES // BLOCK
    rng = random.Random(1)
    hdr_base = BUF_BASE - 0x10000
    for slot in range(depth):
        hdr, data, status = hdr_base + 16 * slot, BUF_BASE + BLOCK * slot, hdr_base + 0x8000 + slot
        head = 3 * slot
        _DESC.pack_into(ring.desc, 16 * head, hdr, 16, VIRTQ_DESC_F_NEXT, head + 1)
        _DESC.pack_into(ring.desc, 16 * (head + 1), data, BLOCK, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, head + 2)
        _DESC.pack_into(ring.desc, 16 * (head + 2), status, 1, VIRTQ_DESC_F_WRITE, 0)

    def issue(slot: int) -> int:
        mem.write(hdr_base + 16 * slot, _HDR.pack(0, 0, rng.randrange(blocks) * (BLOCK // 512)))
        return 3 * slot

    issued = done = 0
    first = [issue(s) for s in range(min(depth, count))]
    issued = len(first)
    clock.ns, cpu0, irq0 = 0, time.process_time(), irq.count
    try:
        ring.offer(first)
        while done < count:
            await _until(lambda: struct.unpack_from("<H", ring.used, 2)[0] != ring.last_used)
            heads = ring.take_used()
            done += len(heads)
            again = []
            for head in heads:
                if issued < count:
                    again.append(issue(head // 3))
                    issued += 1
            if again:
                ring.offer(again)
            transport.interrupt_status = 0          # the guest's ACK, so every batch may interrupt
        result = _result(clock, cpu0, irq.count - irq0, count)
        assert dev.metrics.read_count >= count and dev.metrics.execute_fails == 0
        dev.close()
    finally:
        clock.restore()
    return result


def _patch(clock: DeviceClock) -> None:
    from asyncvmm.devices.virtio.block.uring import UringEngine
    from asyncvmm.devices.virtio.net.handler import NetHandler
    clock.wrap(QueueHandler, "_on_queue_event")
    clock.wrap(QueueHandler, "_scheduled_process")
    clock.wrap(UringEngine, "_on_event")
    clock.wrap(NetHandler, "_on_tap_readable")
    clock.wrap(NetHandler, "_on_tap_writable")


def _result(clock: DeviceClock, cpu0: float, interrupts: int, count: int) -> dict:
    return {"device_us": clock.ns / 1e3 / count,
            "process_us": (time.process_time() - cpu0) * 1e6 / count,
            "interrupts": interrupts / count}


def _lay_out_tx(mem: GuestMemory, tx: "Ring", payload: bytes, *, split: bool) -> list[int]:
    """Write ``payload`` into a chain per free slot of the TX queue; the chains' heads.

    ``split``: the 12-byte header, then the frame in 4 KiB pieces, a descriptor each (a
    Linux sk_buff's fragments); else the whole payload in one descriptor.
    """
    if not split:
        for head in range(tx.size):
            addr = BUF_BASE + 2048 * head
            mem.write(addr, payload)
            _DESC.pack_into(tx.desc, 16 * head, addr, len(payload), 0, 0)
        return list(range(tx.size))
    from asyncvmm.devices.virtio.net.header import VNET_HDR_SIZE
    pieces = [payload[:VNET_HDR_SIZE]] + [payload[i:i + 4096] for i in range(VNET_HDR_SIZE, len(payload), 4096)]
    per_chain = len(pieces)
    heads = []
    for n in range(tx.size // per_chain):
        head, addr = n * per_chain, BUF_BASE + (128 << 10) * n
        for i, piece in enumerate(pieces):
            mem.write(addr, piece)
            last = i == per_chain - 1
            _DESC.pack_into(tx.desc, 16 * (head + i), addr, len(piece),
                            0 if last else VIRTQ_DESC_F_NEXT, 0 if last else head + i + 1)
            addr += len(piece)
        heads.append(head)
    return heads


async def run_net(direction: str, count: int) -> dict:
    clock = DeviceClock()
    _patch(clock)
    try:
        return await _run_net(direction, count, clock)
    finally:
        clock.restore()


async def _run_net(direction: str, count: int, clock: DeviceClock) -> dict:
    from tests.unit.devices.virtio.net.conftest import SocketTap, frame
    from asyncvmm.devices.virtio.net import Net
    from asyncvmm.devices.virtio.net.header import VNET_HDR_SIZE

    done = 0
    tap = SocketTap(sndbuf=1 << 22)
    dev = Net("eth0", tap, guest_mac="aa:fc:00:00:00:01")
    mem, irq, transport, driver = _rig(dev)
    rxq, txq = await driver.init()
    rx, tx = Ring(mem, rxq, driver), Ring(mem, txq, driver)
    payload = bytes(VNET_HDR_SIZE) + frame(1514)
    batch, buf_size, chains_per_frame = 64, 2048, 1
    if direction.endswith("-small"):
        payload, batch = bytes(VNET_HDR_SIZE) + frame(106), 1
    if direction.endswith("-gso"):
        # gso_type TCPV4 (1), gso_size 1448: the tap's header for a 64 KiB TSO segment.
        payload = struct.pack("<BBHHHH", 0, 1, 54, 1448, 0, 0) + bytes(2) + frame(65160)
        batch, buf_size = 8, 4096
        chains_per_frame = -(-len(payload) // buf_size)
    if direction.startswith("tx"):
        free = _lay_out_tx(mem, tx, payload, split=direction == "tx-gso")
        clock.ns, cpu0, irq0 = 0, time.process_time(), irq.count
        while done < count:
            heads, free = free[:batch], free[batch:]
            tx.offer(heads)
            await _until(lambda: struct.unpack_from("<H", tx.used, 2)[0] != tx.last_used)
            back = tx.take_used()
            free += back
            done += len(back)
            while tap.sent():
                pass
            transport.interrupt_status = 0
    else:
        for head in range(rxq.size):
            _DESC.pack_into(rx.desc, 16 * head, BUF_BASE + buf_size * head, buf_size, VIRTQ_DESC_F_WRITE, 0)
        rx.offer(range(rxq.size))
        await settle()
        clock.ns, cpu0, irq0 = 0, time.process_time(), irq.count
        while done < count:
            for _ in range(batch):
                tap.peer.send(payload)
            await _until(lambda: struct.unpack_from("<H", rx.used, 2)[0] != rx.last_used)
            while done < count:
                back = rx.take_used()
                done += len(back) / chains_per_frame
                rx.offer(back)
                if struct.unpack_from("<H", rx.used, 2)[0] == rx.last_used:
                    await asyncio.sleep(0)
                    if struct.unpack_from("<H", rx.used, 2)[0] == rx.last_used:
                        break
            transport.interrupt_status = 0
    assert dev.metrics.rx_fails == 0
    result = _result(clock, cpu0, irq.count - irq0, done)
    dev.close()
    tap.shutdown()
    return result


def _disk() -> Path:
    path = Path(tempfile.gettempdir()) / f"asyncvmm-pypath-{DISK_BYTES >> 20}MiB.img"
    if not path.exists() or path.stat().st_size != DISK_BYTES:
        path.write_bytes(os.urandom(DISK_BYTES))
    with open(path, "rb") as f:                      # warm the page cache
        while f.read(1 << 20):
            pass
    return path


async def run_workload(name: str, count: int, disk: Path) -> dict:
    if name.startswith("block-"):
        _, engine, qd = name.split("-")
        return await run_block("Sync" if engine == "sync" else "Async", int(qd[2:]), count, disk)
    return await run_net(name.split("-", 1)[1], count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--count", type=int, default=4000, help="requests per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions instead")
    args = p.parse_args(argv)
    import uvloop
    disk = _disk()
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"unknown workload {name}")
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            uvloop.run(run_workload(name, args.count, disk))
            prof.disable()
            print(f"== {name}: {args.count} requests")
            pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
            continue
        runs = [uvloop.run(run_workload(name, args.count, disk)) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{name:18s} device {med['device_us']:7.2f} us/req   process {med['process_us']:7.2f} us/req"
              f"   interrupts {med['interrupts']:.3f}/req   (median of {len(runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
