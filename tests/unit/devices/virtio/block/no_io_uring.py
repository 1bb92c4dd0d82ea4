"""Run a command on a host that has no io_uring: ``python no_io_uring.py <argv>``.

Installs a seccomp filter that fails ``io_uring_setup`` with ENOSYS -- what
a kernel built without io_uring answers, and what container runtimes'
default profiles do -- then execs ``argv``; the filter survives the exec.
Lets the tests see asyncvmm refuse an Async drive without touching the
host's ``kernel.io_uring_disabled``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF_0000
SECCOMP_RET_ERRNO = 0x0005_0000
AUDIT_ARCH_X86_64 = 0xC000_003E
SYS_io_uring_setup = 425
# BPF opcodes: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
# struct seccomp_data { int nr; __u32 arch; ... }
NR_AT, ARCH_AT = 0, 4


class sock_fprog(ctypes.Structure):
    """struct sock_fprog { unsigned short len; struct sock_filter *filter; };"""
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    """struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; };"""
    return struct.pack("<HBBI", code, jt, jf, k)


def deny_io_uring() -> None:
    program = b"".join([
        _insn(LD_ABS, 0, 0, ARCH_AT),
        _insn(JEQ, 0, 3, AUDIT_ARCH_X86_64),           # another ABI: allow
        _insn(LD_ABS, 0, 0, NR_AT),
        _insn(JEQ, 0, 1, SYS_io_uring_setup),
        _insn(RET, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        _insn(RET, 0, 0, SECCOMP_RET_ALLOW),
    ])
    buf = ctypes.create_string_buffer(program, len(program))
    prog = sock_fprog(len(program) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"installing the seccomp filter: {os.strerror(e)}")


def prefix() -> list[str]:
    """The argv prefix that runs a command under :func:`deny_io_uring` (from any directory)."""
    return [sys.executable, os.path.abspath(__file__)]


if __name__ == "__main__":
    deny_io_uring()
    os.execvp(sys.argv[1], sys.argv[1:])
