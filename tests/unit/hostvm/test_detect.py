"""kvm_kind and friends on fake /sys, /proc and /dev trees."""

from __future__ import annotations

import pytest

from asyncvmm_tools.hostvm.detect import cpu_flags, kvm_kind, nested_status, tsc_khz

CPUINFO = "processor\t: 0\nflags\t\t: fpu {extra} constant_tsc\ncpu MHz\t\t: 2445.426\n"


def fake(tmp_path, modules=(), flags="", dev=True, nested=None):
    sysfs = tmp_path / "sys"
    for m in modules:
        (sysfs / "module" / m / "parameters").mkdir(parents=True)
    if nested is not None:
        (sysfs / "module" / modules[0] / "parameters" / "nested").write_text(nested + "\n")
    (sysfs / "module").mkdir(parents=True, exist_ok=True)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO.format(extra=flags))
    dev_kvm = tmp_path / "kvm"
    if dev:
        dev_kvm.write_text("")
    return dict(sys_root=sysfs, cpuinfo=cpuinfo, dev_kvm=dev_kvm)


@pytest.mark.parametrize("modules,flags,expected", [
    (("kvm", "kvm_intel"), "vmx", "hardware"),
    (("kvm", "kvm_amd"), "svm", "hardware"),
    (("kvm", "kvm_pvm"), "", "software"),
    (("kvm", "kvm_amd", "kvm_pvm"), "svm", "software"),   # pvm serves /dev/kvm when loaded
    (("kvm", "kvm_amd"), "", "software"),                  # module without the CPU feature
    (("kvm",), "vmx", "software"),                         # some other backend
])
def test_kinds(tmp_path, modules, flags, expected):
    assert kvm_kind(**fake(tmp_path, modules, flags)) == expected


def test_absent_without_dev_kvm(tmp_path):
    assert kvm_kind(**fake(tmp_path, ("kvm", "kvm_intel"), "vmx", dev=False)) == "absent"


def test_nested_status_and_tsc(tmp_path):
    paths = fake(tmp_path, ("kvm_amd",), "svm", nested="1")
    assert nested_status(paths["sys_root"]) == "1"
    assert nested_status(tmp_path / "nothing") == ""
    assert tsc_khz(paths["cpuinfo"]) == 2445426
    (tmp_path / "c2").write_text("flags : fpu\ncpu MHz : 1000\n")
    assert tsc_khz(tmp_path / "c2") is None          # TSC not constant: do not trust MHz
    assert tsc_khz(tmp_path / "missing") is None


def test_cpu_flags():
    assert {"vmx", "fpu"} <= cpu_flags("flags : fpu vmx\n")
    assert cpu_flags("nothing here") == set()
