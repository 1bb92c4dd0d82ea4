"""MicroVM with a stand-in VMM executable (fake_vmm.py): flags, console capture, stdin,
pause/resume, metrics, exit codes, SIGTERM and SIGKILL, and cleanup."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from asyncvmm.client import ApiError, ConsoleTimeoutError, MicroVM, VmmExitedError

FAKE_VMM = [sys.executable, str(Path(__file__).with_name("fake_vmm.py"))]


def fake_vm(*args, **kwargs) -> MicroVM:
    kwargs.setdefault("binary", FAKE_VMM)
    return MicroVM(*args, **kwargs)


async def test_boot_console_and_flags(tmp_path):
    async with fake_vm("/vmlinux", "console=ttyS0", vcpus=2, mem_mib=64, vm_id="vm7", level="Info",
                       boot_timer=True) as vm:
        match = await vm.wait_for_console(re.compile(r"booted id=(\S+) args=(.*)\n"), timeout=10)
        assert match.groups() == ("vm7", "console=ttyS0")
        assert await vm.state() == "Running"
        log = vm.log_text()
        for flag in ("'--id', 'vm7'", "'--level', 'Info'", "'--boot-timer'", "'--metrics-path'"):
            assert flag in log
        assert (await vm.client.get_export_vm_config()) == {}   # the fake answers {}: the call went through


async def test_configuration_reaches_the_api_in_order(tmp_path):
    drive = {"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": True}
    async with fake_vm("/vmlinux", vcpus=1, mem_mib=128, drives=[drive], mmds={"latest": {}},
                       start=False) as vm:
        assert await vm.state() == "Not started"
        await vm.start()
        await vm.wait_for_console("booted", timeout=10)


async def test_pause_holds_the_guest_and_resume_releases_it():
    async with fake_vm("/vmlinux") as vm:
        await vm.wait_for_console("booted", timeout=10)
        await vm.write_console("one\n")
        await vm.wait_for_console("echo:one", timeout=10)
        await vm.pause()
        assert await vm.state() == "Paused"
        start = vm.console.end
        await vm.write_console(b"two\n")
        with pytest.raises(ConsoleTimeoutError, match="echo:two"):
            await vm.wait_for_console("echo:two", timeout=0.5, start=start)
        await vm.resume()
        await vm.wait_for_console("echo:two", timeout=10, start=start)
        metrics = await vm.metrics()
        assert metrics["uart"]["echoed_lines"] == 2 and metrics["api"]["flushes"] == 1
        assert (await vm.metrics())["api"]["flushes"] == 2
        assert len(vm.read_metrics()) == 3       # InstanceStart's line and two flushes


async def test_metrics_before_start_is_the_vmms_error():
    async with fake_vm(start=False) as vm:
        with pytest.raises(ApiError, match="before starting") as err:
            await vm.metrics()
        assert (err.value.status, err.value.path) == (400, "/actions")


async def test_guest_exit_code_is_returned():
    async with fake_vm("/vmlinux", "exit=3") as vm:
        assert await vm.wait(timeout=10) == 3
        assert "booted" in vm.console.text          # every byte was read before wait() returned


async def test_ctrl_alt_del_reboot_exits_0():
    async with fake_vm("/vmlinux") as vm:
        await vm.wait_for_console("booted", timeout=10)
        await vm.send_ctrl_alt_del()
        assert await vm.wait(timeout=10) == 0
        assert "ctrl-alt-del" in vm.console.text


async def test_waiting_for_text_from_an_exited_vmm_says_so():
    async with fake_vm("/vmlinux", "exit=5") as vm:
        with pytest.raises(VmmExitedError, match="exited with 5") as err:
            await vm.wait_for_console("never printed", timeout=10)
        assert "booted" in err.value.output


async def test_a_vmm_that_closes_its_stdout_but_runs_on(monkeypatch):
    monkeypatch.setattr("asyncvmm.client.microvm.STOP_TIMEOUT_S", 0.3)
    async with fake_vm("/vmlinux", "closestdout") as vm:
        with pytest.raises(EOFError, match="closed its stdout but still runs"):
            await vm.wait_for_console("never printed", timeout=10)
        assert vm.returncode is None and await vm.state() == "Running"


async def test_stop_sends_sigterm():
    async with fake_vm("/vmlinux") as vm:
        await vm.wait_for_console("booted", timeout=10)
        assert await vm.stop() == 0


async def test_stop_escalates_to_sigkill_and_env_reaches_the_vmm():
    async with fake_vm("/vmlinux", env={"FAKE_VMM_IGNORE_SIGTERM": "1", "FAKE_VMM_GREETING": "hi"}) as vm:
        await vm.wait_for_console("greeting=hi", timeout=10)
        assert await vm.stop(timeout=0.5) == -9


async def test_cleanup_on_error_inside_the_block():
    vm = fake_vm("/vmlinux")
    with pytest.raises(RuntimeError, match="boom"):
        async with vm:
            pid = vm.pid
            workdir, sock = vm.workdir, vm.api_sock
            assert sock.is_socket()
            raise RuntimeError("boom")
    assert vm.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists() and not sock.exists()


async def test_given_paths_are_used_and_only_the_socket_is_removed(tmp_path):
    metrics, log, sock = tmp_path / "m.json", tmp_path / "v.log", tmp_path / "s.sock"
    async with fake_vm("/vmlinux", metrics_path=metrics, log_path=log, api_sock=sock, workdir=tmp_path / "w") as vm:
        await vm.metrics()
    assert metrics.read_text().count("\n") == 2 and "fake-vmm" in log.read_text()
    assert not sock.exists()
    assert (tmp_path / "w").is_dir()             # the caller's directory is theirs


async def test_a_start_failure_cleans_up_and_raises():
    vm = fake_vm(start=False, extra_args=["--fail-start"])
    with pytest.raises(VmmExitedError, match="refusing to start") as err:
        async with vm:
            pass
    assert err.value.returncode == 1
    assert not vm.workdir.exists()


async def test_a_refused_configuration_cleans_up_and_raises_the_api_error():
    vm = fake_vm("/missing/vmlinux")
    with pytest.raises(ApiError, match="No such file") as err:
        async with vm:
            pass
    assert (err.value.status, err.value.method, err.value.path) == (400, "PUT", "/boot-source")
    assert vm.returncode == 0                     # stopped with SIGTERM
    assert not vm.workdir.exists()


async def test_a_binary_that_never_serves_the_api():
    with pytest.raises(VmmExitedError, match="exited with 0 while waiting for its API socket"):
        async with fake_vm(binary=[sys.executable, "-c", "print('no api here')"]):
            pass


async def test_an_api_that_never_answers_times_out_and_the_process_is_ended():
    vm = fake_vm(binary=[sys.executable, "-c", "import time; time.sleep(60)"], start_timeout=0.3)
    with pytest.raises(TimeoutError, match="did not answer within 0.3 s"):
        async with vm:
            pass
    assert vm.returncode == -15


@pytest.mark.parametrize("kwargs,needle", [
    ({"boot_args": "x"}, "need a kernel"),
    ({"kernel": "/k", "config": {"boot-source": {"kernel_image_path": "/j"}}}, "both"),
    ({"config": {"bootsource": {}}}, "unknown configuration keys"),
])
def test_bad_arguments_are_refused_before_spawning(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MicroVM(**kwargs)


async def test_client_before_spawn_is_an_error():
    with pytest.raises(RuntimeError, match="not spawned"):
        MicroVM().client


# Firecracker v1.16's flags (spec/API-BEHAVIOUR.md, "Process").
FIRECRACKER_FLAGS = {
    "--api-sock", "--id", "--config-file", "--no-api", "--boot-timer", "--log-path", "--level", "--show-level",
    "--show-log-origin", "--metrics-path", "--metadata", "--http-api-max-payload-size", "--mmds-size-limit",
    "--seccomp-filter", "--no-seccomp", "--describe-snapshot", "--enable-pci", "--version", "--help",
}


def test_the_command_line_uses_only_firecrackers_flags():
    vm = MicroVM(binary="/usr/local/bin/firecracker", vm_id="vm1", level="Debug", boot_timer=True,
                 enable_pci=True, extra_args=["--no-seccomp"])
    argv = vm.argv()
    assert argv[0] == "/usr/local/bin/firecracker"
    flags = [a for a in argv[1:] if a.startswith("--")]
    assert set(flags) <= FIRECRACKER_FLAGS
    assert flags == ["--api-sock", "--log-path", "--metrics-path", "--id", "--level", "--boot-timer",
                     "--enable-pci", "--no-seccomp"]
    assert "--enable-pci" not in MicroVM().argv()
    assert argv[argv.index("--id") + 1] == "vm1" and argv[argv.index("--level") + 1] == "Debug"


def test_the_default_binary_is_this_pythons_asyncvmm():
    argv0 = MicroVM().argv0
    assert argv0 == [str(Path(sys.executable).with_name("asyncvmm"))] or \
        argv0 == [sys.executable, "-m", "asyncvmm.cli"]


async def test_a_socket_path_in_use_is_refused_and_left_to_its_owner(tmp_path):
    """Another VMM's API would answer the SDK's polling as if it were the new VMM's."""
    sock = tmp_path / "busy.sock"
    async with fake_vm("/vmlinux", api_sock=sock) as first:
        await first.wait_for_console("booted", timeout=10)
        second = fake_vm("/vmlinux", api_sock=sock)
        with pytest.raises(FileExistsError, match="already in use"):
            async with second:
                pass
        assert second.process is None
        assert sock.is_socket() and await first.state() == "Running"


async def test_metrics_lines_of_an_earlier_run_are_not_reported(tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text('{"utc_timestamp_ms": 1, "old": true}\n')
    async with fake_vm("/vmlinux", metrics_path=metrics) as vm:
        assert "old" not in await vm.metrics()
        assert len(vm.read_metrics()) == 2
