"""A small guest kernel built from Debian's ``linux-source-6.1`` with every driver built in.

For fast-boot benchmarks: no modules, no initramfs needed, virtio-mmio devices
given on the command line (``virtio_mmio.device=4K@0xc0001000:5``) or found
through ACPI, like Firecracker's guest kernels.  ``CONFIG_PCI`` is there for
ACPI: without it the interpreter failed to initialise on QEMU's DSDT and on
asyncvmm's (``AE_BAD_PARAMETER``).  Built from ``allnoconfig`` plus
:data:`FRAGMENT`, then checked: an option the fragment asks for that
``olddefconfig`` dropped is an error, not a silently different kernel.  Takes
~9 minutes on 2 idle cores; run it niced.

Artifact directory ``minikernel-<key>/``: ``vmlinux`` (ELF), ``bzImage``,
``config``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import debian
from .cache import content_key, publishing

SOURCE_PACKAGE = "linux-source-6.1"
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc"}

FRAGMENT = """
CONFIG_64BIT=y
CONFIG_SMP=y
CONFIG_PRINTK=y
CONFIG_BUG=y
CONFIG_MULTIUSER=y
CONFIG_FUTEX=y
CONFIG_EPOLL=y
CONFIG_SIGNALFD=y
CONFIG_TIMERFD=y
CONFIG_EVENTFD=y
CONFIG_SHMEM=y
CONFIG_FILE_LOCKING=y
CONFIG_POSIX_TIMERS=y
CONFIG_INOTIFY_USER=y
CONFIG_HYPERVISOR_GUEST=y
CONFIG_PARAVIRT=y
CONFIG_KVM_GUEST=y
CONFIG_PVH=y
CONFIG_X86_LOCAL_APIC=y
CONFIG_X86_IO_APIC=y
CONFIG_X86_MPPARSE=y
CONFIG_ACPI=y
CONFIG_BINFMT_ELF=y
CONFIG_BINFMT_SCRIPT=y
CONFIG_BLK_DEV_INITRD=y
CONFIG_DEVTMPFS=y
CONFIG_DEVTMPFS_MOUNT=y
CONFIG_TMPFS=y
CONFIG_PROC_FS=y
CONFIG_SYSFS=y
CONFIG_TTY=y
CONFIG_UNIX98_PTYS=y
CONFIG_SERIAL_8250=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_BLOCK=y
CONFIG_BLK_DEV=y
CONFIG_EXT4_FS=y
CONFIG_VIRTIO_MENU=y
CONFIG_VIRTIO=y
CONFIG_VIRTIO_MMIO=y
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y
CONFIG_VIRTIO_BLK=y
CONFIG_NET=y
CONFIG_INET=y
CONFIG_UNIX=y
CONFIG_PACKET=y
CONFIG_NETDEVICES=y
CONFIG_NET_CORE=y
CONFIG_VIRTIO_NET=y
CONFIG_VSOCKETS=y
CONFIG_VIRTIO_VSOCKETS=y
CONFIG_HW_RANDOM=y
CONFIG_HW_RANDOM_VIRTIO=y
CONFIG_MODULES=n
CONFIG_UNWINDER_FRAME_POINTER=y
CONFIG_PCI=y
"""


class MiniKernelError(RuntimeError):
    """Missing build tools, a failed build, or a config that lost a required option."""


@dataclass(frozen=True)
class MiniKernel:
    root: Path

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.root / "bzImage"


def required_options(fragment: str = FRAGMENT) -> dict[str, str]:
    opts = {}
    for line in fragment.split():
        name, _, value = line.partition("=")
        opts[name] = value
    return opts


def missing_options(config_text: str, fragment: str = FRAGMENT) -> list[str]:
    """Fragment options the final .config does not have as asked."""
    have = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_"):
            name, _, value = line.partition("=")
            have[name] = value
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            have[line[2:-len(" is not set")]] = "n"
    return [f"{k}={v}" for k, v in required_options(fragment).items() if have.get(k, "n") != v]


def cached_minikernel(cache: Path) -> MiniKernel | None:
    found = sorted(cache.glob("minikernel-*/vmlinux"), key=lambda p: p.stat().st_mtime)
    return MiniKernel(found[-1].parent) if found else None


def ensure_minikernel(cache: Path, force: bool = False,
                      progress: Callable[[str], None] = print) -> MiniKernel:
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if not shutil.which(tool)]
    if not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")
    if missing:
        raise MiniKernelError(f"install the build tools first: apt-get install {' '.join(missing)}")
    deb = debian.download(SOURCE_PACKAGE, cache / "debs")
    art = MiniKernel(cache / f"minikernel-{content_key([deb.sha256, FRAGMENT])}")
    if art.vmlinux.exists() and not force:
        return art
    with tempfile.TemporaryDirectory(dir=cache) as tmp, publishing(art.root) as out:
        src = _unpack_source(deb, Path(tmp), progress)
        _configure(src, progress)
        progress("[images] compiling the minimal kernel (niced)")
        jobs = str(os.cpu_count() or 1)
        _make(src, ["nice", "-n", "10", "make", "-j", jobs, "bzImage"], "build")
        out.mkdir()
        shutil.copyfile(src / "vmlinux", out / "vmlinux")
        shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(src / ".config", out / "config")
    return art


def _unpack_source(deb: debian.Deb, tmp: Path, progress) -> Path:
    progress("[images] unpacking linux-source")
    tree = debian.extract(deb, tmp / "deb")
    tarballs = sorted(tree.glob("usr/src/linux-source-*.tar.*"))
    if not tarballs:
        raise MiniKernelError(f"{deb.package} holds no source tarball")
    subprocess.run(["tar", "-xf", str(tarballs[0]), "-C", str(tmp)], check=True)
    shutil.rmtree(tree)
    dirs = [d for d in tmp.glob("linux-source-*") if d.is_dir()]
    if len(dirs) != 1:
        raise MiniKernelError("unexpected layout of the source tarball")
    return dirs[0]


def _configure(src: Path, progress) -> None:
    progress("[images] configuring: allnoconfig + the asyncvmm fragment")
    (src / "asyncvmm.config").write_text(FRAGMENT)
    _make(src, ["make", "allnoconfig"], "allnoconfig")
    _make(src, ["scripts/kconfig/merge_config.sh", "-m", ".config", "asyncvmm.config"], "merge_config")
    _make(src, ["make", "olddefconfig"], "olddefconfig")
    lost = missing_options((src / ".config").read_text())
    if lost:
        raise MiniKernelError(f"the kernel config dropped required options: {lost}")


def _make(src: Path, argv: list[str], what: str) -> None:
    r = subprocess.run(argv, cwd=src, capture_output=True, text=True)
    if r.returncode != 0:
        raise MiniKernelError(f"{what} failed: {(r.stdout + r.stderr)[-3000:]}")
