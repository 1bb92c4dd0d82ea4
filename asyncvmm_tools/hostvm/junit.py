"""Read a pytest JUnit XML report back into per-test outcomes, keyed like pytest's node ids.

Pure: XML text in, outcomes out.  pytest's ``--junitxml`` names a test by
``classname`` (the file path as a dotted module plus any classes) and
``name`` (the function with its parameter id); :func:`junit_key` maps a
node id to that pair so the host side can find each inner result.
"""

from __future__ import annotations

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
