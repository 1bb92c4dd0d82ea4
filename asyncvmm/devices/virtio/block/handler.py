"""The loop side of one virtio-block activation.

For each chain: walk it (:func:`collect`), parse it (:func:`parse`), then ask
the engine and the rate limiter whether it may go now; if not, the chain goes
back to the ring and the queue stalls until an engine completion or the
throttle timer resumes it.  GET_ID is answered here; IN/OUT/FLUSH become
:class:`IoOp` s.  Completions write the status byte and the used element and
raise at most one interrupt per batch.

Errors, as the three kinds of STYLE.md: a bad chain or request is answered
(IOERR/UNSUPP where a status byte exists, used length 0 otherwise) and counted
in ``invalid_reqs_count``; a broken ring stops the device with
DEVICE_NEEDS_RESET (the base class); a host I/O failure is IOERR plus
``execute_fails``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.block.engine import CANCELLED, AsyncEngine, IoKind, IoOp, SyncEngine
from asyncvmm.devices.virtio.block.uring import UringEngine
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
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Drain, QueueHandler

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.block.device import Block

log = logging.getLogger(__name__)

_KIND = {VIRTIO_BLK_T_IN: IoKind.READ, VIRTIO_BLK_T_FLUSH: IoKind.FLUSH}


class BlockHandler(QueueHandler):
    def __init__(self, device: "Block", act: Activation) -> None:
        super().__init__(act, f"block {device.drive_id}")
        self.dev = device
        self.metrics = device.metrics
        self.queue = act.queues[0]
        self.engine = make_engine(device, act, self._on_io_complete)
        self.timer = ThrottleTimer(act.loop, device.rate_limiter, self._on_throttle_timer)
        self._draining = False
        self._engine_stalled = False
        self._in_flight: set[IoOp] = set()

    # -- queue side ---------------------------------------------------------

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.queue_event_count += 1
        if chains == 0 and not self.timer.armed and not self._engine_stalled:
            self.metrics.no_avail_buffer += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    def process(self, index: int) -> Drain | None:
        self._draining = True
        try:
            result = super().process(index)
        finally:
            self._draining = False
        if not self.stopped:
            self.guarded(self.engine.flush)        # one io_uring_enter per drain
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
        if self.engine.full:
            self.metrics.io_engine_throttled_events += 1
            self._stalled()
            self._engine_stalled = True
            return False
        nbytes = req.nbytes if req.type != VIRTIO_BLK_T_GET_ID else 0
        if not self.dev.rate_limiter.consume_request(nbytes):
            self.metrics.rate_limiter_throttled_events += 1
            self._stalled()
            self.timer.arm()
            return False
        if req.type == VIRTIO_BLK_T_GET_ID:
            req.data.write(self.mem, device_id(self.dev.drive_id)[:req.data.length])
            self._complete(req, VIRTIO_BLK_S_OK)
            return True
        self._submit(req)
        return True

    def _reject(self, head: int, why: str, status_at, status: int) -> None:
        self.metrics.invalid_reqs_count += 1
        used = 0
        if status_at is not None:
            status_at.write(self.mem, bytes([status]))
            used = 1
        self.queue.add_used(self.mem, head, used)

    def _stalled(self) -> None:
        # The chain being refused is popped but not yet put back, hence the +1.
        self.metrics.remaining_reqs_count += self.queue.pending(self.mem) + 1

    def _submit(self, req: Request) -> None:
        file = self.dev.file
        op = IoOp(_KIND.get(req.type, IoKind.WRITE), file.acquire(), req.offset,
                  req.data.views(self.mem), req.nbytes, token=(req, file))
        self._in_flight.add(op)
        self.engine.submit(op)

    # -- completion side ----------------------------------------------------

    def _on_io_complete(self, batch: list) -> None:
        if self._draining:                 # Sync engine: already inside process()
            self._complete_batch(batch)
        else:
            self.guarded(self._complete_batch, batch)

    def _complete_batch(self, batch: list) -> None:
        for op, result in batch:
            self._in_flight.discard(op)
            req, file = op.token
            file.release()
            if result is CANCELLED:
                continue
            if isinstance(result, OSError):
                self.metrics.execute_fails += 1
                self._complete(req, VIRTIO_BLK_S_IOERR)
                continue
            self._count(req)
            self._complete(req, VIRTIO_BLK_S_OK)
        if not self._draining:
            self.notify(0)
            if self._engine_stalled:
                self._engine_stalled = False
                self.schedule(0)

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

    def _complete(self, req: Request, status: int) -> None:
        req.status_at.write(self.mem, bytes([status]))
        self.queue.add_used(self.mem, req.head, req.used_len(status))

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
        self.engine.close()
        # After a guest reset the gate is already closed and drained; on VMM
        # teardown this waits for running ops, so no op still uses these files.
        self.act.gate.close()
        for op in self._in_flight:
            op.token[1].release()
        self._in_flight.clear()


def make_engine(device: "Block", act: Activation, on_complete):
    """The engine ``device.io_engine`` asks for; Async is io_uring where the host allows it."""
    if device.io_engine == "Sync":
        return SyncEngine(act.gate, on_complete, fdatasync=device.fdatasync)
    if device.async_backend in ("auto", "io_uring"):
        try:
            return UringEngine(act.loop, act.gate, on_complete, depth=device.async_depth)
        except OSError as e:
            if device.async_backend == "io_uring":
                raise
            log.warning("block %s: io_uring unavailable (%s); using worker threads", device.drive_id, e)
    return AsyncEngine(act.loop, act.gate, on_complete, workers=device.async_workers,
                       depth=device.async_depth, fdatasync=device.fdatasync)
