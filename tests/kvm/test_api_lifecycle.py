"""A VM configured only through the REST API: boot, pause (the vCPUs really stop), resume, and a
start that fails for lack of memory leaves the VM configurable."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.apiclient import UnixHTTPConnection
from tests.kvm.conftest import asyncvmm_argv

pytestmark = pytest.mark.kvm


class ApiVmm:
    def __init__(self, tmp: Path) -> None:
        self.sock = str(tmp / "api.sock")
        self.log = tmp / "vmm.log"
        self.log.touch()
        self.console = tmp / "console.out"
        self._out = open(self.console, "wb")
        self.proc = subprocess.Popen([*asyncvmm_argv(), "--api-sock", self.sock, "--log-path", str(self.log),
                                      "--level", "Info"],
                                     stdin=subprocess.PIPE, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.01)

    def __call__(self, method: str, path: str, body=None) -> tuple[int, dict | None]:
        conn = UnixHTTPConnection(self.sock)
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, (json.loads(data) if data else None)

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.proc.poll() is None, self.output() + self.log.read_text()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.output()}"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


@pytest.fixture
def vmm(tmp_path, test_guest):
    v = ApiVmm(tmp_path)
    yield v
    v.close()


def test_api_only_boot_pause_stops_the_guest_and_resume_continues(vmm, test_guest):
    assert vmm("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})[0] == 204
    assert vmm("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                       "boot_args": "serialecho=1 exit=halt"})[0] == 204
    assert vmm("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    vmm.wait_output("testguest: hello")
    assert vmm("PATCH", "/vm", {"state": "Paused"})[0] == 204
    assert vmm("GET", "/")[1]["state"] == "Paused"
    # The UART still takes the bytes, but a paused vCPU cannot echo them.
    vmm.proc.stdin.write(b"while-paused\n")
    vmm.proc.stdin.flush()
    time.sleep(1.0)
    assert "echo:while-paused" not in vmm.output()
    assert vmm("PATCH", "/vm", {"state": "Resumed"})[0] == 204
    assert vmm("GET", "/")[1]["state"] == "Running"
    vmm.wait_output("echo:while-paused")


def test_a_guest_too_large_to_map_fails_start_and_the_vm_stays_configurable(vmm, test_guest):
    assert vmm("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                       "boot_args": "exit=halt"})[0] == 204
    assert vmm("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 1 << 30})[0] == 204  # 1 PiB
    status, body = vmm("PUT", "/actions", {"action_type": "InstanceStart"})
    assert status == 400
    assert "memory" in body["fault_message"]
    assert vmm("GET", "/")[1]["state"] == "Not started"
    assert vmm("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})[0] == 204
    assert vmm("PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
    vmm.wait_output("testguest: done")
    assert vmm("GET", "/")[1]["state"] == "Running"
