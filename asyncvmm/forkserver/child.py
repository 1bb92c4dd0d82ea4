"""What a forked child does to become an ordinary VMM process.

Runs in the child between ``os.fork()`` and the VMM's ``main``; never returns
(the child leaves with ``os._exit``).  It drops everything the fork server
holds that the VMM must not have, and takes on what the launcher handed over:

* its own session (``setsid``): the server's process group and terminal are
  not its own, and killing the server leaves it running;
* no server socket, no other launcher's connection, no server pipe: the
  server's objects are closed by name, then every other descriptor above
  stderr except its own connection (``close_range``);
* the signal dispositions of a fresh interpreter and an empty signal mask,
  not the server's handlers;
* the launcher's stdin/stdout/stderr on 0/1/2, its cwd, umask, environment
  and rlimits, and fresh ``sys.std*`` objects over them;
* its own secrets: ``random`` is reseeded (CPython also does so at fork), and
  MMDS token keys are drawn after the fork (``mmds/token.py`` redraws any key
  that crossed one);
* the launcher's death is its death: the connection is set to raise SIGKILL
  in this process when it becomes readable (``O_ASYNC`` + ``F_SETSIG``), and
  the launcher never writes after its request, so readable means closed.

Before exiting, a child whose fork server has gone (it was re-parented) sends
its own exit status on the connection, so the launcher learns it all the
same; while the server lives, only the server reports, after the pid.
"""

from __future__ import annotations

import fcntl
import os
import resource
import select
import signal
import sys
import time
import traceback
from typing import Any, Callable, Iterable

from asyncvmm.forkserver import launcher, protocol

# The dispositions a freshly started CPython has; the server records them at its start,
# before it installs its own handlers.
FreshSignals = dict[int, Any]


def fresh_signal_dispositions() -> FreshSignals:
    dispositions = {}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            dispositions[sig] = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
    return dispositions


def _restore_signals(fresh: FreshSignals) -> None:
    signal.set_wakeup_fd(-1)
    for sig, handler in fresh.items():
        try:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _take_stdio(stdio: list[int], conn_fd: int) -> int:
    """Put the launcher's stdio on 0/1/2 and the connection on 3; close every other descriptor."""
    for target, fd in enumerate(stdio):
        os.dup2(fd, target, inheritable=True)
    conn = 3
    if conn_fd != conn:
        os.dup2(conn_fd, conn, inheritable=False)
    os.closerange(conn + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0] + 1)
    return conn


def _fresh_std_streams() -> None:
    def stream(fd: int, mode: str, line: bool) -> Any:
        return open(fd, mode, buffering=1 if line else -1, encoding=sys.stdout.encoding,
                    errors=sys.stdout.errors, closefd=False)

    sys.stdin = sys.__stdin__ = stream(0, "r", False)
    sys.stdout = sys.__stdout__ = stream(1, "w", os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", True)       # stderr is line-buffered in CPython


def _apply_request(request: dict[str, Any]) -> None:
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    for name, limits in request["rlimits"].items():
        number = getattr(resource, "RLIMIT_" + name, None)
        if number is not None:
            try:
                resource.setrlimit(number, limits)
            except (OSError, ValueError) as err:
                raise OSError(f"cannot set RLIMIT_{name} to {limits}: {err}") from None


def _die_with_launcher(conn: int) -> None:
    fcntl.fcntl(conn, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn, fcntl.F_SETSIG, signal.SIGKILL)
    fcntl.fcntl(conn, fcntl.F_SETFL, fcntl.fcntl(conn, fcntl.F_GETFL) | os.O_ASYNC)
    # Gone before O_ASYNC was armed: no signal will come for it.
    if select.select([conn], [], [], 0)[0]:
        os._exit(128 + signal.SIGKILL)


def _reseed() -> None:
    import random
    random.seed()
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        asyncio.set_event_loop_policy(None)


def _send(conn: int, message: dict[str, Any]) -> None:
    try:
        os.write(conn, protocol.encode(message))
    except OSError:
        pass                      # the launcher is gone; nobody to tell


def become_vmm(request: dict[str, Any], conn_fd: int, stdio: list[int], inherited: Iterable[Any],
               fresh: FreshSignals, entry: Callable[[list[str]], int]) -> None:
    """Turn this freshly forked child into the VMM for ``request`` and run ``entry(argv)``."""
    conn = conn_fd
    server = os.getppid()
    try:
        os.setsid()
        for obj in inherited:
            obj.close()
        _restore_signals(fresh)
        conn = _take_stdio(stdio, conn_fd)
        _die_with_launcher(conn)
        _apply_request(request)
        if request.get("jail") is not None:  # asyncvmm-jailer through the fork server
            from asyncvmm.jailer.jail import jail_this_process
            jail_this_process(request["jail"])
        _fresh_std_streams()
        _reseed()
        launcher.in_forked_child = True
        _restart_clocks()
    except BaseException as exc:  # noqa: BLE001 - the child must always reach os._exit
        _send(conn, {"error": f"cannot start the VMM: {exc}"})
        os._exit(1)
    code: Any = 1
    try:
        sys.argv = ["asyncvmm", *request["argv"]]
        code = entry(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must always reach os._exit
        traceback.print_exc()
        code = 2
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        code = code if isinstance(code, int) and 0 <= code <= 255 else 1
        # Only when the server is gone: while it lives it reports (after the pid, which it may
        # not have sent yet if this child was quick).
        if os.getppid() != server:
            _send(conn, {"exit": code})
        os._exit(code)


def _restart_clocks() -> None:
    """Start-up time is the child's, from the fork on (CPU time restarts at fork by itself)."""
    cli = sys.modules.get("asyncvmm.cli")
    if cli is not None:
        cli._START_US = time.monotonic_ns() // 1000
        cli._START_CPU_US = time.process_time_ns() // 1000
