"""Kernel modules: names, ``.modinfo`` dependencies, ``modules.dep`` and load order.

Pure functions over bytes and text, plus :func:`read_module` to load a
(possibly compressed) ``.ko``.  Debian's kernel packages ship no
``modules.dep`` (``depmod`` makes it at install time), so the table can also be
built from each module's ``.modinfo`` section, whose ``depends=`` entry lists
the modules it needs (what ``depmod`` itself reads).

A module's *name* is its file name without ``.ko[.xz|.zst|.gz]`` and with
``-`` turned into ``_`` (``kvm-amd.ko`` is ``kvm_amd``), as the kernel does.
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import subprocess
from pathlib import Path

SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


class ModuleError(Exception):
    """A module that is missing, unreadable or part of a dependency cycle."""


def module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    raise ModuleError(f"{path!r} is not a kernel module file")


def elf_section(elf: bytes, wanted: str) -> bytes:
    """The contents of section ``wanted`` of an ELF64 little-endian object."""
    if elf[:4] != b"\x7fELF" or len(elf) < 64 or elf[4] != 2 or elf[5] != 1:
        raise ModuleError("not an ELF64 little-endian object")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(elf):
        raise ModuleError("section header table out of bounds")

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", elf, base)
        offset, size = struct.unpack_from("<QQ", elf, base + 0x18)
        if offset + size > len(elf):
            raise ModuleError(f"section {i} out of bounds")
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    strtab = elf[str_off:str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = header(i)
        end = strtab.find(b"\0", name_off)
        if end >= 0 and strtab[name_off:end].decode(errors="replace") == wanted:
            return elf[offset:offset + size]
    raise ModuleError(f"no {wanted} section")


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """``key -> [values]`` from a module's ``.modinfo`` (NUL-separated ``key=value``)."""
    info: dict[str, list[str]] = {}
    for item in elf_section(elf, ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def modinfo_depends(elf: bytes) -> list[str]:
    deps: list[str] = []
    for value in modinfo(elf).get("depends", []):
        deps += [d.replace("-", "_") for d in value.split(",") if d]
    return deps


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` lines ``path: dep1 dep2`` -> ``{path: [dep paths]}``."""
    table: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ModuleError(f"modules.dep line {lineno} has no ':'")
        table[path.strip()] = rest.split()
    return table


def format_modules_dep(table: dict[str, list[str]]) -> str:
    return "".join(f"{p}: {' '.join(d)}\n" if d else f"{p}:\n" for p, d in sorted(table.items()))


def load_order(wanted: list[str], table: dict[str, list[str]],
               builtin: frozenset[str] = frozenset()) -> list[str]:
    """Module paths to ``insmod``, dependencies first, each once.

    ``wanted`` are module names; ``table`` is a modules.dep table; names in
    ``builtin`` are compiled into the kernel and need no file.
    """
    by_name = {module_name(p): p for p in table}
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(path: str, chain: tuple[str, ...]) -> None:
        if state.get(path) == "done":
            return
        if state.get(path) == "visiting":
            raise ModuleError("dependency cycle: " + " -> ".join(chain + (path,)))
        state[path] = "visiting"
        for dep in table.get(path, []):
            if dep not in table:
                raise ModuleError(f"{path} needs {dep}, which is not in the table")
            visit(dep, chain + (path,))
        state[path] = "done"
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in builtin:
            continue
        if name not in by_name:
            raise ModuleError(f"module {name} is neither built in nor present")
        visit(by_name[name], ())
    return order


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressing ``.ko.xz`` / ``.ko.gz`` / ``.ko.zst``."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    return data


def scan_modules(modules_dir: Path) -> tuple[dict[str, list[str]], frozenset[str]]:
    """The modules.dep table and built-in names of ``lib/modules/<version>``.

    Uses ``modules.dep`` when present, otherwise reads every module's
    ``.modinfo``.  Paths are relative to ``modules_dir``, as in modules.dep.
    """
    builtin_file = modules_dir / "modules.builtin"
    builtin = frozenset(
        module_name(line.strip()) for line in
        (builtin_file.read_text().splitlines() if builtin_file.exists() else []) if line.strip())
    dep_file = modules_dir / "modules.dep"
    if dep_file.exists():
        return parse_modules_dep(dep_file.read_text()), builtin
    paths: dict[str, str] = {}
    for root, _dirs, files in os.walk(modules_dir / "kernel"):
        for f in files:
            if f.endswith(SUFFIXES):
                rel = os.path.relpath(os.path.join(root, f), modules_dir)
                paths[module_name(rel)] = rel
    table: dict[str, list[str]] = {}
    for name, rel in paths.items():
        deps = modinfo_depends(read_module(modules_dir / rel))
        missing = [d for d in deps if d not in paths]
        if missing:
            raise ModuleError(f"{rel} depends on absent modules {missing}")
        table[rel] = [paths[d] for d in deps]
    return table, builtin
