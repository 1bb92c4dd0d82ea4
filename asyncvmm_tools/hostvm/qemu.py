"""QEMU command lines: the emulated KVM host (TCG) and a QEMU microvm guest (KVM).

Pure functions: specs in, argv lists out.  Both machines are ``microvm``
with ACPI on, so a kernel without ``VIRTIO_MMIO_CMDLINE_DEVICES`` (Debian's
cloud kernel) finds its virtio-mmio devices through the DSDT.  No RTC, PIT
or PIC: a TCG guest that polls an absent RTC or i8042 crawls, and the
kernel's timer comes from the local APIC.

Disks carry a ``serial=`` so the guest can find each one by its role in
``/sys/block/vd*/serial`` whatever order the transports enumerate in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MICROVM_OPTS = "microvm,acpi=on,rtc=off,pit=off,pic=off,isa-serial=on"


@dataclass(frozen=True)
class Disk:
    path: Path
    serial: str
    readonly: bool = False
    fmt: str = "raw"


@dataclass(frozen=True)
class MachineSpec:
    kernel: Path
    cmdline: str
    initrd: Path | None = None
    disks: tuple[Disk, ...] = ()
    mem_mib: int = 512
    vcpus: int = 1
    accel: str = "kvm"                 # "kvm" (a guest) or "tcg" (the emulated host)
    cpu: str = "host"
    machine: str = MICROVM_OPTS
    serial: str = "stdio"              # a QEMU chardev backend for the console
    net: tuple[str, ...] = ()          # raw -netdev specs; each gets a virtio-net-device
    vsock_cid: int | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)
    qemu: str = "qemu-system-x86_64"


def drive_args(disks: tuple[Disk, ...]) -> list[str]:
    args: list[str] = []
    for i, d in enumerate(disks):
        if "," in str(d.path):
            raise ValueError(f"QEMU cannot take a drive path with a comma: {d.path}")
        if not d.serial.isalnum() or len(d.serial) > 20:
            raise ValueError(f"disk serial must be 1-20 alphanumerics: {d.serial!r}")
        ro = ",readonly=on" if d.readonly else ""
        args += ["-drive", f"id=disk{i},file={d.path},format={d.fmt},if=none,cache=unsafe{ro}",
                 "-device", f"virtio-blk-device,drive=disk{i},serial={d.serial}"]
    return args


def machine_argv(spec: MachineSpec) -> list[str]:
    if spec.accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {spec.accel!r}")
    argv = [spec.qemu, "-M", spec.machine, "-accel", spec.accel, "-cpu", spec.cpu,
            "-smp", str(spec.vcpus), "-m", str(spec.mem_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", f"{spec.serial},id=console0", "-serial", "chardev:console0",
            "-kernel", str(spec.kernel), "-append", spec.cmdline]
    if spec.initrd is not None:
        argv += ["-initrd", str(spec.initrd)]
    argv += drive_args(spec.disks)
    for i, netdev in enumerate(spec.net):
        argv += ["-netdev", f"{netdev},id=net{i}", "-device", f"virtio-net-device,netdev=net{i}"]
    if spec.vsock_cid is not None:
        argv += ["-device", f"vhost-vsock-device,guest-cid={spec.vsock_cid}"]
    return argv + list(spec.extra)


def host_cmdline(tsc_khz: int | None, extra: list[str]) -> str:
    """Kernel arguments of the emulated host.

    ``tsc_early_khz`` skips TSC calibration (hangs under TCG); ``mitigations=off``
    and ``nokaslr`` cut emulated work; ``i8042.noaux/nokbd`` and ``noapictimer``
    are avoided on purpose -- the APIC timer is the one timer a microvm has.
    """
    args = ["console=ttyS0", "panic=-1", "mitigations=off", "nokaslr", "quiet", "loglevel=4",
            "i8042.noaux", "i8042.nokbd", "i8042.nopnp", "8250.nr_uarts=1"]
    if tsc_khz:
        args += [f"tsc_early_khz={tsc_khz}", "tsc=reliable"]
    return " ".join(args + extra)
