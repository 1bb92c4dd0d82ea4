"""The emulated KVM host: boot QEMU TCG with nested SVM and run commands in it.

Public API::

    kvm_kind() -> "hardware" | "software" | "absent"
    run_in_hostvm(argv, *, timeout, env=None, console_log=None, ...) -> HostVmResult
    HostVm.prepare() -> HostVm        # build/reuse kernel, initramfs, runtime disk once
    in_hostvm() -> bool               # True inside the emulated host (ASYNCVMM_IN_HOSTVM=1)

Where ``/dev/kvm`` is software (kvm_pvm) a stock Linux guest cannot boot in
useful time, so the linux test tier runs inside this emulated host instead.
"""

from .detect import kvm_kind, nested_status, tsc_khz
from .runner import (IN_HOSTVM_ENV, RESULTS_ENV, HostVm, HostVmError, HostVmResult, in_hostvm,
                     run_in_hostvm)

__all__ = ["kvm_kind", "nested_status", "tsc_khz", "run_in_hostvm", "HostVm", "HostVmError",
           "HostVmResult", "in_hostvm", "IN_HOSTVM_ENV", "RESULTS_ENV"]
