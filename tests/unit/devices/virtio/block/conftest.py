"""A virtio-block device on a real temp file behind a real transport, and its fake driver."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from asyncvmm.devices.virtio.block import Block
from asyncvmm.devices.virtio.block import request as rq
from asyncvmm.devices.virtio.block.uring import why_io_uring_unavailable
from asyncvmm.devices.virtio.spec import DEVICE_NEEDS_RESET
from tests.conftest import require
from tests.fakes.virtio_driver import Buf, FakeVirtqueue
from tests.unit.devices.virtio.block.helpers import header, lay_out
from tests.unit.devices.virtio.conftest import Rig, make_rig

SECTORS = 64
BUF_AREA = 0x400000          # request buffers live from here; rings below


def disk_bytes(sectors: int = SECTORS, seed: int = 0) -> bytes:
    return bytes((seed + i * 7 + (i >> 9)) & 0xFF for i in range(sectors * 512))


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(disk_bytes())
    return path


@dataclass
class BlockRig:
    rig: Rig
    dev: Block
    vq: FakeVirtqueue

    @property
    def driver(self):
        return self.rig.driver

    @property
    def mem(self):
        return self.rig.mem

    def needs_reset(self) -> bool:
        return bool(self.driver.status & DEVICE_NEEDS_RESET)

    def lay_out(self, readable: bytes, writable_len: int, rcuts=(), wcuts=()):
        # Requests are independent: reuse the buffer area unless some are still queued.
        if self.vq.avail_idx == self.vq.last_used:
            self.rig.alloc.next = BUF_AREA
        return lay_out(self.mem, self.rig.alloc, readable, writable_len, rcuts, wcuts)

    def offer(self, bufs: list[Buf], *, indirect: bool = False, kick: bool = True) -> int:
        head = self.vq.add_indirect_chain(bufs) if indirect else self.vq.add_chain(bufs)
        self.vq.offer(head)
        if kick:
            self.driver.kick(self.vq)
        return head

    async def request(self, req_type: int, sector: int = 0, *, data: bytes = b"", read_len: int = 0,
                      rcuts=(), wcuts=(), indirect: bool = False) -> tuple[int, bytes]:
        """One request; returns (used length, writable stream as the device left it)."""
        bufs, answer = self.lay_out(header(req_type, sector) + data, read_len + 1, rcuts, wcuts)
        head = self.offer(bufs, indirect=indirect)
        [(used_head, used_len)] = await self.driver.wait_used(self.vq, 1)
        assert used_head == head
        return used_len, answer.read(self.mem)

    async def read(self, sector: int, nbytes: int, **kw) -> tuple[int, bytes]:
        used, answer = await self.request(rq.VIRTIO_BLK_T_IN, sector, read_len=nbytes, **kw)
        return answer[-1], answer[:-1]

    async def write(self, sector: int, data: bytes, **kw) -> int:
        _, answer = await self.request(rq.VIRTIO_BLK_T_OUT, sector, data=data, **kw)
        return answer[-1]


async def make_block_rig(path, *, features_mask: int = ~0, **kw) -> BlockRig:
    kw.setdefault("read_only", False)
    dev = Block(kw.pop("drive_id", "disk0"), str(path), **kw)
    rig = make_rig(dev)
    [vq] = await rig.driver.init(mask=features_mask)
    return BlockRig(rig, dev, vq)


def require_io_uring() -> None:
    why = why_io_uring_unavailable()
    require(why is None, f"io_uring is not available on this host: {why}")


ENGINES = {"Sync": {"io_engine": "Sync"}, "Async": {"io_engine": "Async"}}     # Async: io_uring


@pytest.fixture(params=list(ENGINES))
async def blk(request, disk):
    if request.param == "Async":
        require_io_uring()
    b = await make_block_rig(disk, **ENGINES[request.param])
    yield b
    b.dev.close()
    b.rig.close()


@pytest.fixture
async def loop_errors():
    """Exceptions that reached the loop's handler: must stay empty."""
    errors = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield errors
    loop.set_exception_handler(None)
