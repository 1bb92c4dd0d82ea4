"""Is this ``/dev/kvm`` backed by hardware virtualisation?  Reads sysfs only; no ioctls.

A ``/dev/kvm`` served by a software implementation (``kvm_pvm`` emulates
guest ring 0 at about a million instructions a second) accepts every ioctl a
VMM makes, so InstanceStart succeeds; a stock Linux guest then stays silent
for minutes and usually ends in a KVM internal error.  The VMM cannot tell
that from the ioctls, so it looks at which kernel module provides KVM and
warns once at start (:func:`software_kvm_reason`); it does not refuse,
because small guests (the kvm tier's test guest) run fine there.

Hardware KVM is the vendor module, ``kvm_intel`` (VMX) or ``kvm_amd`` (SVM),
listed in ``/sys/module``.  The root is a parameter so tests can use a fake
tree.
"""

from __future__ import annotations

from pathlib import Path

HARDWARE_MODULES = ("kvm_intel", "kvm_amd")
SOFTWARE_MODULES = ("kvm_pvm",)
DOCS_HINT = "docs/testing.md (\"What kind of KVM is this?\" and the emulated KVM host)"


def software_kvm_reason(sys_root: str | Path = "/sys") -> str | None:
    """Why KVM here looks software-backed, or ``None`` if it looks like hardware KVM.

    Also ``None`` when ``/sys/module/kvm`` is absent (no KVM at all, or a
    sysfs we cannot read): opening ``/dev/kvm`` reports that case itself.
    """
    modules = Path(sys_root) / "module"
    for name in SOFTWARE_MODULES:
        if (modules / name).exists():
            return f"the {name} module provides /dev/kvm"
    if not (modules / "kvm").exists():
        return None
    if not any((modules / name).exists() for name in HARDWARE_MODULES):
        return "kvm is loaded but neither kvm_intel nor kvm_amd is"
    return None


def software_kvm_warning(reason: str) -> str:
    """The one warning line the VMM logs at InstanceStart on software KVM."""
    return (f"Software KVM detected ({reason}): guest kernel code runs emulated, so a stock "
            f"Linux guest will not boot in useful time (InstanceStart succeeds, then minutes of "
            f"silence, often ending in a KVM internal error). Small guests run; for Linux guests "
            f"use hardware KVM or an emulated KVM host, see {DOCS_HINT}.")
