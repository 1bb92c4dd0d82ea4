"""The loop side of one virtio-balloon activation (§5.5.6).

* inflate: a chain's readable bytes are le32 PFNs (at most
  :data:`MAX_PFNS_PER_CHAIN`); they become page ranges whose host memory is
  given back (:class:`Discard`), then the chain is answered with length 0.
* deflate: answered with length 0; nothing to do on the host.
* stats (§5.5.6.3): the driver keeps one readable buffer of statistics with
  the device.  The device reads it (:class:`StoreStats`), holds it
  (:class:`HoldStats`) and gives it back when the polling timer fires or
  the API asks for fresh numbers; the driver then refills and re-offers it.
* hinting (§5.5.6.4): a readable 4-byte buffer carries the driver's command
  id (the run it answers, or ``STOP`` when it is done); a writable buffer is
  a free range the driver holds for the current run, given back like an
  inflated page -- but only while the device's command is that same run
  (:class:`Hint`).  The driver's ``STOP`` is acknowledged with ``DONE`` if
  the run asked for it.
* reporting: every buffer of a chain is a free guest range; each is given
  back like an inflated page (:class:`Report`), then the chain is answered.

A chain that cannot be used (bad descriptors, wrong direction, a PFN array
that is not whole le32s or too long) is answered with length 0 and counted;
a PFN or reported range outside guest RAM is skipped and counted.  Nothing
the guest sends can make the device touch host memory outside guest RAM:
every discard goes through :meth:`GuestMemory.discard`'s bounds check.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from asyncvmm.devices.virtio.balloon.protocol import (
    DEFLATE,
    HINTING,
    INFLATE,
    MAX_PFNS_PER_CHAIN,
    MAX_STATS_BYTES,
    REPORTING,
    STATS,
    VIRTIO_BALLOON_CMD_ID_DONE,
    VIRTIO_BALLOON_CMD_ID_STOP,
    parse_stats,
    pfn_ranges,
)
from asyncvmm.devices.virtio.chain import ChainError, DescriptorChain, collect
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.handler import Effect, QueueHandler, Used
from asyncvmm.memory import GuestMemoryError

if TYPE_CHECKING:
    from asyncvmm.devices.virtio.balloon.device import Balloon

FAULT = "virtio_balloon"


@dataclass(slots=True)
class Discard(Effect):
    """Give the host memory of inflated pages back: ``(guest address, bytes)`` ranges."""

    ranges: list[tuple[int, int]]


@dataclass(slots=True)
class Report(Effect):
    """Give the host memory of reported free ranges back."""

    ranges: list[tuple[int, int]]


@dataclass(slots=True)
class Hint(Effect):
    """The driver's command ids, in order, then the free ranges it hinted."""

    cmds: list[int]
    ranges: list[tuple[int, int]]


@dataclass(slots=True)
class StoreStats(Effect):
    """Keep the statistics the guest just sent."""

    values: dict[str, int]


@dataclass(slots=True)
class HoldStats(Effect):
    """Keep the statistics buffer ``head`` until the next update is due."""

    head: int


class BalloonHandler(QueueHandler):
    def __init__(self, device: "Balloon", act: Activation, roles: dict[int, str]) -> None:
        super().__init__(act, "balloon")
        self.dev = device
        self.metrics = device.metrics
        self.roles = roles
        self.stats_index = next((i for i, role in roles.items() if role == STATS), None)
        self.held_stats: int | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        super().start()
        self.arm_stats_timer()

    # -- chains -------------------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> list[Effect]:
        role = self.roles.get(queue_index)
        try:
            bufs = collect(chain)
        except ChainError as e:
            return self._unusable(chain.head, role, str(e))
        if role == INFLATE:
            n = bufs.readable.length
            if bufs.writable.length or n % 4 or n > 4 * MAX_PFNS_PER_CHAIN:
                return self._unusable(chain.head, role, f"{n} readable, {bufs.writable.length} writable bytes")
            return [Discard(pfn_ranges(bufs.readable.read(self.mem))), Used(chain.head, 0)]
        if role == STATS:
            self.metrics.stats_updates_count += 1
            if bufs.readable.length > MAX_STATS_BYTES:
                self.metrics.stats_update_fails += 1
                self.dev.guest_faults.report(FAULT, "balloon: statistics buffer of %d bytes not read",
                                             bufs.readable.length)
                return [HoldStats(chain.head)]
            values, unknown = parse_stats(bufs.readable.read(self.mem))
            self.metrics.stats_update_fails += unknown
            return [StoreStats(values), HoldStats(chain.head)]
        if role == HINTING:
            cmds = []
            for addr, length in bufs.readable.parts:
                if length == 4:
                    cmds.append(self.mem.read_u32(addr))
                else:
                    self.dev.guest_faults.report(FAULT, "balloon: hinting command of %d bytes", length)
            return [Hint(cmds, list(bufs.writable.parts)), Used(chain.head, 0)]
        if role == REPORTING:
            return [Report([*bufs.readable.parts, *bufs.writable.parts]), Used(chain.head, 0)]
        return [Used(chain.head, 0)]          # deflate: the guest's next access refaults the page

    def _unusable(self, head: int, role: str | None, why: str) -> list[Effect]:
        self.metrics.event_fails += 1
        self.dev.guest_faults.report(FAULT, "balloon: unusable %s chain: %s", role, why)
        return [Used(head, 0)]

    def perform(self, queue_index: int, effect: Effect) -> bool:
        kind = type(effect)
        if kind is Discard:
            for addr, length in effect.ranges:
                if not self._discard(addr, length):
                    self.metrics.event_fails += 1
            return True
        if kind is Report:
            for addr, length in effect.ranges:
                if self._discard(addr, length):
                    self.metrics.free_page_report_count += 1
                    self.metrics.free_page_report_freed += length
                else:
                    self.metrics.free_page_report_fails += 1
            return True
        if kind is Hint:
            self._hint(effect)
            return True
        if kind is StoreStats:
            self.dev.latest_stats.update(effect.values)
            return True
        if kind is HoldStats:
            if self.held_stats is not None:
                # The driver keeps one buffer with the device; a second one gives the first back.
                self.dev.guest_faults.report(FAULT, "balloon: a second statistics buffer")
                self.act.queues[queue_index].add_used(self.mem, self.held_stats, 0)
            self.held_stats = effect.head
            return True
        return super().perform(queue_index, effect)

    def _hint(self, effect: Hint) -> None:
        dev = self.dev
        done = False
        for cmd in effect.cmds:
            dev.guest_cmd = cmd
            # DONE is the device's word; a driver that sends it is treated as stopping.
            done = cmd in (VIRTIO_BALLOON_CMD_ID_STOP, VIRTIO_BALLOON_CMD_ID_DONE)
        host = dev.hint_cmd_id
        for addr, length in effect.ranges:
            # Only pages of the run the device asked for, and never once it said STOP or DONE:
            # after DONE the driver may already be using them again.
            if host in (VIRTIO_BALLOON_CMD_ID_STOP, VIRTIO_BALLOON_CMD_ID_DONE) or dev.guest_cmd != host:
                continue
            self.metrics.free_page_hint_count += 1
            if self._discard(addr, length):
                self.metrics.free_page_hint_freed += length
            else:
                self.metrics.free_page_hint_fails += 1
        if done and dev.acknowledge_on_stop and host != VIRTIO_BALLOON_CMD_ID_DONE:
            dev.set_hint_cmd(VIRTIO_BALLOON_CMD_ID_DONE)

    def _discard(self, addr: int, length: int) -> bool:
        try:
            self.mem.discard(addr, length)
        except GuestMemoryError as e:
            self.dev.guest_faults.report(FAULT, "balloon: cannot give back %s", e)
            return False
        except OSError as e:                  # madvise refused: the host keeps the pages
            self.dev.guest_faults.report(FAULT, "balloon: madvise %#x+%#x failed: %s", addr, length, e)
            return False
        return True

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        role = self.roles.get(queue_index)
        if role == INFLATE:
            self.metrics.inflate_count += 1
        elif role == DEFLATE:
            self.metrics.deflate_count += 1

    def on_event_failure(self) -> None:
        self.metrics.event_fails += 1

    # -- statistics ---------------------------------------------------------

    def arm_stats_timer(self) -> None:
        """(Re)start the polling timer at the device's current interval."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        interval = self.dev.stats_polling_interval_s
        if self.stats_index is not None and interval > 0 and not self.stopped:
            self._timer = self.loop.call_later(interval, self._on_stats_timer)

    def _on_stats_timer(self) -> None:
        self._timer = None
        self.request_stats()
        self.arm_stats_timer()

    def request_stats(self) -> None:
        """Give the held statistics buffer back, so the driver sends fresh numbers."""
        if self.held_stats is not None and self.stats_index is not None:
            self.guarded(self._return_stats, self.stats_index)

    def _return_stats(self, index: int) -> None:
        head, self.held_stats = self.held_stats, None
        if head is not None:
            self.act.queues[index].add_used(self.mem, head, 0)
            self.notify(index)

    def on_stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.held_stats = None
