"""A VM configured only through the REST API: boot, pause (the vCPUs really stop), resume, and a
start that fails for lack of memory leaves the VM configurable.

The requests go through the SDK (asyncvmm.client), whose typed calls return ``None`` only for
a 204 and raise ``ApiError`` (status, ``fault_message``) for anything else."""

from __future__ import annotations

import asyncio

import pytest

from asyncvmm.client import ApiError, MicroVM
from tests.kvm.conftest import asyncvmm_argv

pytestmark = pytest.mark.kvm


@pytest.fixture
async def vmm(test_guest):
    async with MicroVM(binary=asyncvmm_argv(), level="Info", start=False) as vm:
        yield vm


async def test_api_only_boot_pause_stops_the_guest_and_resume_continues(vmm, test_guest):
    api = vmm.client
    assert await api.put_machine_configuration(vcpu_count=1, mem_size_mib=64) is None          # 204
    assert await api.put_guest_boot_source(kernel_image_path=test_guest.elf_pvh,
                                           boot_args="serialecho=1 exit=halt") is None
    assert await api.start_instance() is None
    await vmm.wait_for_console("testguest: hello")
    assert await api.pause() is None
    assert (await api.describe_instance())["state"] == "Paused"
    # The UART still takes the bytes, but a paused vCPU cannot echo them.
    await vmm.write_console(b"while-paused\n")
    await asyncio.sleep(1.0)
    assert "echo:while-paused" not in vmm.console.text
    assert await api.resume() is None
    assert (await api.describe_instance())["state"] == "Running"
    await vmm.wait_for_console("echo:while-paused")


async def test_a_guest_too_large_to_map_fails_start_and_the_vm_stays_configurable(vmm, test_guest):
    api = vmm.client
    assert await api.put_guest_boot_source(kernel_image_path=test_guest.elf_pvh, boot_args="exit=halt") is None
    assert await api.put_machine_configuration(vcpu_count=1, mem_size_mib=1 << 30) is None     # 1 PiB
    with pytest.raises(ApiError) as err:
        await api.start_instance()
    assert err.value.status == 400
    assert "memory" in err.value.fault_message
    assert (await api.describe_instance())["state"] == "Not started"
    assert await api.put_machine_configuration(vcpu_count=1, mem_size_mib=64) is None
    assert await api.start_instance() is None
    await vmm.wait_for_console("testguest: done")
    assert (await api.describe_instance())["state"] == "Running"
