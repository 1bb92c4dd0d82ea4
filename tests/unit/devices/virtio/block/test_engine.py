"""The file engines on their own: transfers into memoryviews, EOF, batching, the gate."""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from asyncvmm.devices.virtio.block.disk import BackingFile
from asyncvmm.devices.virtio.block.engine import (
    CANCELLED,
    AsyncEngine,
    IoKind,
    IoOp,
    SyncEngine,
    _advance,
    perform,
)
from asyncvmm.devices.virtio.block.uring import UringEngine, uring_available
from asyncvmm.devices.virtio.gate import DmaGate
from tests.conftest import require


@pytest.fixture
def fd(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(range(256)) * 16)        # 4 KiB
    fd = os.open(p, os.O_RDWR)
    yield fd
    os.close(fd)


def test_advance_skips_transferred_bytes():
    a, b, c = memoryview(bytearray(3)), memoryview(bytearray(4)), memoryview(bytearray(5))
    assert [len(x) for x in _advance([a, b, c], 0)] == [3, 4, 5]
    assert [len(x) for x in _advance([a, b, c], 5)] == [2, 5]
    assert _advance([a, b, c], 12) == []


def test_read_scatters_into_views(fd):
    x, y = bytearray(10), bytearray(6)
    n = perform(IoOp(IoKind.READ, fd, 250, [memoryview(x), memoryview(y)], 16))
    assert n == 16 and bytes(x + y) == bytes((250 + i) & 0xFF for i in range(16))


def test_write_gathers_from_views(fd):
    perform(IoOp(IoKind.WRITE, fd, 100, [memoryview(b"abc"), memoryview(b"de")], 5))
    assert os.pread(fd, 5, 100) == b"abcde"


def test_read_past_end_of_file_is_eio(fd):
    with pytest.raises(OSError) as info:
        perform(IoOp(IoKind.READ, fd, 4090, [memoryview(bytearray(16))], 16))
    assert info.value.errno == errno.EIO


def test_flush_calls_fdatasync_with_the_fd(fd):
    seen = []
    assert perform(IoOp(IoKind.FLUSH, fd, 0, [], 0), fdatasync=seen.append) == 0
    assert seen == [fd]


def test_sync_engine_completes_inline_and_reports_errors(fd):
    done = []
    eng = SyncEngine(DmaGate(), done.extend)
    eng.submit(IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(4))], 4))
    eng.submit(IoOp(IoKind.READ, -1, 0, [memoryview(bytearray(4))], 4))
    assert done[0][1] == 4 and isinstance(done[1][1], OSError)


def test_closed_gate_cancels(fd):
    gate = DmaGate()
    gate.close()
    done = []
    SyncEngine(gate, done.extend).submit(IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(4))], 4))
    assert done[0][1] is CANCELLED


async def test_async_engine_runs_ops_in_parallel_and_delivers_on_the_loop(fd):
    loop = asyncio.get_running_loop()
    batches = []
    eng = AsyncEngine(loop, DmaGate(), batches.append, workers=4, depth=8)
    bufs = [bytearray(256) for _ in range(8)]
    for i, buf in enumerate(bufs):
        eng.submit(IoOp(IoKind.READ, fd, i * 256, [memoryview(buf)], 256, token=i))
    assert eng.full
    while sum(len(b) for b in batches) < 8:
        await asyncio.sleep(0.001)
    assert eng.in_flight == 0 and not eng.full
    assert all(bytes(b) == bytes(range(256)) for b in bufs)
    assert sorted(op.token for batch in batches for op, _ in batch) == list(range(8))
    assert len(batches) <= 8
    eng.close()


def test_backing_file_closes_after_its_last_user(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(bytes(1000))
    f = BackingFile(str(p), read_only=True)
    assert f.capacity == 1                       # 1000 bytes: one whole sector
    fd = f.acquire()
    f.retire()
    os.fstat(fd)                                 # still open for the running op
    f.release()
    assert f.closed
    with pytest.raises(OSError):
        os.fstat(fd)


# -- io_uring -------------------------------------------------------------------

async def _uring(on_complete, gate=None, depth=8):
    require(uring_available(), "io_uring is not available on this host")
    return UringEngine(asyncio.get_running_loop(), gate or DmaGate(), on_complete, depth=depth)


async def _wait(batches, n):
    while sum(len(b) for b in batches) < n:
        await asyncio.sleep(0.001)
    return [x for b in batches for x in b]


async def test_uring_reads_writes_and_flushes(fd):
    batches = []
    eng = await _uring(batches.append)
    a, b = bytearray(100), bytearray(28)
    eng.submit(IoOp(IoKind.READ, fd, 1000, [memoryview(a), memoryview(b)], 128, token="r"))
    eng.submit(IoOp(IoKind.WRITE, fd, 0, [memoryview(bytearray(b"xyz"))], 3, token="w"))
    eng.submit(IoOp(IoKind.FLUSH, fd, 0, [], 0, token="f"))
    assert eng.in_flight == 3
    eng.flush()
    results = {op.token: res for op, res in await _wait(batches, 3)}
    assert results == {"r": 128, "w": 3, "f": 0}
    assert bytes(a + b) == bytes((1000 + i) & 0xFF for i in range(128))
    assert os.pread(fd, 3, 0) == b"xyz"
    assert eng.in_flight == 0
    eng.close()


async def test_uring_short_read_continues_then_hits_eof(fd):
    batches = []
    eng = await _uring(batches.append)
    buf = bytearray(8192)
    eng.submit(IoOp(IoKind.READ, fd, 0, [memoryview(buf)], 8192))   # the file has 4096 bytes
    eng.flush()
    [(op, res)] = await _wait(batches, 1)
    assert isinstance(res, OSError) and res.errno == errno.EIO
    assert bytes(buf[:4096]) == bytes(range(256)) * 16             # the first part did arrive
    eng.close()


async def test_uring_reports_kernel_errors(fd):
    batches = []
    eng = await _uring(batches.append)
    eng.submit(IoOp(IoKind.READ, 987654, 0, [memoryview(bytearray(8))], 8))   # not an fd
    eng.flush()
    [(op, res)] = await _wait(batches, 1)
    assert isinstance(res, OSError) and res.errno == errno.EBADF
    eng.close()


async def test_uring_depth_and_closed_gate(fd):
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate, depth=2)
    for i in range(2):
        eng.submit(IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(16))], 16))
    assert eng.full
    eng.close()                                    # waits for both: they write our buffers
    assert eng.in_flight == 0 and batches == []    # closed: results are not delivered
    gate.close()
    eng2 = await _uring(batches.append, gate)
    eng2.submit(IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(16))], 16))
    assert batches == [[(batches[0][0][0], CANCELLED)]]
    eng2.close()


async def test_uring_holds_the_gate_while_the_kernel_has_the_op(fd):
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate)
    eng.submit(IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(16))], 16))
    assert gate._inside == 1
    eng.flush()
    await _wait(batches, 1)
    assert gate._inside == 0
    eng.close()
