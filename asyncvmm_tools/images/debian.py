"""Fetch Debian packages without installing them: apt-cache, apt-get download, dpkg-deb -x.

A meta package (``linux-image-cloud-amd64``) is resolved to the versioned
package it depends on (``linux-image-6.1.0-NN-cloud-amd64``) and its version;
the ``.deb`` is kept under the cache's ``debs/`` and identified by its
SHA-256, which keys everything built from it.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class DebianError(RuntimeError):
    """apt could not resolve, download or unpack a package."""


@dataclass(frozen=True)
class Deb:
    package: str
    version: str
    path: Path
    sha256: str


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise DebianError(f"{argv[0]} not found: is this Debian with apt?") from exc
    if r.returncode != 0:
        raise DebianError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r.stdout


def parse_depends(text: str, prefix: str) -> list[str]:
    """Packages named ``prefix*`` in ``apt-cache depends`` output."""
    names = re.findall(r"^\s*\|?(?:Pre)?Depends:\s*(\S+)", text, re.M)
    return [n for n in names if n.startswith(prefix)]


def parse_candidate(text: str) -> str | None:
    """The candidate version in ``apt-cache policy`` output (None when '(none)')."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", text, re.M)
    if not m or m.group(1) == "(none)":
        return None
    return m.group(1)


def resolve(meta: str, prefix: str) -> str:
    """The versioned package ``meta`` depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    deps = parse_depends(_run(["apt-cache", "depends", meta]), prefix)
    if not deps:
        raise DebianError(f"{meta} depends on no {prefix}* package; run apt-get update?")
    return deps[0]


def candidate(package: str) -> str:
    version = parse_candidate(_run(["apt-cache", "policy", package]))
    if version is None:
        raise DebianError(f"apt has no candidate for {package}; run apt-get update?")
    return version


def download(package: str, debs_dir: Path) -> Deb:
    """The candidate ``.deb`` of ``package``, downloaded once into ``debs_dir``."""
    from .cache import sha256_file

    version = candidate(package)
    debs_dir.mkdir(parents=True, exist_ok=True)
    # apt-get names files <pkg>_<version with ':' escaped as %3a>_<arch>.deb
    pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
    found = sorted(debs_dir.glob(pattern))
    if not found:
        log.info("downloading %s %s", package, version)
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=debs_dir)
        found = sorted(debs_dir.glob(pattern))
        if not found:
            raise DebianError(f"apt-get download left no {pattern} in {debs_dir}")
    return Deb(package, version, found[0], sha256_file(found[0]))


def extract(deb: Deb, dest: Path) -> Path:
    """Unpack ``deb``'s files into ``dest`` (created) with ``dpkg-deb -x``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(deb.path), str(dest)])
    return dest
