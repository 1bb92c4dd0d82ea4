"""Memory hotplug (virtio-mem) with a Debian guest (issue 17, memory hotplug part).

One guest per transport (virtio-mmio, and virtio-pci with ``--enable-pci``,
where the configuration change arrives on its MSI-X vector), each with 256 MiB
of boot memory and 512 MiB hotpluggable in 2 MiB blocks and 128 MiB slots,
carries the whole story, since every boot costs minutes inside the emulated
KVM host.  The guest's command line has
``memhp_default_state=online_movable`` (docs/memory-hotplug.md says why):

* The guest's ``virtio_mem`` driver binds the device; ``GET /hotplug/memory``
  reports the configuration with nothing plugged.
* Plug: ``PATCH /hotplug/memory`` to 512 MiB; the driver plugs until
  ``plugged_size_mib`` reaches it and the guest's ``MemTotal`` grows by about
  that much.
* Use: the guest writes more than its boot memory could hold into a tmpfs
  file, so hotplugged blocks become resident in the VMM process, and deletes
  it.
* Unplug: ``PATCH`` back to 0; ``plugged_size_mib`` drops (to 0, or as far as
  the guest could free), ``MemTotal`` shrinks by what was unplugged, and the
  VMM's RSS drops: the unplugged blocks went back to the host.
* A requested size that is not a multiple of the block size is refused with
  Firecracker's message.
* Snapshot (virtio-mmio guest): plugged again and a tmpfs file written over
  the hotplugged memory, the paused microVM is snapshotted and its process
  killed; a fresh process loads the snapshot: the file reads back the same,
  ``GET`` and ``MemTotal`` are as before, and the restored guest unplugs
  again (the region is mapped from the memory file there).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.linux.api import ApiLauncher, api, wait_for_api
from tests.linux.harness import AsyncVmmLauncher, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MEM_MIB = 256
TOTAL_MIB = 512
FILL_MIB = 400
SNAP_MIB = 256
SNAP_FILE_MIB = 300
MiB = 1 << 20


class HotplugLauncher(ApiLauncher):
    """asyncvmm with ``memory-hotplug`` in its config file (PUT /hotplug/memory is pre-boot only)."""

    def __init__(self, sock: Path, hotplug: dict, extra_args: list[str] | None = None) -> None:
        super().__init__(sock, extra_args=extra_args)
        self.hotplug = hotplug

    def config(self, spec):  # an instance method over the classmethod: argv calls self.config
        config = super().config(spec)
        config["memory-hotplug"] = self.hotplug
        return config


class RestoreLauncher(AsyncVmmLauncher):
    """A fresh asyncvmm with only the API socket (a snapshot load needs a fresh process)."""

    name = "asyncvmm-restored"

    def __init__(self, sock: Path) -> None:
        super().__init__()
        self.sock = sock

    def argv(self, spec, workdir):
        return [sys.executable, "-m", "asyncvmm.cli", "--api-sock", str(self.sock)]


def vmm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def mem_total(guest) -> int:
    out = guest.run("grep MemTotal /proc/meminfo").check().output
    return int(out.split()[1]) * 1024


def status(sock) -> dict:
    code, body = api(sock, "GET", "/hotplug/memory")
    assert code == 200, body
    return json.loads(body)


def patch(sock, requested_mib: int) -> tuple[int, str]:
    return api(sock, "PATCH", "/hotplug/memory", {"requested_size_mib": requested_mib})


def wait_plugged(sock, guest, done, what: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = status(sock)
        if done(got["plugged_size_mib"]):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"plugged size never got {what}: {got}; console:\n{guest.tail()}")
        time.sleep(1)


@pytest.mark.parametrize("pci", [False, True], ids=["virtio-mmio", "virtio-pci"])
def test_memory_hotplug_grows_and_shrinks_the_guest_and_gives_memory_back(guests, guest_images, tmp_path, pci):
    sock = tmp_path / "api.sock"
    hotplug = {"total_size_mib": TOTAL_MIB, "block_size_mib": 2, "slot_size_mib": 128}
    spec = default_spec(guest_images, tmp_path, mem_mib=MEM_MIB, extra_args="memhp_default_state=online_movable")
    if pci:      # the tier's base arguments without pci=off
        spec = replace(spec, boot_args=" ".join(w for w in spec.boot_args.split() if w != "pci=off"))
    guest = guests.start(HotplugLauncher(sock, hotplug, ["--enable-pci"] if pci else None), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    bound = guest.run("ls /sys/bus/virtio/drivers/virtio_mem/").check().output
    assert "virtio" in bound, f"virtio_mem bound to nothing: {bound!r}; console:\n{guest.tail()}"
    if pci:                                       # the device is a virtio-pci function (1af4:1058)
        found = guest.run("cat /sys/bus/pci/devices/*/device").check().output.split()
        assert "0x1058" in found, found
    assert status(sock) == {"block_size_mib": 2, "total_size_mib": TOTAL_MIB, "slot_size_mib": 128,
                            "plugged_size_mib": 0, "requested_size_mib": 0}

    # Firecracker's refusal of a size that is not whole blocks.
    code, body = patch(sock, 3)
    assert code == 400
    assert json.loads(body)["fault_message"] == (
        "Memory hotplug update error: Failed to create memory hotplug device: Size 3145728 is invalid: "
        "it must be a multiple of block size and less than the total size")

    total_boot = mem_total(guest)
    code, body = patch(sock, TOTAL_MIB)
    assert code == 204, body
    got = wait_plugged(sock, guest, lambda mib: mib == TOTAL_MIB, f"to {TOTAL_MIB} MiB")
    assert got["requested_size_mib"] == TOTAL_MIB
    deadline = time.monotonic() + 60
    while (total_plugged := mem_total(guest)) - total_boot < (TOTAL_MIB - 16) * MiB:
        assert time.monotonic() < deadline, (total_boot, total_plugged, guest.tail())
        time.sleep(1)
    print(f"memory hotplug ({'pci' if pci else 'mmio'}): MemTotal {total_boot / MiB:.0f} MiB -> {total_plugged / MiB:.0f} MiB")

    # More than boot memory could hold: hotplugged blocks become resident in the VMM.
    guest.run("mkdir -p /run/fill && mount -t tmpfs -o size=90% tmpfs /run/fill").check()
    guest.run(f"dd if=/dev/zero of=/run/fill/a bs=1M count={FILL_MIB} 2>/dev/null && rm /run/fill/a",
              timeout=240).check()
    rss_filled = vmm_rss(guest.pid)

    code, body = patch(sock, 0)
    assert code == 204, body
    # The guest unplugs what it can free; give it time, then take what it reached.
    deadline = time.monotonic() + 180
    while (got := status(sock))["plugged_size_mib"] > 0 and time.monotonic() < deadline:
        time.sleep(2)
    unplugged_mib = TOTAL_MIB - got["plugged_size_mib"]
    time.sleep(1)
    total_unplugged = mem_total(guest)
    rss_unplugged = vmm_rss(guest.pid)
    print(f"memory hotplug ({'pci' if pci else 'mmio'}): unplugged {unplugged_mib} MiB; MemTotal {total_plugged / MiB:.0f} -> "
          f"{total_unplugged / MiB:.0f} MiB; VMM RSS {rss_filled / MiB:.1f} -> {rss_unplugged / MiB:.1f} MiB")
    assert unplugged_mib >= TOTAL_MIB // 2, (got, guest.tail())
    assert total_plugged - total_unplugged >= (unplugged_mib - 16) * MiB, (total_plugged, total_unplugged)
    assert rss_filled - rss_unplugged >= min(unplugged_mib, FILL_MIB - MEM_MIB) * MiB // 2, (
        rss_filled, rss_unplugged)
    if pci:
        assert guest.stop() == 0, guest.tail()
        return

    # A snapshot with hotplugged memory in use, loaded by a fresh process.
    assert patch(sock, SNAP_MIB)[0] == 204
    wait_plugged(sock, guest, lambda mib: mib == SNAP_MIB, f"to {SNAP_MIB} MiB")
    deadline = time.monotonic() + 60
    while mem_total(guest) - total_unplugged < (SNAP_MIB - 16) * MiB:
        assert time.monotonic() < deadline, guest.tail()
        time.sleep(1)
    total_before = mem_total(guest)
    digest = guest.run(f"dd if=/dev/zero bs=1M count={SNAP_FILE_MIB} 2>/dev/null | tr '\\0' h > /run/fill/b "
                       "&& md5sum /run/fill/b", timeout=240).check().output.split()[0]
    status_before = status(sock)
    assert api(sock, "PATCH", "/vm", {"state": "Paused"})[0] == 204
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    code, body = api(sock, "PUT", "/snapshot/create",
                     {"snapshot_type": "Full", "snapshot_path": str(snap), "mem_file_path": str(mem)})
    assert code == 204, body
    code, body = api(sock, "PUT", "/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": str(snap),
                                                       "mem_file_path": str(tmp_path / "diff.mem")})
    assert code == 400, body
    guest.kill()
    assert mem.stat().st_size == (MEM_MIB + TOTAL_MIB) * MiB          # the region follows RAM

    sock2 = tmp_path / "api2.sock"
    second = guests.start(RestoreLauncher(sock2), spec)
    wait_for_api(sock2, second)
    code, body = api(sock2, "PUT", "/snapshot/load", {
        "snapshot_path": str(snap), "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
        "resume_vm": True})
    assert code == 204, body
    second._echo_off = True          # the guest's shell is the same one: echo is still off
    assert status(sock2) == status_before
    assert second.run("md5sum /run/fill/b", timeout=120).check().output.split()[0] == digest
    assert mem_total(second) == total_before
    second.run("rm /run/fill/b").check()
    assert patch(sock2, 0)[0] == 204
    got = wait_plugged(sock2, second, lambda mib: mib <= SNAP_MIB // 2, "down after the restore")
    print(f"memory hotplug: restored guest unplugged to {got['plugged_size_mib']} MiB")
    assert mem_total(second) < total_before
    assert second.stop() == 0, second.tail()
