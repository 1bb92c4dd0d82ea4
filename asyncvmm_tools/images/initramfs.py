"""The guest initramfs: busybox, the virtio (mmio and pci)/vsock modules and the asyncvmm ``/init``.

Written as a deterministic cpio newc archive (uncompressed: under emulation
decompressing costs more boot time than reading a few MB more).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import kmod
from .guestinit import init_script
from .kernel import KernelArtifact
from .tree import FsTree

# What a guest of asyncvmm needs: both virtio transports (virtio-mmio by default,
# virtio-pci with --enable-pci; each loads harmlessly where it finds no device), block,
# net, entropy, balloon, virtio-mem, virtio-pmem (nd_pmem makes its /dev/pmemN), vsock, ext4.
# Transports come first so the device drivers bind
# as they load.  Names that are built into the kernel are skipped; dependencies
# (virtio_pci's virtio_pci_modern_dev / virtio_pci_legacy_dev) come from kmod.load_order.
GUEST_MODULES = ["virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_balloon",
                 "virtio_mem", "virtio_pmem", "nd_pmem", "vsock", "vmw_vsock_virtio_transport", "ext4"]


def busybox_applets(busybox: Path) -> list[str]:
    """Applet paths (``usr/bin/awk``...) the given busybox binary provides."""
    out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


def add_busybox(tree: FsTree, busybox: Path) -> None:
    tree.add_host_file("/bin/busybox", busybox, 0o755)
    for applet in busybox_applets(busybox):
        if applet.rsplit("/", 1)[-1] in ("init", "linuxrc", "busybox"):
            continue   # /init and /sbin/init are ours
        tree.add_symlink("/" + applet, "/bin/busybox")


def add_base(tree: FsTree) -> None:
    for d in ("/proc", "/sys", "/dev", "/run", "/root", "/mnt", "/newroot", "/etc/asyncvmm"):
        tree.add_dir(d, 0o700 if d == "/root" else 0o755)
    tree.add_dir("/tmp", 0o1777)
    # The kernel opens /dev/console for init's stdio before anything is mounted.
    tree.add_chardev("/dev/console", 5, 1, 0o600)
    tree.add_bytes("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.add_bytes("/etc/group", b"root:x:0:\n")
    tree.add_bytes("/etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")


def initramfs_tree(kernel: KernelArtifact, busybox: Path, modules: list[str] = GUEST_MODULES) -> FsTree:
    table, builtin = kmod.scan_modules(kernel.modules_dir)
    order = kmod.load_order(modules, table, builtin)
    tree = FsTree()
    add_base(tree)
    add_busybox(tree, busybox)
    tree.add_bytes("/init", init_script("initramfs"), 0o755)
    for rel in order:
        # Stored decompressed under its plain .ko name: busybox insmod reads plain ELF.
        plain = rel.rsplit(".ko", 1)[0] + ".ko"
        tree.add_bytes(f"/lib/modules/{plain}", kmod.read_module(kernel.modules_dir / rel), 0o644)
    tree.add_bytes("/etc/asyncvmm/modules",
                   "".join(rel.rsplit(".ko", 1)[0] + ".ko\n" for rel in order).encode())
    return tree


def build_initramfs(kernel: KernelArtifact, busybox: Path, out: Path,
                    modules: list[str] = GUEST_MODULES) -> list[str]:
    """Write the archive to ``out``; returns the module load order it contains."""
    tree = initramfs_tree(kernel, busybox, modules)
    out.write_bytes(tree.to_cpio())
    return (tree.nodes["/etc/asyncvmm/modules"].data or b"").decode().split()
