"""What kind of ``/dev/kvm`` this machine has: ``hardware``, ``software`` or ``absent``.

``hardware`` means KVM backed by VMX or SVM (``kvm_intel``/``kvm_amd``
loaded and the CPU flag present): real Linux guests boot in useful time.
``software`` means ``/dev/kvm`` exists but is served by something else --
notably ``kvm_pvm``, which emulates guest ring 0 at ~1M instructions/s -- so
Linux-booting tests must run inside an emulated KVM host instead.
Reads only the paths given (defaults: the real /sys, /proc and /dev), so it
is testable on a fake tree.
"""

from __future__ import annotations

import os
from pathlib import Path

HARDWARE_MODULES = {"kvm_intel": "vmx", "kvm_amd": "svm"}
SOFTWARE_MODULES = ("kvm_pvm",)


def cpu_flags(cpuinfo_text: str) -> set[str]:
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def kvm_kind(sys_root: str | Path = "/sys", cpuinfo: str | Path = "/proc/cpuinfo",
             dev_kvm: str | Path = "/dev/kvm") -> str:
    if not os.path.exists(dev_kvm):
        return "absent"
    modules = Path(sys_root) / "module"
    if any((modules / m).exists() for m in SOFTWARE_MODULES):
        return "software"
    try:
        flags = cpu_flags(Path(cpuinfo).read_text())
    except OSError:
        flags = set()
    for module, flag in HARDWARE_MODULES.items():
        if (modules / module).exists() and flag in flags:
            return "hardware"
    return "software"


def nested_status(sys_root: str | Path = "/sys") -> str:
    """The ``nested`` parameter of the loaded vendor module ("Y"/"1"/"N"...), or "".

    Inside the emulated host this says whether the guests it runs could run
    guests of their own.
    """
    for module in HARDWARE_MODULES:
        p = Path(sys_root) / "module" / module / "parameters" / "nested"
        if p.exists():
            return p.read_text().strip()
    return ""


def tsc_khz(cpuinfo: str | Path = "/proc/cpuinfo") -> int | None:
    """The host TSC frequency in kHz from ``cpu MHz`` when the TSC is constant.

    QEMU TCG derives its guest TSC from the host's, and a TCG guest calibrating
    the TSC against emulated timers sometimes hangs, so the emulated host is told
    the value with ``tsc_early_khz=``.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    if "constant_tsc" not in cpu_flags(text):
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                return None
    return None
