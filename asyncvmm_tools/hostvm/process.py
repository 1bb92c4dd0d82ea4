"""Start a child that cannot outlive us, and kill its whole process group.

The child gets its own session (so one ``killpg`` reaches QEMU and anything
it forked) and ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills it if
the parent dies without cleaning up (SIGKILL, OOM).  PDEATHSIG fires when the
*thread* that forked exits, so :class:`Child` must be started from a thread
that outlives it -- the caller's thread, which waits on it.

:func:`terminate_on_signals` turns SIGTERM/SIGHUP into an exception in the
main thread for the duration of a ``with`` block, so the ``finally`` that
kills QEMU runs on ``kill <pytest>`` as it does on Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import IO, Callable, Iterator

PR_SET_PDEATHSIG = 1


class TerminatedError(BaseException):
    """The parent received SIGTERM/SIGHUP while a child was running."""


def _child_setup() -> None:
    # Runs in the child between fork and exec: new session, die with the parent.
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Child:
    """A subprocess whose combined output is pumped line-free (bytes as they come) to ``sink``."""

    def __init__(self, argv: list[str], sink: Callable[[bytes], None], stdin: int | IO | None = None,
                 env: dict | None = None, cwd: str | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_child_setup, env=env, cwd=cwd)
        self._pump = threading.Thread(target=self._copy, args=(sink,), daemon=True)
        self._pump.start()

    def _copy(self, sink: Callable[[bytes], None]) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            sink(chunk)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float | None) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._pump.join(timeout=5)
        return rc

    def kill(self) -> None:
        """SIGKILL the child's process group (idempotent) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._pump.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


@contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Raise :class:`TerminatedError` on SIGTERM/SIGHUP inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise TerminatedError(f"received signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
