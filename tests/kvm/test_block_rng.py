"""virtio-blk and virtio-rng driven by the test guest's polling drivers on the local /dev/kvm.

The guest reaches the devices through the virtio-mmio windows the builder
placed, with queue notifications going through KVM ioeventfds and used-ring
interrupts through irqfds, exactly the production path.
"""

from __future__ import annotations

import zlib

import pytest

from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, guest_config, run_vmm

pytestmark = pytest.mark.kvm

SECTOR = 512


def drive(path, drive_id="disk0", **kw):
    d = {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": False, "is_read_only": False}
    d.update(kw)
    return d


@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_write_flush_read_back_and_host_file_holds_the_pattern(test_guest, tmp_path, io_engine):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * SECTOR))
    cfg = guest_config(test_guest.elf_pvh,
                       "blk=write:3:0x5a:4 blk=flush blk=read:3:4 blk=id exit=reset",
                       drives=[drive(disk, cache_type="Writeback", io_engine=io_engine)])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 0, run.all_output
    lines = parse_lines(run.stdout)
    write, = find(lines, "blk write")
    assert write.number("status") == 0
    flush, = find(lines, "blk flush")
    assert flush.number("status") == 0
    read, = find(lines, "blk read")
    assert read.number("status") == 0
    expected = bytes([0x5A]) * (4 * SECTOR)
    assert read.number("crc") == zlib.crc32(expected)
    blk_id, = find(lines, "blk id")
    assert "disk0" in blk_id.text
    data = disk.read_bytes()
    assert data[3 * SECTOR:7 * SECTOR] == expected
    assert data[:3 * SECTOR] == bytes(3 * SECTOR)


def test_read_only_drive_rejects_writes(test_guest, tmp_path):
    disk = tmp_path / "ro.img"
    disk.write_bytes(bytes([7]) * (16 * SECTOR))
    cfg = guest_config(test_guest.elf_pvh, "blk=write:0:0x11:1 blk=read:0:1 exit=reset",
                       drives=[drive(disk, is_read_only=True)])
    run = run_vmm(tmp_path, cfg)
    lines = parse_lines(run.stdout)
    write, = find(lines, "blk write")
    assert write.number("status") != 0           # VIRTIO_BLK_S_IOERR
    read, = find(lines, "blk read")
    assert read.number("status") == 0
    assert disk.read_bytes() == bytes([7]) * (16 * SECTOR)


def test_two_drives_are_independent(test_guest, tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(8 * SECTOR))
    b.write_bytes(bytes(8 * SECTOR))
    cfg = guest_config(test_guest.elf_pvh,
                       "blkdev=0 blk=write:0:0xaa:1 blkdev=1 blk=write:1:0xbb:1 exit=reset",
                       drives=[drive(a, "root", is_root_device=True), drive(b, "data")])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 0, run.all_output
    assert a.read_bytes()[:SECTOR] == bytes([0xAA]) * SECTOR
    assert b.read_bytes()[SECTOR:2 * SECTOR] == bytes([0xBB]) * SECTOR


RNG_READS, RNG_REQUEST = 8, 64


def test_rng_fills_buffers_with_random_bytes_from_the_device(test_guest, tmp_path):
    """The guest zeroes a buffer, asks virtio-rng to fill it, prints the count and the first
    16 bytes; eight such reads.  The bytes must look random and differ between reads, and the
    device's own counter must account for exactly the bytes the guest received."""
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        steps = [
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": " ".join([f"rng={RNG_REQUEST}"] * RNG_READS)
                                     + " exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/entropy", {}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]
        for method, path, body in steps:
            status, answer = vmm(method, path, body)
            assert status == 204, (path, answer)
        vmm.wait_output("testguest: exit halt")
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    reads = find(parse_lines(vmm.output()), "rng")
    assert len(reads) == RNG_READS, vmm.output()
    assert all(r.number("bytes") == RNG_REQUEST for r in reads), [r.text for r in reads]
    samples = [bytes.fromhex(r.fields["hex"]) for r in reads]
    assert all(len(s) == 16 for s in samples)
    # Every read differs from every other, and none is constant (all zero: nothing written).
    assert len(set(samples)) == RNG_READS, samples
    assert all(len(set(s)) > 1 for s in samples), samples
    # 1024 bits: the count of ones is Binomial(1024, 1/2), mean 512, sd 16; 6 sd either way.
    data = b"".join(samples)
    ones = sum(bin(b).count("1") for b in data)
    assert 416 <= ones <= 608, (ones, data.hex())
    # 128 draws from 256 values give ~101 distinct ones (sd ~5); a stuck or patterned source far fewer.
    assert len(set(data)) >= 75, data.hex()
    # The bytes came from the device: it counted exactly what the guest was given.
    assert sum(r["entropy"]["entropy_bytes"] for r in reports) == RNG_READS * RNG_REQUEST
    assert sum(r["entropy"]["entropy_event_fails"] for r in reports) == 0


@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_many_requests_in_flight_read_the_right_blocks_and_idx_never_goes_back(test_guest, tmp_path,
                                                                                 io_engine):
    """32 reads in flight on a 256-entry queue: every block's data is right (checksum) and the
    guest never saw the used index move backwards (``glitches``), which a non-atomic store of
    used->idx makes visible under load."""
    import os

    from benchmarks.block import Workload, expected_check

    disk = tmp_path / "bench.img"
    disk.write_bytes(os.urandom(4 << 20))
    work = Workload("rand", "randread", 4096, 3000, 32)
    cfg = guest_config(test_guest.elf_pvh, f"{work.token} exit=reset",
                       drives=[drive(disk, io_engine=io_engine)])
    run = run_vmm(tmp_path, cfg)
    assert run.returncode == 0, run.all_output
    done, = find(parse_lines(run.stdout), "blkbench done")
    assert done.number("errors") == 0
    assert done.number("ops") == work.ops
    assert done.number("glitches") == 0
    with open(disk, "rb") as f:
        assert done.number("check") == expected_check(f.fileno(), work, disk.stat().st_size)
