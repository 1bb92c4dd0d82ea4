"""Read a pytest JUnit XML report back into per-test outcomes, keyed like pytest's node ids.

Pure: XML (or console) text in, outcomes out.  pytest's ``--junitxml`` names a test by
``classname`` (the file path as a dotted module plus any classes) and
``name`` (the function with its parameter id); :func:`junit_key` maps a
node id to that pair so the host side can find each inner result.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class InnerOutcome:
    outcome: str          # "passed" | "failed" | "error" | "skipped"
    message: str
    details: str
    stdout: str
    stderr: str
    seconds: float = 0.0

    def describe(self) -> str:
        parts = [f"[inside the emulated KVM host] {self.outcome}: {self.message}".rstrip()]
        for title, text in (("details", self.details), ("captured stdout", self.stdout),
                            ("captured stderr", self.stderr)):
            if text.strip():
                parts.append(f"--- {title} ---\n{text.rstrip()}")
        return "\n".join(parts)


def junit_key(nodeid: str) -> tuple[str, str]:
    """``tests/linux/test_a.py::TestB::test_c[x::y]`` -> ``("tests.linux.test_a.TestB", "test_c[x::y]")``."""
    path, bracket, params = nodeid.partition("[")
    names = path.split("::")
    module = names[0].replace("/", ".")
    if module.endswith(".py"):
        module = module[:-3]
    names[0] = module
    names[-1] += bracket + params
    return ".".join(names[:-1]), names[-1]


def parse_junit(xml_text: str) -> dict[tuple[str, str], InnerOutcome]:
    """Outcomes by ``(classname, name)``; raises ValueError on malformed XML."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise ValueError(f"malformed junit XML: {exc}") from exc
    results: dict[tuple[str, str], InnerOutcome] = {}
    for case in root.iter("testcase"):
        key = (case.get("classname", ""), case.get("name", ""))
        outcome, message, details = "passed", "", ""
        # A test can fail in its call and error in teardown: the worst one wins.
        for tag in ("skipped", "error", "failure"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = el.get("message", "")
                details = el.text or ""
        out = "\n".join(e.text or "" for e in case.findall("system-out"))
        err = "\n".join(e.text or "" for e in case.findall("system-err"))
        try:
            seconds = float(case.get("time", "0"))
        except ValueError:
            seconds = 0.0
        previous = results.get(key)
        if previous is not None and previous.outcome != "passed":
            continue   # keep the first bad outcome for a repeated case
        results[key] = InnerOutcome(outcome, message, details, out, err, seconds)
    return results


# --------------------------------------------------------------------------- progress on the console
#
# The JUnit report is written when the inner pytest ends; a host that freezes
# mid-run leaves none.  So the inner run also prints a line when each test
# starts and one with its outcome when it is done, and the host side reads
# them back from the console: what finished before a freeze keeps its result,
# and the test that was running is known.

MARK_TEST_START = "asyncvmm-hostvm: test start "
MARK_TEST_DONE = "asyncvmm-hostvm: test done "
DONE_MESSAGE_CHARS = 4000   # the console is a slow serial line; the JUnit report has the rest


def start_line(nodeid: str) -> str:
    return MARK_TEST_START + json.dumps(nodeid)


def done_line(nodeid: str, outcome: str, message: str, seconds: float) -> str:
    # JSON keeps it one line whatever the message holds.
    return MARK_TEST_DONE + json.dumps({"nodeid": nodeid, "outcome": outcome,
                                        "message": message[-DONE_MESSAGE_CHARS:], "seconds": round(seconds, 1)})


@dataclass
class ConsoleProgress:
    outcomes: dict[tuple[str, str], InnerOutcome]
    running: str | None          # the node id started last and not done, if any


def parse_progress(console: str) -> ConsoleProgress:
    """Outcomes and the running test from the console's start/done lines (garbled lines are skipped)."""
    outcomes: dict[tuple[str, str], InnerOutcome] = {}
    running = None
    for line in console.replace("\r\n", "\n").splitlines():
        for mark in (MARK_TEST_START, MARK_TEST_DONE):
            at = line.find(mark)
            if at < 0:
                continue
            try:
                value = json.loads(line[at + len(mark):])
            except ValueError:
                continue
            if mark == MARK_TEST_START and isinstance(value, str):
                running = value
            elif mark == MARK_TEST_DONE and isinstance(value, dict) and isinstance(value.get("nodeid"), str):
                nodeid = value["nodeid"]
                outcome = value.get("outcome") if value.get("outcome") in ("passed", "failed", "error",
                                                                           "skipped") else "failed"
                message = str(value.get("message", ""))
                first, _, rest = message.partition("\n")
                seconds = value.get("seconds", 0.0)
                outcomes[junit_key(nodeid)] = InnerOutcome(
                    outcome, first, rest, "", "", float(seconds) if isinstance(seconds, (int, float)) else 0.0)
                if running == nodeid:
                    running = None
    return ConsoleProgress(outcomes, running)
