"""The loop side of one virtio-block activation.

Chain handling decides; it does no I/O (the base class's effects, see
:mod:`asyncvmm.devices.virtio.handler`).  :meth:`BlockHandler.handle_chain`
walks a chain (:func:`collect`), parses it (:func:`parse`), asks the
engine's room and the rate limiter whether it may go now, and returns what
should happen:

* a rejected request: :class:`WriteGuest` (its status byte, if it has one)
  and :class:`Used`;
* GET_ID: :class:`WriteGuest` (the serial, then the status) and :class:`Used`;
* IN/OUT/FLUSH: :class:`StartIo` with the :class:`IoOp`;
* no room or no tokens: :class:`Stall`; an engine completion or the
  throttle timer resumes the queue.

The base class's ``carry_out`` does them in order; :meth:`BlockHandler.perform`
writes guest bytes and hands the ops on: the Async engine's go to it in one
``submit`` at the end of the drain (one ``io_uring_enter`` per batch), a Sync
op is submitted and answered at once (each is its own syscall anyway, and a
polling driver can refill while the rest of the ring is read).

A Sync drive's usual read or write (header, data, status: a descriptor each, no
rate limiter) skips the effects altogether: :meth:`BlockHandler.take_usual` reads
it straight from the descriptor table by its head as the drain pops it
(:func:`parse_framed_at`) and :meth:`BlockHandler._run_framed` does the I/O and
answers it in place (the general path's objects and dispatch were most
of the device's CPU time per request; docs/benchmarks.md).  Async requests in
that framing take the general path from the :class:`Request` it gives
(:meth:`Request.from_framed`), and every other chain is walked and parsed.

Results -- the ones ``submit`` returns, answered in the drain's batch, and
the ones the engine delivers later from its own loop callback, a batch of
their own -- are answered on the I/O side (the status byte, then the used
entry, written directly: no effect objects on the per-request path) under one
interrupt per batch.  No engine calls back into the handler while it works, so
nothing re-enters and there is no flag for it.

Errors, as the three kinds of STYLE.md: a bad chain or request is answered
(IOERR/UNSUPP where a status byte exists, used length 0 otherwise) and counted
in ``invalid_reqs_count``; a broken ring stops the device with
DEVICE_NEEDS_RESET (the base class); a host I/O failure is IOERR plus
``execute_fails``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.block.engine import CANCELLED, IoKind, IoOp, SyncEngine, perform
from asyncvmm.devices.virtio.block.request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    Framed,
    Request,
    RequestError,
    device_id,
    parse,
    parse_framed,
    parse_framed_at,
)
from asyncvmm.devices.virtio.block.uring import UringEngine
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Effect, ThrottledQueueHandler, Stall, Used

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.block.device import Block

log = logging.getLogger(__name__)

_KIND = {VIRTIO_BLK_T_IN: IoKind.READ, VIRTIO_BLK_T_FLUSH: IoKind.FLUSH}


@dataclass(frozen=True, slots=True)
class WriteGuest(Effect):
    """Write ``data`` into the guest at ``at`` (a status byte, GET_ID's serial)."""

    at: object                        # a request's GuestSlice: .write(mem, data)
    data: bytes


@dataclass(frozen=True, slots=True)
class StartIo(Effect):
    """Hand ``op`` to the engine (after the drain, with the rest of the batch)."""

    op: IoOp


_STATUS_BYTE = {status: bytes([status]) for status in (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR)}


def _status(at, status: int) -> WriteGuest:
    return WriteGuest(at, bytes([status]))


class BlockHandler(ThrottledQueueHandler):
    def __init__(self, device: "Block", act: Activation) -> None:
        super().__init__(act, f"block {device.drive_id}")
        self.dev = device
        self.metrics = device.metrics
        self.queue = act.queues[0]
        self.engine = make_engine(device, act, self._on_io_complete)
        self._uring = isinstance(self.engine, UringEngine)
        self._sync = isinstance(self.engine, SyncEngine)
        self._framed_ok = self._sync and not device.rate_limiter.enabled     # see _run_framed
        self.timer = ThrottleTimer(act.loop, device.rate_limiter, self._on_throttle_timer)
        self._to_start: list[IoOp] = []
        self._engine_stalled = False
        # Ops from handle_chain until answered or dropped: each holds its BackingFile.
        self._in_flight: set[IoOp] = set()

    # -- queue side: decisions ----------------------------------------------

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.queue_event_count += 1
        if chains == 0 and not self.timer.armed and not self._engine_stalled:
            self.metrics.no_avail_buffer += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    def take_usual(self, queue_index: int, table: memoryview, head: int) -> bool:
        """A Sync drive's usual request (see :meth:`_run_framed`), read straight from the
        descriptor table by its head and run as it is popped."""
        if not self._framed_ok:
            return False
        framed = parse_framed_at(self.mem, table, head, self.dev.disk)
        if framed is None:
            return False
        self._run_framed(head, framed)
        return True

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect] | bool:
        # With _framed_ok, take_usual already read this chain and found it not framed.
        framed = None if self._framed_ok else parse_framed(self.mem, chain, self.dev.disk)
        try:
            if framed is not None:
                req = Request.from_framed(chain.head, framed)
            else:
                req = parse(self.mem, collect(chain), self.dev.disk)
        except ChainError:
            self.metrics.invalid_reqs_count += 1
            return [Used(chain.head, 0)]
        except RequestError as e:
            self.metrics.invalid_reqs_count += 1
            if e.status_at is None:
                return [Used(chain.head, 0)]
            return [_status(e.status_at, e.status), Used(chain.head, 1)]
        is_io = req.type != VIRTIO_BLK_T_GET_ID
        if is_io and len(self._to_start) >= self.engine.room:
            self.metrics.io_engine_throttled_events += 1
            self._stalled()
            self._engine_stalled = True
            return [Stall("io engine full")]
        limiter = self.dev.rate_limiter
        if limiter.enabled and not limiter.consume_request(req.nbytes if is_io else 0):
            self.metrics.rate_limiter_throttled_events += 1
            self._stalled()
            self.timer.arm()
            return [Stall("rate limited")]
        if not is_io:
            ident = device_id(self.dev.drive_id)[:req.data.length]
            return [WriteGuest(req.data, ident), _status(req.status_at, VIRTIO_BLK_S_OK),
                    Used(req.head, req.used_len(VIRTIO_BLK_S_OK))]
        file = self.dev.file
        op = IoOp(_KIND.get(req.type, IoKind.WRITE), file.acquire(), req.offset,
                  req.data.views(self.mem), req.nbytes, token=(req, file))
        self._in_flight.add(op)
        return [StartIo(op)]

    def _run_framed(self, head: int, req: Framed) -> None:
        """A Sync drive's usual read or write, carried out and answered where it is decided.

        The general path's effects, op and request objects and their dispatch were two
        thirds of the device's CPU time per request (docs/benchmarks.md); with nothing to
        wait for and nothing to batch (the op runs on this thread, the drain holds the
        gate), this is the same work straight through.  A failed or short transfer is
        answered as :func:`perform` answers it.
        """
        req_type, offset, data_addr, nbytes, status_addr = req
        mem, m = self.mem, self.metrics
        data = mem.view(data_addr, nbytes)
        # No acquire/release of the file: the op ends before this returns, and a path swap
        # (the only thing that retires a file) runs on this loop too.
        fd = self.dev.file.fd
        try:
            if req_type == VIRTIO_BLK_T_IN:
                done = os.preadv(fd, [data], offset)
            else:
                done = os.pwritev(fd, [data], offset)
            if done != nbytes:              # a short transfer: the rest as the engine does it
                kind = IoKind.READ if req_type == VIRTIO_BLK_T_IN else IoKind.WRITE
                perform(IoOp(kind, fd, offset + done, [data[done:]], nbytes - done))
        except OSError:
            m.execute_fails += 1
            mem.write(status_addr, _STATUS_BYTE[VIRTIO_BLK_S_IOERR])
            self.queue.add_used(mem, head, 1)
            return
        mem.write(status_addr, _STATUS_BYTE[VIRTIO_BLK_S_OK])
        if req_type == VIRTIO_BLK_T_IN:
            self.queue.add_used(mem, head, nbytes + 1)
            m.read_count += 1
            m.read_bytes += nbytes
        else:
            self.queue.add_used(mem, head, 1)
            m.write_count += 1
            m.write_bytes += nbytes

    def _stalled(self) -> None:
        # The chain being refused is popped but not yet put back, hence the +1.
        self.metrics.remaining_reqs_count += self.queue.pending(self.mem) + 1

    # -- I/O side: carrying out ---------------------------------------------

    def perform(self, queue_index: int, effect: Effect) -> bool:
        if isinstance(effect, WriteGuest):
            effect.at.write(self.mem, effect.data)
        elif isinstance(effect, StartIo):
            if self._sync:
                # Nothing to batch for Sync (one syscall per op either way), and answering
                # now lets a polling driver see the completion and refill while the rest
                # of the ring is read: the device and the driver overlap instead of taking
                # turns per batch.  The interrupt is still one per batch.
                # carry_out runs inside the drain, which holds the gate.
                self._answer_all([self.engine.run_inside_gate(effect.op)])
            else:
                self._to_start.append(effect.op)
        else:
            return super().perform(queue_index, effect)
        return True

    def end_of_batch(self, queue_index: int) -> None:
        """The drain's ops go to the engine in one submit; what is already done is answered
        now, in the drain's batch and under its one interrupt."""
        if self._to_start:
            ops, self._to_start = self._to_start, []
            self._answer_all(self.engine.submit(ops))

    def _on_io_complete(self, batch: list) -> None:
        """Results the engine collected in a loop callback of its own: one more batch."""
        self.guarded(self._answer_and_notify, batch)

    def _answer_and_notify(self, batch: list) -> None:
        self._answer_all(batch)
        self.notify(0)

    def _answer_all(self, batch: list) -> None:
        """Each answered op's status byte and used entry, in order.

        The I/O side writes them directly rather than through effect objects:
        two allocations and two dispatches per request, on every request.
        """
        mem, queue = self.mem, self.queue
        for op, result in batch:
            status = self._answer(op, result)
            if status is not None:
                req = op.token[0]
                # status_at is one byte, so one part: a bounds-checked one-byte write.
                mem.write(req.status_at.parts[0][0], _STATUS_BYTE[status])
                queue.add_used(mem, req.head, req.used_len(status))
        if self._engine_stalled and self.engine.room > 0:
            self._engine_stalled = False
            self.schedule(0)

    def _answer(self, op: IoOp, result) -> int | None:
        """The status ``op`` ends with (counted), or ``None``: cancelled, no answer."""
        req, file = op.token
        self._in_flight.discard(op)
        file.release()
        if result is CANCELLED:
            self.metrics.discarded_reqs_count += 1
            return None
        if self._uring:
            self.metrics.io_uring_count += 1
        if isinstance(result, OSError):
            self.metrics.execute_fails += 1
            return VIRTIO_BLK_S_IOERR
        self._count(req)
        return VIRTIO_BLK_S_OK

    def _count(self, req: Request) -> None:
        m = self.metrics
        if req.type == VIRTIO_BLK_T_IN:
            m.read_count += 1
            m.read_bytes += req.nbytes
        elif req.type == VIRTIO_BLK_T_FLUSH:
            m.flush_count += 1
        else:
            m.write_count += 1
            m.write_bytes += req.nbytes

    # -- timers and updates -------------------------------------------------

    def rate_limiter_updated(self) -> None:
        self._framed_ok = self._sync and not self.dev.rate_limiter.enabled
        super().rate_limiter_updated()

    def on_stop(self) -> None:
        self.timer.cancel()
        self.engine.close()                # waits for ops the kernel still has
        # After a guest reset the gate is already closed and drained; on VMM
        # teardown this waits for running ops, so no op still uses these files.
        self.act.gate.close()
        # Requests popped but never answered: their answers would go to a ring
        # the driver has taken back.
        self.metrics.discarded_reqs_count += len(self._in_flight)
        for op in self._in_flight:
            op.token[1].release()
        self._in_flight.clear()
        self._to_start.clear()


def make_engine(device: "Block", act: Activation, on_complete):
    """The engine ``device.io_engine`` names: Sync on the loop thread, Async on io_uring."""
    if device.io_engine == "Sync":
        return SyncEngine(act.gate, fdatasync=device.fdatasync)
    # Block() refused Async where the host lacks io_uring; a failure here (e.g. too
    # many rings) fails this activation, which the transport reports.
    return UringEngine(act.loop, act.gate, on_complete, depth=device.async_depth)
