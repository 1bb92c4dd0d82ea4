"""The loop side of one virtio-mem activation (§5.15.6): the guest queue.

Each chain is one request: its device-readable bytes hold a
``virtio_mem_req`` (24 bytes), its device-writable bytes take the
``virtio_mem_resp`` (10 bytes).  :meth:`VirtioMemHandler.handle_chain`
parses it, lets the device decide (:meth:`VirtioMem.handle_request`, no
I/O) and returns the device's effects, then the response write, then the
used entry: a slot is in KVM before the driver hears ACK for a plug, and an
unplugged range is out of KVM and released before the driver hears ACK for
an unplug.

A chain that cannot carry a request (too few readable bytes, no room for
the response, a broken chain) is answered with length 0, counted in
``queue_event_fails`` and reported as a guest fault; nothing the guest
sends touches host memory outside the region (effects name block ranges
the device checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, Segments, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Effect, QueueHandler, Used
from asyncvmm.devices.virtio.mem.protocol import REQ, RESP, RequestError, parse_request, response

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.mem.device import VirtioMem

FAULT = "virtio_mem"


@dataclass(slots=True)
class SlotChange(Effect):
    """Slot ``index`` of the region becomes (``present``) or stops being a KVM memory slot."""

    index: int
    present: bool


@dataclass(slots=True)
class Release(Effect):
    """Give the host memory behind ``[offset, offset+length)`` of the region back."""

    offset: int
    length: int


@dataclass(slots=True)
class Respond(Effect):
    """Write the ``virtio_mem_resp`` bytes to the chain's writable buffers."""

    writable: Segments
    data: bytes


class VirtioMemHandler(QueueHandler):
    def __init__(self, device: "VirtioMem", act: Activation) -> None:
        super().__init__(act, "virtio-mem")
        self.dev = device
        self.metrics = device.metrics

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        try:
            bufs = collect(chain)
        except ChainError as e:
            return self._unusable(chain.head, str(e))
        if bufs.writable.length < RESP.size:
            return self._unusable(chain.head, f"{bufs.writable.length} writable bytes for the response")
        try:
            req = parse_request(bufs.readable.slice(0, min(REQ.size, bufs.readable.length)).read(self.mem))
        except RequestError as e:
            return self._unusable(chain.head, str(e))
        kind, state, effects = self.dev.handle_request(req)
        return [*effects, Respond(bufs.writable, response(kind, state)), Used(chain.head, RESP.size)]

    def _unusable(self, head: int, why: str) -> list[Effect]:
        self.metrics.queue_event_fails += 1
        self.dev.guest_faults.report(FAULT, "virtio-mem: unusable request chain: %s", why)
        return [Used(head, 0)]

    def perform(self, queue_index: int, effect: Effect) -> bool:
        kind = type(effect)
        if kind is Respond:
            effect.writable.write(self.mem, effect.data)
            return True
        if kind is SlotChange:
            self.dev.backing.set_slot(effect.index, effect.present)
            return True
        if kind is Release:
            try:
                self.dev.backing.release(effect.offset, effect.length)
            except OSError as e:         # madvise refused: the host keeps the pages
                self.metrics.unplug_discard_fails += 1
                self.dev.guest_faults.report(FAULT, "virtio-mem: releasing %#x+%#x failed: %s",
                                             effect.offset, effect.length, e)
            return True
        return super().perform(queue_index, effect)

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        self.metrics.queue_event_count += 1

    def on_event_failure(self) -> None:
        self.metrics.queue_event_fails += 1
