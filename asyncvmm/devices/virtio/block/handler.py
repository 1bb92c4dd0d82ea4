"""The loop side of one virtio-block activation.

Chain handling is separated from carrying out its effects.  For each chain,
:meth:`BlockHandler.handle_chain` walks it (:func:`collect`), parses it
(:func:`parse`) and asks the engine's room and the rate limiter whether it
may go now; if not, the chain goes back to the ring and the queue stalls
until an engine completion or the throttle timer resumes it.  It writes
nothing: it only records :class:`Effects` -- answers to give (GET_ID,
rejected requests) and :class:`IoOp` s to start.  One place,
:meth:`BlockHandler._carry_out`, then starts the ops, turns the results the
engine has (now or later, from its own loop callback) into answers, writes
the status bytes and used elements, and raises at most one interrupt.  No
engine ever calls back into the handler while it is working, so nothing
re-enters.

Errors, as the three kinds of STYLE.md: a bad chain or request is answered
(IOERR/UNSUPP where a status byte exists, used length 0 otherwise) and counted
in ``invalid_reqs_count``; a broken ring stops the device with
DEVICE_NEEDS_RESET (the base class); a host I/O failure is IOERR plus
``execute_fails``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.block.engine import CANCELLED, IoKind, IoOp, SyncEngine
from asyncvmm.devices.virtio.block.request import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    Request,
    RequestError,
    device_id,
    parse,
)
from asyncvmm.devices.virtio.block.uring import UringEngine
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Drain, QueueHandler

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.block.device import Block

log = logging.getLogger(__name__)

_KIND = {VIRTIO_BLK_T_IN: IoKind.READ, VIRTIO_BLK_T_FLUSH: IoKind.FLUSH}


@dataclass(slots=True)
class Answer:
    """One used element to add, with the guest bytes that go with it."""

    head: int
    used_len: int
    status_at: object = None          # the status byte's GuestSlice, if the request has one
    status: int = VIRTIO_BLK_S_OK
    data: tuple | None = None         # (GuestSlice, bytes) written before the status (GET_ID)


@dataclass
class Effects:
    """What handling chains decided; :meth:`BlockHandler._carry_out` does it."""

    answers: list[Answer] = field(default_factory=list)
    submit: list[IoOp] = field(default_factory=list)
    results: list = field(default_factory=list)       # (op, result) from the engine, not yet answered


class BlockHandler(QueueHandler):
    def __init__(self, device: "Block", act: Activation) -> None:
        super().__init__(act, f"block {device.drive_id}")
        self.dev = device
        self.metrics = device.metrics
        self.queue = act.queues[0]
        self.engine = make_engine(device, act, self._on_io_complete)
        self.timer = ThrottleTimer(act.loop, device.rate_limiter, self._on_throttle_timer)
        self.effects = Effects()
        self._engine_stalled = False
        # Ops from handle_chain until answered or dropped: each holds its BackingFile.
        self._in_flight: set[IoOp] = set()

    # -- queue side ---------------------------------------------------------

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.queue_event_count += 1
        if chains == 0 and not self.timer.armed and not self._engine_stalled:
            self.metrics.no_avail_buffer += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    def process(self, index: int) -> Drain | None:
        result = super().process(index)    # handle_chain only records effects
        self.guarded(self._carry_out)
        return result

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> bool:
        try:
            req = parse(self.mem, collect(chain), self.dev.disk)
        except ChainError as e:
            self._reject(chain.head, str(e), None, VIRTIO_BLK_S_IOERR)
            return True
        except RequestError as e:
            self._reject(chain.head, str(e), e.status_at, e.status)
            return True
        is_io = req.type != VIRTIO_BLK_T_GET_ID
        if is_io and len(self.effects.submit) >= self.engine.room:
            self.metrics.io_engine_throttled_events += 1
            self._stalled()
            self._engine_stalled = True
            return False
        if not self.dev.rate_limiter.consume_request(req.nbytes if is_io else 0):
            self.metrics.rate_limiter_throttled_events += 1
            self._stalled()
            self.timer.arm()
            return False
        if not is_io:
            ident = device_id(self.dev.drive_id)[:req.data.length]
            self.effects.answers.append(Answer(req.head, req.used_len(VIRTIO_BLK_S_OK), req.status_at,
                                               data=(req.data, ident)))
            return True
        file = self.dev.file
        op = IoOp(_KIND.get(req.type, IoKind.WRITE), file.acquire(), req.offset,
                  req.data.views(self.mem), req.nbytes, token=(req, file))
        self._in_flight.add(op)
        self.effects.submit.append(op)
        return True

    def _reject(self, head: int, why: str, status_at, status: int) -> None:
        self.metrics.invalid_reqs_count += 1
        self.effects.answers.append(Answer(head, 0 if status_at is None else 1, status_at, status))

    def _stalled(self) -> None:
        # The chain being refused is popped but not yet put back, hence the +1.
        self.metrics.remaining_reqs_count += self.queue.pending(self.mem) + 1

    # -- the one place effects are carried out --------------------------------

    def _on_io_complete(self, batch: list) -> None:
        """Results the engine collected in a loop callback of its own."""
        self.effects.results.extend(batch)
        self.guarded(self._carry_out)

    def _carry_out(self) -> None:
        """Start the ops, answer what is done, interrupt once (inside the gate)."""
        fx = self.effects
        if fx.submit:
            ops, fx.submit = fx.submit, []
            fx.results.extend(self.engine.submit(ops))
        results, fx.results = fx.results, []
        for op, result in results:
            self._answer_io(op, result)
        answers, fx.answers = fx.answers, []
        for a in answers:
            if a.data is not None:
                a.data[0].write(self.mem, a.data[1])
            if a.status_at is not None:
                a.status_at.write(self.mem, bytes([a.status]))
            self.queue.add_used(self.mem, a.head, a.used_len)
        self.notify(0)
        if self._engine_stalled and self.engine.room > 0:
            self._engine_stalled = False
            self.schedule(0)

    def _answer_io(self, op: IoOp, result) -> None:
        req, file = op.token
        self._in_flight.discard(op)
        file.release()
        if result is CANCELLED:
            self.metrics.discarded_reqs_count += 1
            return
        if isinstance(self.engine, UringEngine):
            self.metrics.io_uring_count += 1
        if isinstance(result, OSError):
            self.metrics.execute_fails += 1
            status = VIRTIO_BLK_S_IOERR
        else:
            self._count(req)
            status = VIRTIO_BLK_S_OK
        self.effects.answers.append(Answer(req.head, req.used_len(status), req.status_at, status))

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

    def _on_throttle_timer(self) -> None:
        self.metrics.rate_limiter_event_count += 1
        self.process(0)

    def rate_limiter_updated(self) -> None:
        """New buckets start full: a stalled queue may go on now."""
        if self.timer.armed:
            self.timer.cancel()
            self.schedule(0)

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
        self.effects = Effects()


def make_engine(device: "Block", act: Activation, on_complete):
    """The engine ``device.io_engine`` names: Sync on the loop thread, Async on io_uring."""
    if device.io_engine == "Sync":
        return SyncEngine(act.gate, fdatasync=device.fdatasync)
    # Block() refused Async where the host lacks io_uring; a failure here (e.g. too
    # many rings) fails this activation, which the transport reports.
    return UringEngine(act.loop, act.gate, on_complete, depth=device.async_depth)
