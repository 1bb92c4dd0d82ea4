"""The shared libraries a dynamically linked program needs (via ``ldd``).

:func:`parse_ldd` is pure; :func:`library_closure` runs ``ldd`` on each
given ELF file and returns the union of the libraries and the loader.
Libraries that ``ldd`` cannot find are an error: a binary copied into a
guest without them would fail there, far from the cause.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


class LddError(RuntimeError):
    """ldd failed or reported a missing library."""


_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)(?:\s+\(0x[0-9a-f]+\))?\s*$")
_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def parse_ldd(text: str, strict: bool = True) -> list[str]:
    """Absolute paths of the libraries in ``ldd`` output (vdso skipped).

    With ``strict`` a missing library raises :class:`LddError`; without, it is
    left out.  Output for several files (``path:`` headers) is accepted.
    """
    libs: list[str] = []
    for line in text.splitlines():
        if "statically linked" in line or "not a dynamic executable" in line:
            continue
        m = _ARROW.match(line)
        if m:
            if m.group(2) == "not":
                if not strict:
                    continue
                raise LddError(f"library not found: {m.group(1)}")
            if m.group(2).startswith("/"):
                libs.append(m.group(2))
            continue
        m = _PLAIN.match(line)
        if m:
            libs.append(m.group(1))
        elif "not found" in line and strict:
            raise LddError(f"library not found: {line.strip()}")
    return libs


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def library_closure(binaries: list[Path]) -> set[str]:
    libs: set[str] = set()
    for binary in binaries:
        r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
        # ldd exits 1 for static binaries ("not a dynamic executable")
        if r.returncode != 0 and "not a dynamic executable" not in (r.stdout + r.stderr):
            raise LddError(f"ldd {binary} failed: {r.stderr.strip()}")
        try:
            libs.update(parse_ldd(r.stdout))
        except LddError as exc:
            raise LddError(f"{binary}: {exc}") from exc
    return libs
