"""The dependency direction of the design card, checked on the import statements.

http/ translates requests into controller actions and never touches devices
or KVM; devices/ never imports http/ or kvm/; kvm/ knows nothing of devices.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "asyncvmm"

FORBIDDEN = {
    "http": ("asyncvmm.devices", "asyncvmm.kvm", "asyncvmm.builder", "asyncvmm.vmm", "asyncvmm.vcpu",
             "asyncvmm.arch"),
    "devices": ("asyncvmm.http", "asyncvmm.kvm", "asyncvmm.controller", "asyncvmm.builder",
                "asyncvmm.vmm", "asyncvmm.cli"),
    "kvm": ("asyncvmm.devices", "asyncvmm.http", "asyncvmm.controller", "asyncvmm.builder",
            "asyncvmm.vmm"),
    "mmds": ("asyncvmm.http", "asyncvmm.kvm", "asyncvmm.controller", "asyncvmm.builder", "asyncvmm.vmm"),
    "config": ("asyncvmm.http", "asyncvmm.kvm", "asyncvmm.devices", "asyncvmm.builder", "asyncvmm.vmm"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    rel_pkg = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel_pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_dependency_direction(subpackage):
    bad = []
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for mod in _imports(path):
            if any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN[subpackage]):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_relative_imports_are_resolved():
    # serial.py says "from ..irq import IrqLine": the checker must see asyncvmm.devices.irq.
    imports = _imports(PACKAGE / "devices" / "legacy" / "serial.py")
    assert "asyncvmm.devices.irq" in imports
    assert "asyncvmm.devices.irq.IrqLine" in imports


def test_runtime_does_not_import_the_tools():
    # The image builder and the emulated KVM host are tools around the VMM, not part of it.
    bad = [f"{path.relative_to(PACKAGE.parent)} imports {mod}"
           for path in sorted(PACKAGE.rglob("*.py")) for mod in _imports(path)
           if mod == "asyncvmm_tools" or mod.startswith("asyncvmm_tools.")]
    assert not bad, "\n".join(bad)
    assert not (PACKAGE / "images").exists() and not (PACKAGE / "hostvm").exists()


def _third_party_imports(root: Path) -> dict[str, set[str]]:
    """Top-level module -> the files that import it, for modules outside the stdlib and the project."""
    import sys
    found: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        for mod in _imports(path):
            top = mod.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in ("asyncvmm", "asyncvmm_tools", "__future__"):
                found.setdefault(top, set()).add(str(path.relative_to(root.parent)))
    return found


def _requirement_names(reqs: list[str]) -> set[str]:
    import re
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("-", "_") for r in reqs}


def test_runtime_dependencies_are_what_the_runtime_imports():
    import tomllib
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = _requirement_names(project["dependencies"])
    tools = _requirement_names(project["optional-dependencies"]["tools"])
    imported = _third_party_imports(PACKAGE)
    # pyroute2 is imported lazily by the netns helpers only: it is a tools extra, not a runtime need.
    assert set(imported) - tools == declared, imported
    assert not _third_party_imports(PACKAGE.parent / "asyncvmm_tools"), "the tools use only the stdlib"
