"""The BPF compiler, checked by interpreting its programs (no kernel), and once in a real thread."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from asyncvmm.seccomp.bpf import (AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_TRAP,
                                  Cond, Filter, FilterError, Rule, compile_filter, run)
from asyncvmm.seccomp.syscalls import SYSCALLS

READ, IOCTL, MMAP = SYSCALLS["read"], SYSCALLS["ioctl"], SYSCALLS["mmap"]
ALLOW, TRAP = SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP


def _prog(rules):
    return compile_filter(Filter(TRAP, ALLOW, rules))


def test_unconditional_and_unlisted_calls():
    p = _prog({READ: []})
    assert run(p, READ) == ALLOW
    assert run(p, SYSCALLS["write"]) == TRAP


def test_other_architectures_and_x32_get_the_default_action():
    p = _prog({READ: []})
    assert run(p, READ, arch=0x40000003) == TRAP           # i386
    assert run(p, READ | 0x40000000) == TRAP               # the x32 ABI


def test_rules_are_ored_and_conditions_anded():
    p = _prog({IOCTL: [Rule((Cond(1, "eq", 0xAE80),)),
                       Rule((Cond(0, "eq", 7), Cond(1, "eq", 0x5401)))]})
    assert run(p, IOCTL, (3, 0xAE80)) == ALLOW
    assert run(p, IOCTL, (7, 0x5401)) == ALLOW
    assert run(p, IOCTL, (8, 0x5401)) == TRAP
    assert run(p, IOCTL, (3, 0xAE81)) == TRAP
    assert run(p, READ) == TRAP


def test_dword_compares_only_the_low_half():
    p = _prog({IOCTL: [Rule((Cond(1, "eq", 0xAE80),))]})
    assert run(p, IOCTL, (3, 0xFFFFFFFF_0000AE80)) == ALLOW   # the kernel takes cmd as unsigned int


def test_masked_eq_restricts_flags():
    map_shared = 0x01
    p = _prog({MMAP: [Rule((Cond(3, "masked_eq", 0, mask=map_shared),))]})
    assert run(p, MMAP, (0, 4096, 3, 0x22)) == ALLOW
    assert run(p, MMAP, (0, 4096, 3, 0x21)) == TRAP


VALUES = st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, 1 << 32, (1 << 32) - 1, (1 << 64) - 1])
PY = {"eq": lambda a, v: a == v, "ne": lambda a, v: a != v, "lt": lambda a, v: a < v,
      "le": lambda a, v: a <= v, "gt": lambda a, v: a > v, "ge": lambda a, v: a >= v}


@given(op=st.sampled_from(sorted(PY)), val=VALUES, arg=VALUES)
def test_qword_comparisons_match_python(op, val, arg):
    p = _prog({READ: [Rule((Cond(2, op, val, qword=True),))]})
    assert (run(p, READ, (0, 0, arg)) == ALLOW) == PY[op](arg, val)


@given(op=st.sampled_from(sorted(PY)), val=st.integers(0, (1 << 32) - 1), arg=st.integers(0, (1 << 32) - 1))
def test_dword_comparisons_match_python(op, val, arg):
    p = _prog({READ: [Rule((Cond(0, op, val),))]})
    assert (run(p, READ, (arg,)) == ALLOW) == PY[op](arg, val)


@given(mask=VALUES, val=VALUES, arg=VALUES)
def test_qword_masked_eq_matches_python(mask, val, arg):
    p = _prog({READ: [Rule((Cond(0, "masked_eq", val, qword=True, mask=mask),))]})
    assert (run(p, READ, (arg,)) == ALLOW) == ((arg & mask) == val)


def test_bad_conditions_are_refused():
    with pytest.raises(FilterError, match="index"):
        Cond(6, "eq", 0)
    with pytest.raises(FilterError, match="comparison"):
        Cond(0, "like", 0)
    with pytest.raises(FilterError, match="dword"):
        Cond(0, "eq", 1 << 32)


def test_a_program_too_long_for_the_kernel_is_refused():
    rules = {SYSCALLS["read"]: [Rule((Cond(0, "eq", i),)) for i in range(3000)]}
    with pytest.raises(FilterError, match="4096"):
        _prog(rules)


def test_many_calls_compile_and_long_jumps_are_right():
    rules = {nr: [] for nr in range(0, 400)}
    p = _prog(rules)
    assert run(p, 399) == ALLOW and run(p, 400) == TRAP and run(p, 0) == ALLOW


def test_the_kernel_applies_the_compiled_program():
    """In a child process: an errno filter on getppid (whose glibc wrapper returns the raw -errno)."""
    code = (
        "import os, errno\n"
        "from asyncvmm.seccomp.bpf import *\n"
        "from asyncvmm.seccomp.install import install_program\n"
        "from asyncvmm.seccomp.syscalls import SYSCALLS\n"
        "p = compile_filter(Filter(SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno.EACCES,"
        " {SYSCALLS['getppid']: []}))\n"
        "install_program(p)\n"
        "print(open('/proc/self/status').read().split('Seccomp:')[1].split()[0])\n"
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.getppid())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", str(-errno.EACCES)]
