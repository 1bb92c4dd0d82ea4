"""The guest kernel: Debian's cloud kernel as a bzImage, an ELF vmlinux and its modules.

Artifact directory ``kernel-<key>/`` (key: the .deb's SHA-256):
``vmlinuz`` (bzImage), ``vmlinux`` (ELF64, from the bzImage payload),
``config``, ``version``, and ``modules/`` = ``lib/modules/<version>`` with a
generated ``modules.dep``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import bzimage, debian, kmod
from .cache import content_key, publishing

log = logging.getLogger(__name__)

DEFAULT_META = "linux-image-cloud-amd64"


@dataclass(frozen=True)
class KernelArtifact:
    root: Path

    @property
    def bzimage(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    @property
    def version(self) -> str:
        return (self.root / "version").read_text().strip()

    def complete(self) -> bool:
        return all(p.exists() for p in (self.bzimage, self.vmlinux, self.modules_dir / "modules.dep",
                                        self.root / "version"))


def fetch_deb(cache: Path, meta: str = DEFAULT_META) -> debian.Deb:
    package = debian.resolve(meta, "linux-image-")
    return debian.download(package, cache / "debs")


def build_kernel(cache: Path, deb: debian.Deb, force: bool = False) -> KernelArtifact:
    art = KernelArtifact(cache / f"kernel-{content_key({'deb': deb.sha256})}")
    if art.complete() and not force:
        return art
    with tempfile.TemporaryDirectory(dir=cache) as tmp, publishing(art.root) as out:
        tree = debian.extract(deb, Path(tmp) / "x")
        vmlinuz = _one(tree.glob("boot/vmlinuz-*"), "vmlinuz")
        version = vmlinuz.name[len("vmlinuz-"):]
        out.mkdir()
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        log.info("decompressing the bzImage payload of %s", version)
        (out / "vmlinux").write_bytes(bzimage.decompress(vmlinuz.read_bytes()))
        shutil.copyfile(_one(tree.glob("boot/config-*"), "config"), out / "config")
        shutil.move(str(tree / "lib" / "modules" / version), out / "modules")
        table, _ = kmod.scan_modules(out / "modules")
        (out / "modules" / "modules.dep").write_text(kmod.format_modules_dep(table))
        (out / "version").write_text(version + "\n")
    return art


def _one(paths, what: str) -> Path:
    found = sorted(paths)
    if len(found) != 1:
        raise debian.DebianError(f"expected one {what} in the package, found {len(found)}")
    return found[0]


def config_value(config_text: str, option: str) -> str | None:
    """``y``/``m``/a value for ``CONFIG_<option>``, None when unset."""
    prefix = f"CONFIG_{option}="
    for line in config_text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix):]
    return None
