"""The test guest boots through every kernel entry asyncvmm supports, on the local /dev/kvm."""

from __future__ import annotations

import re

import pytest

from tests.kvm.conftest import guest_config, run_vmm

pytestmark = pytest.mark.kvm

VARIANTS = ["elf_pvh", "elf", "bzimage"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_boots_prints_and_resets_with_exit_code_0(test_guest, tmp_path, variant):
    kernel = test_guest.variants()[variant]
    run = run_vmm(tmp_path, guest_config(kernel, "console=ttyS0 exit=reset"))
    assert "testguest: hello" in run.stdout
    assert "testguest: exit reset" in run.stdout
    assert run.returncode == 0, run.all_output
    entry = "PVH" if variant == "elf_pvh" else "64-bit boot protocol"
    assert entry in run.all_output


def test_command_line_reaches_the_guest(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "console=ttyS0 marker=abc123 exit=reset"))
    assert "marker=abc123" in run.stdout


def test_boot_timer_line_is_logged(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "boottimer=1 exit=reset"), "--boot-timer")
    out = run.all_output
    m = re.search(r"Guest-boot-time = +(\d+) us (\d+) ms, +(\d+) CPU us (\d+) CPU ms", out)
    assert m, out
    assert int(m.group(1)) // 1000 == int(m.group(2))
    assert run.returncode == 0


def test_no_boot_timer_line_without_the_flag(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "boottimer=1 exit=reset"))
    assert "Guest-boot-time" not in run.all_output
    assert run.returncode == 0


@pytest.mark.parametrize("variant", ["elf_pvh", "bzimage"])
def test_two_vcpus_both_run(test_guest, tmp_path, variant):
    kernel = test_guest.variants()[variant]
    run = run_vmm(tmp_path, guest_config(kernel, "cpus=2 exit=reset", vcpus=2))
    assert "testguest: cpu 1 up" in run.stdout, run.all_output
    assert run.returncode == 0


@pytest.mark.parametrize("mode", ["triplefault", "triplefault0"])
def test_triple_fault_ends_with_nonzero_code_and_a_clear_line(test_guest, tmp_path, mode):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, f"exit={mode}"))
    assert run.returncode != 0
    assert "triple fault" in run.all_output


def test_acpi_poweroff_ends_with_code_0(test_guest, tmp_path):
    from asyncvmm.devices.legacy.acpi_pm import SLEEP_CONTROL_PORT, S5_SLP_TYP
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh,
                                         f"pmport={SLEEP_CONTROL_PORT:#x} slptyp={S5_SLP_TYP} exit=poweroff"))
    assert "exit poweroff" in run.stdout
    assert run.returncode == 0, run.all_output
    assert "powered off" in run.all_output


def test_stdin_reaches_the_guest_uart(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "serialecho=1 exit=reset"),
                  stdin=b"ping-from-host\n")
    assert "echo:ping-from-host" in run.stdout, run.stdout


def test_a_kernel_too_big_for_memory_fails_start(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "exit=reset", mem_mib=1))
    assert run.returncode != 0
    assert "Cannot load kernel" in run.all_output


def _this_kvm_is_software() -> bool:
    """The machine fact, read independently of asyncvmm.kvm.kind."""
    import os
    modules = "/sys/module"
    if os.path.exists(f"{modules}/kvm_pvm"):
        return True
    return not (os.path.exists(f"{modules}/kvm_intel") or os.path.exists(f"{modules}/kvm_amd"))


def test_software_kvm_is_warned_about_once_at_start_and_the_guest_still_runs(test_guest, tmp_path):
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "console=ttyS0 exit=reset"), "--show-level")
    assert run.returncode == 0, run.all_output
    warnings = [line for line in run.log.splitlines() if "Software KVM detected" in line]
    if _this_kvm_is_software():
        assert len(warnings) == 1, run.log
        assert ":WARN]" in warnings[0], warnings[0]
        assert "will not boot in useful time" in warnings[0] and "docs/testing.md" in warnings[0]
        # Logged at InstanceStart, before the guest ran.
        assert run.log.index("Software KVM detected") < run.log.index("Started microVM")
    else:
        assert warnings == [], run.log
