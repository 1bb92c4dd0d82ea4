"""virtio-blk and virtio-rng driven by the test guest's polling drivers on the local /dev/kvm.

The guest reaches the devices through the virtio-mmio windows the builder
placed, with queue notifications going through KVM ioeventfds and used-ring
interrupts through irqfds, exactly the production path.
"""

from __future__ import annotations

import os
import zlib

import pytest

from tests.conftest import require
from tests.guest.output import find, parse_lines
from tests.kvm.conftest import ApiProcess, guest_config, run_vmm

pytestmark = pytest.mark.kvm

SECTOR = 512


def drive(path, drive_id="disk0", **kw):
    d = {"drive_id": drive_id, "path_on_host": str(path), "is_root_device": False, "is_read_only": False}
    d.update(kw)
    return d


def _interrupt_exits(test_guest, tmp_path, drive: dict, reads: int) -> tuple[int, int]:
    """(MMIO read exits, MMIO write exits) of a boot doing ``reads`` one-sector reads, each
    waited for and its interrupt acknowledged (InterruptStatus read, written to InterruptACK)."""
    metrics = tmp_path / f"{drive['drive_id']}-{reads}-metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        vmm.configure([
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": "blk=read:0:1 " * reads + "exit=halt"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", f"/drives/{drive['drive_id']}", drive),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ])
        vmm.wait_output("testguest: exit halt", timeout=240)
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    done = find(parse_lines(vmm.output()), "blk read")
    assert len(done) == reads and all(r.number("status") == 0 for r in done), vmm.output()
    return (sum(r["vcpu"]["exit_mmio_read"] for r in reports),
            sum(r["vcpu"]["exit_mmio_write"] for r in reports))


def check_acks_stay_in_kvm(test_guest, tmp_path, drive: dict, n: int = 20) -> None:
    """n more acknowledged requests cost no more exits, read or write: the guest reads
    InterruptStatus from the read-only register page (virtio-mmio ``attach_register_page``)
    and KVM completes the ACK of the used-buffer bit (``_let_kvm_ack_vring``)."""
    reads_1, writes_1 = _interrupt_exits(test_guest, tmp_path, drive, n)
    reads_2, writes_2 = _interrupt_exits(test_guest, tmp_path, drive, 2 * n)
    assert reads_2 - reads_1 < n // 4, (reads_1, reads_2)
    assert writes_2 - writes_1 < n // 4, (writes_1, writes_2)


def test_kvm_completes_the_guests_interrupt_acks(test_guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(64 * SECTOR))
    check_acks_stay_in_kvm(test_guest, tmp_path, drive(disk))


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
        vmm.configure(steps)
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


# -- io_uring: Async drives ------------------------------------------------------

def require_io_uring() -> None:
    from asyncvmm.devices.virtio.block.uring import why_io_uring_unavailable
    why = why_io_uring_unavailable()
    require(why is None, f"io_uring is not available on this host: {why}")


def block_totals(reports: list[dict], drive_id: str) -> dict[str, int]:
    """A drive's counters summed over every metrics line (each line holds deltas)."""
    totals: dict[str, int] = {}
    for report in reports:
        for name, value in report.get(f"block_{drive_id}", {}).items():
            totals[name] = totals.get(name, 0) + value
    return totals


def boot_with_drives(vmm: ApiProcess, kernel, boot_args: str, drives: list[dict], metrics, mem_mib=64):
    steps = [("PUT", "/metrics", {"metrics_path": str(metrics)}),
             ("PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": boot_args}),
             ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})]
    steps += [("PUT", f"/drives/{d['drive_id']}", d) for d in drives]
    steps.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    vmm.configure(steps)


def test_io_uring_serves_async_drives_and_only_them(test_guest, tmp_path):
    """One Sync and one Async drive in the same VM, the same requests on each: the Async
    drive's io_uring_count is every read, write and flush it answered, the Sync drive's 0."""
    require_io_uring()
    disks = {name: tmp_path / f"{name}.img" for name in ("sync", "async")}
    for path in disks.values():
        path.write_bytes(bytes(256 * SECTOR))
    per_drive = "blk=write:3:0x5a:4 blk=flush blk=read:3:4 blk=id blk=write:9:0x11:130"
    boot_args = f"blkdev=0 {per_drive} blkdev=1 {per_drive} exit=halt"
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        boot_with_drives(vmm, test_guest.elf_pvh, boot_args, [
            drive(disks["sync"], "sync", io_engine="Sync", cache_type="Writeback"),
            drive(disks["async"], "async", io_engine="Async", cache_type="Writeback")], metrics)
        vmm.wait_output("testguest: exit halt")
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    lines = parse_lines(vmm.output())
    statuses = [ln.number("status") for ln in find(lines, "blk write") + find(lines, "blk flush")
                + find(lines, "blk read") + find(lines, "blk id")]
    assert len(statuses) == 2 * 6 and set(statuses) == {0}, vmm.output()   # 130 sectors: two writes
    for path in disks.values():
        data = path.read_bytes()
        assert data[3 * SECTOR:7 * SECTOR] == b"\x5a" * (4 * SECTOR)
        assert data[9 * SECTOR:139 * SECTOR] == b"\x11" * (130 * SECTOR)
    sync, async_ = block_totals(reports, "sync"), block_totals(reports, "async")
    for counts in (sync, async_):
        assert (counts["write_count"], counts["flush_count"], counts["read_count"]) == (3, 1, 1), counts
    assert sync["io_uring_count"] == 0
    assert async_["io_uring_count"] == 5              # GET_ID is answered by the device itself
    assert sync["execute_fails"] == async_["execute_fails"] == 0


BLOCK, DEPTH, ROUNDS = 1024 * 1024, 32, 2


def test_reset_with_async_reads_in_flight_leaves_the_vmm_healthy(test_guest, tmp_path):
    """The guest publishes 32 reads of 1 MiB of a file that is not in the page cache, resets
    the device as soon as it has taken them all, and watches its memory: nothing may change
    after the reset.  Every read the device took but did not answer was finished by the kernel
    before the reset completed (the guest sees its buffer filled), and the counters agree
    with what the guest saw.  The device then works again."""
    require_io_uring()
    disk = tmp_path / "cold.img"
    disk.write_bytes(os.urandom(ROUNDS * DEPTH * BLOCK))
    fd = os.open(disk, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # cold: reads go to the disk
    finally:
        os.close(fd)
    rounds = " ".join(f"blkreset={BLOCK}:{DEPTH}:{r * DEPTH}" for r in range(ROUNDS))
    boot_args = f"{rounds} blk=write:0:0x5a:8 blk=read:0:8 exit=halt"
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path)
    try:
        boot_with_drives(vmm, test_guest.elf_pvh, boot_args,
                         [drive(disk, io_engine="Async")], metrics)
        vmm.wait_output("testguest: exit halt", timeout=120)
        assert vmm.proc.poll() is None
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    lines = parse_lines(vmm.output())
    done = find(lines, "blkreset done")
    assert len(done) == ROUNDS, vmm.output()
    assert [d.number("late") for d in done] == [0] * ROUNDS, [d.text for d in done]
    for d in done:
        assert 0 <= d.number("answered") <= d.number("filled") <= DEPTH, d.text
    answered = sum(d.number("answered") for d in done)
    unanswered_but_read = sum(d.number("filled") - d.number("answered") for d in done)
    write, = find(lines, "blk write")
    read, = find(lines, "blk read")
    assert write.number("status") == read.number("status") == 0
    assert read.number("crc") == zlib.crc32(b"\x5a" * (8 * SECTOR))
    counts = block_totals(reports, "disk0")
    # Requests were in flight at some reset, and each of them is counted as discarded.
    assert unanswered_but_read >= 1, [d.text for d in done]
    assert counts["discarded_reqs_count"] == unanswered_but_read, (counts, [d.text for d in done])
    assert counts["io_uring_count"] == answered + 2, counts
    assert counts["read_count"] == answered + 1 and counts["write_count"] == 1, counts
    assert counts["execute_fails"] == counts["event_fails"] == 0, counts
    log = vmm.log.read_text()
    assert "Traceback" not in log and "needs reset" not in log, log


def test_async_drive_is_refused_on_a_host_without_io_uring(test_guest, tmp_path):
    """Under a seccomp filter that fails io_uring_setup (as a kernel without io_uring does),
    PUT /drives with io_engine Async answers 400 naming io_uring, as Firecracker refuses
    it; nothing falls back quietly.  A Sync drive in the same process boots and works."""
    from tests.unit.devices.virtio.block import no_io_uring

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(16 * SECTOR))
    metrics = tmp_path / "metrics.json"
    vmm = ApiProcess(tmp_path, *no_io_uring.prefix())
    try:
        status, body = vmm("PUT", "/drives/fast", drive(disk, "fast", io_engine="Async"))
        assert status == 400, body
        assert "io_uring" in body["fault_message"] and "Async" in body["fault_message"], body
        assert "Function not implemented" in body["fault_message"], body
        status, body = vmm("GET", "/vm/config")
        assert status == 200 and body["drives"] == [], body             # nothing was kept
        boot_with_drives(vmm, test_guest.elf_pvh, "blk=write:1:0x77:1 blk=read:1:1 exit=halt",
                         [drive(disk, "slow", io_engine="Sync")], metrics)
        vmm.wait_output("testguest: exit halt")
    finally:
        vmm.close()
    lines = parse_lines(vmm.output())
    write, = find(lines, "blk write")
    read, = find(lines, "blk read")
    assert write.number("status") == read.number("status") == 0
    assert disk.read_bytes()[SECTOR:2 * SECTOR] == b"\x77" * SECTOR
