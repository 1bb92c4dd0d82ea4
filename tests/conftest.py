"""Shared test configuration.

A test that needs something the machine lacks calls :func:`require`: outside
CI that is a skip with a clear reason; under ``CI=true`` it is a failure,
because a skipped proof is no proof.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (or, under CI=true, fail) the calling test unless ``condition``."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"missing prerequisite under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)
