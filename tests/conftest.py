"""Shared test configuration.

A test that needs something the machine lacks calls :func:`require`: outside
CI that is a skip with a clear reason; under ``CI=true`` it is a failure,
because a skipped proof is no proof.
"""

from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) the calling test unless ``condition``."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` still runs: a process gone or a zombie (exited, not reaped yet) does not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"     # the state follows the (comm) field
    except (FileNotFoundError, ProcessLookupError):      # gone, even between open and read
        return False


def require_netns_and_taps() -> None:
    """What a test that makes network namespaces and tap devices needs of the host."""
    require(os.geteuid() == 0, "needs root (network namespaces, taps)")
    require(os.path.exists("/dev/net/tun"), "/dev/net/tun is missing")
    require(shutil.which("ip") is not None, "the ip command (iproute2) is missing")
