"""The linux tier: tests that boot real Linux guests on a real /dev/kvm.

Every test here is marked ``linux``.  How they run depends on the machine:

* **direct** -- ``kvm_kind() == "hardware"`` (or we are already inside the
  emulated host, ``ASYNCVMM_IN_HOSTVM=1``): the tests run here, each with a
  per-test timeout (``ASYNCVMM_LINUX_TEST_TIMEOUT``, default 300 s).
* **hostvm** -- anywhere else (``kvm_pvm``, no KVM): each selected test is
  replaced by a proxy item with the same node id.  The first proxy boots the
  emulated KVM host once and runs all selected linux tests inside it
  (``pytest <ids> --junitxml``); every proxy then reports its test's inner
  outcome.  A test the inner run did not report (it hung, the host was
  killed, the junit file is missing) fails with the host console's tail --
  never passes.  The inner run prints a console line as each test starts
  and ends, and the job a heartbeat every 10 s; when the console goes silent
  for ``FREEZE_STALL_S`` (the emulated host froze: docs/testing.md) or the
  boot runs out of time, QEMU is killed, the finished tests keep their
  outcomes, and a fresh boot runs the rest.  The test that was running when
  a host froze runs again in the next boot; ``FREEZE_TRIES`` freezes in it fail it.  The whole
  tier has a budget (``ASYNCVMM_HOSTVM_TIMEOUT``, default: boot allowance +
  per-test timeout per test, at most ``TIER_BUDGET`` s, so a frozen host
  fails tests instead of running CI out of time).

``ASYNCVMM_LINUX_TIER=direct|hostvm`` forces a mode.  Missing prerequisites
(qemu, images, KVM) go through ``require()``: skips locally, failures under
``CI=true``.  In hostvm mode that holds for every proxy alike: a prerequisite
the emulated host lacks (or an error preparing it) is reported by each
selected test, and under ``CI=true`` an inner skip is an outer failure.

Tests marked ``minikernel`` exercise the optional small kernel
(``asyncvmm-images build --only minikernel``, ~7 minutes to build).  They are
not part of the run -- deselected, counted in pytest's summary and named in
a summary line -- unless ``ASYNCVMM_MINIKERNEL=1`` asks for them (then a
missing kernel is a failure under ``CI=true``) or, outside CI, the kernel is
already in the cache.  Under ``CI=true`` the suite does not depend on what a
machine's cache happens to hold.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

from asyncvmm_tools.hostvm import in_hostvm, kvm_kind
from asyncvmm_tools.hostvm.runner import FREEZE_HEARTBEAT_S, FREEZE_STALL_S
from asyncvmm_tools.hostvm.junit import InnerOutcome, done_line, junit_key, parse_junit, parse_progress, start_line
from tests import conftest as shared
from tests.conftest import require

HERE = Path(__file__).resolve().parent
PER_TEST_TIMEOUT = float(os.environ.get("ASYNCVMM_LINUX_TEST_TIMEOUT", "300"))
BOOT_ALLOWANCE = 240.0
TIER_BUDGET = 2700.0     # 45 minutes: CI has 90 for everything
FREEZE_TRIES = 3         # boots a test may freeze the emulated host in before it fails
INNER_RESULTS = "/hostvm-job/results"   # asyncvmm_tools.hostvm.hostinit.JOB_MOUNT + /results


def tier_mode() -> str:
    forced = os.environ.get("ASYNCVMM_LINUX_TIER", "")
    if forced in ("direct", "hostvm"):
        return forced
    if in_hostvm() or kvm_kind() == "hardware":
        return "direct"
    return "hostvm"


def _is_linux_item(item: pytest.Item) -> bool:
    return Path(str(item.path)).resolve().is_relative_to(HERE)


# --------------------------------------------------------------------------- collection

@pytest.hookimpl(trylast=True)   # after -m/-k deselection: proxy only what will run
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    for item in items:
        if _is_linux_item(item):
            item.add_marker(pytest.mark.linux)
            # This tier sets its own limits: each phase in direct mode (SIGALRM, below, which
            # would cancel pytest-timeout's alarm anyway), the whole inner run in hostvm mode
            # (ASYNCVMM_HOSTVM_TIMEOUT kills QEMU), which a 300 s default would cut short.
            item.add_marker(pytest.mark.timeout(0))
    if not _minikernel_wanted():
        dropped = [i for i in items if i.get_closest_marker("minikernel")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if not i.get_closest_marker("minikernel")]
            config.stash[MINIKERNEL_DROPPED_KEY] = [i.nodeid for i in dropped]
    if tier_mode() != "hostvm":
        return
    linux = [i for i in items if _is_linux_item(i)]
    if not linux:
        return
    runner = InnerRun([i.nodeid for i in linux], config)
    config.stash[RUNNER_KEY] = runner
    for idx, item in enumerate(items):
        if _is_linux_item(item):
            proxy = HostVmProxy.from_parent(item.parent, name=item.name, runner=runner)
            proxy.own_markers.extend(item.own_markers)   # parents' marks come with the parent
            items[idx] = proxy


def _minikernel_wanted() -> bool:
    if in_hostvm():
        return True   # the outer run already chose which tests to send in
    if os.environ.get("ASYNCVMM_MINIKERNEL", "") in ("1", "true", "yes"):
        return True
    if shared.IN_CI:
        return False  # the CI suite is fixed: only ASYNCVMM_MINIKERNEL=1 adds these
    from asyncvmm_tools.images.cache import cache_root
    from asyncvmm_tools.images.minikernel import cached_minikernel
    return cached_minikernel(cache_root()) is not None


RUNNER_KEY = pytest.StashKey["InnerRun"]()
MINIKERNEL_DROPPED_KEY = pytest.StashKey[list]()


class InnerFailure(Exception):
    """An inner test that failed, errored, or never reported."""


class MissingPrerequisite(Exception):
    """The emulated host cannot run here (no QEMU, no images): every proxy reports it."""


class HostVmProxy(pytest.Item):
    """Stands for a linux-tier test that runs inside the emulated KVM host."""

    def __init__(self, *, runner: "InnerRun", **kw) -> None:
        super().__init__(**kw)
        self.runner = runner

    def runtest(self) -> None:
        report(self.runner.outcome(self.nodeid))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, InnerFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.name} [in emulated KVM host]"


def report(outcome: InnerOutcome) -> None:
    """Turn an inner outcome into this side's: return (passed), skip or fail."""
    if outcome.outcome == "passed":
        return
    if outcome.outcome == "skipped":
        # A skip locally; under CI=true a failure, as it would be outside the emulated host.
        require(False, f"skipped inside the emulated host: {outcome.message}")
    raise InnerFailure(outcome.describe())


class InnerRun:
    """Boots the emulated host once, on first use, for all selected linux tests."""

    def __init__(self, nodeids: list[str], config: pytest.Config) -> None:
        self.nodeids = nodeids
        self.config = config
        self.lock = threading.Lock()
        self.outcomes: dict[tuple[str, str], InnerOutcome] | None = None
        self.failure: str = ""
        self.missing: str = ""  # a prerequisite the run lacked: every test reports it the same way
        self.workdir = Path()   # made when the run starts: collection alone (--co) leaves nothing
        self.boots = 0
        self.wakes = [0, 0]      # silences a serial break was sent into, and those it ended

    def outcome(self, nodeid: str) -> InnerOutcome:
        """This test's inner outcome; ``require()`` for all alike when a prerequisite is missing."""
        with self.lock:
            if self.outcomes is None:
                self.outcomes = {}
                try:
                    self._run()
                except MissingPrerequisite as exc:
                    self.missing = str(exc)
                except Exception:   # every test fails with it, not only the first to ask
                    self.failure = f"the emulated host could not run the tier:\n{traceback.format_exc()}"
        if self.missing:
            require(False, self.missing)
        assert self.outcomes is not None
        found = self.outcomes.get(junit_key(nodeid))
        if found is not None:
            return found
        return InnerOutcome("failed", "the inner run did not report this test (hung, killed or not run)",
                            self.failure, "", "")

    def _run(self) -> None:
        if shutil.which("qemu-system-x86_64") is None:
            raise MissingPrerequisite("qemu-system-x86_64 is needed to run the linux tier in an emulated KVM host")
        self.workdir = Path(tempfile.mkdtemp(prefix="asyncvmm-linux-tier-"))
        from asyncvmm_tools.hostvm import HostVm, HostVmError
        from asyncvmm_tools.images import ImagesMissingError
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")

        def say(msg: str) -> None:
            # This runs inside the first proxy's call: past pytest's capture, or a passing
            # run's log would never show it.
            if reporter is None:
                return
            if capture is None:
                reporter.write_line(msg)
                return
            with capture.global_and_fixture_disabled():
                reporter.write_line(msg)

        try:
            prepared = HostVm.prepare(progress=say)
        except (HostVmError, ImagesMissingError, OSError) as exc:
            raise MissingPrerequisite(f"cannot prepare the emulated KVM host: {exc}") from exc
        budget = float(os.environ.get("ASYNCVMM_HOSTVM_TIMEOUT", "0")) or \
            min(BOOT_ALLOWANCE + PER_TEST_TIMEOUT * len(self.nodeids), TIER_BUDGET)
        deadline = time.monotonic() + budget
        froze_in: dict[str, int] = {}
        remaining = list(self.nodeids)
        boot = 0
        while remaining:
            left = deadline - time.monotonic()
            if left < BOOT_ALLOWANCE / 2:
                self.failure = (f"the linux tier's budget of {budget:.0f} s ran out before these tests ran "
                                f"(ASYNCVMM_HOSTVM_TIMEOUT){self.failure}")
                return
            boot += 1
            self.boots = boot
            known = len(self.outcomes)
            outcome, running = self._boot(prepared, remaining, boot, left, say)
            if outcome == "complete" or (running is None and len(self.outcomes) == known):
                return   # done, or a boot that got nowhere: another would not either
            if running is not None:
                froze_in[running] = froze_in.get(running, 0) + 1
                if froze_in[running] >= FREEZE_TRIES or outcome == "timeout":
                    what = {"stalled": "the emulated host froze", "timeout": "the tier ran out of time",
                            "no report": "the inner pytest ended without a report"}[outcome]
                    again = f", {froze_in[running]} times" if froze_in[running] > 1 else ""
                    self.outcomes[junit_key(running)] = InnerOutcome(
                        "failed", f"{what} during this test (boot {boot}{again})", self.failure, "", "")
            remaining = [n for n in remaining if junit_key(n) not in self.outcomes]
            if remaining:
                say(f"[linux tier] boot {boot} ended early ({outcome}); {len(remaining)} test(s) go to a new boot")

    def _boot(self, prepared, nodeids: list[str], boot: int, timeout: float, say) -> tuple[str, str | None]:
        """One boot of the emulated host for ``nodeids``; its outcomes go into ``self.outcomes``.

        Returns ``("complete", None)`` when the inner pytest ended and wrote its report, else
        ``("stalled" | "timeout" | "no report", <node id that was running or None>)``.
        """
        from asyncvmm_tools.hostvm import run_in_hostvm
        suffix = "" if boot == 1 else f"-{boot}"
        console_log = self.workdir / f"hostvm-console{suffix}.log"
        results = self.workdir / f"results{suffix}"
        # Python runs ~20x slower in there: leave out plugins the tier does not use
        # (schemathesis alone costs over a minute of start-up).
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:schemathesis",
                "-p", "no:anyio", "-rA", "-v",
                f"--junitxml={INNER_RESULTS}/junit.xml", "-o", "junit_logging=all",
                "-o", "junit_family=xunit1", *nodeids]
        env = {"CI": os.environ.get("CI", ""), "ASYNCVMM_LINUX_TEST_TIMEOUT": str(PER_TEST_TIMEOUT)}
        say(f"[linux tier] boot {boot}: running {len(nodeids)} test(s) inside the emulated KVM host "
            f"(timeout {timeout:.0f} s; console: {console_log})")
        result = run_in_hostvm(argv, timeout=timeout, env=env, prepared=prepared, console_log=console_log,
                               results_dir=results, heartbeat=FREEZE_HEARTBEAT_S, stall_timeout=FREEZE_STALL_S,
                               progress=say)
        say(f"[linux tier] emulated host: {result.kvm_line or 'no kvm status line'}; "
            f"exit {result.returncode}; timings {fmt_timings(result.timings)}")
        if result.wakes:
            say(f"[linux tier] boot {boot}: its console went silent {len(result.wakes)} time(s) and got a "
                f"serial break; it spoke again after {result.woken} ({results / 'hostvm-wakes.txt'})")
            self.wakes = [self.wakes[0] + len(result.wakes), self.wakes[1] + result.woken]
        junit = results / "junit.xml"
        progress = parse_progress(result.console)
        tail = result.console[-6000:]
        if result.stalled:
            why, state = (f"the emulated host froze: its console was silent for {FREEZE_STALL_S:.0f} s "
                          f"(where its CPU was: {results / 'hostvm-freeze.txt'})"), "stalled"
        elif result.timed_out:
            why, state = f"the emulated host was killed after {timeout:.0f} s", "timeout"
        elif not junit.exists():
            why, state = f"the inner pytest wrote no junit report (exit {result.returncode})", "no report"
        else:
            why, state = "", "complete"
        self.failure = f"{why}\n--- emulated host console, boot {boot} (tail) ---\n{tail}"
        # What the console saw first; the report, when there is one, has the whole story.
        self.outcomes.update(progress.outcomes)
        if junit.exists():
            try:
                self.outcomes.update(parse_junit(junit.read_text(errors="replace")))
            except ValueError as exc:
                self.failure = f"unreadable junit report: {exc}\n{self.failure}"
        return state, (None if state == "complete" else progress.running)


def fmt_timings(t: dict) -> str:
    return ", ".join(f"{k} {v:.1f} s" for k, v in t.items())


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    dropped = config.stash.get(MINIKERNEL_DROPPED_KEY, [])
    if dropped:
        terminalreporter.write_line(
            f"not part of this run: {len(dropped)} minikernel test(s) ({', '.join(dropped)}); "
            "ASYNCVMM_MINIKERNEL=1 adds them (scripts/test then builds the minimal kernel)")
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is not None and runner.outcomes is not None and runner.workdir != Path():
        sent, woke = runner.wakes
        terminalreporter.write_line(
            f"linux tier ran in the emulated KVM host ({runner.boots} boot(s); its console went silent "
            f"{sent} time(s) and a serial break ended {woke} of those, docs/testing.md); logs and junit: "
            f"{runner.workdir}")


# --------------------------------------------------------------------------- progress lines (inside)

_CONFIG: list[pytest.Config] = []
_SEEN: dict[str, list] = {}     # node id -> [worst outcome so far, its text, seconds]


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG[:] = [config]       # historic: called for this conftest too when it registers late


def _progress(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)   # on its own line, outside any test's captured output


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logstart(nodeid, location) -> None:
    if in_hostvm() and _CONFIG:
        _progress(_CONFIG[0], start_line(nodeid))


def pytest_runtest_logreport(report) -> None:
    if not (in_hostvm() and _CONFIG):
        return
    seen = _SEEN.setdefault(report.nodeid, ["passed", "", 0.0])
    seen[2] += report.duration
    if report.failed and seen[0] in ("passed", "skipped"):
        seen[0] = "failed" if report.when == "call" else "error"
        seen[1] = report.longreprtext
    elif report.skipped and seen[0] == "passed":
        seen[0] = "skipped"
        seen[1] = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longreprtext


def pytest_runtest_logfinish(nodeid, location) -> None:
    if in_hostvm() and _CONFIG:
        outcome, message, seconds = _SEEN.pop(nodeid, ["error", "no report", 0.0])
        _progress(_CONFIG[0], done_line(nodeid, outcome, message, seconds))


# --------------------------------------------------------------------------- per-test timeout

class TestTimeoutError(Exception):
    """The test ran past ASYNCVMM_LINUX_TEST_TIMEOUT."""


def _alarm(signum, frame):
    raise TestTimeoutError(f"linux-tier test exceeded {PER_TEST_TIMEOUT:.0f} s")


def _with_timeout(item):
    timed = (_is_linux_item(item) and not isinstance(item, HostVmProxy)
             and threading.current_thread() is threading.main_thread())
    if timed:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, PER_TEST_TIMEOUT)
    try:
        yield
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _with_timeout(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _with_timeout(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _with_timeout(item)


# --------------------------------------------------------------------------- fixtures (direct mode)

@pytest.fixture(scope="session")
def guest_images():
    from asyncvmm_tools.images import ImagesMissingError, ensure_images
    require(kvm_kind() == "hardware", f"needs hardware KVM (this machine: {kvm_kind()})")
    try:
        return ensure_images(build=not in_hostvm(), refresh=False)
    except ImagesMissingError as exc:
        require(False, str(exc))


@pytest.fixture
def guests(guest_images, tmp_path):
    from tests.linux.harness import GuestFactory
    factory = GuestFactory(guest_images, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def qemu_available():
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 is not installed")
