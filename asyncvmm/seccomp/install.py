"""Install a compiled filter on the calling thread, and log the call that trips one.

Filters are per thread: ``seccomp(SECCOMP_SET_MODE_FILTER)`` without
``SECCOMP_FILTER_FLAG_TSYNC`` applies to the caller only, and threads the
caller starts later inherit it.  ``PR_SET_NO_NEW_PRIVS`` comes first (the
kernel requires it of an unprivileged caller; for root it still stops a
set-uid exec from shedding the filter).

A denied call gets ``SECCOMP_RET_TRAP`` from the default filters: the
kernel sends the thread ``SIGSYS`` with the call number in
``siginfo.si_syscall``.  The handler installed here (a ctypes callback,
registered with ``SA_SIGINFO | SA_NODEFER | SA_RESETHAND``) writes one log
line naming the call and the thread, flushes the log, then ends the
process with ``_exit(148)``, Firecracker's exit code for a bad system call,
so a client that watches the VMM's exit code sees what it would see from
Firecracker.  The handler runs Python code in signal context; that is
acceptable only because the process ends right after, and the calls it
makes (write, getpid, gettid, exit_group) are in every allowlist.  The core
limit is set to 0 before any filter goes in: a VMM killed this way must
not write a core file holding guest memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import socket
import threading

from asyncvmm.exitcodes import ExitCode

from .bpf import pack
from .syscalls import NAMES, SYSCALLS

log = logging.getLogger(__name__)

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SA_SIGINFO = 0x4
SA_NODEFER = 0x40000000
SA_RESETHAND = 0x80000000
SA_RESTORER = 0x04000000

#: Test-only hook, off by default: with ``ASYNCVMM_TEST_DENIED_SYSCALL=vmm`` (or ``vcpu``)
#: that thread attempts a call its default filter denies right after installing it.
TEST_HOOK_ENV = "ASYNCVMM_TEST_DENIED_SYSCALL"

_libc = ctypes.CDLL(None, use_errno=True)


class SeccompError(OSError):
    pass


class _SockFprog(ctypes.Structure):
    """struct sock_fprog { unsigned short len; struct sock_filter *filter; };"""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _Siginfo(ctypes.Structure):
    """The SIGSYS arm of siginfo_t: { int si_signo, si_errno, si_code; (pad);
    void *si_call_addr; int si_syscall; unsigned int si_arch; }."""
    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("si_call_addr", ctypes.c_void_p), ("si_syscall", ctypes.c_int),
                ("si_arch", ctypes.c_uint), ("_rest", ctypes.c_byte * 96)]


_HANDLER_T = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_Siginfo), ctypes.c_void_p)


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86_64: handler, 128-byte mask, flags, restorer."""
    _fields_ = [("sa_sigaction", _HANDLER_T), ("sa_mask", ctypes.c_ulong * 16), ("sa_flags", ctypes.c_int),
                ("sa_restorer", ctypes.c_void_p)]


def denied_call_text(nr: int) -> str:
    return f"{nr} ({NAMES.get(nr, 'unknown')})"


def _on_sigsys(signo: int, info, _ctx) -> None:
    nr = info.contents.si_syscall
    text = (f"Shutting down VM after intercepting a bad syscall {denied_call_text(nr)} "
            f"on thread {threading.current_thread().name!r}")
    handlers = logging.getLogger("asyncvmm").handlers   # asyncvmm.logger's root
    if handlers:
        log.critical("%s", text)
        for h in handlers:
            try:
                h.flush()
            except Exception:
                pass
    else:  # the logger is already closed (the VMM is ending): stderr still names the call
        os.write(2, f"asyncvmm: {text}\n".encode())
    os._exit(ExitCode.BAD_SYSCALL)


_handler = _HANDLER_T(_on_sigsys)   # kept alive: the kernel calls it


def install_sigsys_handler() -> None:
    """Log-then-exit(148) on ``SIGSYS`` for the whole process (once, before the first filter)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    act = _Sigaction()
    act.sa_sigaction = _handler
    act.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESETHAND
    if _libc.sigaction(signal.SIGSYS, ctypes.byref(act), None) != 0:
        e = ctypes.get_errno()
        raise SeccompError(e, f"installing the SIGSYS handler: {os.strerror(e)}")


def install_program(program: list[tuple[int, int, int, int]]) -> None:
    """Install ``program`` on the calling thread only."""
    raw = pack(program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(program), ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        e = ctypes.get_errno()
        raise SeccompError(e, f"PR_SET_NO_NEW_PRIVS: {os.strerror(e)}")
    if _libc.syscall(SYSCALLS["seccomp"], SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(prog)) != 0:
        e = ctypes.get_errno()
        raise SeccompError(e, f"installing the seccomp filter: {os.strerror(e)}")


def run_test_hook(category: str) -> None:
    """Attempt a denied call when the test-only hook asks this thread category to (see TEST_HOOK_ENV)."""
    if os.environ.get(TEST_HOOK_ENV) != category:
        return
    log.warning("%s=%s: attempting a denied system call (socket(AF_INET))", TEST_HOOK_ENV, category)
    socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
