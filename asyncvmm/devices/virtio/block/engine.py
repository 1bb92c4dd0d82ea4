"""File I/O engines for virtio-block: ``Sync`` and ``Async``.

An engine executes :class:`IoOp` s (read, write, flush at a file offset,
straight into or out of guest-memory views) and hands back ``(op, result)``
pairs where ``result`` is the byte count, the ``OSError`` or
:data:`CANCELLED`.  Engines know nothing of virtio.

* :class:`SyncEngine` runs each op on the loop thread as it is submitted and
  returns its result at once: lowest latency for one request, but the loop
  waits on the disk.
* :class:`~asyncvmm.devices.virtio.block.uring.UringEngine` (``Async``)
  hands up to ``depth`` ops to the kernel's io_uring, so the disk works
  while the loop serves other devices.

Both share one contract: ``submit(ops)`` starts the ops and *returns* the
results already known; it never calls back into its caller.  Results that
arrive later come through ``on_complete(batch)`` from a loop callback of the
engine's own.  ``room`` is how many more ops the engine takes now.

Each op enters the activation's :class:`DmaGate` for as long as it may touch
guest memory, so a reset never returns while an op writes guest memory, and
an op submitted after a reset does nothing (result :data:`CANCELLED`).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

from asyncvmm.devices.virtio.gate import DmaGate

log = logging.getLogger(__name__)


class IoKind(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"


class _Cancelled:
    def __repr__(self) -> str:
        return "CANCELLED"


CANCELLED = _Cancelled()


@dataclass(eq=False, slots=True)
class IoOp:
    kind: IoKind
    fd: int
    offset: int
    buffers: list[memoryview]
    length: int
    token: object = None                  # the caller's request


def _advance(buffers: list[memoryview], done: int) -> list[memoryview]:
    """The buffers left after ``done`` bytes of them were transferred."""
    out = []
    for b in buffers:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:] if done else b)
        done = 0
    return out


def perform(op: IoOp, fdatasync: Callable[[int], None] = os.fdatasync) -> int:
    """Run ``op`` to completion; partial transfers continue, EOF is an error."""
    if op.kind is IoKind.FLUSH:
        fdatasync(op.fd)
        return 0
    done, buffers = 0, op.buffers
    while done < op.length:
        if op.kind is IoKind.READ:
            n = os.preadv(op.fd, buffers, op.offset + done)
        else:
            n = os.pwritev(op.fd, buffers, op.offset + done)
        if n <= 0:
            # The file shrank under us (the capacity was computed at open).
            raise OSError(errno.EIO, f"{op.kind.value} at {op.offset + done} hit end of file")
        done += n
        buffers = _advance(buffers, n)
    return done


class SyncEngine:
    """Runs every op on the calling (loop) thread: :meth:`submit` returns every result."""

    name = "Sync"
    in_flight = 0
    room = sys.maxsize                     # never full: nothing waits in an engine queue

    def __init__(self, gate: DmaGate, *, fdatasync: Callable[[int], None] = os.fdatasync) -> None:
        self.gate = gate
        self.fdatasync = fdatasync

    def submit(self, ops: list[IoOp]) -> list[tuple[IoOp, object]]:
        # One gate entry for the batch: the ops run back to back on this thread.
        gate = self.gate
        if not gate.enter():
            return [(op, CANCELLED) for op in ops]
        try:
            return [self.run_inside_gate(op) for op in ops]
        finally:
            gate.exit()

    def run_inside_gate(self, op: IoOp) -> tuple[IoOp, object]:
        """Run one op for a caller that already holds the activation's gate (a queue drain)."""
        try:
            return op, perform(op, self.fdatasync)
        except OSError as e:
            return op, e

    def close(self) -> None:
        pass
