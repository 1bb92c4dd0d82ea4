"""The linux tier's host-side bookkeeping: mode choice and inner outcomes per node id (no VM)."""

from __future__ import annotations

from asyncvmm_tools.hostvm.junit import InnerOutcome, junit_key, parse_junit
from tests.linux import conftest as tier


def run_with(outcomes_xml: str, failure: str = "host console tail") -> tier.InnerRun:
    run = tier.InnerRun(["tests/linux/test_a.py::test_ok", "tests/linux/test_a.py::test_gone"], config=None)
    run.outcomes = parse_junit(outcomes_xml)     # as if the emulated host had run already
    run.failure = failure
    return run


XML = ('<testsuite><testcase classname="tests.linux.test_a" name="test_ok" time="1"/>'
       '<testcase classname="tests.linux.test_a" name="test_bad"><failure message="m">tb</failure></testcase>'
       '</testsuite>')


def test_reported_outcomes_are_found_by_node_id():
    run = run_with(XML)
    assert run.outcome("tests/linux/test_a.py::test_ok").outcome == "passed"
    bad = run.outcome("tests/linux/test_a.py::test_bad")
    assert bad.outcome == "failed" and "tb" in bad.describe()


def test_a_test_the_inner_run_never_reported_fails_with_the_host_log():
    outcome = run_with(XML, failure="killed after the outer timeout\nconsole tail").outcome(
        "tests/linux/test_a.py::test_gone")
    assert outcome.outcome == "failed"
    assert "did not report" in outcome.message and "console tail" in outcome.describe()


def test_an_empty_or_missing_report_fails_everything():
    run = run_with("<testsuite/>", failure="the inner pytest wrote no junit report (exit 2)")
    for nodeid in run.nodeids:
        assert run.outcome(nodeid).outcome == "failed"


def test_mode_can_be_forced(monkeypatch):
    monkeypatch.setenv("ASYNCVMM_LINUX_TIER", "direct")
    assert tier.tier_mode() == "direct"
    monkeypatch.setenv("ASYNCVMM_LINUX_TIER", "hostvm")
    assert tier.tier_mode() == "hostvm"
    monkeypatch.setenv("ASYNCVMM_IN_HOSTVM", "1")
    monkeypatch.delenv("ASYNCVMM_LINUX_TIER")
    assert tier.tier_mode() == "direct"          # inside the emulated host: never delegate again


def test_skips_keep_their_reason():
    xml = '<testsuite><testcase classname="m" name="t"><skipped message="needs X"/></testcase></testsuite>'
    o = parse_junit(xml)[("m", "t")]
    assert isinstance(o, InnerOutcome) and (o.outcome, o.message) == ("skipped", "needs X")
    assert junit_key("m.py::t") == ("m", "t")
