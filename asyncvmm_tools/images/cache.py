"""The artifact cache under ``~/.cache/asyncvmm`` (or ``$ASYNCVMM_CACHE``).

Artifacts are named by a content key: the SHA-256 of a JSON document of
everything that went into them (input package hashes, file lists, the
builder's version).  A build writes into a temporary sibling and renames it
into place, so a half-built artifact is never found by a later run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Bump when a builder's output changes for the same inputs.
BUILDER_VERSION = 3


def cache_root() -> Path:
    env = os.environ.get("ASYNCVMM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncvmm"


def content_key(inputs: object) -> str:
    """A short stable hash of a JSON-able description of a build's inputs."""
    doc = json.dumps({"builder": BUILDER_VERSION, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime) in ``sha256.json``.

    Warm runs check several large inputs (the kernel .deb is 27 MB); hashing
    them again each time is most of a warm run's cost.
    """
    st = os.stat(path)
    memo_key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    memo_file = cache_root() / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if memo_key in memo:
        return memo[memo_key]
    digest = _sha256(path)
    memo[memo_key] = digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass   # a read-only cache (inside the emulated host) just hashes again
    return digest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def publishing(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    target = tmp / "out"
    try:
        yield target
        if final.exists():
            _remove(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
