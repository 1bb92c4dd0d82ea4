"""The jailer's command line: every bad input fails before anything is created, with Firecracker's text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncvmm.jailer import cgroups
from asyncvmm.jailer.env import ArgumentsError, JailerError, parse


@pytest.fixture
def jail(tmp_path):
    exec_file = tmp_path / "asyncvmm"
    exec_file.write_text("#!/bin/sh\n")
    base = tmp_path / "base"
    base.mkdir()
    return exec_file, base


def _argv(exec_file, base, *extra, jail_id="vm-1"):
    return ["--id", jail_id, "--exec-file", str(exec_file), "--uid", "1000", "--gid", "1000",
            "--chroot-base-dir", str(base), *extra]


def test_a_good_command_line(jail):
    exec_file, base = jail
    env = parse(_argv(exec_file, base, "--cgroup-version", "2", "--resource-limit", "no-file=64",
                      "--new-pid-ns", "--daemonize", "--", "--api-sock", "/run/api.sock"))
    assert env.chroot_dir == base.resolve() / "asyncvmm" / "vm-1" / "root"
    assert (env.uid, env.gid, env.cgroup_version, env.parent_cgroup) == (1000, 1000, 2, "asyncvmm")
    assert env.resource_limits == {"no-file": 64} and env.new_pid_ns and env.daemonize
    assert env.extra_args == ["--api-sock", "/run/api.sock"]
    assert list(base.iterdir()) == []                     # checking created nothing


def test_open_files_are_bounded_to_2048_unless_named(jail):
    """Firecracker's jailer default: no-file 2048 when --resource-limit does not name it."""
    exec_file, base = jail
    assert parse(_argv(exec_file, base)).resource_limits == {"no-file": 2048}
    assert parse(_argv(exec_file, base, "--resource-limit", "fsize=4096")).resource_limits == \
        {"fsize": 4096, "no-file": 2048}


@pytest.mark.parametrize("extra, jail_id, message", [
    ((), "a/b", "Invalid instance ID: Invalid char (/) at position 1"),
    ((), "..", "Invalid instance ID: Invalid char (.) at position 0"),
    ((), "x" * 65, "Invalid instance ID: Invalid len (65)"),
    ((), "", "Invalid instance ID: Invalid len (0)"),
    (("--cgroup-version", "3"), "vm", "3 is an invalid cgroup version specifier"),
    (("--parent-cgroup", "../escape"), "vm", "Parent cgroup path is invalid"),
    (("--parent-cgroup", "/abs"), "vm", "Parent cgroup path is invalid"),
    (("--cgroup", "cpushares"), "vm", "Invalid format for cgroups: cpushares"),
    (("--cgroup", "cpu.shares="), "vm", "Invalid format for cgroups: cpu.shares="),
    (("--cgroup", "frobnicator.weight=1"), "vm", "Controller frobnicator is unavailable"),
    (("--resource-limit", "stack=1"), "vm", "Invalid resource argument: stack"),
    (("--resource-limit", "fsize"), "vm", "Invalid format for resources limits: fsize"),
    (("--resource-limit", "fsize=lots"), "vm", "Invalid limit value for resource: lots"),
    (("--netns", "/nonexistent/netns"), "vm", "Failed to open file /nonexistent/netns"),
])
def test_bad_input_is_refused_before_anything_is_made(jail, extra, jail_id, message):
    exec_file, base = jail
    with pytest.raises(JailerError, match=_re(message)):
        parse(_argv(exec_file, base, *extra, jail_id=jail_id))
    assert list(base.iterdir()) == []


def _re(text):
    import re
    return re.escape(text)


def test_bad_uid_gid_and_missing_flags(jail):
    exec_file, base = jail
    argv = _argv(exec_file, base)
    with pytest.raises(JailerError, match="Invalid uid: -1"):
        parse([*argv[:4], "--uid", "-1", *argv[6:]])
    with pytest.raises(JailerError, match="Invalid gid: root"):
        parse([*argv[:6], "--gid", "root", *argv[8:]])
    with pytest.raises(ArgumentsError, match="Argument 'exec-file' required"):
        parse(["--id", "vm", "--uid", "1", "--gid", "1"])


def test_missing_exec_file_and_base(jail, tmp_path):
    exec_file, base = jail
    with pytest.raises(JailerError, match=_re(f"Failed to canonicalize path {tmp_path}/nope: "
                                              "No such file or directory (os error 2)")):
        parse(_argv(tmp_path / "nope", base))
    with pytest.raises(JailerError, match="is not a file"):
        parse(_argv(base, base))
    with pytest.raises(JailerError, match="is not a directory"):
        parse(_argv(exec_file, exec_file))


def test_an_existing_chroot_is_refused(jail):
    exec_file, base = jail
    chroot = base / "asyncvmm" / "vm-1" / "root"
    chroot.mkdir(parents=True)
    (chroot / "left-over").write_text("")
    with pytest.raises(JailerError, match=_re(f"Failed to create directory {chroot.resolve()}: File exists")):
        parse(_argv(exec_file, base))
    assert [p.name for p in chroot.iterdir()] == ["left-over"]


def test_cgroup_hierarchies_are_found_from_the_mount_table(tmp_path):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    mounts = (f"cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n"
              f"cgroup2 {v2} cgroup2 rw 0 0\n")
    assert cgroups.hierarchy("cpu", 1, mounts) == Path("/sys/fs/cgroup/cpu")
    assert cgroups.hierarchy("memory", 2, mounts) == v2
    with pytest.raises(JailerError, match="Controller hugetlb is unavailable"):
        cgroups.hierarchy("hugetlb", 2, mounts)
    with pytest.raises(JailerError, match="Controller memory is unavailable"):
        cgroups.hierarchy("memory", 1, mounts)
    with pytest.raises(JailerError, match="Hierarchy not found: cgroup2"):
        cgroups.hierarchy("cpu", 2, "cgroup /x cgroup rw,cpu 0 0\n")


def test_the_command_exits_1_with_firecrackers_text_and_creates_nothing(jail):
    exec_file, base = jail
    out = subprocess.run([sys.executable, "-m", "asyncvmm.jailer", *_argv(exec_file, base, jail_id="../x")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Jailer error: Invalid instance ID: Invalid char (.) at position 0" in out.stderr
    assert list(base.iterdir()) == []
    out = subprocess.run([sys.executable, "-m", "asyncvmm.jailer", "--id", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith("Arguments parsing error: ")
    out = subprocess.run([sys.executable, "-m", "asyncvmm.jailer", "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("Jailer v1.16")
