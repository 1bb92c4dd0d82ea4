"""Process exit codes, as Firecracker defines them."""

import enum


class ExitCode(enum.IntEnum):
    OK = 0                  # also a guest-initiated reboot or power-off
    GENERIC_ERROR = 1       # e.g. the guest triple-faulted
    UNEXPECTED_ERROR = 2    # a failure of the VMM or of KVM
    BAD_SYSCALL = 148       # seccomp
    SIGBUS = 149
    SIGSEGV = 150
    SIGXFSZ = 151
    BAD_CONFIGURATION = 152
    ARG_PARSING = 153
    SIGXCPU = 154
    SIGPIPE = 155
    SIGHUP = 156
    SIGILL = 157
