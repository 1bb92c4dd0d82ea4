"""On a terminal, the serial console runs the TTY raw while the guest runs and restores it at exit."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import termios
import time

import pytest

from tests.kvm.conftest import asyncvmm_argv, guest_config

pytestmark = pytest.mark.kvm


def _read_until(fd: int, marker: bytes, timeout: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        assert time.monotonic() < deadline, out
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_tty_is_raw_while_running_and_restored_after(test_guest, tmp_path):
    controller, terminal = pty.openpty()
    before = termios.tcgetattr(terminal)
    assert before[3] & termios.ICANON and before[3] & termios.ECHO
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(guest_config(test_guest.elf_pvh, "serialecho=1 exit=reset")))
    log = tmp_path / "vmm.log"
    log.touch()
    proc = subprocess.Popen([*asyncvmm_argv(), "--no-api", "--config-file", str(cfg), "--log-path", str(log)],
                            stdin=terminal, stdout=terminal, stderr=subprocess.DEVNULL)
    try:
        _read_until(controller, b"testguest: hello")
        during = termios.tcgetattr(terminal)
        assert not during[3] & termios.ICANON and not during[3] & termios.ECHO   # raw: keys go to the guest
        os.write(controller, b"typed\r")        # a raw TTY passes CR through; the guest echoes it
        out = _read_until(controller, b"testguest: done")
        assert b"echo:typed" in out
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = termios.tcgetattr(terminal)
    assert after == before
    os.close(controller)
    os.close(terminal)
