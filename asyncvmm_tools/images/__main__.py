"""``python -m asyncvmm_tools.images build [--only KIND ...] [--force] | paths [--no-build] [--sh] | vmconfig [...]``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from . import DEFAULT_KINDS, KINDS, ImagesMissingError, ensure_images, load_manifest
from .bzimage import BzImageError
from .debian import DebianError
from .guestinit import run_flag
from .kmod import ModuleError
from .minikernel import MiniKernelError
from .rootfs import RootfsError

ERRORS = (DebianError, BzImageError, ModuleError, RootfsError, MiniKernelError, ImagesMissingError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncvmm_tools.images",
                                     description="Build and locate asyncvmm guest images.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse from the cache) the guest images")
    b.add_argument("--only", action="append", choices=KINDS,
                   help=f"build only these (repeatable); default: {' '.join(DEFAULT_KINDS)}")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--rootfs-size-mib", type=int, default=128)
    p = sub.add_parser("paths", help="print the artifact paths as JSON")
    p.add_argument("--no-build", action="store_true", help="only report what is built; never build")
    p.add_argument("--sh", action="store_true",
                   help="print KERNEL=, BZIMAGE=, INITRD=, ROOTFS= assignments for a shell's eval")
    v = sub.add_parser("vmconfig", help="print a Firecracker --config-file JSON booting the built images")
    v.add_argument("--run", help="a shell command the guest runs, then reboots (ending the VMM)")
    v.add_argument("--vcpus", type=int, default=1)
    v.add_argument("--mem-mib", type=int, default=256)
    v.add_argument("--kernel", choices=["bzimage", "vmlinux"], default="vmlinux",
                   help="vmlinux (ELF, as Firecracker boots on x86) or the bzImage")
    v.add_argument("--rootfs", type=Path, help="a writable copy of the rootfs to use instead of the cache's")
    v.add_argument("--quiet", action="store_true", help="boot with `quiet loglevel=4`: only the kernel's errors")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.command == "build":
            start = time.monotonic()
            images = ensure_images(only=args.only, force=args.force, progress=progress,
                                   rootfs_size_mib=args.rootfs_size_mib)
            progress(f"[images] all done in {time.monotonic() - start:.1f} s")
        elif args.command == "vmconfig":
            print(json.dumps(vm_config(load_manifest(), args), indent=2))
            return 0
        elif args.no_build:
            images = load_manifest()
        else:
            images = ensure_images(progress=progress)
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if getattr(args, "sh", False):
        print(shell_assignments(images))
    else:
        print(json.dumps(images.to_json(), indent=2))
    return 0


def shell_assignments(images) -> str:
    """``KERNEL=... BZIMAGE=... INITRD=... ROOTFS=...`` lines, quoted for ``eval``."""
    pairs = {"KERNEL": images.vmlinux, "BZIMAGE": images.bzimage, "INITRD": images.initramfs,
             "ROOTFS": images.rootfs}
    return "\n".join(f"{name}={shlex.quote(str(path))}" for name, path in pairs.items())


def vm_config(images, args) -> dict:
    """Firecracker's config-file shape; the VMM appends ``pci=off`` and, for the root drive,
    ``root=/dev/vda ro``."""
    boot_args = "console=ttyS0 reboot=k panic=1" + (" quiet loglevel=4" if args.quiet else "")
    if args.run:
        boot_args += " " + run_flag(args.run)
    return {
        "boot-source": {"kernel_image_path": str(images.vmlinux if args.kernel == "vmlinux" else images.bzimage),
                        "initrd_path": str(images.initramfs), "boot_args": boot_args},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(args.rootfs or images.rootfs),
                    "is_root_device": True, "is_read_only": args.rootfs is None}],
        "machine-config": {"vcpu_count": args.vcpus, "mem_size_mib": args.mem_mib},
        "network-interfaces": [],
    }


if __name__ == "__main__":
    sys.exit(main())
