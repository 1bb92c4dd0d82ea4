"""SIGTERM and SIGINT end a running microVM cleanly: vCPU threads stop and the process exits 0."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.kvm.conftest import asyncvmm_argv, guest_config, wait_until

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_a_running_guest(test_guest, tmp_path, sig):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(guest_config(test_guest.elf_pvh, "exit=halt", vcpus=2)))
    log = tmp_path / "vmm.log"
    log.touch()
    proc = subprocess.Popen([*asyncvmm_argv(), "--no-api", "--config-file", str(cfg), "--log-path", str(log),
                             "--level", "Info"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        def started() -> bool:
            assert proc.poll() is None, log.read_text()
            return "Successfully started microvm" in log.read_text()
        wait_until(started, 30, "the microVM to start")
        proc.send_signal(sig)
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 0, text
    assert f"Received {sig.name}" in text
    assert "exiting with code 0" in text
