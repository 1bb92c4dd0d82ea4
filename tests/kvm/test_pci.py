"""virtio over PCI (``--enable-pci``) on the local /dev/kvm, driven by the test guest's PCI driver.

The guest (``tests/guest/pci.c``) does what a PCI-aware kernel does, from ring 3
and by polling: it lists bus 0 through ECAM, walks a virtio function's
capabilities, turns on memory decode of BAR0, initialises the device through
the common configuration structure and kicks its queue at the notify address
(an ioeventfd: no VM exit).  Beyond plain I/O it moves BAR0 (the VMM must move
the MMIO mapping and the ioeventfds with it) and programs BAR0 over its own RAM
(the VMM must refuse that mapping, say so once in its log and carry on).

The last test runs the same guest commands under QEMU's q35 machine, the peer:
if they work there and not under asyncvmm, the bug is in asyncvmm.
"""

from __future__ import annotations

import os
import subprocess
import zlib

import pytest

from asyncvmm.arch.x86_64 import layout
from tests.conftest import require
from tests.guest.output import find, parse_lines
from tests.guest.qemu import QEMU, qemu_available
from tests.kvm.conftest import ApiProcess, guest_config, run_vmm, wait_until

SECTOR = 512
MEM_MIB = 64
MMIO64_START, MMIO64_SIZE = layout.pci_mmio64_window(MEM_MIB << 20)
BAR0_SIZE = 0x8000                       # docs: the virtio-pci transport's BAR0
# The layout inside BAR0 the transport advertises (cfg_type -> offset), and notify_off_multiplier.
CAP_OFFSETS = {1: 0x0000, 3: 0x1000, 4: 0x2000, 2: 0x3000}
NOTIFY_OFF_MULTIPLIER = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
PCI_CAP_ID_MSIX = 0x11
VIRTIO_F_VERSION_1 = 1 << 32
KICKS = 2000


def pci_config(kernel, cmdline: str, **extra) -> dict:
    return guest_config(kernel, cmdline, mem_mib=MEM_MIB, **extra)


def drive(path) -> dict:
    return {"drive_id": "disk0", "path_on_host": str(path), "is_root_device": False,
            "is_read_only": True}


def functions(lines) -> dict[int, dict[str, int]]:
    return {l.number("dev"): {k: l.number(k) for k in ("vendor", "device", "class")}
            for l in find(lines, "pci fn")}


def init_line(lines, dev: str):
    found = [l for l in find(lines, "pci virtio init") if l.fields["dev"] == dev]
    assert len(found) == 1, [l.text for l in lines]
    return found[0]


def api_run(tmp_path, kernel, cmdline: str, *, done: str = "testguest: exit halt",
            extra_steps=()) -> tuple[ApiProcess, list, list[dict]]:
    """Boot through the API with --enable-pci and virtio-rng; wait for ``done``, flush metrics.

    The process is returned still running (the caller closes it)."""
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path, args=("--enable-pci",))
    try:
        vmm.configure([
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": cmdline}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
            ("PUT", "/entropy", {}),
            *extra_steps,
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        vmm.wait_output(done, timeout=120)
        reports = vmm.flush_metrics(metrics)
    except BaseException:
        vmm.close()
        raise
    return vmm, parse_lines(vmm.output()), reports


def summed(reports: list[dict], group: str) -> dict[str, int]:
    return {k: sum(r[group][k] for r in reports) for k in reports[-1][group]}


@pytest.mark.kvm
def test_bus_0_lists_the_host_bridge_and_virtio_functions_with_their_capabilities(test_guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * SECTOR))
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, "pci-rng=16 exit=reset", entropy={},
                                       drives=[drive(disk)]), "--enable-pci")
    assert run.returncode == 0, run.all_output
    lines = parse_lines(run.stdout)
    fns = functions(lines)
    assert fns[0] == {"vendor": 0x8086, "device": 0x0D57, "class": 0x060000}, fns
    virtio = sorted((f["device"], f["class"]) for dev, f in fns.items() if f["vendor"] == 0x1AF4)
    assert virtio == [(0x1042, 0x018000), (0x1044, 0xFF0000)], fns
    assert find(lines, "pci bus")[0].number("functions") == 3

    rng_dev = next(dev for dev, f in fns.items() if f["device"] == 0x1044)
    caps = [l for l in find(lines, "pci cap") if l.number("dev") == rng_dev]
    vendor = {l.number("cfg_type"): l for l in caps if l.number("id") == 0x09}
    assert set(vendor) == {1, 2, 3, 4, VIRTIO_PCI_CAP_PCI_CFG}, [l.text for l in caps]
    assert all(l.number("bar") == 0 for t, l in vendor.items() if t != VIRTIO_PCI_CAP_PCI_CFG)
    assert {t: vendor[t].number("offset") for t in CAP_OFFSETS} == CAP_OFFSETS
    assert vendor[2].number("notify_off_multiplier") == NOTIFY_OFF_MULTIPLIER
    assert any(l.number("id") == PCI_CAP_ID_MSIX for l in caps)

    init = init_line(lines, "rng")
    bar = init.number("bar")
    assert init.number("bar_index") == 0 and init.number("bar_size") == BAR0_SIZE
    assert MMIO64_START <= bar and bar + BAR0_SIZE <= MMIO64_START + MMIO64_SIZE and bar % BAR0_SIZE == 0
    assert init.number("features") == VIRTIO_F_VERSION_1 and init.number("status") == 0xF
    assert init.number("notify") == bar + CAP_OFFSETS[2]     # queue 0: queue_notify_off 0
    rng, = find(lines, "pci rng")
    assert rng.number("bytes") == 16 and bytes.fromhex(rng.fields["hex"]) != bytes(16)


@pytest.mark.kvm
def test_virtio_blk_over_pci_reads_sector_0_of_the_file(test_guest, tmp_path):
    disk = tmp_path / "disk.img"
    data = os.urandom(16 * SECTOR)
    disk.write_bytes(data)
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, "pci-blk=0 pci-blk=5 exit=reset",
                                       drives=[drive(disk)]), "--enable-pci")
    assert run.returncode == 0, run.all_output
    reads = find(parse_lines(run.stdout), "pci blk")
    assert [r.number("sector") for r in reads] == [0, 5], run.stdout
    for r in reads:
        sector = data[r.number("sector") * SECTOR:][:SECTOR]
        assert r.number("status") == 0 and r.number("used") == SECTOR + 1
        assert r.number("capacity") == 16
        assert r.number("crc") == zlib.crc32(sector)
        assert r.fields["hex"] == sector[:16].hex()


@pytest.mark.kvm
def test_virtio_rng_over_pci_through_the_api(test_guest, tmp_path):
    vmm, lines, reports = api_run(tmp_path, test_guest.elf_pvh, "pci-rng=64 pci-rng=64 pci-rng=64 exit=halt")
    vmm.close()
    reads = find(lines, "pci rng")
    assert [r.number("bytes") for r in reads] == [64] * 3, vmm.output()
    samples = {bytes.fromhex(r.fields["hex"]) for r in reads}
    assert len(samples) == 3 and bytes(16) not in samples, samples
    assert len({r.number("crc") for r in reads}) == 3
    # 4.1.4.5: with MSI-X off the device sets the queue-interrupt bit of ISR for each used buffer.
    assert [r.number("isr") for r in reads] == [1] * 3
    assert summed(reports, "entropy")["entropy_bytes"] == 3 * 64
    # A driver that keeps to the spec makes no guest fault of any kind.
    faults = summed(reports, "guest_faults")
    assert not any(faults.values()), faults


@pytest.mark.kvm
# Both inside the guest's page tables (the 3..4 GiB gap; the first GiB of the 64-bit window).
@pytest.mark.parametrize("target, how", [(MMIO64_START + 0x1000_0000, ""), (layout.PCI_MMIO32_START, ""),
                                         (layout.PCI_MMIO32_START, ":live")],
                         ids=["mmio64", "mmio32", "mmio32-decode-on"])
def test_moving_bar0_moves_the_mapping_and_the_notify_ioeventfd(test_guest, tmp_path, target, how):
    """After the move the old base answers all ones, the device works at the new one, kicks
    at the new notify address are ioeventfd writes (no VM exit) and kicks at the old one
    reach nobody (each one an unclaimed MMIO write).  ``:live`` writes the two BAR dwords with
    memory decode on, as a careless driver may: BAR0 passes through (new low | old high)."""
    vmm, lines, reports = api_run(
        tmp_path, test_guest.elf_pvh,
        f"pci-rng=16 pci-move={target:#x}:32{how} pci-kick=new:{KICKS} pci-kick=old:{KICKS} pci-rng=48 "
        "exit=halt")
    vmm.close()
    before, after_move, last = find(lines, "pci rng")
    move, = find(lines, "pci move")
    assert move.number("from") == before.number("bar") != target
    assert move.number("readback") == target, move.text
    assert move.number("old_num_queues") == 0xFFFF        # nothing decodes there: all ones
    assert move.number("new_num_queues") == 1
    assert after_move.number("bar") == target and after_move.number("bytes") == 32
    assert last.number("bar") == target and last.number("bytes") == 48
    assert bytes.fromhex(after_move.fields["hex"]) != bytes(16) != bytes.fromhex(last.fields["hex"])
    new, old = find(lines, "pci kick")
    assert new.number("notify") == target + CAP_OFFSETS[2]
    assert old.number("notify") == before.number("bar") + CAP_OFFSETS[2]

    faults = summed(reports, "guest_faults")
    writes = summed(reports, "vcpu")["exit_mmio_write"]
    # The old notify address: every kick exits and nobody claims it (plus the one old_num_queues read).
    assert KICKS <= faults["mmio_unclaimed"] <= KICKS + 1, faults
    # The new one: KVM swallows the kicks.  The guest's other MMIO writes (configuration space,
    # common config) are a few dozen, so a missing ioeventfd would show as KICKS more exits.
    assert KICKS <= writes < KICKS + KICKS // 4, writes
    assert faults["pci_bar"] == 0 and "guest fault pci_bar" not in vmm.log.read_text(errors="replace")


@pytest.mark.kvm
def test_bar0_over_guest_ram_is_not_mapped_and_the_vmm_carries_on(test_guest, tmp_path):
    vmm, lines, reports = api_run(tmp_path, test_guest.elf_pvh,
                                  "pci-rng=16 pci-bad-bar=0x100000 pci-rng=16 exit=halt")
    try:
        bad, = find(lines, "pci bad-bar")
        assert bad.number("addr") == 0x100000 and bad.number("readback") == 0x100000
        assert bad.number("ram_ok") == 1, "RAM under the BAR did not keep what the guest wrote"
        assert bad.number("crc_same") == 1, "RAM under the BAR changed"
        # The BAR went back home and the device works as before, twice (the action's own read, ours).
        first, *rest = find(lines, "pci rng")
        assert len(rest) == 2 and all(r.number("bar") == first.number("bar") for r in rest), vmm.output()
        assert all(r.number("bytes") == 16 for r in rest)
        log = vmm.log.read_text(errors="replace")
        faults = [l for l in log.splitlines() if "guest fault pci_bar" in l]
        assert len(faults) == 1 and "0x100000" in faults[0], faults
        assert summed(reports, "guest_faults")["pci_bar"] == 1
        # The VMM still answers its API.
        status, info = vmm("GET", "/")
        assert status == 200 and info["state"] == "Running", info
        status, _ = vmm("GET", "/machine-config")
        assert status == 200
    finally:
        vmm.close()


@pytest.mark.kvm
def test_bar0_over_another_devices_bar0_is_not_mapped(test_guest, tmp_path):
    disk = tmp_path / "disk.img"
    data = os.urandom(8 * SECTOR)
    disk.write_bytes(data)
    vmm, lines, reports = api_run(tmp_path, test_guest.elf_pvh,
                                  "pci-blk=0 pci-bad-bar=blk pci-blk=1 exit=halt",
                                  extra_steps=[("PUT", "/drives/disk0", drive(disk))])
    vmm.close()
    bad, = find(lines, "pci bad-bar")
    blk_bar = init_line(lines, "blk").number("bar")
    assert bad.number("addr") == bad.number("readback") == blk_bar
    # virtio-blk kept its BAR: both reads (before, after) are right; rng works back home.
    reads = find(lines, "pci blk")
    assert [r.number("crc") for r in reads] == [zlib.crc32(data[:SECTOR]), zlib.crc32(data[SECTOR:][:SECTOR])]
    rng, = find(lines, "pci rng")
    assert rng.number("bytes") == 16 and rng.number("bar") != blk_bar
    log = [l for l in vmm.log.read_text(errors="replace").splitlines() if "guest fault pci_bar" in l]
    assert len(log) == 1 and f"{blk_bar:#x}" in log[0], log
    assert summed(reports, "guest_faults")["pci_bar"] == 1


@pytest.mark.kvm
def test_a_driver_that_breaks_the_rules_is_ignored_counted_and_the_device_recovers(test_guest, tmp_path):
    """Wrong access sizes in configuration space, common config, notify area and MSI-X table; writes
    to read-only registers and the PBA; an absent queue; an enabled queue reconfigured; an MSI-X
    vector aimed at no local APIC; an invalid status transition.  Each is refused and counted; a reset and a fresh initialisation work."""
    vmm, lines, reports = api_run(tmp_path, test_guest.elf_pvh, "pci-hostile=1 pci-rng=16 exit=halt")
    try:
        hostile, = find(lines, "pci hostile")
        assert hostile.number("vendor") == 0x1AF4                # read-only
        assert hostile.number("absent_queue_size") == 0          # 4.1.4.3: 0 = no such queue
        assert hostile.number("desc_kept") == 1, hostile.text    # queue 0 is enabled: not reconfigured
        rngs = find(lines, "pci rng")
        assert [r.number("bytes") for r in rngs] == [16, 16], vmm.output()
        faults = summed(reports, "guest_faults")
        for kind in ("pci_config", "virtio_pci_access", "virtio_pci_protocol", "pci_msix", "virtio_config",
                     "msi_address"):
            assert faults[kind] >= 1, (kind, faults)
        assert faults["mmio_unclaimed"] == 0 and faults["other"] == 0, faults
        log = vmm.log.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
        status, info = vmm("GET", "/")
        assert status == 200 and info["state"] == "Running", info
    finally:
        vmm.close()


@pytest.mark.kvm
def test_msix_vectors_reach_the_local_apic_and_follow_mask_and_table_writes(test_guest, tmp_path):
    """Queue 0 on MSI-X vector 0 (fixed, to this CPU's local APIC); interrupts stay off, so a
    delivered message waits in the APIC's IRR, which the guest reads.  Masked: the pending bit
    is set and nothing arrives.  Unmasked: the pending message is sent.  Re-aimed at another
    vector (a table write, so a new GSI route): the next used buffer arrives there."""
    vmm, lines, reports = api_run(tmp_path, test_guest.elf_pvh, "pci-msix=0x40 pci-rng=16 exit=halt")
    vmm.close()
    msix, = find(lines, "pci msix")
    assert msix.number("entries") == 2                   # one queue + configuration changes
    assert msix.number("masked_pba") == 1 and msix.number("masked_irr") == 0, msix.text
    assert msix.number("unmasked_irr") == 1 and msix.number("unmasked_pba") == 0, msix.text
    assert msix.number("moved_irr") == 1, msix.text
    assert all(r.number("bytes") == 16 for r in find(lines, "pci rng"))
    faults = summed(reports, "guest_faults")
    assert not any(faults.values()), faults


@pytest.mark.kvm
def test_the_pci_cfg_capability_window_reaches_bar0(test_guest, tmp_path):
    """§4.1.4.9: through pci_cfg_data alone the guest reads num_queues, selects and reads the
    feature word holding VERSION_1, and kicks queue 0 for an entropy read."""
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, "pci-cfgwin=1 exit=reset", entropy={}),
                  "--enable-pci")
    assert run.returncode == 0, run.all_output
    lines = parse_lines(run.stdout)
    win, = find(lines, "pci cfgwin")
    assert win.number("num_queues") == 1
    assert win.number("df_hi") == win.number("df_hi_mmio") == VIRTIO_F_VERSION_1 >> 32, win.text
    assert win.number("kicked") == 1, run.stdout
    rng, = find(lines, "pci rng")
    assert rng.number("bytes") == 16 and bytes.fromhex(rng.fields["hex"]) != bytes(16)


@pytest.mark.kvm
def test_a_drive_patched_to_a_bigger_file_changes_capacity_generation_and_isr(test_guest, tmp_path):
    """PATCH /drives path_on_host: a configuration change (§4.1.4.3.1 config_generation moves,
    §4.1.4.5 ISR bit 1 with MSI-X off), and reads come from the new file."""
    small, big = tmp_path / "small.img", tmp_path / "big.img"
    small.write_bytes(os.urandom(8 * SECTOR))
    data = os.urandom(16 * SECTOR)
    big.write_bytes(data)
    vmm = ApiProcess(tmp_path, args=("--enable-pci",))
    try:
        vmm.configure([
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": "pci-blk=0 pci-blk-resize=1 pci-blk=12 exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
            ("PUT", "/drives/disk0", drive(small)),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        vmm.wait_output("testguest: pci blk-resize waiting")
        status, body = vmm("PATCH", "/drives/disk0", {"drive_id": "disk0", "path_on_host": str(big)})
        assert status == 204, body
        vmm.wait_output("testguest: exit halt", timeout=60)
    finally:
        vmm.close()
    lines = parse_lines(vmm.output())
    waiting, = find(lines, "pci blk-resize waiting")
    resized, = find(lines, "pci blk-resize")
    assert waiting.number("capacity") == 8 and resized.number("capacity") == 16, vmm.output()
    assert resized.number("generation") != waiting.number("generation")
    assert resized.number("isr") & 2, resized.text
    last = find(lines, "pci blk")[-1]
    assert last.number("sector") == 12 and last.number("status") == 0
    assert last.number("crc") == zlib.crc32(data[12 * SECTOR:13 * SECTOR])


@pytest.mark.kvm
def test_configuration_mechanism_1_ports_agree_with_ecam(test_guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8 * SECTOR))
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, "pci-cf8=1 exit=reset", entropy={},
                                       drives=[drive(disk)]), "--enable-pci")
    assert run.returncode == 0, run.all_output
    cf8, = find(parse_lines(run.stdout), "pci cf8")
    assert cf8.number("functions") == 3 and cf8.number("mismatches") == 0, cf8.text


@pytest.mark.kvm
def test_a_hot_plugged_drive_appears_on_bus_0_and_goes_away_when_unplugged(test_guest, tmp_path):
    """The guest rescans bus 0 until a virtio-blk function shows up (PUT /drives after boot), reads
    it, releases it and waits for it to go (DELETE), then the same for a second file."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    data = {first: os.urandom(8 * SECTOR), second: os.urandom(8 * SECTOR)}
    for path, content in data.items():
        path.write_bytes(content)
    cmd = ("pci-rng=16 pci-wait=blk:present pci-blk=0 pci-wait=blk:absent pci-wait=blk:present "
           "pci-blk=1 exit=halt")
    vmm = ApiProcess(tmp_path, args=("--enable-pci",))

    def guest_says(text: str, times: int = 1) -> None:
        wait_until(lambda: vmm.output().count(text) >= times and vmm.output().endswith("\n"), 60,
                   f"{text!r} x{times} on the console")

    try:
        vmm.configure([
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh), "boot_args": cmd}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
            ("PUT", "/entropy", {}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        guest_says("pci wait dev=blk for=present")
        status, body = vmm("PUT", "/drives/data", {**drive(first), "drive_id": "data"})
        assert status == 204, body
        guest_says("pci wait dev=blk for=absent")
        status, body = vmm("DELETE", "/drives/data")
        assert status == 204, body
        guest_says("pci wait dev=blk for=present", 2)
        status, body = vmm("PUT", "/drives/again", {**drive(second), "drive_id": "again"})
        assert status == 204, body
        vmm.wait_output("testguest: exit halt", timeout=60)
        lines = parse_lines(vmm.output())
        waits = [l for l in find(lines, "pci wait") if "found" in l.fields]
        assert [l.number("found") for l in waits] == [1, 0, 1], vmm.output()
        reads = find(lines, "pci blk")
        assert [(r.number("sector"), r.number("status")) for r in reads] == [(0, 0), (1, 0)], vmm.output()
        assert reads[0].number("crc") == zlib.crc32(data[first][:SECTOR])
        assert reads[1].number("crc") == zlib.crc32(data[second][SECTOR:2 * SECTOR])
        status, config = vmm("GET", "/vm/config")
        assert status == 200 and [d["drive_id"] for d in config["drives"]] == ["again"], config
    finally:
        vmm.close()


@pytest.mark.kvm
def test_a_restored_pci_microvm_keeps_its_moved_bar_and_its_device(test_guest, tmp_path):
    """Snapshot a guest whose rng BAR0 it moved, mid-count; load it in a new process (without the
    flag: the snapshot knows it has a PCI bus).  The restored guest finishes its count, then uses
    the device at the moved BAR (mapping and notify ioeventfd rebuilt from the restored
    configuration space), and sets MSI-X up afresh (new routes in the new process)."""
    target = MMIO64_START + 0x1000_0000
    cmd = (f"pci-rng=16 pci-move={target:#x}:16 count=60 pci-rng=32 pci-kick=new:{KICKS} "
           "pci-msix=0x50 exit=halt")
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    (tmp_path / "first").mkdir()
    first = ApiProcess(tmp_path / "first", args=("--enable-pci",))
    try:
        first.configure([
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh), "boot_args": cmd}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
            ("PUT", "/entropy", {}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        first.wait_output("testguest: count i=2")
        first.configure([
            ("PATCH", "/vm", {"state": "Paused"}),
            ("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)}),
        ])
    finally:
        first.close()
    before = parse_lines(first.output())
    assert not find(before, "exit halt"), "the guest finished before the snapshot: count longer"
    assert find(before, "pci move")[0].number("readback") == target

    (tmp_path / "second").mkdir()
    metrics = tmp_path / "second" / "metrics.json"
    second = ApiProcess(tmp_path / "second")
    try:
        second.configure([
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/snapshot/load", {"snapshot_path": str(snap), "resume_vm": True,
                                       "mem_backend": {"backend_type": "File", "backend_path": str(mem)}}),
        ])
        second.wait_output("testguest: exit halt", timeout=120)
        reports = second.flush_metrics(metrics)
    finally:
        second.close()
    after = parse_lines(second.output())
    assert not find(after, "hello"), "the restored guest rebooted"
    rngs = find(after, "pci rng")
    assert rngs and rngs[0].number("bytes") == 32 and rngs[0].number("bar") == target, second.output()
    assert bytes.fromhex(rngs[0].fields["hex"]) != bytes(16)
    msix, = find(after, "pci msix")
    assert [msix.number(k) for k in ("masked_pba", "masked_irr", "unmasked_irr", "unmasked_pba",
                                     "moved_irr")] == [1, 0, 1, 0, 1], msix.text
    # The kicks at the moved notify address were ioeventfd writes in the new process too.
    assert summed(reports, "vcpu")["exit_mmio_write"] < KICKS // 4
    faults = summed(reports, "guest_faults")
    assert not any(faults.values()), faults


@pytest.mark.kvm
def test_a_hot_plugged_drive_comes_back_in_its_slot_after_a_snapshot(test_guest, tmp_path):
    """The restored guest reads on with the slot, BAR and queue it set up before the snapshot."""
    disk = tmp_path / "disk.img"
    data = os.urandom(8 * SECTOR)
    disk.write_bytes(data)
    snap, mem = tmp_path / "vm.snap", tmp_path / "vm.mem"
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = ApiProcess(tmp_path / "first", args=("--enable-pci",))
    try:
        first.configure([
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": "pci-wait=blk:present pci-blk=0 count=60 pci-blk=1 exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        first.wait_output("testguest: pci wait dev=blk for=present")
        first.configure([("PUT", "/drives/data", {**drive(disk), "drive_id": "data"})])
        first.wait_output("testguest: count i=2")
        first.configure([
            ("PATCH", "/vm", {"state": "Paused"}),
            ("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)}),
        ])
    finally:
        first.close()
    second = ApiProcess(tmp_path / "second")
    try:
        second.configure([("PUT", "/snapshot/load", {
            "snapshot_path": str(snap), "resume_vm": True,
            "mem_backend": {"backend_type": "File", "backend_path": str(mem)}})])
        second.wait_output("testguest: exit halt", timeout=120)
        status, config = second("GET", "/vm/config")
        assert status == 200 and [d["drive_id"] for d in config["drives"]] == ["data"], config
    finally:
        second.close()
    read, = find(parse_lines(second.output()), "pci blk")
    assert read.number("sector") == 1 and read.number("status") == 0, second.output()
    assert read.number("crc") == zlib.crc32(data[SECTOR:2 * SECTOR])


# -- the peer ----------------------------------------------------------------------------

Q35_ECAM = 0xB000_0000


def test_the_same_commands_work_under_qemu_q35(tmp_path):
    """Modern-only virtio-rng-pci/virtio-blk-pci on q35 (SeaBIOS places BAR4 below 4 GiB); the
    guest moves the rng BAR into the gigabyte its page tables map at 256 GiB, as asyncvmm's
    window is there, and over its own RAM."""
    require(qemu_available(), "qemu-system-x86_64 is not installed")
    from tests.guest.build import build_test_guest
    images = build_test_guest()
    disk = tmp_path / "disk.img"
    data = os.urandom(8 * SECTOR)
    disk.write_bytes(data)
    target = MMIO64_START + 0x10_0000
    cmd = (f"pci_ecam={Q35_ECAM:#x} pci-rng=16 pci-blk=0 pci-move={target:#x}:32 pci-kick=new:10 "
           "pci-bad-bar=0x100000 pci-cf8=1 pci-msix=0x40 pci-hostile=1 pci-cfgwin=1 exit=reset")
    argv = [QEMU, "-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256M", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(images.bzimage), "-append", cmd,
            "-device", "virtio-rng-pci,disable-legacy=on",
            "-drive", f"id=d0,file={disk},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    out = subprocess.run(argv, capture_output=True, timeout=60, check=False).stdout.decode(errors="replace")
    lines = parse_lines(out)
    assert lines and lines[-1].event == "done", out
    assert not [l for l in lines if l.event.startswith("pci error")], out
    blk, = find(lines, "pci blk")
    assert blk.number("status") == 0 and blk.number("crc") == zlib.crc32(data[:SECTOR])
    move, = find(lines, "pci move")
    assert move.number("readback") == target and move.number("new_num_queues") == 1
    bad, = find(lines, "pci bad-bar")
    assert bad.number("ram_ok") == 1 and bad.number("crc_same") == 1
    rngs = find(lines, "pci rng")
    assert [r.number("bytes") for r in rngs] == [16, 32, 16, 16, 16, 16, 16], out
    assert rngs[1].number("bar") == target
    cf8, = find(lines, "pci cf8")     # function 0 of: host bridge, rng, blk, the ICH9 LPC bridge
    assert cf8.number("functions") == 4 and cf8.number("mismatches") == 0
    msix, = find(lines, "pci msix")
    assert [msix.number(k) for k in ("masked_pba", "masked_irr", "unmasked_irr", "unmasked_pba",
                                     "moved_irr")] == [1, 0, 1, 0, 1], msix.text
    hostile, = find(lines, "pci hostile")
    assert hostile.number("vendor") == 0x1AF4 and hostile.number("absent_queue_size") == 0
    win, = find(lines, "pci cfgwin")
    assert win.number("kicked") == 1 and win.number("df_hi") == win.number("df_hi_mmio")


# -- the block benchmark's loop over virtio-pci ------------------------------------

def check_blkbench(stdout: str, disk, works) -> None:
    from benchmarks.block import expected_check
    lines = parse_lines(stdout)
    assert not [l for l in lines if "error" in l.event], stdout
    starts, dones = find(lines, "blkbench start"), find(lines, "blkbench done")
    assert len(dones) == len(works), stdout
    with open(disk, "rb") as f:
        for start, done, work in zip(starts, dones, works):
            assert start.number("queue_size") == 256 and start.number("event_idx") == 1
            assert done.number("ops") == work.ops and done.number("errors") == 0
            assert done.number("glitches") == 0
            assert done.number("check") == expected_check(f.fileno(), work, disk.stat().st_size)


def blkbench_works():
    from benchmarks.block import Workload
    return [Workload("rand", "randread", 4096, 2000, 32), Workload("seq", "seqread", 65536, 4 << 20, 4)]


@pytest.mark.kvm
def test_blkbench_over_pci_keeps_requests_in_flight_and_reads_the_right_blocks(test_guest, tmp_path):
    """pci-blkbench: blkbench.c's loop on a 256-entry EVENT_IDX queue, kicked at the PCI notify
    address (an ioeventfd); the data checksum is the file's, and pci-blk still works afterwards."""
    disk = tmp_path / "bench.img"
    disk.write_bytes(os.urandom(1 << 20))
    works = blkbench_works()
    cmd = " ".join([*(w.pci_token for w in works), "pci-blkbench=randread:4096:100:1:ack", "pci-blk=3",
                    "exit=reset"])
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, cmd, drives=[drive(disk)]), "--enable-pci")
    assert run.returncode == 0, run.all_output
    from benchmarks.block import Workload
    check_blkbench(run.stdout, disk, works + [Workload("ack", "randread", 4096, 100, 1)])
    blk, = find(parse_lines(run.stdout), "pci blk")
    assert blk.number("status") == 0 and blk.number("crc") == zlib.crc32(disk.read_bytes()[3 * SECTOR:][:SECTOR])


@pytest.mark.kvm
def test_blkbench_over_pci_under_qemu_microvm_pcie(tmp_path):
    """The peer the block benchmark uses: QEMU microvm with pcie=on (ECAM 0xe0000000, BARs left
    unassigned, placed by the guest from pci_mmio=)."""
    require(qemu_available(), "qemu-system-x86_64 is not installed")
    require(os.access("/dev/kvm", os.R_OK | os.W_OK), "no /dev/kvm")
    from benchmarks.block import MICROVM_PCIE
    from tests.guest.build import build_test_guest
    images = build_test_guest()
    disk = tmp_path / "bench.img"
    disk.write_bytes(os.urandom(1 << 20))
    works = blkbench_works()
    cmd = " ".join([MICROVM_PCIE, *(w.pci_token for w in works), "exit=poweroff"])
    argv = [QEMU, "-M", "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,pcie=on",
            "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128M", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", str(images.elf_pvh), "-append", cmd,
            "-drive", f"id=d0,file={disk},format=raw,if=none,readonly=on",
            "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"]
    out = subprocess.run(argv, capture_output=True, timeout=60, check=False).stdout.decode(errors="replace")
    check_blkbench(out, disk, works)
    init = [l for l in find(parse_lines(out), "pci virtio init") if l.fields["dev"] == "blk"]
    assert init and init[0].number("bar") == 0xC000_0000 and init[0].number("bar_index") == 4
