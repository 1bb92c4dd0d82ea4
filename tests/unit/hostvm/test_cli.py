"""``python -m asyncvmm_tools.hostvm``: which command runs in the emulated host, and with which terminal."""

from __future__ import annotations

import pytest

from asyncvmm_tools.hostvm import __main__ as cli
from asyncvmm_tools.hostvm.runner import HostVmResult


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_run(cmd, **kw):
        seen.append((cmd, kw["interactive"]))
        return HostVmResult(0, "", "", None)

    monkeypatch.setattr(cli, "run_in_hostvm", fake_run)
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **kw: None)   # no `stty sane` here
    return seen


def test_interactive_run_runs_the_given_command_with_the_terminal(calls):
    # scripts/quickstart --shell: the guest's shell, not a shell in the emulated host
    assert cli.main(["run", "--interactive", "--", "sh", "-c", "boot the guest"]) == 0
    assert calls == [(["sh", "-c", "boot the guest"], True)]


def test_shell_is_bash_in_the_emulated_host(calls):
    assert cli.main(["shell"]) == 0
    assert calls == [(["/bin/bash", "-l"], True)]


def test_plain_run_has_no_terminal_and_needs_a_command(calls, capsys):
    assert cli.main(["run", "--", "true"]) == 0
    assert calls == [(["true"], False)]
    with pytest.raises(SystemExit):
        cli.main(["run"])
