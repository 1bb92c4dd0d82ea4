"""The SDK (asyncvmm.client) driving a real asyncvmm process with the kvm-tier test guest:
boot over the API, console text, stdin, pause/resume, metrics, the boot timer, and the
exit code of a guest reset; a second VM configured from the first one's GET /vm/config; the
same through asyncvmm's fork server; and every runnable example of docs/sdk.md."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest

from asyncvmm.client import ConsoleTimeoutError, MicroVM

pytestmark = pytest.mark.kvm

TIMEOUT_S = 60
REPO = Path(__file__).resolve().parents[2]


async def test_sdk_boots_pauses_reads_metrics_and_returns_0_after_a_guest_reset(test_guest):
    async with MicroVM(test_guest.elf_pvh, "serialecho=1 boottimer=1 exit=reset", vcpus=1, mem_mib=64,
                       vm_id="sdk0", level="Info", boot_timer=True) as vm:
        await vm.wait_for_console("testguest: serialecho ready", timeout=TIMEOUT_S)
        info = await vm.client.describe_instance()
        assert (info["id"], info["state"]) == ("sdk0", "Running")
        assert (await vm.client.get_machine_configuration())["mem_size_mib"] == 64
        entry = await vm.wait_for_console(re.compile(r"boot entry=(\w+) "), timeout=TIMEOUT_S)
        assert entry.group(1) == "pvh"

        await vm.pause()
        assert await vm.state() == "Paused"
        # The UART still takes the bytes, but a paused vCPU cannot echo them.
        start = vm.console.end
        await vm.write_console("while-paused\n")
        with pytest.raises(ConsoleTimeoutError):
            await vm.wait_for_console("echo:while-paused", timeout=1.0, start=start)

        metrics = await vm.metrics()      # deltas since InstanceStart's line
        assert metrics["patch_api_requests"]["vm_count"] == 1
        assert metrics["uart"]["write_count"] >= len("testguest: serialecho ready\n")
        assert len(vm.read_metrics()) == 2

        await vm.resume()
        assert await vm.state() == "Running"
        await vm.wait_for_console("echo:while-paused", timeout=TIMEOUT_S, start=start)
        assert await vm.wait(timeout=TIMEOUT_S) == 0
        assert "testguest: exit reset" in vm.console.text
        log = vm.log_text()
        assert "Guest-boot-time =" in log
        assert "the guest reset the i8042; exit code 0" in log


async def test_a_second_vm_boots_from_the_first_ones_exported_config(test_guest):
    async with MicroVM(test_guest.elf_pvh, "serialecho=1 exit=halt", mem_mib=64) as first:
        await first.wait_for_console("testguest: serialecho ready", timeout=TIMEOUT_S)
        exported = await first.client.get_export_vm_config()
    exported["boot-source"]["boot_args"] = "exit=reset"
    async with MicroVM(config=exported) as second:
        assert await second.wait(timeout=TIMEOUT_S) == 0
        assert "testguest: cmdline exit=reset" in second.console.text
        assert "Started microVM with 1 vCPU(s), 64 MiB" in second.log_text()   # the exported machine-config



async def test_sdk_drives_asyncvmm_through_the_fork_server(test_guest, tmp_path):
    """Nothing fork-server specific in the SDK: the environment it passes through selects the
    fork server, and the VMM behaves as without it (the zygote's child is the VM)."""
    from asyncvmm.forkserver import ENV_VAR

    path = str(tmp_path / "zygote.sock")
    zygote = await asyncio.create_subprocess_exec(sys.executable, "-m", "asyncvmm.forkserver", "--socket", path,
                                                  cwd=REPO, stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(zygote.stdout.readline(), TIMEOUT_S) == f"ready {path}\n".encode()
        async with MicroVM(test_guest.elf_pvh, "serialecho=1 exit=reset", mem_mib=64,
                           env={ENV_VAR: path}) as vm:
            await vm.wait_for_console("testguest: serialecho ready", timeout=TIMEOUT_S)
            children = Path(f"/proc/{zygote.pid}/task/{zygote.pid}/children").read_text().split()
            assert len(children) == 1 and int(children[0]) != vm.pid    # forked by the zygote
            await vm.pause()
            assert (await vm.metrics())["patch_api_requests"]["vm_count"] == 1
            await vm.resume()
            await vm.write_console("go\n")
            await vm.wait_for_console("echo:go", timeout=TIMEOUT_S)
            assert await vm.wait(timeout=TIMEOUT_S) == 0
        async with MicroVM(test_guest.elf_pvh, "serialecho=1", mem_mib=64, env={ENV_VAR: path}) as vm:
            await vm.wait_for_console("testguest: serialecho ready", timeout=TIMEOUT_S)
            assert await vm.stop() == 0                                   # SIGTERM reaches the VM
        assert zygote.returncode is None
    finally:
        zygote.kill()
        await zygote.wait()


DOCS = REPO / "docs" / "sdk.md"
# What each runnable example of docs/sdk.md must print.
EXAMPLE_OUTPUT = {
    "boot": ["exit code 0"],
    "interact": ["state: Paused", "a paused guest does not answer", "uart bytes since start:",
                 "guest said: ping", "exit code: 0", "Guest-boot-time ="],
    "api": ["'firecracker_version': '1.16.1'", "'vcpu_count': 2", "'mem_size_mib': 256",
            "400 PATCH /vm -> The requested operation is not supported before starting the microVM.",
            "400 -> Invalid request method and/or path: PATCH"],
    "many": ["exit codes: [0, 0, 0]"],
}


def doc_examples() -> dict[str, str]:
    blocks = re.findall(r"```python\n(# example: (\w+)\n.*?)```", DOCS.read_text(), re.S)
    return {name: code for code, name in blocks}


def test_every_docs_example_is_checked():
    assert sorted(doc_examples()) == sorted(EXAMPLE_OUTPUT)


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTPUT))
def test_docs_examples_run(name, test_guest, tmp_path):
    script = tmp_path / f"{name}.py"
    script.write_text(doc_examples()[name])
    proc = subprocess.run([sys.executable, str(script), str(test_guest.elf_pvh)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for expected in EXAMPLE_OUTPUT[name]:
        assert expected in proc.stdout, proc.stdout + proc.stderr
