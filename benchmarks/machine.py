"""What machine a benchmark ran on, and which code: recorded with every result.

Reads /proc, /sys and ``git``; everything is best effort, an unreadable item
is recorded as ``None`` rather than failing the benchmark.  ``kvm_kind``
matters most here: on ``kvm_pvm`` (a software hypervisor) guest ring 0 is
emulated, which dominates boot times for every VMM alike.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KVM_MODULES = ("kvm_pvm", "kvm_intel", "kvm_amd")


def cpu_model(cpuinfo: str) -> str | None:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def meminfo_kib(meminfo: str, key: str) -> int | None:
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0])
    return None


def kvm_kind(sys_module: Path = Path("/sys/module")) -> str | None:
    """The loaded KVM vendor module (``kvm_pvm``, ``kvm_intel``, ``kvm_amd``), if any."""
    for name in KVM_MODULES:
        if (sys_module / name).exists():
            return name
    return "kvm" if (sys_module / "kvm").exists() else None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# What a benchmark result depends on; other engineers' uncommitted work elsewhere does not count.
RESULT_PATHS = ("asyncvmm", "benchmarks", "tests/guest", "pyproject.toml")


def git_state(repo: Path = REPO, paths: tuple[str, ...] = RESULT_PATHS) -> dict[str, object]:
    """HEAD, and whether ``paths`` had uncommitted changes (then the numbers are for HEAD plus those)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                 text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.rstrip("\n")     # keep porcelain's leading status column

    status = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    changed = [] if not status else [line[3:] for line in status.splitlines()]
    return {"commit": (git("rev-parse", "HEAD") or "").strip() or None,
            "dirty": None if status is None else bool(changed), "dirty_paths": changed}


def tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else None


def describe() -> dict[str, object]:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    meminfo = read("/proc/meminfo")
    return {
        "cpu_model": cpu_model(read("/proc/cpuinfo")),
        "cpus": os.cpu_count(),
        "mem_total_kib": meminfo_kib(meminfo, "MemTotal"),
        "kernel": platform.release(),
        "kvm": kvm_kind(),
        "python": sys.version.split()[0],
        "qemu": tool_version(["qemu-system-x86_64", "--version"]),
    }
