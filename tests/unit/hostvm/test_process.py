"""Children started by asyncvmm_tools.hostvm.process never outlive their parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from asyncvmm_tools.hostvm.process import Child, TerminatedError, terminate_on_signals
from tests.conftest import process_alive


def _wait_gone(pid: int, seconds: float = 10) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_output_is_pumped_and_status_returned():
    chunks = []
    child = Child(["sh", "-c", "echo out; echo err >&2; exit 3"], chunks.append)
    assert child.wait(10) == 3
    assert b"".join(chunks).split() == [b"out", b"err"]


def test_kill_reaches_grandchildren_in_the_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    child = Child(["sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"], lambda b: None)
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    grandchild = int(pidfile.read_text())
    assert child.wait(0.2) is None
    child.kill()
    assert _wait_gone(grandchild)


def test_child_dies_with_a_sigkilled_parent(tmp_path):
    """PR_SET_PDEATHSIG: no cleanup code runs in the parent, yet the child goes."""
    pidfile = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from asyncvmm_tools.hostvm.process import Child
        c = Child(["sleep", "300"], lambda b: None)
        open({str(pidfile)!r}, "w").write(str(c.pid))
        time.sleep(300)
    """)])
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child_pid = int(pidfile.read_text())
    assert process_alive(child_pid)
    parent.kill()
    parent.wait()
    assert _wait_gone(child_pid)


def test_sigterm_becomes_an_exception_in_the_block():
    old = signal.getsignal(signal.SIGTERM)
    raised = False
    try:
        with terminate_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    except TerminatedError:
        raised = True
    assert raised
    assert signal.getsignal(signal.SIGTERM) == old
