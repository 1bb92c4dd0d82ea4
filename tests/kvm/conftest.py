"""The kvm tier: real ioctl paths on the local /dev/kvm with the freestanding test guest.

Every test here runs the real ``asyncvmm`` process (Firecracker's command
line, ``--config-file --no-api`` or ``--api-sock``) and checks what a user
would see: console output on stdout, log lines, the exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

KVM_PATH = "/dev/kvm"
VMM_TIMEOUT_S = 60


def asyncvmm_argv() -> list[str]:
    script = Path(sys.executable).with_name("asyncvmm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "asyncvmm.cli"]


def kvm_usable() -> bool:
    return os.path.exists(KVM_PATH) and os.access(KVM_PATH, os.R_OK | os.W_OK)


@pytest.fixture(scope="session")
def test_guest():
    require(kvm_usable(), f"{KVM_PATH} is missing or not accessible")
    from tests.guest.build import build_test_guest
    return build_test_guest()


@dataclasses.dataclass
class VmmRun:
    returncode: int
    stdout: str          # the guest's serial console
    stderr: str
    log: str             # the VMM's log (--log-path), kept apart from the console

    @property
    def all_output(self) -> str:
        return self.stdout + self.stderr + self.log


def run_vmm(tmp_path: Path, config: dict, *extra_args: str, stdin: bytes = b"",
            timeout: float = VMM_TIMEOUT_S) -> VmmRun:
    """Run ``asyncvmm --no-api --config-file`` to completion."""
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(config))
    log = tmp_path / "vmm.log"
    log.touch()
    proc = subprocess.run([*asyncvmm_argv(), "--no-api", "--config-file", str(cfg), "--level", "Info",
                           "--log-path", str(log), *extra_args],
                          input=stdin, capture_output=True, timeout=timeout)
    return VmmRun(proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"), log.read_text(errors="replace"))


def guest_config(kernel: Path, cmdline: str, *, vcpus: int = 1, mem_mib: int = 64, **extra) -> dict:
    config = {
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": cmdline},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    }
    config.update(extra)
    return config
