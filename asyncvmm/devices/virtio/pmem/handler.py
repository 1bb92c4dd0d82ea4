"""The loop side of one virtio-pmem activation: flush requests answered by a write-back.

:meth:`PmemHandler.handle_chain` only decides: an unusable request is
``Used(head, 0)`` (counted in ``event_fails`` and reported as a guest fault),
a flush is a :class:`~asyncvmm.devices.virtio.pmem.request.Flush` effect.

Flushes are coalesced.  The flushes taken while no write-back is running form
one group; at the end of the drain one write-back starts for the whole group,
off the loop (the device's ``flush``, msync of the whole file, can take as
long as the disk needs, and the loop serves every vCPU's MMIO exits).  When it
ends, each request of the group gets the result (§5.19.6: ``ret`` 0 or
VIRTIO_PMEM_RESP_TYPE_EIO) and used length 4.  Flushes taken while a
write-back runs wait for the next one: the running one may have passed the
guest's latest writes already.

The rate limiter charges each write-back one op and the file's length in
bytes, when its group opens; an empty limiter puts the chain back and arms the
throttle timer.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.rate_limiter import ThrottleTimer
from asyncvmm.devices.virtio.chain import DescriptorChain
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Effect, ThrottledQueueHandler, Used
from asyncvmm.devices.virtio.pmem.request import (
    RESP_SIZE,
    VIRTIO_PMEM_RESP_TYPE_EIO,
    VIRTIO_PMEM_RESP_TYPE_OK,
    Flush,
    PmemRequestError,
    parse_request,
)

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.pmem.device import Pmem

FAULT = "virtio_pmem"


@dataclass(slots=True)
class Status(Effect):
    """Write the response ``ret`` of a request."""

    addr: int
    value: int


class PmemHandler(ThrottledQueueHandler):
    def __init__(self, device: "Pmem", act: Activation) -> None:
        super().__init__(act, "pmem")
        self.dev = device
        self.metrics = device.metrics
        self.timer = ThrottleTimer(act.loop, device.rate_limiter, self._on_throttle_timer)
        self._group: list[Flush] = []          # taken, waiting for the next write-back
        self._running: asyncio.Future | None = None

    # -- deciding -------------------------------------------------------------

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.queue_event_count += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        try:
            return [parse_request(self.mem, chain)]
        except PmemRequestError as e:
            self.metrics.event_fails += 1
            self.dev.guest_faults.report(FAULT, "pmem %s: unusable request (head %d): %s",
                                         self.dev.id, chain.head, e)
            return [Used(chain.head, 0)]

    # -- doing ------------------------------------------------------------------

    def perform(self, queue_index: int, effect: Effect) -> bool:
        if isinstance(effect, Flush):
            if not self._group and not self._charge():
                self.metrics.rate_limiter_throttled_events += 1
                self.timer.arm()
                return False
            self._group.append(effect)
            return True
        if isinstance(effect, Status):
            self.mem.write_u32(effect.addr, effect.value)
            return True
        return super().perform(queue_index, effect)

    def _charge(self) -> bool:
        """One op and the file's length, as one write-back costs; both or neither."""
        return self.dev.rate_limiter.consume_request(self.dev.file_len)

    def end_of_batch(self, queue_index: int) -> None:
        if self._group and self._running is None:
            self._start_write_back()

    def _start_write_back(self) -> None:
        group, self._group = self._group, []
        self._running = self.loop.run_in_executor(None, self.dev.flush)
        self._running.add_done_callback(functools.partial(self._written_back, group))

    def _written_back(self, group: list[Flush], future: asyncio.Future) -> None:
        self._running = None
        if self.stopped:
            return
        ok = not future.cancelled() and future.exception() is None and bool(future.result())
        status = VIRTIO_PMEM_RESP_TYPE_OK if ok else VIRTIO_PMEM_RESP_TYPE_EIO
        effects: list[Effect] = []
        for flush in group:
            effects += [Status(flush.status_addr, status), Used(flush.head, RESP_SIZE)]
        self.complete(0, effects)
        if self._group and not self.stopped:
            self._start_write_back()

    # -- rate limiter -------------------------------------------------------------

    def on_stop(self) -> None:
        self.timer.cancel()
