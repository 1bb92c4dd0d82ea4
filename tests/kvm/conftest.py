"""The kvm tier: real ioctl paths on the local /dev/kvm with the freestanding test guest.

Every test here runs the real ``asyncvmm`` process (Firecracker's command
line, ``--config-file --no-api`` or ``--api-sock``) and checks what a user
would see: console output on stdout, log lines, the exit code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks.launch import stop_process
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


def wait_until(condition, timeout: float, what: str, poll_s: float = 0.02):
    """Poll ``condition()`` until it returns something truthy (returned); fail after ``timeout``.

    The kvm tier waits for *events* (a line, a counter, a file) with a deadline,
    never for a fixed time followed by an assert.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(poll_s)


def accepts(sock_path: str) -> bool:
    """Whether the API socket takes connections: its file appears at bind(), before listen()."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock_path)
        return True
    except OSError:
        return False


def api_call(sock_path: str, method: str, path: str, body=None) -> tuple[int, Any]:
    """One request on the API socket: (status, decoded JSON body or None)."""
    from tests.integration.apiclient import UnixHTTPConnection
    conn = UnixHTTPConnection(sock_path)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None)
    finally:
        conn.close()


class ApiProcess:
    """``asyncvmm --api-sock`` as a subprocess with its console and log in files."""

    def __init__(self, tmp_path: Path, *prefix: str, args: tuple[str, ...] = ()) -> None:
        """``prefix`` runs before asyncvmm (a wrapper command), ``args`` are more asyncvmm flags."""
        self.sock = str(tmp_path / "api.sock")
        self.log = tmp_path / "vmm.log"
        self.log.touch()
        self.console = tmp_path / "console.out"
        self._out = open(self.console, "wb")
        self.proc = subprocess.Popen([*prefix, *asyncvmm_argv(), "--api-sock", self.sock,
                                      "--log-path", str(self.log), "--level", "Info", *args],
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        wait_until(lambda: accepts(self.sock) or self.proc.poll() is not None, 30, "the API socket")
        assert self.proc.poll() is None, self.log.read_text()

    def __call__(self, method: str, path: str, body=None) -> tuple[int, Any]:
        return api_call(self.sock, method, path, body)

    def configure(self, steps: list[tuple[str, str, Any]]) -> None:
        """Each (method, path, body) request in turn; every one must answer 204."""
        for method, path, body in steps:
            status, answer = self(method, path, body)
            assert status == 204, (path, answer)

    def output(self) -> str:
        return self.console.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 30) -> None:
        """Wait for the console line holding ``text`` to be complete (the guest writes a
        line a byte at a time: its fields may still be arriving when ``text`` shows)."""
        def seen() -> bool:
            assert self.proc.poll() is None, self.output() + self.log.read_text()
            out = self.output()
            at = out.find(text)
            return at >= 0 and "\n" in out[at:]
        wait_until(seen, timeout, f"{text!r} on the console")

    def flush_metrics(self, path: Path) -> list[dict]:
        """FlushMetrics, then every report written so far."""
        status, body = self("PUT", "/actions", {"action_type": "FlushMetrics"})
        assert status == 204, body
        return [json.loads(line) for line in path.read_text().splitlines()]

    def close(self) -> None:
        stop_process(self.proc, 10)
        self._out.close()
