"""The guest root filesystem: an ext4 image made with ``mke2fs -d`` (no mount, no root needed).

Contents: busybox and its applets, the asyncvmm ``/sbin/init`` (stage
``rootfs``), and the tools the linux-tier tests and benchmarks use inside the
guest -- ``iperf3`` (TCP throughput), ``socat`` (Debian's build has
``VSOCK-LISTEN``/``VSOCK-CONNECT``) and ``fio`` (block I/O, benchmarks/blockfio.py)
-- copied from the host with the shared libraries ``ldd`` names and the loader.
Debian's fio links every engine it was built with (ceph, gluster, rdma, nbd,
pmem...): about 75 MB of libraries, most of the ~85 MB of files; the
128 MiB file system still has ~30 MB free.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from .elfdeps import library_closure
from .guestinit import init_script
from .initramfs import add_base, add_busybox
from .tree import FsTree, guest_path

GUEST_TOOLS = ["iperf3", "socat", "fio"]
DEFAULT_SIZE_MIB = 128


class RootfsError(RuntimeError):
    """A tool to copy is missing, or mke2fs failed."""


def find_tools(names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        found = shutil.which(name)
        if not found:
            raise RootfsError(f"{name} is not installed on the host (apt-get install {name})")
        paths.append(Path(os.path.realpath(found)))
    return paths


def rootfs_tree(busybox: Path, tools: list[Path]) -> FsTree:
    tree = FsTree()
    add_base(tree)
    add_busybox(tree, busybox)
    tree.add_bytes("/sbin/init", init_script("rootfs"), 0o755)
    for tool in tools:
        tree.add_host_file("/usr/bin/" + tool.name, tool, 0o755)
    for lib in sorted(library_closure(tools)):
        tree.add_host_file(guest_path(lib), Path(lib), 0o755)
    # iperf3 resolves service names and users through NSS; keep the lookups local.
    tree.add_bytes("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files\nservices: files\n")
    return tree


def build_rootfs(busybox: Path, tools: list[Path], out: Path, key: str,
                 size_mib: int = DEFAULT_SIZE_MIB) -> None:
    tree = rootfs_tree(busybox, tools)
    need_mib = tree.size() // (1 << 20) + 16
    if size_mib < need_mib:
        raise RootfsError(f"rootfs of {size_mib} MiB cannot hold {need_mib} MiB of files")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "root"
        tree.materialize(staging)
        make_ext4(staging, out, size_mib, label="asyncvmm-root", key=key)


def make_ext4(staging: Path, out: Path, size_mib: int, label: str, key: str) -> None:
    """``mke2fs -t ext4 -d`` into a sparse file of ``size_mib``, files owned by root.

    The UUID and directory hash seed come from ``key`` and the timestamps are
    pinned so the same inputs give the same image.
    """
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "asyncvmm:" + key))
    if out.exists():
        out.unlink()
    with open(out, "wb") as f:
        f.truncate(size_mib << 20)
    argv = ["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-U", fs_uuid,
            "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", str(staging), str(out)]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1")
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RootfsError(f"mke2fs failed: {r.stderr.strip()}")
