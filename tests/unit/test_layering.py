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
