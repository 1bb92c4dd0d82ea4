"""A vhost-user-blk drive (Firecracker's drive ``socket``) served by qemu-storage-daemon.

The test guest's own virtio-blk driver talks to the back end through the
rings in guest memory: kicks are KVM ioeventfds that qemu-storage-daemon
reads, completions its writes of the call eventfd.  The VMM only set it up
(docs/devices.md, "vhost-user block devices").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import zlib

import pytest

from tests.conftest import require
from tests.guest.output import find, parse_lines
from tests.kvm.conftest import asyncvmm_argv, guest_config, run_vmm
from tests.kvm.test_block_rng import check_acks_stay_in_kvm
from tests.kvm.test_pci import pci_config

pytestmark = pytest.mark.kvm

SECTOR = 512


@pytest.fixture
def qsd(tmp_path):
    """Start ``qemu-storage-daemon`` exporting an image as vhost-user-blk; returns its socket path."""
    exe = shutil.which("qemu-storage-daemon")
    require(exe is not None, "qemu-storage-daemon is not installed (Debian: qemu-system-common)")
    procs = []

    def start(image, name: str = "vu.sock", writable: bool = True) -> str:
        sock = str(tmp_path / name)
        proc = subprocess.Popen(
            [exe, "--blockdev", f"driver=file,node-name=f,filename={image}",
             "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},"
                         f"writable={'on' if writable else 'off'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
            time.sleep(0.02)
        start.proc = proc
        return sock

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def vu_drive(sock: str, drive_id: str = "vu", **kw) -> dict:
    return {"drive_id": drive_id, "socket": sock, "is_root_device": False, **kw}


def test_write_flush_and_read_back_through_the_back_end(test_guest, tmp_path, qsd):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes([0x33]) * (64 * SECTOR))
    sock = qsd(disk)
    cfg = guest_config(test_guest.elf_pvh,
                       "blk=read:10:2 blk=write:3:0x5a:4 blk=flush blk=read:3:4 exit=reset",
                       drives=[vu_drive(sock, cache_type="Writeback")])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 0, run.all_output
    lines = parse_lines(run.stdout)
    first, second = find(lines, "blk read")
    assert first.number("status") == 0 and first.number("crc") == zlib.crc32(bytes([0x33]) * 2 * SECTOR)
    assert find(lines, "blk write")[0].number("status") == 0
    assert find(lines, "blk flush")[0].number("status") == 0
    expected = bytes([0x5A]) * (4 * SECTOR)
    assert second.number("status") == 0 and second.number("crc") == zlib.crc32(expected)
    assert disk.read_bytes()[3 * SECTOR:7 * SECTOR] == expected       # the back end wrote the file
    assert "vhost-user back end" in run.log
    assert "vu: queue 0 completions signal the guest's irqfd directly" in run.log     # virtio-mmio too


def test_kvm_completes_the_guests_interrupt_acks_on_a_vhost_user_drive_too(test_guest, tmp_path, qsd):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * SECTOR))
    check_acks_stay_in_kvm(test_guest, tmp_path, vu_drive(qsd(image)))


def test_a_read_only_export_is_a_read_only_drive(test_guest, tmp_path, qsd):
    disk = tmp_path / "ro.img"
    disk.write_bytes(bytes([7]) * (16 * SECTOR))
    sock = qsd(disk, writable=False)
    cfg = guest_config(test_guest.elf_pvh, "blk=write:0:0x11:1 blk=read:0:1 exit=reset",
                       drives=[vu_drive(sock)])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 0, run.all_output
    lines = parse_lines(run.stdout)
    assert find(lines, "blk write")[0].number("status") != 0
    assert find(lines, "blk read")[0].number("status") == 0
    assert disk.read_bytes() == bytes([7]) * (16 * SECTOR)


def test_over_pci(test_guest, tmp_path, qsd):
    disk = tmp_path / "disk.img"
    data = os.urandom(16 * SECTOR)
    disk.write_bytes(data)
    sock = qsd(disk)
    run = run_vmm(tmp_path, pci_config(test_guest.elf_pvh, "pci-blk=0 pci-blk=5 exit=reset",
                                       drives=[vu_drive(sock)]), "--enable-pci")
    assert run.returncode == 0, run.all_output
    reads = find(parse_lines(run.stdout), "pci blk")
    assert [r.number("sector") for r in reads] == [0, 5], run.stdout
    for r in reads:
        assert r.number("status") == 0 and r.number("capacity") == 16
        assert r.number("crc") == zlib.crc32(data[r.number("sector") * SECTOR:][:SECTOR])


def test_a_socket_with_no_back_end_fails_the_configuration(test_guest, tmp_path):
    cfg = guest_config(test_guest.elf_pvh, "exit=reset", drives=[vu_drive(str(tmp_path / "nobody.sock"))])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 152, run.all_output
    assert ("Drive config error: Unable to create the virtio block device: Vhost user backend error: "
            "Vhost-user error: Failed to connect to UDS Unix stream: No such file or directory "
            "(os error 2)") in run.all_output


def test_a_back_end_killed_mid_run_costs_the_guest_an_io_error_not_the_vmm(test_guest, tmp_path, qsd):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * SECTOR))
    sock = qsd(disk)
    backend = qsd.proc
    cfg = tmp_path / "vm.json"
    import json
    cfg.write_text(json.dumps(guest_config(test_guest.elf_pvh, "blk=read:0:1 count=4 blk=read:1:1 exit=reset",
                                           drives=[vu_drive(sock)])))
    log = tmp_path / "vmm.log"
    log.touch()
    vmm = subprocess.Popen([*asyncvmm_argv(), "--no-api", "--config-file", str(cfg), "--level", "Info",
                            "--log-path", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = b""
        while b"count i=1" not in out:                 # the first read went through; kill the back end
            chunk = vmm.stdout.readline()
            assert chunk, out.decode(errors="replace") + vmm.stderr.read().decode(errors="replace")
            out += chunk
        backend.send_signal(signal.SIGKILL)
        rest, err = vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.wait()
    lines = parse_lines((out + rest).decode(errors="replace"))
    first, second = find(lines, "blk read")
    assert first.number("status") == 0
    assert second.number("status") == 1                # VIRTIO_BLK_S_IOERR, not a hang
    assert vmm.returncode == 0, err.decode(errors="replace")     # the VMM lived on to the guest's reset
    text = log.read_text()
    assert text.count("lost the back end") == 1, text
