"""The test guest under QEMU microvm: proof that the guest itself is right.

QEMU is the peer: if a behaviour works here and not under asyncvmm, the bug is
in asyncvmm.  TCG always runs; the same runs on the local /dev/kvm (kvm_pvm)
are marked ``kvm``.
"""

from __future__ import annotations

import os
import zlib

import pytest

from tests.conftest import require
from tests.guest.output import cmdline, find, parse_lines
from tests.guest.qemu import microvm_argv, qemu_available, run_microvm

ACCELS = ["tcg", pytest.param("kvm", marks=pytest.mark.kvm)]
SECTOR = 512
GUEST_MAC = bytes.fromhex("525400123456")


@pytest.fixture(scope="module")
def images():
    require(qemu_available(), "qemu-system-x86_64 is not installed")
    from tests.guest.build import build_test_guest
    return build_test_guest()


def need_accel(accel: str) -> None:
    if accel == "kvm":
        require(os.access("/dev/kvm", os.R_OK | os.W_OK), "/dev/kvm is missing or not accessible")


def run(images, accel, cmd, *, kernel=None, **kw):
    need_accel(accel)
    result = run_microvm(microvm_argv(kernel or images.elf_pvh, cmd, accel=accel, **kw))
    lines = parse_lines(result.stdout)
    assert [l.event for l in lines][:1] == ["hello"], result.stdout + result.stderr
    assert lines[-1].event == "done", result.stdout + result.stderr
    return result, lines


@pytest.mark.parametrize("accel", ACCELS)
def test_pvh_boot_and_a_virtio_blk_round_trip(images, accel, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * SECTOR))
    result, lines = run(images, accel, "blk=write:3:0x5a:2 blk=flush blk=read:3:2 blk=read:0:1 "
                        "exit=poweroff", disk=disk)
    assert result.returncode == 0
    assert find(lines, "boot")[0].fields["entry"] == "pvh"
    assert "blk=write:3:0x5a:2" in cmdline(lines)
    write, = find(lines, "blk write")
    assert write.number("status") == 0 and write.number("count") == 2
    assert find(lines, "blk flush")[0].number("status") == 0
    back, zero = find(lines, "blk read")
    assert back.number("status") == 0 and back.fields["uniform"] == "1"
    assert back.number("crc") == zlib.crc32(b"\x5a" * 2 * SECTOR)
    assert zero.number("crc") == zlib.crc32(bytes(SECTOR))
    assert disk.read_bytes()[3 * SECTOR:5 * SECTOR] == b"\x5a" * 2 * SECTOR


def test_read_only_drive_reports_ioerr_and_its_serial(images, tmp_path):
    disk = tmp_path / "ro.img"
    disk.write_bytes(b"\x77" * 8 * SECTOR)
    _, lines = run(images, "tcg", "blk=id blk=write:0:0x11:1 blk=read:0:1 exit=poweroff", disk=disk,
                   disk_readonly=True, disk_serial="ro-disk-1")
    assert find(lines, "blk device")[0].fields["ro"] == "1"
    assert find(lines, "blk id")[0].fields["serial"] == "ro-disk-1"
    assert find(lines, "blk write")[0].number("status") == 1            # VIRTIO_BLK_S_IOERR
    assert find(lines, "blk read")[0].number("first") == 0x77
    assert disk.read_bytes() == b"\x77" * 8 * SECTOR


@pytest.mark.parametrize("accel", ACCELS)
def test_bzimage_boots_through_the_32_bit_protocol_and_starts_an_ap(images, accel):
    result, lines = run(images, accel, "cpus=2 exit=reset", kernel=images.bzimage, cpus=2)
    assert result.returncode == 0
    assert find(lines, "boot")[0].fields["entry"] == "linux32"
    assert find(lines, "madt")[0].number("cpus") == 2
    assert find(lines, "cpu 1 up")[0].number("apic") == 1
    assert find(lines, "smp")[0].number("up") == 2


def test_blkbench_keeps_requests_in_flight_and_reads_the_right_blocks(images, tmp_path):
    from benchmarks.block import Workload, expected_check
    disk = tmp_path / "bench.img"
    disk.write_bytes(os.urandom((1 << 20) + 3 * SECTOR))      # a partial block at the end
    works = [Workload("r", "randread", 4096, 300, 8), Workload("s", "seqread", 65536, 2 << 20, 3)]
    result, lines = run(images, "tcg", " ".join(w.token for w in works) + " blk=read:0:1 exit=poweroff",
                        disk=disk, disk_readonly=True)
    starts, dones = find(lines, "blkbench start"), find(lines, "blkbench done")
    assert len(starts) == len(dones) == 2, result.stdout
    fd = os.open(disk, os.O_RDONLY)
    try:
        for w, start, done in zip(works, starts, dones):
            assert start.number("queue_size") == 256 and start.number("event_idx") == 1
            assert start.number("blocks") == disk.stat().st_size // w.block
            assert (done.number("ops"), done.number("errors"), done.number("glitches")) == (w.ops, 0, 0)
            assert done.number("bytes") == w.ops * w.block and done.number("tsc") > 0
            assert done.number("check") == expected_check(fd, w, disk.stat().st_size)
    finally:
        os.close(fd)
    # the plain driver takes the device back with its own small queue
    back, = find(lines, "blk read")
    assert back.number("status") == 0 and back.number("crc") == zlib.crc32(disk.read_bytes()[:SECTOR])


@pytest.mark.kvm
def test_blkbench_under_kvm(images, tmp_path):
    from benchmarks.block import Workload, expected_check
    disk = tmp_path / "bench.img"
    disk.write_bytes(os.urandom(1 << 20))
    w = Workload("r", "randread", 4096, 500, 16)
    _, lines = run(images, "kvm", f"{w.token} exit=poweroff", disk=disk, disk_readonly=True)
    done, = find(lines, "blkbench done")
    fd = os.open(disk, os.O_RDONLY)
    try:
        assert done.number("check") == expected_check(fd, w, 1 << 20)
    finally:
        os.close(fd)
    assert (done.number("ops"), done.number("errors"), done.number("glitches")) == (500, 0, 0)


def test_blkbench_refuses_bad_arguments_and_small_devices(images, tmp_path):
    disk = tmp_path / "tiny.img"
    disk.write_bytes(bytes(2 * SECTOR))
    bad = ["randread:1000:10:1", "randread:4096:10:0", "randread:4096:10:65", "seqread:4096:5000:1",
           "writes:4096:1:1", "randread:4096:0:1", "randread:2097152:1:64", "randread:4096:10",
           "randread:4096:x:1"]
    cmd = " ".join(f"blkbench={a}" for a in bad) + " blkbench=randread:4096:1:1 exit=poweroff"
    _, lines = run(images, "tcg", cmd, disk=disk)
    errors = find(lines, "blkbench")
    assert [e.fields["error"] for e in errors] == ["bad-argument"] * len(bad) + ["device-too-small"]
    assert [e.fields.get("arg") for e in errors[:-1]] == bad
    assert not find(lines, "blkbench start")


def arp_request(sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    def ip(a):
        return bytes(int(x) for x in a.split("."))
    return (b"\xff" * 6 + sender_mac + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01"
            + sender_mac + ip(sender_ip) + bytes(6) + ip(target_ip))


def test_rng_and_an_arp_exchange_over_virtio_net(images):
    frame = arp_request(GUEST_MAC, "10.0.2.15", "10.0.2.2")
    _, lines = run(images, "tcg", f"rng=24 net=send:{frame.hex()} net=recv exit=poweroff",
                   rng=True, user_net=True)
    rng, = find(lines, "rng")
    assert rng.number("bytes") == 24 and len(rng.fields["hex"]) == 32
    assert find(lines, "net device")[0].fields["mac"] == GUEST_MAC.hex()
    assert find(lines, "net send")[0].number("len") == len(frame)
    reply = bytes.fromhex(find(lines, "net recv")[0].fields["frame"])
    assert reply[:6] == GUEST_MAC and reply[12:14] == b"\x08\x06"
    assert reply[20:22] == b"\x00\x02"                                   # ARP reply


def test_stdin_reaches_the_guest_uart(images):
    need_accel("tcg")
    result = run_microvm(microvm_argv(images.elf_pvh, "serialecho=1 exit=poweroff"),
                         stdin=b"ping-from-host\n")
    assert "echo:ping-from-host\n" in result.stdout
    assert parse_lines(result.stdout)[-1].event == "done"


@pytest.mark.parametrize("exit_mode", ["triplefault", "triplefault0", "reset", "poweroff"])
def test_every_exit_ends_the_vm(images, exit_mode):
    # -no-reboot turns a reset or triple fault into a QEMU exit; halt would hang.
    result, lines = run(images, "tcg", f"exit={exit_mode}")
    assert result.returncode == 0
    assert any(l.event.startswith(f"exit {exit_mode.rstrip('0')}") for l in lines)
    assert not any("failed" in l.text for l in lines)
