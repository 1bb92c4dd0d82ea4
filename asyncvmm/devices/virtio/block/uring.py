"""An io_uring engine for virtio-block, through ctypes and raw syscalls.

Primer (io_uring(7)).  ``io_uring_setup`` returns a ring fd; three mmaps of
it give the submission ring (head, tail, mask, and an array of SQE indices),
the 64-byte SQEs themselves, and the completion ring of 16-byte CQEs.  The
application fills an SQE, puts its index in the array, advances the SQ tail
and calls ``io_uring_enter`` to submit; the kernel posts a CQE (``user_data``,
``res``) per operation and advances the CQ tail; the application consumes
CQEs and advances the CQ head.  An eventfd registered with
``IORING_REGISTER_EVENTFD`` is signalled for every CQE, so the asyncio loop
waits on it like any other fd: no threads of ours.  (Not
``IORING_REGISTER_EVENTFD_ASYNC``: it would spare the wake-up after a read
the page cache serves during the enter, but it signals only completions
posted by io_uring's worker threads, so an op finished by a poll retry -- a
file that was not ready -- would never wake the loop; the engine's unit test
with a pipe hangs that way.)

Memory ordering: the kernel reads the SQ tail with acquire semantics and we
write SQE, array slot, then tail in program order; x86 keeps stores in
order, so the kernel never sees the tail before the entry.  Symmetrically we
read the CQ tail before the CQEs it covers and loads are not reordered.

Each op enters the activation's :class:`DmaGate` when submitted and exits
when its CQE is reaped, because the kernel writes guest memory on its own
time.  :meth:`UringEngine.close` (a device reset) waits for every op still
in the kernel, up to :data:`CLOSE_TIMEOUT_S`.  :meth:`UringEngine.submit`
returns the results the kernel gave during the enter; later ones go to
``on_complete`` from the eventfd reader, never from inside ``submit``.

:func:`why_io_uring_unavailable` is the probe that decides whether an
``Async`` drive is accepted at all.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
import select
import struct
import time
from typing import Callable

from asyncvmm.devices.virtio.block.engine import CANCELLED, IoKind, IoOp, _advance
from asyncvmm.memory import store_u32
from asyncvmm.devices.virtio.gate import DmaGate

log = logging.getLogger(__name__)

SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_REGISTER_EVENTFD = 4
IORING_REGISTER_PROBE = 8
IO_URING_OP_SUPPORTED = 1 << 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_READ = 22                       # Linux 5.6: one buffer, no iovec array
IORING_OP_WRITE = 23
IORING_FSYNC_DATASYNC = 1 << 0

_OPCODE = {IoKind.READ: IORING_OP_READV, IoKind.WRITE: IORING_OP_WRITEV, IoKind.FLUSH: IORING_OP_FSYNC}
_OPCODE_ONE_BUFFER = {IoKind.READ: IORING_OP_READ, IoKind.WRITE: IORING_OP_WRITE}
_NEEDED_OPS = {"IORING_OP_READV": IORING_OP_READV, "IORING_OP_WRITEV": IORING_OP_WRITEV,
               "IORING_OP_FSYNC": IORING_OP_FSYNC}
# struct io_uring_probe { __u8 last_op; __u8 ops_len; __u16 resv; __u32 resv2[3];
#                         struct io_uring_probe_op ops[]; } -- 16 bytes, then 8 per op.
_PROBE_HEADER, _PROBE_OP, _PROBE_OPS = 16, 8, 256


class io_sqring_offsets(ctypes.Structure):
    """struct io_sqring_offsets { __u32 head, tail, ring_mask, ring_entries, flags, dropped,
    array, resv1; __u64 user_addr; };"""
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")] \
        + [("user_addr", ctypes.c_uint64)]


class io_cqring_offsets(ctypes.Structure):
    """struct io_cqring_offsets { __u32 head, tail, ring_mask, ring_entries, overflow, cqes,
    flags, resv1; __u64 user_addr; };"""
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")] \
        + [("user_addr", ctypes.c_uint64)]


class io_uring_params(ctypes.Structure):
    """struct io_uring_params { __u32 sq_entries, cq_entries, flags, sq_thread_cpu,
    sq_thread_idle, features, wq_fd, resv[3]; struct io_sqring_offsets sq_off;
    struct io_cqring_offsets cq_off; };"""
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle",
                 "features", "wq_fd")] \
        + [("resv", ctypes.c_uint32 * 3), ("sq_off", io_sqring_offsets), ("cq_off", io_cqring_offsets)]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# struct io_uring_sqe: opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data,
# buf_index, personality, splice_fd_in, addr3, __pad2[1] -- 64 bytes.
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")
assert _SQE.size == 64 and _CQE.size == 16 and ctypes.sizeof(io_uring_params) == 120

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


# io_uring_enter(fd, to_submit, min_complete, flags, sig, sigsz) runs once or more per batch of
# every Async drive: through its own prototype ctypes converts the ints in C instead of a
# c_long object per argument built in Python (0.5-1 us less per call, timeit).
_enter = type(_syscall)(("syscall", _libc))
_enter.restype = ctypes.c_long
_enter.argtypes = [ctypes.c_long] * 7


def _checked(ret: int) -> int:
    """A raw syscall's result, or its errno as OSError."""
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _uring_enter(fd: int, to_submit: int) -> int:
    return _checked(_enter(SYS_io_uring_enter, fd, to_submit, 0, 0, 0, 0))


def _sys(*args: int | ctypes.c_void_p) -> int:
    return _checked(_syscall(*[a if isinstance(a, ctypes.c_void_p) else ctypes.c_long(a) for a in args]))


# How long closing (a device reset, VMM exit) waits for the kernel to finish an activation's I/O.
CLOSE_TIMEOUT_S = 5.0
# Ops given up at close: their iovecs and buffer pins stay alive for the rest of the process.
_abandoned: list = []


class _Pending:
    __slots__ = ("op", "done", "pins", "iovs")

    def __init__(self, op: IoOp) -> None:
        self.op = op
        self.done = 0
        self.pins: list = []
        self.iovs = None


class UringEngine:
    """Up to ``depth`` ops in the kernel at once; completions arrive on the loop."""

    name = "io_uring"

    def __init__(self, loop: asyncio.AbstractEventLoop, gate: DmaGate,
                 on_complete: Callable[[list], None], *, depth: int = 64) -> None:
        self.loop = loop
        self.gate = gate
        self.on_complete = on_complete
        params = io_uring_params()
        self.fd = _sys(SYS_io_uring_setup, depth, ctypes.c_void_p(ctypes.addressof(params)))
        try:
            self._map(params)
            self.event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            efd = ctypes.c_int32(self.event)
            _sys(SYS_io_uring_register, self.fd, IORING_REGISTER_EVENTFD,
                 ctypes.c_void_p(ctypes.addressof(efd)), 1)
        except BaseException:
            os.close(self.fd)
            raise
        self.depth = params.sq_entries
        # A one-buffer op (a 4 KiB page, a whole 1 MiB buffer) skips building an iovec array.
        self._one_buffer = _supports(self.fd, IORING_OP_READ) and _supports(self.fd, IORING_OP_WRITE)
        self.in_flight = 0
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._unsubmitted = 0
        self._closed = False
        loop.add_reader(self.event, self._on_event)

    def _map(self, p: io_uring_params) -> None:
        sq_len = p.sq_off.array + p.sq_entries * 4
        cq_len = p.cq_off.cqes + p.cq_entries * _CQE.size
        flags, prot = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), mmap.PROT_READ | mmap.PROT_WRITE
        if p.features & IORING_FEAT_SINGLE_MMAP:
            self.sq_ring = self.cq_ring = mmap.mmap(self.fd, max(sq_len, cq_len), flags, prot,
                                                    offset=IORING_OFF_SQ_RING)
        else:
            self.sq_ring = mmap.mmap(self.fd, sq_len, flags, prot, offset=IORING_OFF_SQ_RING)
            self.cq_ring = mmap.mmap(self.fd, cq_len, flags, prot, offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(self.fd, p.sq_entries * _SQE.size, flags, prot, offset=IORING_OFF_SQES)
        self.sq, self.cq = p.sq_off, p.cq_off
        self.sq_mask = _U32.unpack_from(self.sq_ring, p.sq_off.ring_mask)[0]
        self.cq_mask = _U32.unpack_from(self.cq_ring, p.cq_off.ring_mask)[0]

    @property
    def room(self) -> int:
        return self.depth - self.in_flight

    # -- submission ---------------------------------------------------------

    def submit(self, ops: list[IoOp]) -> list[tuple[IoOp, object]]:
        """Queue an SQE per op, enter the kernel once, return the ops already finished."""
        if not self.gate.enter(len(ops)):          # one lock for the batch
            return [(op, CANCELLED) for op in ops]
        done = []
        for op in ops:
            self.in_flight += 1
            key, self._next_id = self._next_id, self._next_id + 1
            pend = self._pending[key] = _Pending(op)
            self._queue_sqe(key, pend)
        done.extend(self._pump())
        return done

    def _queue_sqe(self, key: int, pend: _Pending) -> None:
        op = pend.op
        addr = length = rw_flags = 0
        opcode = _OPCODE[op.kind]
        if op.kind is IoKind.FLUSH:
            rw_flags = IORING_FSYNC_DATASYNC
        else:
            bufs = _advance(op.buffers, pend.done) if pend.done else op.buffers
            # from_buffer pins each guest-memory view until the CQE is reaped.
            pend.pins = [ctypes.c_char.from_buffer(b) for b in bufs]
            if len(bufs) == 1 and self._one_buffer:
                opcode = _OPCODE_ONE_BUFFER[op.kind]
                addr, length = ctypes.addressof(pend.pins[0]), len(bufs[0])
            else:
                pend.iovs = (iovec * len(bufs))(*[iovec(ctypes.addressof(c), len(b))
                                                  for c, b in zip(pend.pins, bufs)])
                addr, length = ctypes.addressof(pend.iovs), len(bufs)
        tail = _U32.unpack_from(self.sq_ring, self.sq.tail)[0]
        index = tail & self.sq_mask
        _SQE.pack_into(self.sqes, index * _SQE.size, opcode, 0, 0, op.fd,
                       op.offset + pend.done, addr, length, rw_flags, key, 0, 0, 0, 0, 0)
        _U32.pack_into(self.sq_ring, self.sq.array + 4 * index, index)
        store_u32(self.sq_ring, self.sq.tail, (tail + 1) & 0xFFFF_FFFF)
        self._unsubmitted += 1

    def _pump(self) -> list[tuple[IoOp, object]]:
        """Hand queued SQEs to the kernel and take every finished op, until nothing is queued.

        Cached reads often complete during the enter; short transfers are
        queued again by :meth:`_collect`, hence the loop.
        """
        done: list = []
        while True:
            while self._unsubmitted:
                try:
                    n = _uring_enter(self.fd, self._unsubmitted)
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                        done.extend(self._collect())    # make room in the CQ ring, then retry
                        continue
                    raise
                self._unsubmitted -= n
            done.extend(self._collect())
            if not self._unsubmitted:
                return done

    # -- completion ---------------------------------------------------------

    def _on_event(self) -> None:
        try:
            os.eventfd_read(self.event)
        except BlockingIOError:
            pass
        batch = self._pump()
        if batch and not self._closed:
            self.on_complete(batch)

    def _collect(self) -> list[tuple[IoOp, object]]:
        batch = []
        head = _U32.unpack_from(self.cq_ring, self.cq.head)[0]
        tail = _U32.unpack_from(self.cq_ring, self.cq.tail)[0]
        while head != tail:
            key, res, _flags = _CQE.unpack_from(self.cq_ring, self.cq.cqes + (head & self.cq_mask) * _CQE.size)
            head = (head + 1) & 0xFFFF_FFFF
            result = self._finish(key, res)
            if result is not None:
                batch.append(result)
        store_u32(self.cq_ring, self.cq.head, head)   # the kernel reads head concurrently
        if batch:
            self.gate.exit(len(batch))                # the finished ops no longer touch guest memory
        return batch

    def _finish(self, key: int, res: int):
        pend = self._pending.get(key)
        if pend is None:
            return None
        op = pend.op
        short = 0 < res and op.kind is not IoKind.FLUSH and pend.done + res < op.length
        if not self._closed and (res == -errno.EAGAIN or res == -errno.EINTR or short):
            pend.done += max(res, 0)
            self._queue_sqe(key, pend)      # continue the transfer from where it stopped
            return None
        del self._pending[key]
        self.in_flight -= 1                         # _collect exits the gate for the batch
        if res < 0:
            return op, OSError(-res, os.strerror(-res))
        if op.kind is not IoKind.FLUSH and pend.done + res < op.length:
            return op, OSError(errno.EIO, f"{op.kind.value} at {op.offset + pend.done} hit end of file")
        return op, pend.done + res

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Wait for the kernel to finish every op (they write guest memory), then release the ring.

        Results are dropped: the ops' owner is going away.  Short transfers
        are not continued.  A host whose I/O does not finish within
        ``timeout`` (a hung disk or NFS server) does not hang the VMM: the
        ops are logged and abandoned (their buffers stay pinned, as the
        kernel may still write them), the gate is released and the ring
        closed, which makes the kernel cancel what it can.
        """
        if self.fd < 0:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.event, select.POLLIN)
        try:
            while True:
                self._pump()
                if not self._pending:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not done after {timeout:g} s")
                # Every CQE signals the eventfd; one already posted makes this return at once.
                poller.poll(max(1, int(left * 1000)))
                try:
                    os.eventfd_read(self.event)
                except BlockingIOError:
                    pass
        except (OSError, TimeoutError) as e:
            log.error("io_uring: abandoning %d operations still in the kernel at close: %s",
                      len(self._pending), e)
            _abandoned.extend(self._pending.values())
            for _ in self._pending:
                self.gate.exit()
            self._pending.clear()
            self.in_flight = 0
        self.loop.remove_reader(self.event)
        os.close(self.event)
        for m in {id(x): x for x in (self.sq_ring, self.cq_ring, self.sqes)}.values():
            m.close()
        os.close(self.fd)
        self.fd = -1


def _probe(fd: int) -> bytes:
    """IORING_REGISTER_PROBE's answer for ring ``fd`` (raises OSError before Linux 5.6)."""
    probe = (ctypes.c_uint8 * (_PROBE_HEADER + _PROBE_OP * _PROBE_OPS))()
    _sys(SYS_io_uring_register, fd, IORING_REGISTER_PROBE, ctypes.c_void_p(ctypes.addressof(probe)), _PROBE_OPS)
    return bytes(probe)


def _op_supported(probe: bytes, opcode: int) -> bool:
    # struct io_uring_probe_op { __u8 op; __u8 resv; __u16 flags; __u32 resv2; }
    return opcode < probe[1] and bool(probe[_PROBE_HEADER + _PROBE_OP * opcode + 2] & IO_URING_OP_SUPPORTED)


def _supports(fd: int, opcode: int) -> bool:
    try:
        return _op_supported(_probe(fd), opcode)
    except OSError:
        return False


def why_io_uring_unavailable() -> str | None:
    """Why this host cannot run :class:`UringEngine`, or ``None`` if it can.

    Sets up a small ring (the kernel may lack io_uring, or refuse it through
    ``kernel.io_uring_disabled`` or seccomp) and asks the kernel, with
    IORING_REGISTER_PROBE (Linux 5.6), whether it knows the operations the
    engine issues.
    """
    params = io_uring_params()
    try:
        fd = _sys(SYS_io_uring_setup, 2, ctypes.c_void_p(ctypes.addressof(params)))
    except OSError as e:
        return f"io_uring_setup failed: {e.strerror} (os error {e.errno})"
    try:
        try:
            probe = _probe(fd)
        except OSError as e:
            return f"IORING_REGISTER_PROBE failed: {e.strerror} (os error {e.errno}); Linux 5.6 or later is needed"
        for name, opcode in _NEEDED_OPS.items():
            if not _op_supported(probe, opcode):
                return f"the kernel's io_uring does not support {name}"
    finally:
        os.close(fd)
    return None
