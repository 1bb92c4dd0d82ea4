"""The default allowlists, one per thread category; data only.

Built by tracing the VMM (``strace -f``) through the kvm tier: boot, the API
(pause, resume, PATCH, metrics, snapshots), block I/O (Sync and io_uring),
net (tap), rng, vsock, balloon, the serial console on a tty, SIGTERM/SIGINT
and exit (docs/seccomp.md says how to re-trace).  Only calls made *after*
each thread's filter goes in are listed: start-up (imports, building the VM,
opening /dev/kvm) happens before.  A call not listed gets
``SECCOMP_RET_TRAP``: the process logs the call and exits with 148 (Firecracker's code).

Argument restrictions follow Firecracker's: ``ioctl`` only with the request
numbers each thread uses, ``socket``/``socketpair`` only ``AF_UNIX``, no
executable mappings (``mmap``/``mprotect`` without ``PROT_EXEC``), signals
only to this process's own threads with the signals the VMM sends.
Never listed: ``execve``, ``ptrace``, ``fork``/``vfork``, ``kill``,
``mount``, ``chroot``, ``setuid`` and the like, ``bpf``, ``seccomp``.

Order matters for speed only: the compiled program tests calls in the
order given, so each list starts with its hottest calls.
"""

from __future__ import annotations

import signal
import socket
import termios

from asyncvmm.devices.vhost import ioctls as vhost
from asyncvmm.kvm import ioctls as k

from .bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_TRAP, Cond, Filter, Rule
from .syscalls import SYSCALLS

PROT_EXEC = 0x4
CLONE_THREAD = 0x10000
O_ACCMODE_CREAT_TRUNC = 0o3 | 0o100 | 0o1000   # O_ACCMODE | O_CREAT | O_TRUNC
FIONBIO = 0x5421
FIOCLEX = 0x5451
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNGETVNETHDRSZ = 0x800454D7
TUNGETIFF = 0x800454D2
TUNSETIFF = 0x400454CA
KICK_SIGNAL = int(signal.SIGRTMIN) + 2      # asyncvmm.vcpu.KICK_SIGNAL (not imported: no cycle)

Spec = dict[str, list[tuple[Cond, ...]]]   # call name -> rules (each a tuple of AND-ed conditions)


def _any(*_: object) -> list[tuple[Cond, ...]]:
    return []


def _ioctls(*requests: int) -> list[tuple[Cond, ...]]:
    # dword: the kernel reads the request as an unsigned int, so only the low half counts.
    return [(Cond(1, "eq", r),) for r in requests]


def _no_exec(prot_arg: int) -> list[tuple[Cond, ...]]:
    return [(Cond(prot_arg, "masked_eq", 0, mask=PROT_EXEC),)]


def _signals(arg: int, *sigs: int) -> list[tuple[Cond, ...]]:
    return [(Cond(arg, "eq", int(s)),) for s in sigs]


_UNIX_ONLY = [(Cond(0, "eq", socket.AF_UNIX),)]
# open() for reading only (Python's tracebacks read source files; no creation, no truncation).
_READ_ONLY_OPEN = [(Cond(2, "masked_eq", 0, mask=O_ACCMODE_CREAT_TRUNC),)]

# Every thread: the Python runtime itself, and what the SIGSYS handler needs to log and exit.
_RUNTIME: Spec = {
    "futex": _any(),                    # the GIL, locks, condition variables, futures
    "write": _any(),                    # log lines, the loop's wake-up fd, console output
    "madvise": _any(),                  # the allocator returning memory; thread stacks at exit
    "munmap": _any(),
    "mmap": _no_exec(2),                # allocator arenas; never executable
    "mprotect": _no_exec(2),            # glibc grows a thread's malloc arena with mprotect
    "brk": _any(),
    "mremap": _any(),
    "rt_sigprocmask": _any(),           # threads block signals around their start and end
    "rt_sigreturn": _any(),             # returning from the kick and other signal handlers
    "getpid": _any(),                   # log records
    "getppid": _any(),                  # a fork-server child checks its server is still there
    "gettid": _any(),
    "tgkill": _signals(2, KICK_SIGNAL, signal.SIGABRT),  # own threads only (tgid)
    "sched_yield": _any(),
    "clock_gettime": _any(),            # the vDSO normally answers; a fallback syscall
    "clock_nanosleep": _any(),
    "nanosleep": _any(),
    "getrandom": _any(),
    "exit": _any(),                     # a thread ending
    "exit_group": _any(),
    # Reading (never creating or truncating) files: a traceback reads the source it quotes.
    "openat": _READ_ONLY_OPEN,
    "read": _any(),
    "lseek": _any(),
    "newfstatat": _any(),
    "fstat": _any(),
    "statx": _any(),
    "close": _any(),
}

# vCPU threads: KVM_RUN in a loop; port I/O answered on the thread (UART bytes reach the
# console with write()); MMIO handed to the loop through a future (futex, the loop's wake-up fd).
VCPU: Spec = {
    "ioctl": _ioctls(k.KVM_RUN),
    **_RUNTIME,
}

# The loop thread: the API server, every device's event handler, the console, metrics,
# pause/resume, snapshots, exit.  Threads it starts after its filter is in inherit this list.
VMM: Spec = {
    **{name: _RUNTIME[name] for name in ("futex",)},
    # the event loop
    "epoll_pwait": _any(), "epoll_wait": _any(), "epoll_ctl": _any(), "poll": _any(), "ppoll": _any(),
    "eventfd2": _any(),
    **_RUNTIME,
    # files: drives (preadv2/pwritev2, flush), serial_out, logs and metrics, snapshots (created,
    # sized and written here), balloon (punching holes)
    "openat": _any(), "preadv2": _any(), "pwritev2": _any(), "preadv": _any(), "pwritev": _any(),
    "pread64": _any(), "pwrite64": _any(), "readv": _any(), "writev": _any(), "fsync": _any(),
    "fdatasync": _any(), "ftruncate": _any(), "fallocate": _any(), "unlink": _any(), "unlinkat": _any(),
    "fcntl": _any(), "dup": _any(), "dup3": _any(), "pipe2": _any(), "getdents64": _any(),
    "readlink": _any(), "getcwd": _any(), "rename": _any(),
    # io_uring (the block device's async engine)
    "io_uring_enter": _any(), "io_uring_setup": _any(), "io_uring_register": _any(),
    # sockets: the API (accept), vsock's host side, the loop's own socketpair; AF_UNIX only
    "socket": _UNIX_ONLY, "socketpair": _UNIX_ONLY,
    "accept4": _any(), "accept": _any(), "bind": _any(), "listen": _any(), "connect": _any(),
    "recvfrom": _any(), "recvmsg": _any(), "sendto": _any(), "sendmsg": _any(), "shutdown": _any(),
    "getsockname": _any(), "getpeername": _any(), "setsockopt": _any(), "getsockopt": _any(),
    # memory: guest memory and io_uring rings are shared mappings; still never executable
    "msync": _any(),
    # signals: SIGTERM/SIGINT handlers, the kick signal to vCPU threads, the SIGSYS handler
    "rt_sigaction": _any(), "sigaltstack": _any(), "restart_syscall": _any(),
    # threads the loop may start (an executor): clone only for threads; clone3's flags sit in
    # a struct seccomp cannot read, so it is allowed as is (execve stays denied either way)
    "clone": [(Cond(0, "masked_eq", CLONE_THREAD, mask=CLONE_THREAD),)], "clone3": _any(),
    "set_robust_list": _any(), "rseq": _any(), "prctl": _any(), "sched_getaffinity": _any(),
    "getrlimit": _any(), "prlimit64": _any(), "getuid": _any(), "geteuid": _any(),
    "getgid": _any(), "getegid": _any(), "sysinfo": _any(), "uname": _any(),
    "ioctl": _ioctls(
        FIONBIO, FIOCLEX,                                          # the loop's fds
        termios.TCGETS, termios.TCSETS, termios.TCSETSW, termios.TCSETSF, termios.TIOCGWINSZ,  # console
        TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNGETVNETHDRSZ, TUNGETIFF,  # tap, as the guest negotiates
        TUNSETIFF,                                                 # a tap opened for a hot-plug
        # vhost-net interfaces: activation and reset set up and stop the kernel's queues;
        # a hot-plugged one is opened and owned here too
        *vhost.RUNTIME_IOCTLS,
        k.KVM_IRQ_LINE, k.KVM_KVMCLOCK_CTRL, k.KVM_SET_USER_MEMORY_REGION, k.KVM_GET_DIRTY_LOG,
        # PCI (--enable-pci): the guest's MSI-X table writes re-route vectors, its BAR moves
        # move the notify ioeventfds, and hot-plug wires a new device's irqfds and ioeventfds
        k.KVM_SET_GSI_ROUTING, k.KVM_IOEVENTFD, k.KVM_IRQFD,
        # snapshots read the VM's and vCPUs' state from the loop (vCPUs paused)
        k.KVM_GET_REGS, k.KVM_GET_SREGS, k.KVM_GET_MSRS, k.KVM_GET_FPU, k.KVM_GET_LAPIC,
        k.KVM_GET_CPUID2, k.KVM_GET_MP_STATE, k.KVM_GET_VCPU_EVENTS, k.KVM_GET_DEBUGREGS,
        k.KVM_GET_XSAVE, k.KVM_GET_XCRS, k.KVM_GET_IRQCHIP, k.KVM_GET_CLOCK, k.KVM_GET_PIT2,
        k.KVM_GET_TSC_KHZ),
}


def compile_spec(spec: Spec) -> Filter:
    unknown = [name for name in spec if name not in SYSCALLS]
    if unknown:
        raise ValueError(f"unknown system call(s) in an allowlist: {unknown}")
    return Filter(SECCOMP_RET_TRAP, SECCOMP_RET_ALLOW,
                  {SYSCALLS[name]: [Rule(conds) for conds in rules] for name, rules in spec.items()})


def default_filters() -> dict[str, Filter]:
    return {"vmm": compile_spec(VMM), "vcpu": compile_spec(VCPU)}
