"""scripts/quickstart installs every external tool the tests and benchmarks look up.

The tools are found by reading the sources (tests, benchmarks, the image and host tools) for
``shutil.which("<tool>")`` and ``subprocess.run(["<tool>", ...])``; each is traced to its
Debian package with ``dpkg -S``, which must be in the quickstart's list (or be an essential or
required package every Debian has).  A tool missing here is a failure under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[3]
WHICH = re.compile(r"""which\(\s*["']([\w.+-]+)["']""")
RUN = re.compile(r"""(?:run|Popen|check_output|check_call)\(\s*\[\s*["']([a-z][\w.+-]*)["']""")


def quickstart_packages() -> set[str]:
    text = (ROOT / "scripts" / "quickstart").read_text()
    found = set()
    for block in re.findall(r"PACKAGES(?:\+)?=\(([^)]*)\)", text):
        found.update(re.sub(r"#.*", "", block).split())
    return found


def looked_up_tools() -> set[str]:
    tools = set()
    for top in ("tests", "benchmarks", "asyncvmm_tools"):
        for path in (ROOT / top).rglob("*.py"):
            text = path.read_text()
            tools.update(WHICH.findall(text))
            tools.update(RUN.findall(text))
    return tools - {"asyncvmm"}   # the project's own console script


def package_of(path: str) -> str:
    """The package that ships ``path``; dpkg knows some by their pre-/usr-merge name (/bin/ip)."""
    candidates = [path, os.path.realpath(path)]
    candidates += [c[len("/usr"):] for c in list(candidates) if c.startswith("/usr/")]
    for candidate in candidates:
        r = subprocess.run(["dpkg", "-S", candidate], capture_output=True, text=True)
        owners = [l for l in r.stdout.splitlines() if l and not l.startswith("diversion ")]
        if r.returncode == 0 and owners:
            return owners[0].split(":", 1)[0].split(",")[0].strip()
    return ""


def base_system(package: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Essential} ${Priority}", package], capture_output=True, text=True)
    return r.stdout.split()[:1] == ["yes"] or r.stdout.endswith("required")


def test_the_source_scan_finds_the_known_tools():
    assert {"iasl", "acpiexec", "gcc", "qemu-system-x86_64", "iperf3", "busybox", "debugfs", "ld"} <= looked_up_tools()
    assert {"acpica-tools", "gcc", "qemu-system-x86", "iperf3", "busybox-static",
            "qemu-system-common"} <= quickstart_packages()


def test_every_tool_the_tests_look_up_comes_from_a_package_the_quickstart_installs():
    require(shutil.which("dpkg") is not None, "dpkg is needed to trace tools to packages")
    wanted = quickstart_packages()
    missing, unlisted = [], []
    for tool in sorted(looked_up_tools()):
        path = shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
        if path is None:
            missing.append(tool)
            continue
        package = package_of(path)
        if not package or package not in wanted and not base_system(package):
            unlisted.append(f"{tool} ({package or 'no Debian package ships ' + path})")
    assert not unlisted, f"add to scripts/quickstart's PACKAGES: {unlisted}"
    require(not missing, f"not installed (run scripts/quickstart): {missing}")
