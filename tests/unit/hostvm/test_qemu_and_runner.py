"""QEMU command lines, the job script, console splitting, junit mapping, the harness console protocol."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from asyncvmm_tools.hostvm.hostdisk import fingerprint, host_path, walk
from asyncvmm_tools.hostvm.hostinit import host_init_script
from asyncvmm_tools.hostvm.junit import junit_key, parse_junit
from asyncvmm_tools.hostvm.qemu import Disk, MachineSpec, drive_args, host_cmdline, machine_argv
from asyncvmm_tools.hostvm.runner import IN_HOSTVM_ENV, job_script, split_console
from tests.conftest import require
from tests.linux.harness import AsyncVmmLauncher, ConsoleProtocol, DriveSpec, QemuMicrovmLauncher, VmSpec


def test_machine_argv_for_the_emulated_host():
    spec = MachineSpec(kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0", accel="tcg",
                       cpu="max", mem_mib=4096, disks=(Disk(Path("/r.ext4"), "avmroot", readonly=True),))
    argv = machine_argv(spec)
    assert argv[:3] == ["qemu-system-x86_64", "-M", spec.machine]
    assert "acpi=on" in spec.machine and "rtc=off" in spec.machine
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-cpu") + 1] == "max"
    assert argv[argv.index("-smp") + 1] == "1" and "-no-reboot" in argv
    assert "id=disk0,file=/r.ext4,format=raw,if=none,cache=unsafe,readonly=on" in argv
    assert "virtio-blk-device,drive=disk0,serial=avmroot" in argv
    assert argv[argv.index("-initrd") + 1] == "/i"


def test_bad_specs_are_refused():
    with pytest.raises(ValueError):
        drive_args((Disk(Path("/a,b"), "x"),))
    with pytest.raises(ValueError):
        drive_args((Disk(Path("/a"), "bad serial"),))
    with pytest.raises(ValueError):
        machine_argv(MachineSpec(kernel=Path("/k"), cmdline="", accel="hvf"))


def test_host_cmdline_has_tsc_only_when_known():
    assert "tsc_early_khz=2000000" in host_cmdline(2_000_000, ["x=1"]).split()
    assert not any(a.startswith("tsc_early_khz") for a in host_cmdline(None, []).split())


def test_job_script_quotes_and_sets_the_environment():
    text = job_script(["python", "-c", "print('a b')"], {"CI": "true", "X": "it's"}, "/work/my dir")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    assert f"export {IN_HOSTVM_ENV}=1" in lines
    assert "export X='it'\"'\"'s'" in lines
    assert lines[-2] == "cd '/work/my dir' || exit 125"
    assert shlex.split(lines[-1]) == ["exec", "python", "-c", "print('a b')"]
    with pytest.raises(ValueError):
        job_script([], {}, "/")
    with pytest.raises(ValueError):
        job_script(["true"], {"BAD NAME": "1"}, "/")


def test_job_script_runs_in_a_real_shell(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(job_script(["sh", "-c", 'echo "$X"; exit 4'], {"X": "va lue"}, str(tmp_path)))
    r = subprocess.run(["sh", str(script)], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (4, "va lue\n")


def test_split_console():
    console = ("boot noise\r\nasyncvmm-hostvm: kvm ready: /dev/kvm present, nested=1\r\n"
               "asyncvmm-hostvm: job start\r\nhello\r\nworld\r\nasyncvmm-hostvm: job exit=3\r\npower down\r\n")
    out, rc, kvm = split_console(console)
    assert (out, rc, kvm) == ("hello\nworld\n", 3, "kvm ready: /dev/kvm present, nested=1")
    assert split_console("no markers") == ("", None, "")
    assert split_console("asyncvmm-hostvm: job start\nhung")[1] is None


def test_host_init_parses_in_busybox_sh(tmp_path):
    require(shutil.which("busybox") is not None, "busybox not installed")
    (tmp_path / "init").write_bytes(host_init_script())
    r = subprocess.run(["busybox", "sh", "-n", str(tmp_path / "init")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not re.search(rb"@[A-Z]+@", host_init_script())   # every placeholder filled


def test_runtime_disk_helpers(tmp_path):
    (tmp_path / "a" / "__pycache__").mkdir(parents=True)
    (tmp_path / "a" / "m.py").write_text("x")
    (tmp_path / "a" / "__pycache__" / "m.pyc").write_text("y")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("z")
    files = walk(tmp_path, {".git"})
    assert sorted(Path(f).name for f in files) == ["m.py", "m.pyc"]
    assert [f for f, _, _ in fingerprint(files)] == [str(tmp_path / "a" / "m.py")]   # bytecode not keyed
    assert host_path("/lib/x86_64-linux-gnu/libc.so.6").startswith("/usr/lib/") or \
        not Path("/lib").is_symlink()


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.linux.test_a" name="test_ok" time="1.5"><system-out>console</system-out></testcase>
<testcase classname="tests.linux.test_a.TestK" name="test_p[x::y]" time="2"><failure message="boom">tb</failure></testcase>
<testcase classname="tests.linux.test_a" name="test_skip" time="0"><skipped message="no kvm"/></testcase>
<testcase classname="tests.linux.test_a" name="test_err" time="0"><error message="fixture"/></testcase>
</testsuite></testsuites>"""


def test_junit_keys_match_pytest_node_ids():
    assert junit_key("tests/linux/test_a.py::test_ok") == ("tests.linux.test_a", "test_ok")
    assert junit_key("tests/linux/test_a.py::TestK::test_p[x::y]") == ("tests.linux.test_a.TestK", "test_p[x::y]")


def test_parse_junit_outcomes():
    r = parse_junit(JUNIT)
    ok = r[("tests.linux.test_a", "test_ok")]
    assert (ok.outcome, ok.stdout, ok.seconds) == ("passed", "console", 1.5)
    bad = r[junit_key("tests/linux/test_a.py::TestK::test_p[x::y]")]
    assert (bad.outcome, bad.message, bad.details) == ("failed", "boom", "tb")
    assert "boom" in bad.describe() and "tb" in bad.describe()
    assert r[("tests.linux.test_a", "test_skip")].outcome == "skipped"
    assert r[("tests.linux.test_a", "test_err")].outcome == "error"
    with pytest.raises(ValueError):
        parse_junit("<testsuite><testcase")


def test_console_protocol_round_trip_through_a_real_shell():
    proto = ConsoleProtocol()
    n, data = proto.encode("echo one; echo 'two  spaces'; exit 5")
    assert n == 1 and all(len(line) < 4000 for line in data.split(b"\n"))
    # Run what the console would receive, with the echo a tty would add in front.
    r = subprocess.run(["sh"], input=data, capture_output=True, cwd="/")
    text = data.decode() + r.stdout.decode()
    result = ConsoleProtocol.find(text, n)
    assert result is not None and result.status == 5
    assert result.output == "one\ntwo  spaces\n"
    assert ConsoleProtocol.find(text, 2) is None


def test_console_protocol_long_commands_are_chunked():
    n, data = ConsoleProtocol().encode("echo " + "y" * 9000)
    assert data.count(b"\n") > 6
    r = subprocess.run(["sh"], input=data, capture_output=True)
    result = ConsoleProtocol.find(r.stdout.decode(), n)
    assert result is not None and result.output == "y" * 9000 + "\n"


def test_launchers_build_firecracker_config_and_qemu_argv(tmp_path):
    spec = VmSpec(kernel=Path("/k"), boot_args="console=ttyS0", initrd=Path("/i"), vcpus=2, mem_mib=128,
                  drives=[DriveSpec(Path("/data.img"), "data"), DriveSpec(Path("/root.ext4"), "rootfs",
                                                                           is_root_device=True)])
    argv = AsyncVmmLauncher().argv(spec, tmp_path)
    assert argv[1:3] == ["-m", "asyncvmm.cli"] and argv[3:5] == ["--no-api", "--config-file"]
    import json
    config = json.loads(Path(argv[5]).read_text())
    assert config["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 128}
    assert config["boot-source"]["initrd_path"] == "/i" and "reboot=k" in config["boot-source"]["boot_args"]
    assert [d["drive_id"] for d in config["drives"]] == ["data", "rootfs"]
    q = QemuMicrovmLauncher().argv(spec, tmp_path)
    append = q[q.index("-append") + 1]
    assert "root=/dev/vda rw" in append and "initcall_blacklist=cmos_init" in append and "reboot=t" in append
    drives = [a for a in q if a.startswith("virtio-blk-device")]
    assert drives[0].endswith("serial=rootfs")          # the root disk first: it becomes /dev/vda


def test_heartbeat_lines_are_printed_and_left_out_of_stdout(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(job_script(["sh", "-c", "printf 'a'; sleep 0.35; echo b"], {}, str(tmp_path), heartbeat=0.1))
    out = tmp_path / "out"
    with open(out, "w") as f:   # a file, not a pipe: the beat may outlive the job by one beat
        assert subprocess.run(["sh", str(script)], stdout=f, timeout=10).returncode == 0
    time.sleep(0.3)             # the beat noticed the job is gone and stopped
    text = out.read_text()
    assert text.count("asyncvmm-hostvm: alive") >= 2 and out.read_text() == text
    console = f"asyncvmm-hostvm: job start\n{text}asyncvmm-hostvm: job exit=0\n"
    assert split_console(console)[:2] == ("ab\n", 0)   # a beat inside a line does not split it


def test_a_silent_child_is_given_up_on_after_the_stall_timeout():
    from asyncvmm_tools.hostvm.process import Child
    from asyncvmm_tools.hostvm.runner import wait_watched
    seen = [time.monotonic()]

    def sink(_data):
        seen[0] = time.monotonic()

    child = Child(["sh", "-c", "for i in 1 2 3 4 5; do echo x; sleep 0.1; done; sleep 60"], sink)
    try:
        t0 = time.monotonic()
        assert wait_watched(child, t0 + 30, 0.6, lambda: seen[0]) == (None, True)
        assert 0.9 < time.monotonic() - t0 < 10       # the chatter kept it alive, then silence ended it
        assert wait_watched(child, time.monotonic() + 0.2, 0, lambda: seen[0]) == (None, False)   # plain timeout
    finally:
        child.kill()
    quick = Child(["sh", "-c", "exit 5"], sink)
    assert wait_watched(quick, time.monotonic() + 10, 5, lambda: seen[0]) == (5, False)


def test_a_silence_gets_a_wake_before_it_is_given_up_on():
    """After wake_after s of silence wake() is called once; the console speaking again ends that
    silence (the next one gets its own wake), stall_timeout s of silence end the wait."""
    from asyncvmm_tools.hostvm.process import Child
    from asyncvmm_tools.hostvm.runner import wait_waking
    seen = [time.monotonic()]
    calls = []

    def sink(_data):
        seen[0] = time.monotonic()

    def wake():
        calls.append(time.monotonic())
        return "answer\n"

    child = Child(["sh", "-c", "echo a; sleep 1.2; echo b; sleep 60"], sink)
    try:
        t0 = time.monotonic()
        rc, stalled, woken = wait_waking(child, t0 + 30, 2.5, lambda: seen[0], 0.5, wake)
        took = time.monotonic() - t0
    finally:
        child.kill()
    assert (rc, stalled, len(calls)) == (None, True, 2)
    assert 3.5 < took < 15                      # b at ~1.2 s, then 2.5 s of silence
    assert re.fullmatch(r"after 0\.\d s of console silence:\nanswer\n\(the console spoke again 1\.\d s into "
                        r"the silence\)\n", woken[0])
    assert woken[1].endswith("answer\n(the console stayed silent)\n")
    from asyncvmm_tools.hostvm.runner import HostVmResult
    assert HostVmResult(0, "", "", None, wakes=woken).woken == 1
    # Without a wake step (0, or not shorter than the stall limit) it is wait_watched.
    quick = Child(["sh", "-c", "exit 3"], sink)
    assert wait_waking(quick, time.monotonic() + 10, 5, lambda: seen[0], 0, wake) == (3, False, [])
    quiet = Child(["sh", "-c", "sleep 60"], sink)
    try:
        seen[0] = time.monotonic()
        assert wait_waking(quiet, time.monotonic() + 10, 0.3, lambda: seen[0], 0.3, wake) == (None, True, [])
    finally:
        quiet.kill()
    assert len(calls) == 2
    # Without a stall limit the wake still comes, and nothing gives up but the deadline.
    quiet = Child(["sh", "-c", "sleep 60"], sink)
    try:
        seen[0] = time.monotonic()
        t0 = time.monotonic()
        rc, stalled, woken = wait_waking(quiet, t0 + 1.0, 0, lambda: seen[0], 0.3, wake)
        assert (rc, stalled, len(woken)) == (None, False, 1)
        assert re.fullmatch(r"after 0\.\d s of console silence:\nanswer\n", woken[0])
        assert time.monotonic() - t0 < 5
    finally:
        quiet.kill()
    assert len(calls) == 3


def test_the_monitor_is_asked_where_a_frozen_cpu_is(tmp_path):
    """monitor_dump speaks QEMU's human monitor: banner, then each query answered up to the
    next prompt (the command echoed first); a monitor that is not there is said, not raised."""
    import socket
    import threading
    from asyncvmm_tools.hostvm.runner import monitor_dump
    path = tmp_path / "monitor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    asked = []

    def serve():
        conn, _ = server.accept()
        with conn:
            conn.sendall(b"QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) ")
            for _ in range(2):
                line = b""
                while not line.endswith(b"\n"):
                    line += conn.recv(1)
                query = line.decode().strip()
                asked.append(query)
                conn.sendall(f"{query}\r\nanswer to {query}\r\nRIP=ffffffff81000000\r\n(qemu) ".encode())

    t = threading.Thread(target=serve)
    t.start()
    try:
        dump = monitor_dump(path, ("info registers", "x/4i $pc"), timeout=5, pause=0.01)
    finally:
        t.join(5)
        server.close()
    assert asked == ["info registers", "x/4i $pc"]
    assert dump == ("(qemu) info registers\nanswer to info registers\nRIP=ffffffff81000000\n"
                    "(qemu) x/4i $pc\nanswer to x/4i $pc\nRIP=ffffffff81000000\n")
    gone = monitor_dump(tmp_path / "nothing.sock", timeout=1)
    assert gone.startswith(f"(the monitor at {tmp_path / 'nothing.sock'} did not answer:")
