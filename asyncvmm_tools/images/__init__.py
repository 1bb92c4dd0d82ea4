"""Guest images for tests, benchmarks and the quickstart: kernel, initramfs, root filesystem.

Public API::

    ensure_images(only=None, force=False, build=True, progress=None) -> GuestImages
    load_manifest() -> GuestImages          # what the last build produced, no building

Everything is cached under :func:`cache.cache_root` by content key and
rebuilt only when missing or its inputs changed.  ``build=False`` never runs
apt or builders (used inside the emulated KVM host, which has no network):
it returns the manifest's artifacts or raises :class:`ImagesMissingError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import debian
from .cache import cache_root, content_key, publishing, sha256_file
from .elfdeps import library_closure
from .guestinit import init_script
from .initramfs import GUEST_MODULES, build_initramfs
from .kernel import KernelArtifact, build_kernel, fetch_deb
from .rootfs import DEFAULT_SIZE_MIB, GUEST_TOOLS, build_rootfs, find_tools

log = logging.getLogger(__name__)

KINDS = ("kernel", "initramfs", "rootfs", "minikernel")
DEFAULT_KINDS = ("kernel", "initramfs", "rootfs")
MANIFEST = "images.json"


class ImagesMissingError(RuntimeError):
    """Images were needed but are not built (and building was not allowed)."""


@dataclass(frozen=True)
class GuestImages:
    bzimage: Path
    vmlinux: Path
    initramfs: Path
    rootfs: Path
    kernel_version: str
    kernel_dir: Path
    modules: tuple[str, ...] = ()          # load order inside the initramfs
    minikernel: Path | None = None         # ELF vmlinux of the small built-in-drivers kernel
    minikernel_bzimage: Path | None = None
    rootfs_size: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        doc = asdict(self)
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in doc.items()}

    @classmethod
    def from_json(cls, doc: dict) -> "GuestImages":
        paths = ("bzimage", "vmlinux", "initramfs", "rootfs", "kernel_dir", "minikernel", "minikernel_bzimage")
        kw = {k: (Path(v) if k in paths and v else v) for k, v in doc.items() if k in cls.__dataclass_fields__}
        kw["modules"] = tuple(kw.get("modules", ()))
        return cls(**kw)

    def missing(self) -> list[str]:
        must = [self.bzimage, self.vmlinux, self.initramfs, self.rootfs]
        return [str(p) for p in must if not p.exists()]


def load_manifest(cache: Path | None = None) -> GuestImages:
    path = (cache or cache_root()) / MANIFEST
    try:
        images = GuestImages.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise ImagesMissingError(f"no usable {path}: run `python -m asyncvmm_tools.images build`") from exc
    missing = images.missing()
    if missing:
        raise ImagesMissingError(f"images listed in {path} are gone: {missing}")
    return images


def builder_hash() -> str:
    """Hash of this package's sources: editing a builder or the init invalidates the fast path."""
    h = hashlib.sha256()
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    return h.hexdigest()[:16]


def ensure_images(only: Iterable[str] | None = None, force: bool = False, build: bool = True,
                  progress: Callable[[str], None] | None = None,
                  rootfs_size_mib: int = DEFAULT_SIZE_MIB, refresh: bool = True) -> GuestImages:
    """Build what is missing and return the artifacts.

    ``refresh=False`` trusts a manifest written by the same builder sources
    instead of asking apt for newer packages (apt-cache takes seconds; test
    sessions call this every time).  ``build=False`` never builds.
    """
    cache = cache_root()
    if not build:
        return load_manifest(cache)
    kinds = set(only or DEFAULT_KINDS)
    if not refresh and not force:
        try:
            images = load_manifest(cache)
        except ImagesMissingError:
            images = None
        if images and images.extra.get("builder") == builder_hash() and \
                images.rootfs_size == rootfs_size_mib << 20 and \
                ("minikernel" not in kinds or images.minikernel):
            return images
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown image kinds {sorted(unknown)}; choose from {KINDS}")
    say = progress or log.info
    step = _Stepper(say)
    cache.mkdir(parents=True, exist_ok=True)

    with step("resolving and fetching the Debian cloud kernel"):
        deb = fetch_deb(cache)
    with step(f"kernel {deb.package} {deb.version}"):
        kernel = build_kernel(cache, deb, force=force and "kernel" in kinds)
    with step("busybox-static"):
        busybox = busybox_binary(cache)
    bb_sha = sha256_file(busybox)

    init_hash = hashlib.sha256(init_script("initramfs") + init_script("rootfs")).hexdigest()
    initrd = cache / f"initramfs-{content_key([kernel.root.name, bb_sha, GUEST_MODULES, init_hash])}.cpio"
    order_file = initrd.with_suffix(".modules")
    if force and "initramfs" in kinds or not initrd.exists() or not order_file.exists():
        with step("initramfs (cpio newc)"), publishing(initrd) as out:
            order = build_initramfs(kernel, busybox, out)
            order_file.write_text("\n".join(order) + "\n")
    order = tuple(order_file.read_text().split())

    tools = find_tools(GUEST_TOOLS)
    libs = sorted(library_closure(tools))
    fingerprint = [[str(p), sha256_file(p)] for p in tools] + [[lib, _stat_key(lib)] for lib in libs]
    rootfs_key = content_key([bb_sha, fingerprint, init_hash, rootfs_size_mib])
    rootfs = cache / f"rootfs-{rootfs_key}.ext4"
    if force and "rootfs" in kinds or not rootfs.exists():
        with step(f"ext4 root filesystem ({rootfs_size_mib} MiB)"), publishing(rootfs) as out:
            build_rootfs(busybox, tools, out, rootfs_key, rootfs_size_mib)

    mini = None
    if "minikernel" in kinds:
        from .minikernel import ensure_minikernel
        with step("minimal kernel from linux-source (several minutes)"):
            mini = ensure_minikernel(cache, force=force, progress=say)
    else:
        from .minikernel import cached_minikernel
        mini = cached_minikernel(cache)

    images = GuestImages(
        bzimage=kernel.bzimage, vmlinux=kernel.vmlinux, initramfs=initrd, rootfs=rootfs,
        kernel_version=kernel.version, kernel_dir=kernel.root, modules=order,
        minikernel=mini.vmlinux if mini else None, minikernel_bzimage=mini.bzimage if mini else None,
        rootfs_size=rootfs.stat().st_size, extra={"builder": builder_hash()})
    write_if_changed(cache / MANIFEST, json.dumps(images.to_json(), indent=2) + "\n")
    _prune(cache, keep={initrd, order_file, rootfs})
    return images


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless ``path`` already holds it; True when it wrote.

    The emulated host's runtime disk carries the manifest, and a rewrite with
    the same content would still look like a change to whoever goes by mtime.
    """
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def _prune(cache: Path, keep: set[Path]) -> None:
    """Drop superseded initramfs/rootfs builds (a running guest keeps its open file)."""
    for pattern in ("initramfs-*.cpio", "initramfs-*.modules", "rootfs-*.ext4"):
        for old in cache.glob(pattern):
            if old not in keep:
                old.unlink(missing_ok=True)


def busybox_binary(cache: Path) -> Path:
    """The static busybox from Debian's ``busybox-static``, fetched once per package version."""
    deb = debian.download("busybox-static", cache / "debs")
    dest = cache / f"busybox-{deb.sha256[:16]}" / "busybox"
    if not dest.exists():
        with publishing(dest.parent) as out:
            tree = debian.extract(deb, out)
            found = [p for p in (tree / "bin" / "busybox", tree / "usr" / "bin" / "busybox") if p.exists()]
            if not found:
                raise debian.DebianError("busybox-static has no bin/busybox")
            found[0].rename(out / "busybox")
    return dest


def _stat_key(path: str) -> str:
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


class _Stepper:
    """Prints ``[images] <what> ... done (1.2 s)`` around each build step."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def __call__(self, what: str):
        return _Step(self.say, what)


class _Step:
    def __init__(self, say, what: str) -> None:
        self.say, self.what = say, what

    def __enter__(self):
        self.start = time.monotonic()
        self.say(f"[images] {self.what} ...")
        return self

    def __exit__(self, exc_type, exc, tb):
        took = time.monotonic() - self.start
        self.say(f"[images] {self.what}: {'failed' if exc_type else 'ok'} ({took:.1f} s)")
        return False


__all__ = ["GuestImages", "ImagesMissingError", "KernelArtifact", "ensure_images", "load_manifest", "busybox_binary",
           "KINDS", "DEFAULT_KINDS"]
