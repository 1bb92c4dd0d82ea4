"""The file engines on their own: transfers into memoryviews, EOF, batching, the gate."""

from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest

from asyncvmm.devices.virtio.block.disk import BackingFile
from asyncvmm.devices.virtio.block.engine import (
    CANCELLED,
    IoKind,
    IoOp,
    SyncEngine,
    _advance,
    perform,
)
from asyncvmm.devices.virtio.block.uring import UringEngine
from asyncvmm.devices.virtio.gate import DmaGate
from tests.unit.devices.virtio.block.conftest import require_io_uring

DEADLINE_S = 10.0          # a completion that has not come by then never will


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


def test_sync_engine_returns_every_result_and_reports_errors(fd):
    eng = SyncEngine(DmaGate())
    done = eng.submit([IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(4))], 4),
                       IoOp(IoKind.READ, -1, 0, [memoryview(bytearray(4))], 4)])
    assert done[0][1] == 4 and isinstance(done[1][1], OSError)
    assert eng.in_flight == 0 and eng.room > 0


def test_closed_gate_cancels(fd):
    gate = DmaGate()
    gate.close()
    [(_, result)] = SyncEngine(gate).submit([IoOp(IoKind.READ, fd, 0, [memoryview(bytearray(4))], 4)])
    assert result is CANCELLED


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
    require_io_uring()
    return UringEngine(asyncio.get_running_loop(), gate or DmaGate(), on_complete, depth=depth)


async def _wait(done, batches, n):
    """``done`` (what submit returned) plus later batches, once there are ``n`` results."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while len(done) + sum(len(b) for b in batches) < n:
        assert loop.time() < deadline, f"only {len(done) + sum(map(len, batches))} of {n} results"
        await asyncio.sleep(0.001)
    return done + [x for b in batches for x in b]


@pytest.fixture
def pipe():
    """A pipe: a read from it stays in the kernel until the test writes."""
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


async def test_uring_reads_writes_and_flushes(fd):
    batches = []
    eng = await _uring(batches.append)
    a, b = bytearray(100), bytearray(28)
    done = eng.submit([IoOp(IoKind.READ, fd, 1000, [memoryview(a), memoryview(b)], 128, token="r"),
                       IoOp(IoKind.WRITE, fd, 0, [memoryview(bytearray(b"xyz"))], 3, token="w"),
                       IoOp(IoKind.FLUSH, fd, 0, [], 0, token="f")])
    results = {op.token: res for op, res in await _wait(done, batches, 3)}
    assert results == {"r": 128, "w": 3, "f": 0}
    assert bytes(a + b) == bytes((1000 + i) & 0xFF for i in range(128))
    assert os.pread(fd, 3, 0) == b"xyz"
    assert eng.in_flight == 0
    eng.close()


async def test_uring_never_calls_back_from_submit(pipe):
    """Results known at once are returned; later ones come from the engine's own callback."""
    r, w = pipe
    batches = []
    eng = await _uring(batches.append)
    buf = bytearray(4)
    assert eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(buf)], 4, token="p")]) == []
    assert eng.in_flight == 1 and batches == []
    os.write(w, b"abcd")
    [(op, res)] = await _wait([], batches, 1)
    assert (op.token, res, bytes(buf)) == ("p", 4, b"abcd")
    eng.close()


async def test_uring_short_read_continues_then_hits_eof(fd):
    batches = []
    eng = await _uring(batches.append)
    buf = bytearray(8192)
    done = eng.submit([IoOp(IoKind.READ, fd, 0, [memoryview(buf)], 8192)])   # the file has 4096 bytes
    [(op, res)] = await _wait(done, batches, 1)
    assert isinstance(res, OSError) and res.errno == errno.EIO
    assert bytes(buf[:4096]) == bytes(range(256)) * 16             # the first part did arrive
    eng.close()


async def test_uring_short_pipe_reads_are_continued(pipe):
    r, w = pipe
    batches = []
    eng = await _uring(batches.append)
    buf = bytearray(6)
    eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(buf[:2]), memoryview(buf)[2:]], 6)])
    os.write(w, b"abc")
    await asyncio.sleep(0.01)
    assert batches == [] and eng.in_flight == 1                    # 3 of 6 bytes: still going
    os.write(w, b"def")
    [(op, res)] = await _wait([], batches, 1)
    assert res == 6
    eng.close()


async def test_uring_reports_kernel_errors(fd):
    batches = []
    eng = await _uring(batches.append)
    done = eng.submit([IoOp(IoKind.READ, 987654, 0, [memoryview(bytearray(8))], 8)])   # not an fd
    [(op, res)] = await _wait(done, batches, 1)
    assert isinstance(res, OSError) and res.errno == errno.EBADF
    eng.close()


async def test_uring_room_and_closed_gate(pipe):
    r, w = pipe
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate, depth=2)
    assert eng.room == 2
    eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(bytearray(16))], 16) for _ in range(2)])
    assert eng.room == 0
    os.write(w, bytes(32))
    eng.close()                                    # waits for both: they write our buffers
    assert eng.in_flight == 0 and batches == []    # closed: results are not delivered
    gate.close()
    eng2 = await _uring(batches.append, gate)
    [(_, result)] = eng2.submit([IoOp(IoKind.READ, r, 0, [memoryview(bytearray(16))], 16)])
    assert result is CANCELLED and eng2.in_flight == 0
    eng2.close()


async def test_uring_holds_the_gate_while_the_kernel_has_the_op(pipe):
    r, w = pipe
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate)
    eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(bytearray(16))], 16)])
    assert gate._inside == 1
    os.write(w, bytes(16))
    await _wait([], batches, 1)
    assert gate._inside == 0
    eng.close()


async def test_uring_close_waits_for_the_kernel(pipe):
    """close() returns only once the kernel is done with every op, whatever thread finishes it."""
    r, w = pipe
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate)
    buf = bytearray(8)
    eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(buf)], 8)])
    timer = threading.Timer(0.05, os.write, (w, b"12345678"))
    timer.start()
    eng.close()
    timer.join()
    assert bytes(buf) == b"12345678" and gate._inside == 0 and batches == []


async def test_uring_close_gives_up_on_a_host_that_never_finishes(pipe, caplog):
    """A hung disk must not hang the VMM: close() logs, releases the gate and returns."""
    r, _w = pipe
    batches = []
    gate = DmaGate()
    eng = await _uring(batches.append, gate)
    eng.submit([IoOp(IoKind.READ, r, 0, [memoryview(bytearray(8))], 8)])
    loop = asyncio.get_running_loop()
    started = loop.time()
    eng.close(timeout=0.05)
    assert loop.time() - started < DEADLINE_S
    assert gate._inside == 0 and eng.in_flight == 0 and batches == []
    assert "abandoning 1 operations still in the kernel" in caplog.text
    assert gate.close(timeout=0.1)                 # nothing holds the gate any more
