"""Run the test guest under QEMU's ``microvm`` machine, the peer asyncvmm is compared with.

QEMU boots the PVH ELF (``-kernel`` with the Xen note) and the bzImage (through
its real-mode setup stub, i.e. the 32-bit boot protocol), never the ELF
without the note.  Its virtio-mmio transports are not where asyncvmm puts
them, so :data:`MICROVM_VIRTIO` is added to the guest command line.

    argv = microvm_argv(images.elf_pvh, "blk=read:0:1", disk=Path("disk.img"))
    result = run_microvm(argv)
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

QEMU = "qemu-system-x86_64"
# QEMU 7.2 microvm: 24 transports of 512 bytes from 0xfeb00000 (``info mtree``);
# -device ... virtio-*-device fills them from the last one backwards.
MICROVM_VIRTIO = "virtio_base=0xfeb00000 virtio_stride=0x200 virtio_count=24"
ACCELS = {
    "tcg": ["-accel", "tcg", "-cpu", "max"],
    "kvm": ["-enable-kvm", "-cpu", "host,-arch-capabilities"],
}


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def microvm_argv(kernel: Path, cmdline: str, *, accel: str = "tcg", cpus: int = 1,
                 mem_mib: int = 256, disk: Path | None = None, disk_readonly: bool = False,
                 disk_serial: str | None = None, rng: bool = False, user_net: bool = False,
                 mac: str = "52:54:00:12:34:56") -> list[str]:
    """The QEMU command line for one test-guest run (serial on stdio, exits on reset)."""
    argv = [QEMU, "-M", "microvm", *ACCELS[accel], "-smp", str(cpus), "-m", f"{mem_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-device", "i8042",                          # for exit=reset
            "-global", "virtio-mmio.force-legacy=false",  # version-2 registers only
            "-kernel", str(kernel), "-append", f"{MICROVM_VIRTIO} {cmdline}"]
    if disk is not None:
        drive = f"id=d0,file={disk},format=raw,if=none" + (",readonly=on" if disk_readonly else "")
        dev = "virtio-blk-device,drive=d0" + (f",serial={disk_serial}" if disk_serial else "")
        argv += ["-drive", drive, "-device", dev]
    if rng:
        argv += ["-device", "virtio-rng-device"]
    if user_net:
        argv += ["-netdev", "user,id=n0", "-device", f"virtio-net-device,netdev=n0,mac={mac}"]
    return argv


@dataclasses.dataclass(frozen=True)
class QemuRun:
    returncode: int
    stdout: str
    stderr: str


def run_microvm(argv: list[str], *, stdin: bytes = b"", timeout: float = 60) -> QemuRun:
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout, check=False)
    return QemuRun(proc.returncode, proc.stdout.decode(errors="replace"),
                   proc.stderr.decode(errors="replace"))
