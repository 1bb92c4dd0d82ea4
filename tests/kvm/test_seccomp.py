"""Seccomp filters in the real VMM: every thread filtered, a denied call logged and fatal.

The default filters go in before the guest runs (docs/seccomp.md): each vCPU
thread installs the ``vcpu`` filter first thing, the loop thread the ``vmm``
filter once the vCPU threads exist.  The test-only hook
``ASYNCVMM_TEST_DENIED_SYSCALL`` makes one thread category attempt
``socket(AF_INET)`` (allowed by neither list) right after its filter is in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from asyncvmm.exitcodes import ExitCode
from tests.kvm.conftest import asyncvmm_argv, guest_config, run_vmm, wait_until

pytestmark = pytest.mark.kvm

HOOK = "ASYNCVMM_TEST_DENIED_SYSCALL"
ALLOW_ALL = {"default_action": "allow", "filter_action": "allow", "filter": []}


def seccomp_modes(pid: int) -> dict[int, int]:
    """``Seccomp:`` of every thread of ``pid``, by thread id."""
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):   # a worker thread that just ended
            continue
        for line in status.splitlines():
            if line.startswith("Seccomp:"):
                modes[int(task.name)] = int(line.split()[1])
    return modes


class RunningVmm:
    """A VMM booted from a config file whose guest halts and stays (two vCPU threads)."""

    def __init__(self, tmp_path: Path, kernel: Path, *args: str, cmdline: str = "exit=halt",
                 **config) -> None:
        cfg = tmp_path / "vm.json"
        cfg.write_text(json.dumps(guest_config(kernel, cmdline, vcpus=2, **config)))
        self.log = tmp_path / "vmm.log"
        self.log.touch()
        self.proc = subprocess.Popen([*asyncvmm_argv(), "--no-api", "--config-file", str(cfg), "--log-path",
                                      str(self.log), "--level", "Debug", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def started() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            return "Successfully started microvm" in self.log.read_text()
        wait_until(started, 30, "the microVM to start")

    def close(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=10)


def test_every_thread_of_a_running_vmm_is_filtered(test_guest, tmp_path):
    vmm = RunningVmm(tmp_path, test_guest.elf_pvh)
    try:
        # The vCPU threads install theirs as they start: wait for both lines.
        wait_until(lambda: vmm.log.read_text().count("vcpu filter installed") == 2, 10, "the vCPU filters")
        modes = seccomp_modes(vmm.proc.pid)
    finally:
        code = vmm.close()
    text = vmm.log.read_text()
    assert len(modes) >= 3, modes                       # the loop thread and two vCPU threads
    assert set(modes.values()) == {2}, (modes, text)    # SECCOMP_MODE_FILTER on each
    assert "vmm filter installed" in text
    assert code == 0, text                              # SIGTERM still ends it cleanly under the filters


def test_no_seccomp_installs_no_filter(test_guest, tmp_path):
    vmm = RunningVmm(tmp_path, test_guest.elf_pvh, "--no-seccomp")
    try:
        modes = seccomp_modes(vmm.proc.pid)
    finally:
        vmm.close()
    assert set(modes.values()) == {0}, modes
    assert "Starting without seccomp filters (--no-seccomp)" in vmm.log.read_text()


@pytest.mark.parametrize("category, thread", [("vmm", "MainThread"), ("vcpu", "fc_vcpu 0")])
def test_a_denied_call_is_logged_and_ends_the_vmm_with_148(test_guest, tmp_path, monkeypatch,
                                                               category, thread):
    monkeypatch.setenv(HOOK, category)
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "exit=reset"))
    assert run.returncode == ExitCode.BAD_SYSCALL, run.all_output  # 148, as Firecracker
    assert (f"Shutting down VM after intercepting a bad syscall 41 (socket) on thread '{thread}'"
            in run.log), run.all_output


def test_a_custom_filter_file_replaces_the_defaults(test_guest, tmp_path, monkeypatch):
    """An allow-everything policy: the hook's socket() now passes and the guest runs to its end."""
    policy = tmp_path / "filter.json"
    policy.write_text(json.dumps({"vmm": ALLOW_ALL, "vcpu": ALLOW_ALL}))
    monkeypatch.setenv(HOOK, "vcpu")
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "exit=reset"), "--seccomp-filter", str(policy))
    assert run.returncode == 0, run.all_output
    assert "attempting a denied system call" in run.log
    assert "testguest: exit reset" in run.stdout


def test_a_custom_filter_denying_a_call_kills_with_its_name(test_guest, tmp_path, monkeypatch):
    deny_socket = {"default_action": "allow", "filter_action": "trap", "filter": [{"syscall": "socket"}]}
    policy = tmp_path / "filter.json"
    policy.write_text(json.dumps({"vmm": ALLOW_ALL, "vcpu": deny_socket}))
    monkeypatch.setenv(HOOK, "vcpu")
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "exit=reset"), "--seccomp-filter", str(policy))
    assert run.returncode == ExitCode.BAD_SYSCALL, run.all_output  # 148, as Firecracker
    assert "intercepting a bad syscall 41 (socket)" in run.log


def test_an_unusable_filter_file_is_refused_before_boot(test_guest, tmp_path):
    policy = tmp_path / "filter.bpf"
    policy.write_bytes(b"\x20\x00\x00\x00\x04\x00\x00\x00")   # compiled BPF, as Firecracker's flag takes
    run = run_vmm(tmp_path, guest_config(test_guest.elf_pvh, "exit=reset"), "--seccomp-filter", str(policy))
    assert run.returncode == 1, run.all_output       # Firecracker's code for an unusable filter
    assert f"Seccomp error: invalid filter file {policy}: not a JSON document" in run.log
    assert "testguest" not in run.stdout


def test_io_uring_workers_carry_the_loop_threads_filter(test_guest, tmp_path):
    """Cold reads at queue depth 32 on an Async (io_uring) drive.  Threads the kernel adds to
    the process -- io-wq workers (``iou-wrk-*``) when it punts a request, KVM's
    ``kvm-nx-lpage-recovery`` thread -- are copies of the thread that caused them, filter
    included: every task listed must still show mode 2."""
    from tests.kvm.test_block_rng import drive, require_io_uring
    require_io_uring()
    disk = tmp_path / "cold.img"
    disk.write_bytes(os.urandom(64 << 20))
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # cold: the reads go to the disk
    finally:
        os.close(fd)
    vmm = RunningVmm(tmp_path, test_guest.elf_pvh, cmdline="blkbench=randread:4096:3000:32 exit=halt",
                     drives=[drive(disk, io_engine="Async", is_read_only=True)])
    try:
        wait_until(lambda: vmm.log.read_text().count("vcpu filter installed") == 2, 10, "the vCPU filters")
        modes: dict[int, int] = {}
        deadline = time.monotonic() + 1.5       # sample while the reads run: workers come and go
        while time.monotonic() < deadline:
            modes.update(seccomp_modes(vmm.proc.pid))
            time.sleep(0.02)
    finally:
        vmm.close()
    assert len(modes) >= 3 and set(modes.values()) == {2}, modes
