"""vCPU threads: ``KVM_RUN`` in a loop, exits dispatched to the buses.

Each vCPU has a thread (named ``fc_vcpu <n>`` as in Firecracker) and an
explicit run state.  Requests from the loop (pause, resume, exit) move the
state through :data:`TRANSITIONS`; a thread blocked in ``KVM_RUN`` is kicked
out by setting ``immediate_exit`` and sending it :data:`KICK_SIGNAL` (the
signal has a no-op handler, so the only effect is ``EINTR``).  Setting
``immediate_exit`` first closes the race with a thread that is about to
enter ``KVM_RUN``: it returns at once instead of missing the signal.

Where an exit is answered (see ``docs/architecture.md``):

* port I/O (UART bytes, i8042, ACPI PM): on this thread, through the
  port-I/O bus; legacy register handlers are short by contract.  Ports a
  loop-owned port-I/O bus claims (``pio_loop_bus``: PCI CONFIG_ADDRESS/DATA,
  whose devices belong to the loop) are handed to the loop like MMIO; the
  check costs one bisect on that small bus;
* MMIO: the MMIO bus's devices belong to the asyncio loop, so the access is
  handed to the loop through a thread-safe future (:meth:`Vcpu._on_loop`)
  and the thread waits for the answer.  Only registers a device answers
  inline (virtio-mmio's InterruptStatus/ACK) skip the hand-off.  While it
  waits, a pause completes once the answer came (the loop is running); an
  exit request cancels the hand-off and ends the thread, and so does a loop
  that closed under it, so a vCPU never hangs on a loop that is gone.

Exits that end the VM are reported to the loop with ``call_soon_threadsafe``;
the thread then stops.  Each vCPU bumps its own :class:`VcpuMetrics`; the
``vcpu`` group reports their sum (``metrics.SummedGroup``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import signal
import threading
from typing import Callable

from .devices.bus import Bus
from .kvm import KvmError, VcpuFd
from .kvm import exits as x
from .metrics import MetricGroup

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN + 2
# How often a vCPU waiting for the loop checks that the loop still exists.
HANDOFF_POLL_S = 0.5


class HandoffAbandoned(Exception):
    """A hand-off to the loop will never be answered: the vCPU is exiting or the loop closed."""


def _answer_on_loop(fut: concurrent.futures.Future, fn: Callable, args: tuple) -> None:
    """Loop side of a hand-off: run ``fn(*args)`` unless the vCPU gave up waiting."""
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn(*args))
    except BaseException as e:       # delivered to the vCPU thread, which reports it
        fut.set_exception(e)


def _pio_out(bus: Bus, port: int, data: bytes, size: int) -> None:
    """Loop side of an OUT (a ``rep outs`` string in one hand-off)."""
    for i in range(0, len(data), size):
        bus.write(port, data[i:i + size])


def _pio_in(bus: Bus, port: int, size: int, count: int) -> bytes:
    return b"".join(bus.read(port, size) for _ in range(count))


def install_kick_handler() -> None:
    """Give :data:`KICK_SIGNAL` a no-op handler (main thread only, once per process)."""
    signal.signal(KICK_SIGNAL, lambda *_: None)


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITING = "exiting"


class Request(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    EXIT = "exit"


# (state, request) -> next state.  Pausing a paused vCPU and resuming a running
# one are no-ops; EXITING is final.
TRANSITIONS: dict[tuple[RunState, Request], RunState] = {
    (RunState.RUNNING, Request.PAUSE): RunState.PAUSED,
    (RunState.RUNNING, Request.RESUME): RunState.RUNNING,
    (RunState.RUNNING, Request.EXIT): RunState.EXITING,
    (RunState.PAUSED, Request.PAUSE): RunState.PAUSED,
    (RunState.PAUSED, Request.RESUME): RunState.RUNNING,
    (RunState.PAUSED, Request.EXIT): RunState.EXITING,
    (RunState.EXITING, Request.PAUSE): RunState.EXITING,
    (RunState.EXITING, Request.RESUME): RunState.EXITING,
    (RunState.EXITING, Request.EXIT): RunState.EXITING,
}


class VcpuStopReason(enum.Enum):
    """Why a vCPU stopped the VM; the VMM maps these to process exit codes."""
    GUEST_SHUTDOWN = "guest shutdown"        # KVM_SYSTEM_EVENT_SHUTDOWN, HLT without irqchip
    GUEST_RESET = "guest reset"              # KVM_SYSTEM_EVENT_RESET
    TRIPLE_FAULT = "guest triple fault"      # KVM_EXIT_SHUTDOWN
    GUEST_CRASH = "guest crash"              # KVM_SYSTEM_EVENT_CRASH
    KVM_FAILURE = "KVM failure"              # entry failure, internal error, unknown exit


@dataclasses.dataclass
class VcpuMetrics(MetricGroup):
    """Firecracker's ``vcpu`` metrics group; one per vCPU thread, reported summed."""
    exit_io_in: int = 0
    exit_io_out: int = 0
    exit_mmio_read: int = 0
    exit_mmio_write: int = 0
    failures: int = 0


class Vcpu:
    #: Let devices answer their inline registers (virtio-mmio InterruptStatus/ACK) on the
    #: vCPU thread instead of handing them to the loop; figures in docs/architecture.md.
    INLINE_REGISTERS = True

    def __init__(self, fd: VcpuFd, *, pio_bus: Bus, mmio_bus: Bus,
                 loop: asyncio.AbstractEventLoop,
                 on_stop: Callable[[int, VcpuStopReason, str], None],
                 metrics: VcpuMetrics, pio_loop_bus: Bus | None = None) -> None:
        self.fd = fd
        self.index = fd.vcpu_id
        self._pio = pio_bus
        self._pio_loop = pio_loop_bus
        self._mmio = mmio_bus
        self._loop = loop
        self._on_stop = on_stop
        self.metrics = metrics
        self._cond = threading.Condition()
        self._state = RunState.PAUSED        # started paused; resume() lets it run
        self._parked = False                 # the thread is waiting in PAUSED
        self._ran = False                    # the thread has entered KVM_RUN at least once
        self._waiters: list[concurrent.futures.Future] = []
        self._handoff: concurrent.futures.Future | None = None   # a register access on the loop
        self._thread: threading.Thread | None = None
        #: Run first on the new thread, before any guest code (the seccomp filter goes in here).
        self.before_run: Callable[[], None] | None = None

    @property
    def state(self) -> RunState:
        return self._state

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name=f"fc_vcpu {self.index}",
                                        daemon=True)
        self._thread.start()

    # -- requests from the loop ------------------------------------------------

    def request(self, req: Request) -> concurrent.futures.Future:
        """Apply ``req``; the future completes when the thread has acted on it."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._state = TRANSITIONS[(self._state, req)]
            if self._state is RunState.RUNNING:
                self.fd.set_immediate_exit(False)
                self._parked = False
                done.set_result(None)
            elif self._thread is None or not self._thread.is_alive() or (
                    self._state is RunState.PAUSED and self._parked):
                done.set_result(None)
            else:
                self._waiters.append(done)
                self.fd.set_immediate_exit(True)
            if self._state is RunState.EXITING and self._handoff is not None:
                # Called on the loop, so the hand-off has not started: cancelling it wakes
                # the thread, which ends (the caller may be about to join it on the loop).
                self._handoff.cancel()
            self._cond.notify_all()
        if not done.done():
            self._kick()
        return done

    def _kick(self) -> None:
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------

    def _ack(self) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _thread_main(self) -> None:
        try:
            if self.before_run is not None:
                self.before_run()
            while self._wait_until_runnable():
                if not self._run_once():
                    break
        except Exception:  # a bug here must not leave a silent, stuck vCPU
            log.exception("vCPU %d: unexpected error", self.index)
            self._stop(VcpuStopReason.KVM_FAILURE, "unexpected error in the vCPU thread")
        finally:
            with self._cond:
                self._state = RunState.EXITING
                self._ack()

    def _complete_pending_exit(self) -> None:
        """Re-enter KVM_RUN with ``immediate_exit`` so KVM finishes the last port/MMIO exit
        (advances RIP past an OUT, stores an IN's data) without running the guest: KVM's
        API document asks this of a VMM before it reads vCPU state (a snapshot)."""
        self.fd.set_immediate_exit(True)
        try:
            exit_ = self.fd.run()
        except KvmError as e:
            log.debug("vCPU %d: completing the last exit before parking: %s", self.index, e)
            return
        if not isinstance(exit_, x.Interrupted):
            log.debug("vCPU %d: KVM_RUN with immediate_exit returned %r", self.index, exit_)

    def _wait_until_runnable(self) -> bool:
        with self._cond:
            if self._state is RunState.PAUSED and self._ran:
                self._complete_pending_exit()
            while self._state is RunState.PAUSED:
                self._parked = True
                self._ack()
                self._cond.wait()
            self._parked = False
            self._ran = True
            return self._state is RunState.RUNNING

    def _stop(self, reason: VcpuStopReason, detail: str) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_stop, self.index, reason, detail)
        except RuntimeError:             # the loop is closed: the VMM is already ending
            log.debug("vCPU %d stopped after the loop closed: %s", self.index, detail)

    def _on_loop(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the loop thread and return its result (a register access)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._state is RunState.EXITING:
                raise HandoffAbandoned("the vCPU is exiting")
            self._handoff = fut
        try:
            try:
                self._loop.call_soon_threadsafe(_answer_on_loop, fut, fn, args)
            except RuntimeError as e:            # the loop is closed
                raise HandoffAbandoned(str(e)) from e
            while True:
                try:
                    return fut.result(timeout=HANDOFF_POLL_S)
                except concurrent.futures.TimeoutError:
                    if self._loop.is_closed() and fut.cancel():
                        raise HandoffAbandoned("the loop closed") from None
                except concurrent.futures.CancelledError:
                    raise HandoffAbandoned("the hand-off was cancelled") from None
        finally:
            with self._cond:
                self._handoff = None

    def _mmio_read(self, addr: int, size: int) -> bytes:
        if self.INLINE_REGISTERS:
            data = self._mmio.read_inline(addr, size)
            if data is not None:
                return data
        return self._on_loop(self._mmio.read, addr, size)

    def _mmio_write(self, addr: int, data: bytes) -> None:
        if not (self.INLINE_REGISTERS and self._mmio.write_inline(addr, data)):
            self._on_loop(self._mmio.write, addr, data)

    def _run_once(self) -> bool:
        """One KVM_RUN and its exit; False when this vCPU is done."""
        try:
            exit_ = self.fd.run()
        except KvmError as e:
            self.metrics.failures += 1
            self._stop(VcpuStopReason.KVM_FAILURE, str(e))
            return False
        try:
            return self._handle(exit_)
        except HandoffAbandoned as e:
            log.debug("vCPU %d: %s; the thread ends", self.index, e)
            return False

    def _handle(self, exit_) -> bool:
        match exit_:
            case x.MmioWrite(addr, data):
                self.metrics.exit_mmio_write += 1
                self._mmio_write(addr, data)
            case x.MmioRead(addr, size):
                self.metrics.exit_mmio_read += 1
                exit_.complete(self._mmio_read(addr, size))
            case x.IoOut(port, data, size):
                self.metrics.exit_io_out += 1
                if self._pio_loop is not None and self._pio_loop.device_at(port) is not None:
                    self._on_loop(_pio_out, self._pio_loop, port, data, size)
                else:
                    _pio_out(self._pio, port, data, size)
            case x.IoIn(port, size, count):
                self.metrics.exit_io_in += 1
                if self._pio_loop is not None and self._pio_loop.device_at(port) is not None:
                    exit_.complete(self._on_loop(_pio_in, self._pio_loop, port, size, count))
                else:
                    exit_.complete(_pio_in(self._pio, port, size, count))
            case x.Interrupted():
                pass
            case x.SystemEvent(type=x.KVM_SYSTEM_EVENT_SHUTDOWN):
                self._stop(VcpuStopReason.GUEST_SHUTDOWN, "KVM_SYSTEM_EVENT_SHUTDOWN")
                return False
            case x.SystemEvent(type=x.KVM_SYSTEM_EVENT_RESET):
                self._stop(VcpuStopReason.GUEST_RESET, "KVM_SYSTEM_EVENT_RESET")
                return False
            case x.SystemEvent(type=x.KVM_SYSTEM_EVENT_CRASH):
                self._stop(VcpuStopReason.GUEST_CRASH, "KVM_SYSTEM_EVENT_CRASH")
                return False
            case x.Shutdown():
                self._stop(VcpuStopReason.TRIPLE_FAULT, "KVM_EXIT_SHUTDOWN")
                return False
            case x.Hlt():
                self._stop(VcpuStopReason.GUEST_SHUTDOWN, "KVM_EXIT_HLT")
                return False
            case _:
                self.metrics.failures += 1
                self._stop(VcpuStopReason.KVM_FAILURE, repr(exit_))
                return False
        return True
