"""The fork server with real VMMs: Firecracker's process contract kept through the launcher.

Every test starts ``python -m asyncvmm.forkserver`` (what ``asyncvmm-zygote``
runs) and launches ``asyncvmm`` exactly as a client starts ``firecracker``,
only with ``ASYNCVMM_FORKSERVER`` in its environment.  What a client sees
(exit codes, the console on stdout, signals, the API socket) must be what it
sees without the fork server (tests/kvm/test_boot.py, test_signals.py).

MMDS token keys per child are checked in tests/unit/forkserver/test_server.py:
the test guest cannot speak TCP to the MMDS, the only way a token is issued.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncvmm.forkserver import ENV_VAR, protocol
from tests.conftest import process_alive
from tests.integration.apiclient import UnixHTTPConnection
from tests.kvm.conftest import asyncvmm_argv, guest_config

pytestmark = pytest.mark.kvm

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 60


class Zygote:
    def __init__(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "zygote.sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "asyncvmm.forkserver", "--socket", self.path],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        assert line == f"ready {self.path}\n".encode(), line + self.proc.stderr.read()

    def env(self) -> dict[str, str]:
        return dict(os.environ, **{ENV_VAR: self.path})

    def children(self) -> list[int]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def zygote(tmp_path):
    z = Zygote(tmp_path)
    yield z
    z.close()


def _wait_for(predicate, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _config_argv(tmp_path: Path, name: str, cfg: dict) -> list[str]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    log = tmp_path / f"{name}.log"
    log.touch()
    return [*asyncvmm_argv(), "--no-api", "--config-file", str(path), "--level", "Info", "--log-path", str(log)]


def _api(sock: str, method: str, path: str, body=None) -> tuple[int, object]:
    conn = UnixHTTPConnection(sock, timeout=10)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def _api_vmm(zygote: Zygote, tmp_path: Path, name: str) -> tuple[subprocess.Popen, str]:
    sock = str(tmp_path / f"{name}.sock")
    proc = subprocess.Popen([*asyncvmm_argv(), "--api-sock", sock, "--level", "Info",
                             "--log-path", str(tmp_path / f"{name}.log")], env=zygote.env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def answers() -> bool:
        assert proc.poll() is None, proc.communicate()
        try:
            return _api(sock, "GET", "/")[0] == 200
        except OSError:
            return False
    _wait_for(answers, "the API socket")
    return proc, sock


def test_the_test_guest_boots_and_a_reset_exits_0_with_the_console_on_stdout(test_guest, tmp_path, zygote):
    argv = _config_argv(tmp_path, "vm", guest_config(test_guest.elf_pvh, "boottimer=1 exit=reset"))
    out = subprocess.run([*argv, "--boot-timer"], env=zygote.env(), capture_output=True, timeout=TIMEOUT)
    stdout = out.stdout.decode(errors="replace")
    assert out.returncode == 0, stdout + out.stderr.decode(errors="replace")
    assert "testguest: hello" in stdout and "testguest: exit reset" in stdout
    assert "testguest: done" in stdout
    log = (tmp_path / "vm.log").read_text()
    assert "Guest-boot-time" in log and "Firecracker exiting with code 0" in log
    assert zygote.proc.poll() is None


def test_a_failing_start_gives_the_same_code_as_without_the_fork_server(tmp_path, zygote):
    argv = _config_argv(tmp_path, "bad", {"boot-source": {"kernel_image_path": "/nonexistent"},
                                          "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}})
    direct = subprocess.run(argv, capture_output=True, timeout=TIMEOUT)
    forked = subprocess.run(argv, env=zygote.env(), capture_output=True, timeout=TIMEOUT)
    assert direct.returncode != 0
    assert forked.returncode == direct.returncode


def _sigterm_code(test_guest, tmp_path: Path, name: str, env: dict[str, str] | None) -> int:
    argv = _config_argv(tmp_path, name, guest_config(test_guest.elf_pvh, "exit=halt"))
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: "Successfully started microvm" in log.read_text() or proc.poll() is not None,
                  "the microVM to start")
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Received SIGTERM" in log.read_text()
    return code


def test_sigterm_gives_the_same_exit_code_as_without_the_fork_server(test_guest, tmp_path, zygote):
    direct = _sigterm_code(test_guest, tmp_path, "direct", None)
    forked = _sigterm_code(test_guest, tmp_path, "forked", zygote.env())
    assert forked == direct == 0


def test_sigkill_of_the_launcher_ends_its_microvm(test_guest, tmp_path, zygote):
    proc, sock = _api_vmm(zygote, tmp_path, "vm")
    (child,) = zygote.children()
    for path, body in (("/boot-source", {"kernel_image_path": str(test_guest.elf_pvh), "boot_args": "exit=halt"}),
                       ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                       ("/actions", {"action_type": "InstanceStart"})):
        assert _api(sock, "PUT", path, body)[0] == 204
    proc.kill()
    proc.wait()
    _wait_for(lambda: not process_alive(child), "the microVM to end with its launcher")
    _wait_for(lambda: zygote.children() == [], "the fork server to reap it")
    assert zygote.proc.poll() is None


def test_sigkill_of_the_fork_server_leaves_its_children_serving(test_guest, tmp_path, zygote):
    proc, sock = _api_vmm(zygote, tmp_path, "vm")
    zygote.proc.kill()
    zygote.proc.wait()
    status, info = _api(sock, "GET", "/")
    assert status == 200 and info["state"] == "Not started"
    for path, body in (("/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                         "boot_args": "exit=reset"}),
                       ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                       ("/actions", {"action_type": "InstanceStart"})):
        assert _api(sock, "PUT", path, body)[0] == 204
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    assert b"testguest: exit reset" in out


def _fds(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]


def _shared_descriptors(pid_a: int, pid_b: int) -> list[tuple[int, int]]:
    """Pairs of descriptors of two processes that are one open file (kcmp(2) KCMP_FILE)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    SYS_kcmp, KCMP_FILE = 312, 0                     # x86_64
    shared = []
    for fa in _fds(pid_a):
        for fb in _fds(pid_b):
            if libc.syscall(SYS_kcmp, pid_a, pid_b, KCMP_FILE, fa, fb) == 0:
                shared.append((fa, fb))
    return shared


def test_two_children_share_no_descriptors(test_guest, tmp_path, zygote):
    a, sock_a = _api_vmm(zygote, tmp_path, "a")
    b, sock_b = _api_vmm(zygote, tmp_path, "b")
    try:
        for sock in (sock_a, sock_b):
            for path, body in (("/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                                 "boot_args": "exit=halt"}),
                               ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                               ("/actions", {"action_type": "InstanceStart"})):
                assert _api(sock, "PUT", path, body)[0] == 204
        ca, cb = zygote.children()
        assert len(_fds(ca)) > 5 and len(_fds(cb)) > 5          # KVM, the API socket, the log...
        assert _shared_descriptors(ca, cb) == []
        # Nothing of the server's either, but each child's own launcher connection (fd 3),
        # which the server keeps to report the exit status.
        assert [a for a, _ in _shared_descriptors(ca, zygote.proc.pid)] == [3]
        assert [b for b, _ in _shared_descriptors(cb, zygote.proc.pid)] == [3]
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.communicate(timeout=TIMEOUT)
    assert a.returncode == b.returncode == 0


def test_garbage_on_the_fork_server_socket_is_answered_and_the_server_lives_on(test_guest, tmp_path, zygote):
    for data in (b"\xffgarbage", b"{}", b"x" * (protocol.MAX_MESSAGE + 1)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(10)
            s.connect(zygote.path)
            socket.send_fds(s, [data], [0, 1, 2])
            kind, text = protocol.parse_reply(s.recv(protocol.MAX_MESSAGE))
        assert kind == "error", text
    assert zygote.proc.poll() is None
    argv = _config_argv(tmp_path, "vm", guest_config(test_guest.elf_pvh, "exit=reset"))
    out = subprocess.run(argv, env=zygote.env(), capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 0 and b"testguest: done" in out.stdout


def test_a_guest_larger_than_host_ram_boots_as_on_firecracker(test_guest, tmp_path, zygote):
    # Guest RAM is mapped MAP_NORESERVE (docs/forkserver.md, "Guest memory on dense hosts"):
    # twice the host's RAM is only address space until the guest touches it.
    with open("/proc/meminfo") as f:
        host_mib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:")) // 1024
    cfg = guest_config(test_guest.elf_pvh, "exit=reset", mem_mib=2 * host_mib)
    for name, env in (("direct", None), ("forked", zygote.env())):
        out = subprocess.run(_config_argv(tmp_path, name, cfg), env=env, capture_output=True, timeout=TIMEOUT)
        assert out.returncode == 0, (name, (tmp_path / f"{name}.log").read_text())
        assert b"testguest: done" in out.stdout
