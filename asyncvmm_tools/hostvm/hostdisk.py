"""The emulated host's runtime disk: Python, the venv, the project, tools and guest images.

Files keep their host paths, so inside the host VM the same ``sys.executable``,
editable install and image cache paths work.  The disk is an ext4 image made
with ``mke2fs -d`` from a staging tree of hard links (cheap) and is rebuilt
only when its content key changes.  The key hashes each file's path, size
and mtime -- not its bytes: hashing a gigabyte of runtime on every test run
would cost more than the test tier itself.  The few small files that are
rewritten with the same content (the image manifest) are keyed by their bytes.

Disks do not pile up: each records the venv it was built for (``.owner``),
and every call keeps the chosen disk, the disks of other venvs that still
exist, and any disk a running session holds (a shared ``flock``, taken by
:func:`ensure_host_disk` and kept by the caller); the rest are deleted.

What goes in: ``sys.base_prefix`` without its test suite (and without its own
site-packages when running from a venv that does not use them), the venv,
the files of a few Debian
packages (:data:`PACKAGES`: QEMU, shells, coreutils, e2fsprogs, iproute2,
socat, iperf3, curl...), every shared library those ELF files need, ``/etc``, and
the guest images of the manifest.  The project tree itself changes with
every commit, so it is not here: :func:`copy_project` puts it on the small
per-run job disk, and the host init copies it to its host path.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import BinaryIO

from ..images.cache import content_key, publishing
from ..images.elfdeps import is_elf, parse_ldd
from ..images.rootfs import make_ext4

PACKAGES = ["coreutils", "bash", "dash", "e2fsprogs", "iproute2", "socat", "iperf3", "cpio", "lz4",
            "zstd", "xz-utils", "gzip", "tar", "grep", "sed", "findutils", "procps", "util-linux",
            "busybox-static", "qemu-system-x86", "qemu-system-data", "qemu-system-common", "seabios",
            "diffutils", "file", "libmagic-mgc", "kmod", "mawk", "curl"]
# Made by maintainer scripts, so no package lists them.
EXTRA_FILES = ["/usr/bin/sh", "/usr/bin/awk", "/usr/bin/which"]
# __pycache__ is kept: compiling the project's modules under TCG costs seconds each run.
PROJECT_SKIP = {".git", ".hypothesis", ".pytest_cache", ".venv", "results"}


class HostDiskError(RuntimeError):
    """The runtime disk could not be assembled."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[2]


def package_files(packages: list[str]) -> list[str]:
    """Regular files and symlinks ``dpkg -L`` lists for the installed ``packages``."""
    files: list[str] = []
    for pkg in packages:
        r = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True)
        if r.returncode != 0:
            continue   # not installed: scripts/quickstart installs what the tier needs
        for line in r.stdout.splitlines():
            if line.startswith("/") and (os.path.islink(line) or os.path.isfile(line)):
                if not line.startswith(("/usr/share/doc", "/usr/share/man", "/usr/share/locale",
                                        "/usr/share/lintian", "/usr/share/info")):
                    files.append(line)
    return files


def walk(root: Path, skip: set[str]) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel_dir = os.path.relpath(dirpath, root)
        if any(rel_dir == s or rel_dir.startswith(s + "/") for s in skip):
            dirnames[:] = []
            continue
        for name in filenames:
            out.append(os.path.join(dirpath, name))
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out.append(p)
    return out


def python_files() -> list[str]:
    base = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths(vars={"installed_base": str(base), "base": str(base)})["stdlib"])
    skip = {str(stdlib.relative_to(base) / "test"), str(stdlib.relative_to(base) / "idlelib"),
            str(stdlib.relative_to(base) / "tkinter")}
    in_venv = sys.prefix != sys.base_prefix
    if in_venv:
        skip.add(str(stdlib.relative_to(base) / "site-packages"))
    files = walk(base, skip)
    if in_venv:
        files += walk(Path(sys.prefix), set())
    return files


def host_path(path: str) -> str:
    """``path`` with its directory resolved (``/lib/x`` -> ``/usr/lib/x``), the name kept."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(d), name)


def collect(extra_paths: list[Path]) -> list[str]:
    """The runtime's files (host paths, directories resolved), without the library closure."""
    files = set(python_files())
    files.update(package_files(PACKAGES))
    files.update(walk(Path("/etc"), set()))
    files.update(f for f in EXTRA_FILES if os.path.lexists(f))
    for p in extra_paths:
        files.update(walk(p, set()) if p.is_dir() else [str(p)])
    return with_link_targets({host_path(f) for f in files if os.path.lexists(f)})


def with_link_targets(paths: set[str]) -> list[str]:
    """``paths`` plus what their symlinks finally point to (the loader is such a link)."""
    out = set(paths)
    for p in paths:
        if os.path.islink(p):
            target = os.path.realpath(p)
            # /etc/mtab -> /proc/self/mounts: kernel files are not runtime files
            if os.path.isfile(target) and not target.startswith(("/proc/", "/sys/", "/dev/", "/run/")):
                out.add(target)
    return sorted(out)


def libraries_of(files: list[str]) -> list[str]:
    """Shared libraries the ELF files among ``files`` need (ldd, in batches).

    A library ldd cannot find is skipped, not fatal: optional plugins (QEMU's
    GUI modules, say) may need libraries nobody installed.
    """
    elves = [f for f in files if not os.path.islink(f)
             and (f.endswith(".so") or ".so." in f or os.access(f, os.X_OK)) and is_elf(Path(f))]
    libs: set[str] = set()
    for i in range(0, len(elves), 200):
        r = subprocess.run(["ldd", *elves[i:i + 200]], capture_output=True, text=True)
        libs.update(parse_ldd(r.stdout, strict=False))
    return sorted(set(with_link_targets({host_path(lib) for lib in libs})) - set(files))


def copy_project(dest: Path) -> None:
    """The project tree (no .git, venv or caches) under ``dest``, hard-linked where possible."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(project_root(), dest, symlinks=True, copy_function=link_or_copy,
                    ignore=lambda d, names: [n for n in names if n in PROJECT_SKIP])


def fingerprint(files: list[str], by_content: frozenset[str] = frozenset()) -> list[tuple[str, int, int | str]]:
    """(path, size, mtime) of each file -- (path, size, sha256) for those in ``by_content`` --
    bytecode caches left out.

    Every first import writes new ``.pyc`` files into the runtime; counting
    them would rebuild the disk after nearly every run.  A disk with older
    bytecode is still right (Python checks each ``.pyc`` against its source).
    """
    out: list[tuple[str, int, int | str]] = []
    for f in files:
        if "/__pycache__/" in f:
            continue
        st = os.lstat(f)
        if f in by_content and not os.path.islink(f):
            with open(f, "rb") as fh:
                out.append((f, st.st_size, hashlib.sha256(fh.read()).hexdigest()))
        else:
            out.append((f, st.st_size, st.st_mtime_ns))
    return out


def stage(files: list[str], staging: Path) -> int:
    """Hard-link (or copy) ``files`` under ``staging`` at their host paths; returns total bytes."""
    total = 0
    for top in ("bin", "sbin", "lib", "lib64"):
        link = Path("/") / top
        if link.is_symlink():
            (staging / top).symlink_to(os.readlink(link))
    for f in files:
        dest = staging / f.lstrip("/")
        if os.path.lexists(dest):
            continue   # e.g. /bin itself, listed by dpkg and already made above
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(f):
            os.symlink(os.readlink(f), dest)
            continue
        try:
            os.link(f, dest)
        except OSError:
            shutil.copy2(f, dest)
        total += os.path.getsize(f)
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "hostvm-job"):
        (staging / d).mkdir(parents=True, exist_ok=True)
    return total


def hold(disk: Path) -> BinaryIO | None:
    """A shared lock on ``disk`` while the returned file stays open; None if it is gone."""
    try:
        f = open(disk, "rb")
    except FileNotFoundError:
        return None
    fcntl.flock(f, fcntl.LOCK_SH)
    if os.fstat(f.fileno()).st_nlink == 0:   # pruned between open and lock
        f.close()
        return None
    return f


def prune(disk_dir: Path, current: Path, owner: str) -> list[Path]:
    """Delete superseded runtime disks; returns those deleted.

    Kept: ``current``, disks of another venv that still exists, and disks a
    session holds (it may be about to start QEMU on it; a running QEMU keeps
    its open file anyway).
    """
    deleted = []
    for disk in sorted(disk_dir.glob("root-*.ext4")):
        if disk == current:
            continue
        try:
            other = disk.with_suffix(".owner").read_text().strip()
        except OSError:
            other = ""
        if other and other != owner and os.path.isdir(other):
            continue
        try:
            f = open(disk, "rb")
        except FileNotFoundError:
            continue
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            for path in (disk, disk.with_suffix(".libs"), disk.with_suffix(".owner")):
                path.unlink(missing_ok=True)
            deleted.append(disk)
    return deleted


def ensure_host_disk(cache: Path, extra_paths: list[Path], progress=print,
                     by_content: frozenset[str] = frozenset()) -> tuple[Path, BinaryIO]:
    """The cached disk for the current runtime and a shared lock on it (keep it open while in use).

    Rebuilt when any file's size or mtime (for ``by_content``, its bytes) changed.  The library
    closure is recorded beside the disk (``.libs``) so checking the key does not run ldd over
    thousands of files each time.
    """
    files = collect(extra_paths)
    by_content = frozenset(host_path(f) for f in by_content)
    disk_dir = cache / "hostvm"
    owner = sys.prefix
    for old in sorted(disk_dir.glob("root-*.ext4")):
        libs_file = old.with_suffix(".libs")
        if not libs_file.exists():
            continue
        libs = [l for l in libs_file.read_text().split("\n") if l]
        if all(os.path.lexists(l) for l in libs) and \
                old.name == f"root-{content_key(['hostdisk', fingerprint(files + libs, by_content)])}.ext4":
            lock = hold(old)
            if lock is None:
                continue
            prune(disk_dir, old, owner)
            return old, lock
    progress(f"[hostvm] resolving shared libraries of {len(files)} files")
    libs = libraries_of(files)
    key = content_key(["hostdisk", fingerprint(files + libs, by_content)])
    out = disk_dir / f"root-{key}.ext4"
    progress(f"[hostvm] building the runtime disk ({len(files) + len(libs)} files)")
    disk_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp, publishing(out) as target:
        staging = Path(tmp) / "root"
        staging.mkdir()
        total = stage(files + libs, staging)
        size_mib = int(total * 1.2) // (1 << 20) + 512
        make_ext4(staging, target, size_mib, label="avmroot", key=key)
    out.with_suffix(".libs").write_text("\n".join(libs) + "\n")
    out.with_suffix(".owner").write_text(owner + "\n")
    lock = hold(out)
    if lock is None:
        raise HostDiskError(f"{out} vanished right after it was built")
    for deleted in prune(disk_dir, out, owner):
        progress(f"[hostvm] deleted the superseded runtime disk {deleted.name}")
    return out, lock
