"""The linux tier's host-side bookkeeping: mode choice and inner outcomes per node id (no VM)."""

from __future__ import annotations

from asyncvmm_tools.hostvm import runner as hostvm_runner
from asyncvmm_tools.hostvm.junit import InnerOutcome, done_line, junit_key, parse_junit, parse_progress, start_line
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


# --------------------------------------------------------------------------- a host that freezes

IDS = [f"tests/linux/test_a.py::test_{n}" for n in "abcd"]


def test_console_progress_keeps_finished_tests_and_names_the_running_one():
    console = "\r\n".join([
        "noise", start_line(IDS[0]), "tests/linux/test_a.py::test_a " + done_line(IDS[0], "passed", "", 2.5),
        start_line(IDS[1]), done_line(IDS[1], "failed", "assert 1 == 2\ntraceback", 1.0),
        start_line(IDS[2]), "asyncvmm-hostvm: test done {garbled", ""])
    progress = parse_progress(console)
    assert progress.running == IDS[2]
    assert progress.outcomes[junit_key(IDS[0])].outcome == "passed"
    bad = progress.outcomes[junit_key(IDS[1])]
    assert (bad.outcome, bad.message, bad.details) == ("failed", "assert 1 == 2", "traceback")
    assert parse_progress(console + "\n" + done_line(IDS[2], "skipped", "why", 0)).running is None


class _Config:
    class pluginmanager:
        @staticmethod
        def get_plugin(_name):
            return None


def _fake_boots(monkeypatch, tmp_path, boots):
    """Each boot: (console lines, junit xml or None, stalled, *what each serial break's wake answered)."""
    calls = []

    def fake_run(argv, *, timeout, results_dir, **kw):
        console, junit, stalled, *wakes = boots[len(calls)]
        calls.append([a for a in argv if a.startswith("tests/")])
        if junit is not None:
            results_dir.mkdir(parents=True, exist_ok=True)
            (results_dir / "junit.xml").write_text(junit)
        return hostvm_runner.HostVmResult(None if stalled else 0, "\n".join(console), "", results_dir,
                                          timed_out=stalled, stalled=stalled, wakes=wakes)

    monkeypatch.setattr(hostvm_runner.HostVm, "prepare", classmethod(lambda cls, progress=None: object()))
    monkeypatch.setattr("asyncvmm_tools.hostvm.run_in_hostvm", fake_run)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(tier.tempfile, "mkdtemp", lambda prefix: str(tmp_path))
    return calls


def test_a_frozen_host_keeps_what_finished_retries_the_running_test_and_runs_the_rest(monkeypatch, tmp_path):
    junit = ('<testsuite><testcase classname="tests.linux.test_a" name="test_c"/>'
             '<testcase classname="tests.linux.test_a" name="test_d"><failure message="m">tb</failure>'
             '</testcase></testsuite>')
    calls = _fake_boots(monkeypatch, tmp_path, [
        ([start_line(IDS[0]), done_line(IDS[0], "passed", "", 1), start_line(IDS[1])], None, True),
        ([start_line(IDS[1])], None, True),                         # the same test freezes it again
        ([start_line(IDS[1])], None, True),                         # and a third time: it fails
        ([start_line(IDS[2]), done_line(IDS[2], "passed", "", 1)], junit, False),
    ])
    assert tier.FREEZE_TRIES == 3
    run = tier.InnerRun(IDS, _Config())
    assert [run.outcome(n).outcome for n in IDS] == ["passed", "failed", "passed", "failed"]
    assert calls == [IDS, IDS[1:], IDS[1:], IDS[2:]]
    assert "froze during this test (boot 3, 3 times)" in run.outcome(IDS[1]).message
    assert "tb" in run.outcome(IDS[3]).describe()


def test_a_test_that_froze_the_host_twice_and_then_passes_passes(monkeypatch, tmp_path):
    junit = '<testsuite><testcase classname="tests.linux.test_a" name="test_b"/></testsuite>'
    calls = _fake_boots(monkeypatch, tmp_path, [
        ([start_line(IDS[1])], None, True),
        ([start_line(IDS[1])], None, True),
        ([start_line(IDS[1]), done_line(IDS[1], "passed", "", 1)], junit, False),
    ])
    run = tier.InnerRun(IDS[1:2], _Config())
    assert run.outcome(IDS[1]).outcome == "passed" and calls == [IDS[1:2]] * 3


def test_the_serial_breaks_a_boot_needed_are_counted_and_said(monkeypatch, tmp_path):
    junit = '<testsuite><testcase classname="tests.linux.test_a" name="test_a"/></testsuite>'
    _fake_boots(monkeypatch, tmp_path, [
        ([start_line(IDS[0]), done_line(IDS[0], "passed", "", 1)], junit, False,
         "after 20.0 s of console silence:\n(the console spoke again 20.0 s into the silence)\n",
         "after 20.0 s of console silence:\n(the console stayed silent)\n")])
    said = []

    class Reporter:
        @staticmethod
        def write_line(line):
            said.append(line)

    class Config:
        class pluginmanager:
            @staticmethod
            def get_plugin(name):
                return Reporter if name == "terminalreporter" else None

    run = tier.InnerRun(IDS[:1], Config())
    assert run.outcome(IDS[0]).outcome == "passed"
    assert (run.boots, run.wakes) == (1, [2, 1])
    assert any("went silent 2 time(s) and got a serial break; it spoke again after 1" in line for line in said)


def test_a_boot_that_gets_nowhere_is_not_repeated(monkeypatch, tmp_path):
    calls = _fake_boots(monkeypatch, tmp_path, [(["Traceback: the inner pytest could not start"], None, False)])
    run = tier.InnerRun(IDS, _Config())
    assert all(run.outcome(n).outcome == "failed" for n in IDS) and len(calls) == 1
    assert "wrote no junit report" in run.outcome(IDS[0]).describe()


def test_a_tier_out_of_budget_boots_no_more_and_says_why(monkeypatch, tmp_path):
    calls = _fake_boots(monkeypatch, tmp_path, [([start_line(IDS[0])], None, True)] * 3)
    monkeypatch.setenv("ASYNCVMM_HOSTVM_TIMEOUT", "1")     # less than half a boot allowance
    run = tier.InnerRun(IDS, _Config())
    assert all(run.outcome(n).outcome == "failed" for n in IDS) and calls == []
    assert "budget of 1 s ran out" in run.outcome(IDS[0]).describe()
