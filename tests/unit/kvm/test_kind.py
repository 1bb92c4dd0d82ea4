"""Software-KVM detection on fake sysfs trees (asyncvmm.kvm.kind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncvmm.kvm.kind import software_kvm_reason, software_kvm_warning


def sysfs(root: Path, *modules: str) -> Path:
    for name in modules:
        (root / "module" / name / "parameters").mkdir(parents=True)
    return root


def test_kvm_pvm_is_software(tmp_path):
    reason = software_kvm_reason(sysfs(tmp_path, "kvm", "kvm_pvm"))
    assert reason is not None and "kvm_pvm" in reason


def test_kvm_pvm_wins_even_next_to_a_vendor_module(tmp_path):
    assert software_kvm_reason(sysfs(tmp_path, "kvm", "kvm_amd", "kvm_pvm")) is not None


def test_kvm_without_a_vendor_module_is_software(tmp_path):
    reason = software_kvm_reason(sysfs(tmp_path, "kvm"))
    assert reason is not None and "kvm_intel" in reason and "kvm_amd" in reason


@pytest.mark.parametrize("vendor", ["kvm_intel", "kvm_amd"])
def test_vendor_module_is_hardware(tmp_path, vendor):
    assert software_kvm_reason(sysfs(tmp_path, "kvm", vendor)) is None


def test_no_kvm_at_all_is_not_called_software(tmp_path):
    assert software_kvm_reason(sysfs(tmp_path, "loop")) is None
    assert software_kvm_reason(tmp_path / "missing") is None


def test_warning_says_what_happens_and_where_to_read():
    text = software_kvm_warning("the kvm_pvm module provides /dev/kvm")
    assert "kvm_pvm" in text
    assert "Linux guest will not boot in useful time" in text
    assert "docs/testing.md" in text
