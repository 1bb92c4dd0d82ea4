"""The loop side of a virtio device: queue readers, draining, batched interrupts.

A device's event handler subclasses :class:`QueueHandler` and implements
:meth:`QueueHandler.handle_chain`.  The base class owns the rest of the
pattern every device shares:

* one loop reader per queue eventfd (KVM's ioeventfd for QueueNotify);
* a drain that pops every available chain, bounded per wakeup so a guest
  that keeps adding cannot starve the loop, and that re-enables
  notifications before it stops (§2.7.10, with the EVENT_IDX re-check);
* one interrupt per batch, only when the driver asked for it (§2.7.7);
* every guest-memory access inside the activation's :class:`DmaGate`;
* a broken ring (:class:`QueueContractError`) or an unexpected exception
  stops the device and sets DEVICE_NEEDS_RESET (§2.1.2): never an exception
  out of a loop callback.

Effects (STYLE.md point 2).  Chain handling decides; it does no I/O.
:meth:`QueueHandler.handle_chain` looks at a chain in guest memory and
returns what should happen as a sequence of :class:`Effect` objects, and
:meth:`QueueHandler.carry_out` is the one place that does it, in order:

* :class:`Used` -- return the chain to the driver with that used length;
* :class:`Stall` -- put the chain back and stop draining this queue (the
  device has arranged for something to resume it);
* any other effect is the device's own I/O (a tap write, a request for an
  I/O engine, a timer to arm), handed to the device's :meth:`perform`.  It
  answers ``True`` when done, ``False`` when the backend cannot take it now
  (EAGAIN, a full engine): the chain then goes back as for :class:`Stall`
  and the effects after it are not carried out -- so a chain lists its I/O
  before its :class:`Used`.

The used-buffer interrupt is the batch's effect: :meth:`process` raises it
at most once, after the drain.  Work that finishes later (an I/O engine's
completions) goes through :meth:`QueueHandler.complete`, which carries out
its effects inside the gate and notifies once -- or, when the completion
arrives synchronously inside a drain, carries them out there and leaves the
notification to that drain's batch.  Devices need no re-entrancy flag of
their own.

A device whose usual request needs none of this may answer it as the drain
pops it: :meth:`QueueHandler.take_usual` gets the head and the descriptor
table before any :class:`DescriptorChain` exists (a Sync drive's reads and
writes).

``handle_chain`` may still answer a plain ``bool`` (``True``: consumed and
answered, ``False``: stall), for devices written before effects.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Sequence

from asyncvmm.devices.virtio.chain import DescriptorChain
from asyncvmm.devices.virtio.device import Activation
from asyncvmm.devices.virtio.gate import GateClosedError
from asyncvmm.devices.virtio.queue import QueueContractError
from asyncvmm.memory import GuestMemoryError

log = logging.getLogger(__name__)


class Drain(enum.Enum):
    EMPTY = "empty"        # nothing left; notifications are enabled again
    STALLED = "stalled"    # handle_chain refused (throttled, engine full); someone resumes us
    MORE = "more"          # the per-wakeup budget ran out; a loop callback continues


class Effect:
    """Something chain handling asks the I/O side to do (see the module docstring)."""

    __slots__ = ()


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~1 us per chain
class Used(Effect):
    """Add ``head`` to the queue's used ring with ``length`` bytes written (§2.7.8)."""

    head: int
    length: int


@dataclass(slots=True)   # not frozen: a frozen __init__ costs ~1 us per chain
class Stall(Effect):
    """Put the chain back and stop draining until the device resumes the queue."""

    reason: str = ""


ChainOutcome = bool | Sequence[Effect]


class QueueHandler:
    """Processes an activation's queues on the asyncio loop."""

    # Chains per wakeup before yielding to the loop: two rings' worth.
    BATCH_PER_WAKEUP_FACTOR = 2

    def __init__(self, activation: Activation, name: str) -> None:
        self.act = activation
        self.mem = activation.mem
        self.loop = activation.loop
        self.name = name
        self.stopped = False
        self._torn_down = False
        self.chains_seen = 0
        self._readers: list[int] = []
        self._scheduled: set[int] = set()
        self._draining: list[int] = []   # queues whose process() is on the stack (inside the gate)

    # -- hooks for devices --------------------------------------------------

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> ChainOutcome:
        """Decide what one chain needs, as effects (or ``True``/``False``: done/stall); no I/O."""
        raise NotImplementedError

    def take_usual(self, queue_index: int, table: memoryview, head: int) -> bool:
        """Answer the chain at ``head`` of the descriptor table ``table`` at once if it is the
        device's usual request, read straight from the table (``False``: :meth:`handle_chain`
        gets it).  For a per-request hot path that needs no :class:`DescriptorChain`."""
        return False

    def perform(self, queue_index: int, effect: Effect) -> bool:
        """Carry out a device-specific effect; ``False``: the backend cannot take it now."""
        raise TypeError(f"{self.name}: no way to carry out {effect!r}")

    def end_of_batch(self, queue_index: int) -> None:
        """After a drain, inside the gate, before its one interrupt: start I/O batched over it."""

    def on_queue_event(self, queue_index: int, chains: int) -> None:
        """A kick arrived and ``chains`` chains were popped in response (count them)."""

    def on_event_failure(self) -> None:
        """The device was stopped for a broken contract or a bug (count it)."""

    def on_stop(self) -> None:
        """Release device-specific resources (timers, in-flight I/O)."""

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        for index, (queue, event) in enumerate(zip(self.act.queues, self.act.queue_events)):
            if queue.ready:
                self.loop.add_reader(event.fileno(), self._on_queue_event, index)
                self._readers.append(event.fileno())
                # A kick written before the reader existed is still in the eventfd;
                # draining now also covers chains offered without a kick.
                self.schedule(index)

    def halt(self) -> None:
        """Stop processing: no more readers, no more ring updates."""
        self.stopped = True
        for fd in self._readers:
            self.loop.remove_reader(fd)
        self._readers.clear()

    def stop(self) -> None:
        """Halt and release everything (on the loop, outside the gate: on_stop may close it)."""
        if self._torn_down:
            return
        self._torn_down = True
        self.halt()
        self.on_stop()

    # -- processing ---------------------------------------------------------

    def _on_queue_event(self, index: int) -> None:
        self.act.queue_events[index].read()
        before = self.chains_seen
        self.process(index)
        self.on_queue_event(index, self.chains_seen - before)

    def schedule(self, index: int) -> None:
        """Process queue ``index`` soon, once, from a fresh loop callback."""
        if index not in self._scheduled and not self.stopped:
            self._scheduled.add(index)
            self.loop.call_soon(self._scheduled_process, index)

    def _scheduled_process(self, index: int) -> None:
        self._scheduled.discard(index)
        self.process(index)

    def process(self, index: int) -> Drain | None:
        """Drain queue ``index`` and interrupt once if the driver wants it."""
        if self.stopped:
            return None
        gate = self.act.gate
        if not gate.enter():                 # the activation was reset
            return None
        self._draining.append(index)
        try:
            try:                             # gate.access() without a generator per batch
                result = self._drain(index)
                self.end_of_batch(index)
                self.notify(index)
            finally:
                gate.exit()
        except GateClosedError:
            return None
        except QueueContractError as e:
            self.fail(f"queue {index}: {e}")
            return None
        except GuestMemoryError as e:       # see guarded()
            self.fail(f"queue {index}: guest memory gone under a request: {e}")
            return None
        except Exception:
            log.exception("%s: unexpected error processing queue %d", self.name, index)
            self.fail(f"queue {index}: internal error")
            return None
        finally:
            self._draining.pop()
        if result is Drain.MORE:
            self.schedule(index)
        return result

    def _drain(self, index: int) -> Drain:
        mem = self.mem
        queue = self.act.queues[index]
        rings = queue.rings(mem)
        budget = self.BATCH_PER_WAKEUP_FACTOR * queue.size
        while budget:
            head = queue.pop_head(rings)
            if head is None:
                if queue.enable_notification(mem):
                    continue
                return Drain.EMPTY
            budget -= 1
            self.chains_seen += 1
            if self.take_usual(index, rings.desc, head):
                continue
            outcome = self.handle_chain(index, queue.chain_at(mem, rings, head))
            if outcome is True or (outcome is not False and self.carry_out(index, outcome)):
                continue
            queue.undo_pop()
            return Drain.STALLED
        return Drain.MORE

    def carry_out(self, index: int, effects: Sequence[Effect]) -> bool:
        """Do ``effects`` in order (inside the gate); ``False`` if one says stall.

        :class:`Used` and :class:`Stall` are matched by exact type (the
        per-chain hot path); every other effect goes to :meth:`perform`.
        """
        queue = self.act.queues[index]
        for effect in effects:
            kind = type(effect)
            if kind is Used:
                queue.add_used(self.mem, effect.head, effect.length)
            elif kind is Stall:
                return False
            elif not self.perform(index, effect):
                return False
        return True

    def complete(self, index: int, effects: Sequence[Effect]) -> None:
        """Carry out the effects of work that finished after its chain was handled.

        Inside a drain (a synchronous backend completing during
        :meth:`handle_chain`) the gate is held and that queue's batch
        notifies; from a loop callback this takes the gate and notifies once
        itself.
        """
        if self._draining:
            self.carry_out(index, effects)
            if index not in self._draining:
                self.notify(index)
        else:
            self.guarded(self._complete_and_notify, index, effects)

    def _complete_and_notify(self, index: int, effects: Sequence[Effect]) -> None:
        self.carry_out(index, effects)
        self.notify(index)

    def notify(self, index: int) -> None:
        """Raise the used-buffer interrupt if entries were added and the driver wants one."""
        if self.act.queues[index].needs_notification(self.mem):
            self.act.interrupts.signal_used(index)

    def fail(self, reason: str) -> None:
        """Halt and tell the driver it must reset the device (§2.1.2).

        Called inside the gate, so only :meth:`halt`: the teardown waits for
        the driver's reset (or the VMM's), which deactivates the device.
        """
        # No log line of our own: the transport counts this as a guest fault and limits its
        # log lines (a guest can break a ring, reset and re-activate in a loop).
        self.on_event_failure()
        self.act.interrupts.needs_reset(f"{self.name}: {reason}")
        self.halt()

    def guarded(self, fn, *args) -> None:
        """Run ``fn(*args)`` inside the gate with the same failure handling as :meth:`process`."""
        if self.stopped:
            return
        gate = self.act.gate
        if not gate.enter():                 # the activation was reset
            return
        try:
            try:                             # gate.access() without a generator per call
                fn(*args)
            finally:
                gate.exit()
        except GateClosedError:
            pass
        except QueueContractError as e:
            self.fail(str(e))
        except GuestMemoryError as e:
            # The guest took memory away under a request (a virtio-mem unplug of the block
            # holding its status byte): its fault, reported rate-limited, not a traceback.
            self.fail(f"guest memory gone under a request: {e}")
        except Exception:
            log.exception("%s: unexpected error", self.name)
            self.fail("internal error")


class ThrottledQueueHandler(QueueHandler):
    """A handler whose one queue (0) waits on a rate limiter through ``self.timer``, a
    :class:`~asyncvmm.devices.rate_limiter.ThrottleTimer` the subclass makes with
    :meth:`_on_throttle_timer` as its callback (block, pmem, entropy)."""

    metrics: object
    timer: object

    def _on_throttle_timer(self) -> None:
        self.metrics.rate_limiter_event_count += 1
        self.process(0)

    def rate_limiter_updated(self) -> None:
        """New buckets start full: a stalled queue may go on now."""
        if self.timer.armed:
            self.timer.cancel()
            self.schedule(0)
