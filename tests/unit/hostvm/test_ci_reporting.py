"""Under CI=true the linux tier drops nothing silently: a test runs, fails, or is not part of the run.

The host side (tests/linux/conftest.py) is exercised without a VM: the emulated host's run
is replaced by what it would have produced.
"""

from __future__ import annotations

import pytest

from asyncvmm_tools.hostvm.junit import InnerOutcome
from tests import conftest as shared
from tests.linux import conftest as tier

NODES = ["tests/linux/test_a.py::test_one", "tests/linux/test_a.py::test_two",
         "tests/linux/test_b.py::test_three"]


class Runs:
    def __init__(self, effect):
        self.effect = effect
        self.count = 0

    def __call__(self):
        self.count += 1
        raise self.effect


def inner_run(monkeypatch, effect) -> tuple[tier.InnerRun, Runs]:
    run = tier.InnerRun(list(NODES), config=None)
    runs = Runs(effect)
    monkeypatch.setattr(run, "_run", runs)
    return run, runs


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_prerequisite_is_reported_by_every_test_alike(monkeypatch, ci):
    monkeypatch.setattr(shared, "IN_CI", ci)
    run, runs = inner_run(monkeypatch, tier.MissingPrerequisite("qemu-system-x86_64 is needed"))
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    for nodeid in NODES:
        with pytest.raises(expected) as exc:
            run.outcome(nodeid)
        assert "qemu-system-x86_64 is needed" in str(exc.value)
        assert "did not report" not in str(exc.value)
    assert runs.count == 1   # the emulated host is tried once, not once per test


def test_an_error_preparing_the_host_fails_every_test_with_it(monkeypatch):
    run, runs = inner_run(monkeypatch, RuntimeError("mke2fs exploded"))
    for nodeid in NODES:
        outcome = run.outcome(nodeid)
        assert outcome.outcome == "failed"
        assert "mke2fs exploded" in outcome.describe()
    assert runs.count == 1


@pytest.mark.parametrize("ci", [False, True])
def test_an_inner_skip_is_an_outer_failure_under_ci(monkeypatch, ci):
    monkeypatch.setattr(shared, "IN_CI", ci)
    skipped = InnerOutcome("skipped", "needs iperf3", "", "", "")
    with pytest.raises(pytest.fail.Exception if ci else pytest.skip.Exception) as exc:
        tier.report(skipped)
    assert "needs iperf3" in str(exc.value)


def test_inner_passes_pass_and_failures_fail(monkeypatch):
    monkeypatch.setattr(shared, "IN_CI", True)
    tier.report(InnerOutcome("passed", "", "", "", ""))
    for bad in ("failed", "error"):
        with pytest.raises(tier.InnerFailure, match="boom"):
            tier.report(InnerOutcome(bad, "boom", "", "", ""))


def test_under_ci_the_minikernel_tests_join_only_when_asked(monkeypatch):
    monkeypatch.delenv("ASYNCVMM_IN_HOSTVM", raising=False)
    monkeypatch.delenv("ASYNCVMM_MINIKERNEL", raising=False)
    monkeypatch.setattr(shared, "IN_CI", True)
    # Even with the kernel in the cache: the CI suite must not depend on a machine's cache.
    monkeypatch.setattr("asyncvmm_tools.images.minikernel.cached_minikernel", lambda cache: object())
    assert tier._minikernel_wanted() is False
    monkeypatch.setenv("ASYNCVMM_MINIKERNEL", "1")
    assert tier._minikernel_wanted() is True
    monkeypatch.delenv("ASYNCVMM_MINIKERNEL")
    monkeypatch.setattr(shared, "IN_CI", False)
    assert tier._minikernel_wanted() is True   # locally a built kernel is used


def test_deselected_minikernel_tests_are_named_in_the_summary():
    lines = []

    class Reporter:
        def write_line(self, line):
            lines.append(line)

    class Config:
        stash = pytest.Stash()

    config = Config()
    config.stash[tier.MINIKERNEL_DROPPED_KEY] = ["tests/linux/test_asyncvmm_boot.py::test_minikernel"]
    tier.pytest_terminal_summary(Reporter(), 0, config)
    assert any("not part of this run" in l and "test_minikernel" in l and "ASYNCVMM_MINIKERNEL=1" in l
               for l in lines)
