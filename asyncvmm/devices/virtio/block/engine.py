"""File I/O engines for virtio-block: ``Sync`` and ``Async``.

An engine executes :class:`IoOp` s (read, write, flush at a file offset,
straight into or out of guest-memory views) and hands the results back on
the asyncio loop through ``on_complete(batch)``, a list of ``(op, result)``
where ``result`` is the byte count or the ``OSError``.  Engines know
nothing of virtio.

* :class:`SyncEngine` runs each op on the loop thread as it is submitted and
  completes it at once: lowest latency for one request, but the loop waits
  on the disk.
* :class:`AsyncEngine` keeps up to ``depth`` ops in flight on a small thread
  pool; ``os.preadv``/``os.pwritev``/``os.fdatasync`` release the GIL, so the
  disk works while the loop serves other devices.  Results are collected in a
  deque and delivered with one loop wakeup per burst.

Each op enters the activation's :class:`DmaGate` around its syscall, so a
reset never returns while an op writes guest memory, and an op that starts
after a reset does nothing (result :data:`CANCELLED`).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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


def _run(op: IoOp, gate: DmaGate, fdatasync: Callable[[int], None]) -> int | OSError | _Cancelled:
    if not gate.enter():
        return CANCELLED
    try:
        return perform(op, fdatasync)
    except OSError as e:
        return e
    finally:
        gate.exit()


class SyncEngine:
    """Runs every op on the calling (loop) thread, completing it before ``submit`` returns."""

    name = "Sync"

    def __init__(self, gate: DmaGate, on_complete: Callable[[list], None], *,
                 fdatasync: Callable[[int], None] = os.fdatasync) -> None:
        self.gate = gate
        self.on_complete = on_complete
        self.fdatasync = fdatasync
        self.in_flight = 0

    @property
    def full(self) -> bool:
        return False

    def submit(self, op: IoOp) -> None:
        result = _run(op, self.gate, self.fdatasync)
        self.on_complete([(op, result)])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class AsyncEngine:
    """Up to ``depth`` ops in flight on ``workers`` threads; results come back on ``loop``."""

    name = "Async"

    def __init__(self, loop: asyncio.AbstractEventLoop, gate: DmaGate,
                 on_complete: Callable[[list], None], *, workers: int = 4, depth: int = 64,
                 fdatasync: Callable[[int], None] = os.fdatasync) -> None:
        self.loop = loop
        self.gate = gate
        self.on_complete = on_complete
        self.fdatasync = fdatasync
        self.depth = depth
        self.in_flight = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blk-io")
        self._lock = threading.Lock()
        self._done: collections.deque = collections.deque()
        self._wakeup_pending = False
        self._futures: set[Future] = set()
        self._closed = False

    @property
    def full(self) -> bool:
        return self.in_flight >= self.depth

    def submit(self, op: IoOp) -> None:
        self.in_flight += 1
        fut = self._pool.submit(self._work, op)
        self._futures.add(fut)
        fut.add_done_callback(self._futures.discard)

    def flush(self) -> None:
        pass

    def _work(self, op: IoOp) -> None:
        """On a worker thread: run the op, queue the result, wake the loop once per burst."""
        result = _run(op, self.gate, self.fdatasync)
        with self._lock:
            self._done.append((op, result))
            wake = not self._wakeup_pending
            self._wakeup_pending = True
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                pass                      # loop closed: the VMM is exiting

    def _deliver(self) -> None:
        with self._lock:
            batch = list(self._done)
            self._done.clear()
            self._wakeup_pending = False
        self.in_flight -= len(batch)
        if batch and not self._closed:
            self.on_complete(batch)

    def close(self) -> None:
        """Drop ops that have not started; running ones finish (the gate keeps them harmless)."""
        self._closed = True
        for fut in list(self._futures):
            fut.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
