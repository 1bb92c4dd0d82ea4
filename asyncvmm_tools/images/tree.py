"""A file tree described in memory, emitted as a cpio archive or a staging directory.

The initramfs and the root filesystem hold the same kinds of things (busybox
and its applet links, an init script, libraries, device nodes), so both are
described as an :class:`FsTree` first.  Paths are absolute guest paths; the
tree uses Debian's merged-/usr layout (``/bin -> usr/bin`` ...), so a host
path such as ``/lib/x86_64-linux-gnu/libc.so.6`` is placed by resolving its
directory (:func:`guest_path`).
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from .cpio import CpioArchive

MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


class TreeError(ValueError):
    """Conflicting or invalid entries in a file tree."""


@dataclass(frozen=True)
class Node:
    kind: str                       # "dir" | "file" | "symlink" | "chardev"
    perm: int = 0o755
    data: bytes | None = None       # file contents given inline
    source: Path | None = None      # or read from this host file
    target: str = ""                # symlink target
    rdev: tuple[int, int] = (0, 0)


def guest_path(host_path: str) -> str:
    """Where a host file belongs in a merged-/usr tree (its directory resolved, name kept)."""
    directory, name = os.path.split(os.path.abspath(host_path))
    parts = Path(directory).parts[1:]
    if parts and parts[0] in MERGED_USR:
        parts = tuple(MERGED_USR[parts[0]].split("/")) + parts[1:]
    return "/" + "/".join(parts + (name,))


class FsTree:
    def __init__(self, merged_usr: bool = True) -> None:
        self.nodes: dict[str, Node] = {}
        if merged_usr:
            for link, target in MERGED_USR.items():
                self.add_dir("/" + target)
                self.add_symlink("/" + link, target)

    def _put(self, path: str, node: Node) -> None:
        path = "/" + path.strip("/")
        top = path.split("/")[1]
        if top in MERGED_USR and path != "/" + top and self.nodes.get("/" + top, Node("dir")).kind == "symlink":
            path = "/" + MERGED_USR[top] + path[len(top) + 1:]
        old = self.nodes.get(path)
        if old is not None and old != node and not (old.kind == node.kind == "dir"):
            raise TreeError(f"conflicting entries for {path}")
        self.nodes[path] = node

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._put(path, Node("dir", perm))

    def add_bytes(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._put(path, Node("file", perm, data=data))

    def add_host_file(self, path: str, source: Path, perm: int | None = None) -> None:
        mode = os.stat(source).st_mode  # follows symlinks: we copy the contents
        if not stat.S_ISREG(mode):
            raise TreeError(f"{source} is not a regular file")
        self._put(path, Node("file", perm if perm is not None else stat.S_IMODE(mode), source=Path(source)))

    def add_symlink(self, path: str, target: str) -> None:
        self._put(path, Node("symlink", target=target))

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._put(path, Node("chardev", perm, rdev=(major, minor)))

    def size(self) -> int:
        total = 0
        for node in self.nodes.values():
            if node.kind == "file":
                total += len(node.data) if node.data is not None else os.path.getsize(node.source)
        return total

    def to_cpio(self) -> bytes:
        archive = CpioArchive()
        for path in sorted(self.nodes):
            n = self.nodes[path]
            if n.kind == "dir":
                archive.add_dir(path, n.perm)
            elif n.kind == "file":
                archive.add_file(path, n.data if n.data is not None else n.source.read_bytes(), n.perm)
            elif n.kind == "symlink":
                archive.add_symlink(path, n.target)
            else:
                archive.add_chardev(path, *n.rdev, perm=n.perm)
        return archive.to_bytes()

    def materialize(self, root: Path) -> None:
        """Write the tree under ``root`` (device nodes are skipped: mke2fs -d needs root for them
        and the guest mounts devtmpfs anyway)."""
        for path in sorted(self.nodes):
            n = self.nodes[path]
            dest = root / path.lstrip("/")
            if n.kind == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                dest.chmod(n.perm)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if n.kind == "symlink":
                os.symlink(n.target, dest)
            elif n.kind == "file":
                if n.data is not None:
                    dest.write_bytes(n.data)
                else:
                    shutil.copyfile(n.source, dest)
                dest.chmod(n.perm)
