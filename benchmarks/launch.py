"""Start a VMM process with a precise start time and timestamp what it prints.

Contract:

* ``launch(argv)`` takes ``time.monotonic_ns()`` immediately before
  ``subprocess.Popen`` (which execs through vfork/posix_spawn when, as here,
  no ``preexec_fn`` is given: the fork cost is small and the same for every
  VMM).  That instant is the "process start" every benchmark measures from.
* One reader thread per output pipe records the arrival time of every chunk
  it reads (``os.read`` returning), so a marker's time is the time its last
  byte reached us.  Threads, not the asyncio loop, because the benchmark's
  own loop must not add latency to the VMM's output; each thread blocks in
  ``read`` and costs nothing while the VMM is quiet.
* A *probe* (``launch(argv, probes={marker: fn})``) runs ``fn(pid)`` on the
  stdout thread right after stamping the chunk that completes ``marker``,
  e.g. to read the VMM's CPU time as the guest's boot-timer line arrives;
  its result (or the exception it raised) is in ``stdout.probed``.
* Every child started here is killed when the benchmark exits, however it
  exits (normal return, exception, SIGINT, SIGTERM, SIGHUP): ``atexit`` plus
  signal handlers that turn the signal into ``SystemExit``.  A SIGKILL of
  the benchmark itself cannot be caught and leaves the children orphaned
  (``PR_SET_PDEATHSIG`` would need a ``preexec_fn``, which forces a full
  fork and would change what the start time measures).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

CHUNK = 65536
STOP_GRACE_S = 5.0

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()
_cleanup_installed = False


class LaunchError(RuntimeError):
    """A VMM did not start, did not print an expected marker, or did not open its socket."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    t_ns: int
    data: bytes


def arrival_of(chunks: Sequence[Chunk], offset: int) -> int | None:
    """Arrival time of the chunk holding byte ``offset`` of the stream, if it arrived."""
    end = 0
    for c in chunks:
        end += len(c.data)
        if offset < end:
            return c.t_ns
    return None


def first_arrivals(chunks: Sequence[Chunk], markers: Iterable[bytes], *,
                   edge: str = "end") -> dict[bytes, int]:
    """For each marker found in the stream, when its first occurrence arrived.

    ``edge="end"``: the arrival of its last byte (the marker is complete);
    ``edge="start"``: the arrival of its first byte.  A marker may straddle
    chunks; markers never seen (or empty) are absent from the result.
    """
    if edge not in ("start", "end"):
        raise ValueError(f"edge must be 'start' or 'end', not {edge!r}")
    stream = b"".join(c.data for c in chunks)
    found: dict[bytes, int] = {}
    for marker in markers:
        at = stream.find(marker) if marker else -1
        if at < 0:
            continue
        t = arrival_of(chunks, at if edge == "start" else at + len(marker) - 1)
        assert t is not None                    # the byte is inside the stream we searched
        found[marker] = t
    return found


class StreamRecorder(threading.Thread):
    """Reads one pipe to EOF, keeping every chunk with its arrival time."""

    def __init__(self, fd: int, name: str, clock: Callable[[], int] = time.monotonic_ns,
                 probes: Mapping[bytes, Callable[[], Any]] | None = None) -> None:
        super().__init__(name=f"bench-reader-{name}", daemon=True)
        self._fd = fd
        self._clock = clock
        self._cond = threading.Condition()
        self.chunks: list[Chunk] = []
        self._data = bytearray()
        self.eof = False
        self._pending = dict(probes or {})
        # marker -> what its probe returned, or the exception it raised (e.g. the process is gone)
        self.probed: dict[bytes, Any] = {}

    def run(self) -> None:
        try:
            while True:
                data = os.read(self._fd, CHUNK)
                t = self._clock()
                with self._cond:
                    if not data:
                        break
                    self.chunks.append(Chunk(t, data))
                    self._data += data
                    self._run_probes(len(data))
                    self._cond.notify_all()
        except OSError:
            pass                                 # the pipe was closed under us by stop()
        finally:
            with self._cond:
                self.eof = True
                self._cond.notify_all()

    def _run_probes(self, new: int) -> None:
        """Probe every pending marker that the last ``new`` bytes completed (lock held)."""
        for marker, probe in list(self._pending.items()):
            if self._data.find(marker, max(0, len(self._data) - new - len(marker) + 1)) < 0:
                continue
            del self._pending[marker]
            try:
                self.probed[marker] = probe()
            except Exception as err:          # noqa: BLE001 - kept for the caller to report
                self.probed[marker] = err

    @property
    def data(self) -> bytes:
        with self._cond:
            return bytes(self._data)

    def wait_for(self, marker: bytes, timeout: float) -> bool:
        """Block until ``marker`` has arrived (True) or EOF/timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while marker not in self._data:
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def arrivals(self, markers: Iterable[bytes], *, edge: str = "end") -> dict[bytes, int]:
        with self._cond:
            chunks = list(self.chunks)
        return first_arrivals(chunks, markers, edge=edge)


@dataclasses.dataclass
class Launched:
    """A running child: its start instant, its pipes' recorders."""

    argv: list[str]
    t_start_ns: int
    proc: subprocess.Popen
    stdout: StreamRecorder
    stderr: StreamRecorder

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit status."""
        try:
            stop_process(self.proc, grace)
        finally:
            _forget(self.proc)
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.stdout.join(grace)
            self.stderr.join(grace)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        return self.proc.returncode

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise LaunchError(f"{self.argv[0]} did not exit within {timeout} s") from None
        self.stop()
        return code

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch(argv: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
           clock: Callable[[], int] = time.monotonic_ns,
           probes: Mapping[bytes, Callable[[int], Any]] | None = None) -> Launched:
    """Start ``argv`` with stdin an idle pipe and stdout/stderr recorded.

    ``probes`` maps a stdout marker to a function of the child's pid, run by
    the stdout reader right after the marker arrives (``Launched.stdout.probed``).
    """
    install_cleanup()
    t_start = clock()
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env, bufsize=0)
    with _live_lock:
        _live.add(proc)
    assert proc.stdout is not None and proc.stderr is not None
    bound = {marker: functools.partial(fn, proc.pid) for marker, fn in (probes or {}).items()}
    out = StreamRecorder(proc.stdout.fileno(), "stdout", clock, bound)
    err = StreamRecorder(proc.stderr.fileno(), "stderr", clock)
    out.start()
    err.start()
    return Launched(list(argv), t_start, proc, out, err)


def connect_unix(path: Path, deadline_s: float, *, poll_s: float = 0.0005,
                 clock: Callable[[], int] = time.monotonic_ns,
                 alive: Callable[[], bool] = lambda: True) -> tuple[socket.socket, int]:
    """Connect to a Unix socket as soon as it accepts; returns the socket and the instant.

    Polls every ``poll_s`` (0.5 ms), so the instant is late by at most that
    plus scheduling delay.  Raises LaunchError if ``alive()`` turns false or
    the deadline passes.
    """
    end = time.monotonic() + deadline_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock, clock()
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if not alive():
            raise LaunchError(f"the process exited before {path} accepted connections")
        if time.monotonic() > end:
            raise LaunchError(f"{path} did not accept connections within {deadline_s} s")
        time.sleep(poll_s)


def parse_stat_cpu_ticks(stat: str) -> int:
    """utime + stime (clock ticks) from a ``/proc/<pid>/stat`` line.

    The command name (field 2) may hold spaces and parentheses, so fields
    are counted from the last ')': utime and stime are fields 14 and 15.
    """
    close = stat.rfind(")")
    rest = stat[close + 2:].split() if close >= 0 else []
    if len(rest) < 13:
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:120]!r}")
    return int(rest[11]) + int(rest[12])


def stat_cpu_ms(stat: str, clk_tck: int) -> float:
    """utime + stime of a ``/proc/<pid>/stat`` line in ms, all threads (live and exited) included."""
    return parse_stat_cpu_ticks(stat) * 1000 / clk_tck


def process_cpu_ms(pid: int) -> float:
    """CPU time (user + system) a live process has used, in ms (resolution 1/CLK_TCK)."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return stat_cpu_ms(f.read(), os.sysconf("SC_CLK_TCK"))


_installer_pid = -1


def install_cleanup() -> None:
    """Kill live children at exit and on SIGTERM/SIGHUP (SIGINT already raises)."""
    global _cleanup_installed
    if _cleanup_installed:
        return
    _cleanup_installed = True
    global _installer_pid
    _installer_pid = os.getpid()
    atexit.register(kill_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _raise_exit)


def stop_process(proc: subprocess.Popen, grace: float) -> int:
    """Stop ``proc`` if it still runs: SIGTERM, SIGKILL after ``grace`` seconds; its exit status.

    The one stop of a VMM or fork server process for benchmarks and tests (tests/kvm, tests/integration).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def kill_all() -> None:
    with _live_lock:
        procs = list(_live)
        _live.clear()
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _forget(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live.discard(proc)


def _raise_exit(signum: int, _frame: object) -> None:
    if os.getpid() != _installer_pid:
        # A forked child (e.g. a library's helper process) inherited the handler:
        # die of the signal as it expects, instead of raising in its code.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise SystemExit(128 + signum)
