"""The SDK (asyncvmm.client) driving a real asyncvmm process with the kvm-tier test guest:
boot over the API, console text, stdin, pause/resume, metrics, the boot timer, and the
exit code of a guest reset; a second VM configured from the first one's GET /vm/config."""

from __future__ import annotations

import re

import pytest

from asyncvmm.client import ConsoleTimeoutError, MicroVM

pytestmark = pytest.mark.kvm

TIMEOUT_S = 60


async def test_sdk_boots_pauses_reads_metrics_and_returns_0_after_a_guest_reset(test_guest):
    async with MicroVM(test_guest.elf_pvh, "serialecho=1 boottimer=1 exit=reset", vcpus=1, mem_mib=64,
                       vm_id="sdk0", level="Info", boot_timer=True) as vm:
        await vm.wait_for_console("testguest: serialecho ready", timeout=TIMEOUT_S)
        info = await vm.client.describe_instance()
        assert (info["id"], info["state"]) == ("sdk0", "Running")
        assert (await vm.client.get_machine_configuration())["mem_size_mib"] == 64
        entry = await vm.wait_for_console(re.compile(r"boot entry=(\w+)"), timeout=TIMEOUT_S)
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
