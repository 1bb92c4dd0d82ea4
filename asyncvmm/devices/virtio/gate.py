"""A gate that fences a device's guest-memory accesses against a reset.

A virtio device touches guest buffers from the asyncio loop (queue
processing, the Sync block engine, used-ring updates) and from outside it:
the kernel (io_uring reads and writes guest memory on its own time) and any
worker thread a device may use.  The driver's reset is a
register write that the loop executes while the vCPU waits; once it
completes the driver may reuse every buffer and ring page it had given the
device.  So the reset must not complete while any access of the old
activation is in progress, and none may start afterwards.

:class:`DmaGate` does that: each access runs between :meth:`enter` (which
refuses once the gate is closed) and :meth:`exit`; :meth:`close` refuses new
entries and waits for the ones inside.  Loop accesses are over before the
reset runs (it runs on the loop too); a worker's would be one syscall.  An
io_uring op leaves the gate only when the loop reaps its completion, so on
the loop the device's engine is closed (which reaps everything) *before*
the gate: see ``VirtioTransport._reset`` (transport.py).
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


class GateClosedError(Exception):
    """The activation this access belonged to has been reset."""


class DmaGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # enter/exit take the lock itself (its C context manager: they run per access);
        # close() waits on a condition over the same lock.
        self._cond = threading.Condition(self._lock)
        self._open = True
        self._inside = 0

    @property
    def is_open(self) -> bool:
        return self._open

    def enter(self, count: int = 1) -> bool:
        """Start ``count`` accesses; ``False`` (and none) once the gate is closed."""
        with self._lock:
            if not self._open:
                return False
            self._inside += count
            return True

    def exit(self, count: int = 1) -> None:
        """End ``count`` accesses (a batch of reaped operations takes the lock once)."""
        with self._lock:
            self._inside -= count
            # Only close() waits, and it closes the gate first: while the gate is open nobody
            # is waiting, and Condition.notify_all would cost every access its Python-level walk.
            if self._inside == 0 and not self._open:
                self._cond.notify_all()

    @contextmanager
    def access(self) -> Iterator[None]:
        """``with gate.access():`` an access; raises :class:`GateClosedError` if closed."""
        if not self.enter():
            raise GateClosedError("device was reset")
        try:
            yield
        finally:
            self.exit()

    def close(self, timeout: float = 5.0) -> bool:
        """Refuse new accesses and wait for current ones; ``False`` on timeout.

        A timeout means a host syscall is stuck (e.g. a hung NFS backing
        file); the reset proceeds anyway and the late access is logged.
        """
        with self._cond:
            self._open = False
            done = self._cond.wait_for(lambda: self._inside == 0, timeout)
        if not done:
            log.error("device reset while %d guest-memory accesses were still running", self._inside)
        return done
