"""virtio-block with a Debian guest (issue 5, acceptance point 3).

* A Writeback root on ``/dev/vda`` survives SIGKILL of the VMM: what the guest
  wrote and ``sync``ed is in the ext4 image afterwards, read on the host with
  e2fsprogs (``e2fsck`` replays the journal as the next mount would, then
  ``debugfs`` reads the files; nothing is mounted).  The guest's ``sync`` must
  have reached the device as a FLUSH (metrics ``flush_count``).
* ``PATCH /drives/<id>`` with a file of another size: the guest gets the
  config-change interrupt and sees the new capacity and the new file's data.
* An ops rate limiter paces direct 4 KiB reads.  The issue asks for 100 ops
  per 100 ms making 1000 reads take 0.7-1.3 s.  That is only a test of the
  limiter if the unthrottled reads are clearly faster than the limit, which
  they are not inside the emulated KVM host (every request is a nested exit
  into a Python VMM).  So the test first times the same 1000 reads on an
  unthrottled drive; if they take more than 0.35 s it scales the bucket down
  to ``S`` ops per 100 ms with ``10*S`` reads so that the unthrottled time of
  the scaled workload is at most 0.35 s, keeps the expected time (~0.9 s: the
  bucket starts full) and asserts the same 0.7-1.3 s window.  With the issue's
  bucket the limiter comes from the config file; a scaled bucket is set by
  ``PATCH /drives`` after boot.  Either way a second PATCH then halves the rate
  (the same bucket refilled every 200 ms) for about half as many reads, which
  the same window must show: at the old rate those reads would take ~0.45 s.
  Measured in the emulated host: 1000 unthrottled reads 8.5-12.9 s, so the
  bucket used there was 2-4 ops per 100 ms.  The test prints which bucket it used
  (``ops-limit: mode=issue|scaled ...``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import signal
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import require
from tests.linux.api import ApiLauncher, api, metrics_delta, wait_for_api
from tests.linux.harness import DriveSpec, VmSpec, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"

ISSUE_OPS_PER_100MS = 100          # the issue's bucket: 100 ops per 100 ms ...
ISSUE_READS = 1000                 # ... and 1000 direct 4 KiB reads
COMFORT_S = 0.35                   # unthrottled reads must take at most this for the limit to be what is timed
WINDOW_S = (0.7, 1.3)


def e2fs_tool(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    require(path is not None, f"{name} (e2fsprogs) is needed to read the guest's ext4 image")
    return path


def sparse_file(path: Path, size: int, markers: dict[int, bytes] = {}) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in markers.items():
            f.seek(offset)
            f.write(data)
    return path


def device_of(guest, drive_id: str) -> str:
    """``/dev/vdX`` of the drive whose virtio-blk serial (GET_ID) is ``drive_id``."""
    out = guest.run(f"for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = {drive_id} ] && "
                    f"echo /dev/${{d##*/}}; done; true").check().output.split()
    assert len(out) == 1, f"drive {drive_id!r}: {out}"
    return out[0]


def with_drives(spec: VmSpec, *drives: DriveSpec, root: dict | None = None) -> VmSpec:
    root_drive = replace(spec.drives[0], **(root or {}))
    return replace(spec, drives=[root_drive, *drives])


# --------------------------------------------------------------------------- (a) SIGKILL

@pytest.mark.parametrize("io_engine", ["Sync", "Async"])
def test_writeback_root_keeps_synced_data_when_the_vmm_is_sigkilled(guests, guest_images, tmp_path,
                                                                     io_engine):
    e2fsck, debugfs = e2fs_tool("e2fsck"), e2fs_tool("debugfs")
    sock, metrics = tmp_path / "api.sock", tmp_path / "metrics.json"
    spec = with_drives(default_spec(guest_images, tmp_path, writable_root=True),
                       root={"cache_type": "Writeback", "io_engine": io_engine})
    image = spec.drives[0].path
    guest = guests.start(ApiLauncher(sock, extra_args=["--metrics-path", str(metrics)]), spec)
    guest.wait_for(r"asyncvmm-guest: root /dev/vda mounted \(ext4, rw\)", BOOT_TIMEOUT)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    # Writeback offers VIRTIO_BLK_F_FLUSH, so the guest block layer runs a volatile write cache.
    assert guest.run("cat /sys/block/vda/queue/write_cache").check().output.strip() == "write back"

    token = secrets.token_hex(16)
    metrics_delta(sock, metrics)   # everything up to now; the next line counts only what follows
    out = guest.run(f"dd if=/dev/urandom of=/avm-sigkill.bin bs=64k count=16 2>/dev/null && "
                    f"echo {token} > /avm-sigkill.txt && sync && md5sum /avm-sigkill.bin").check().output
    guest_md5 = out.split()[0]
    block = metrics_delta(sock, metrics)["block_rootfs"]
    assert block["write_count"] >= 1 and block["flush_count"] >= 1, block

    os.kill(guest.pid, signal.SIGKILL)
    assert guest.wait_exit(30) == -signal.SIGKILL

    # The next mount would replay the journal; e2fsck does the same without mounting.
    fsck = subprocess.run([e2fsck, "-fy", str(image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), f"e2fsck -fy exited {fsck.returncode}:\n{fsck.stdout}{fsck.stderr}"
    clean = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    assert clean.returncode == 0, f"not clean after journal replay:\n{clean.stdout}{clean.stderr}"
    text = subprocess.run([debugfs, "-R", "cat /avm-sigkill.txt", str(image)],
                          capture_output=True, text=True, check=True).stdout
    assert text.strip() == token
    dumped = tmp_path / "avm-sigkill.bin"
    subprocess.run([debugfs, "-R", f"dump /avm-sigkill.bin {dumped}", str(image)],
                   capture_output=True, check=True)
    assert dumped.stat().st_size == 16 * 65536
    assert hashlib.md5(dumped.read_bytes()).hexdigest() == guest_md5


# --------------------------------------------------------------------------- (b) PATCH swap

OLD_SIZE, NEW_SIZE = 8 << 20, 24 << 20
TAIL_OFFSET = 20 << 20      # beyond the old size: only readable once the new capacity is seen


def read_marker(guest, dev: str, offset: int) -> str:
    cmd = f"dd if={dev} bs=4096 count=1 skip={offset // 4096} iflag=direct 2>/dev/null | head -c 40 | tr -d '\\000'"
    return guest.run(cmd).check().output.strip()


def test_patch_drive_path_swaps_the_disk_and_the_guest_sees_the_new_size(guests, guest_images, tmp_path):
    sock = tmp_path / "api.sock"
    token = secrets.token_hex(8)
    old = sparse_file(tmp_path / "old.img", OLD_SIZE, {0: f"OLD-{token}".encode()})
    new = sparse_file(tmp_path / "new.img", NEW_SIZE,
                      {0: f"NEW-{token}".encode(), TAIL_OFFSET: f"TAIL-{token}".encode()})
    spec = with_drives(default_spec(guest_images, tmp_path), DriveSpec(old, "scratch", read_only=True))
    guest = guests.start(ApiLauncher(sock), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    dev = device_of(guest, "scratch")
    name = dev.removeprefix("/dev/")
    assert guest.run(f"cat /sys/block/{name}/size").check().output.strip() == str(OLD_SIZE // 512)
    assert read_marker(guest, dev, 0) == f"OLD-{token}"
    # KERN_INFO to the console, so the kernel's capacity message is a marker to wait for.
    guest.run("dmesg -n 7").check()

    status, body = api(sock, "PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": str(new)})
    assert status == 204, body
    guest.wait_for(rf"{name}: detected capacity change from {OLD_SIZE // 512} to {NEW_SIZE // 512}", 60)
    guest.run("dmesg -n 4").check()
    assert guest.run(f"cat /sys/block/{name}/size").check().output.strip() == str(NEW_SIZE // 512)
    assert read_marker(guest, dev, 0) == f"NEW-{token}"
    assert read_marker(guest, dev, TAIL_OFFSET) == f"TAIL-{token}"
    assert guest.stop() == 0, guest.tail()


# --------------------------------------------------------------------------- (c) ops rate limit

def timed_reads(guest, dev: str, count: int) -> float:
    """The guest's own time for ``count`` direct 4 KiB reads (``/proc/uptime``: 10 ms steps)."""
    out = guest.run(f"read a _ < /proc/uptime; dd if={dev} of=/dev/null bs=4k count={count} iflag=direct "
                    f"2>/tmp/dd.err; s=$?; read b _ < /proc/uptime; echo \"elapsed $a $b\"; cat /tmp/dd.err; "
                    f"exit $s", timeout=120).check().output
    assert f"{count}+0 records in" in out, out
    a, b = re.search(r"elapsed ([\d.]+) ([\d.]+)", out).groups()
    return float(b) - float(a)


def ops_bucket(ops: int, refill_ms: int = 100) -> dict:
    return {"ops": {"size": ops, "refill_time": refill_ms}}


def test_ops_rate_limit_paces_direct_reads_and_patch_changes_the_rate(guests, guest_images, tmp_path):
    sock = tmp_path / "api.sock"
    plain = sparse_file(tmp_path / "plain.img", 8 << 20)
    limited = sparse_file(tmp_path / "limited.img", 8 << 20)
    spec = with_drives(default_spec(guest_images, tmp_path),
                       DriveSpec(plain, "plain", read_only=True),
                       DriveSpec(limited, "limited", read_only=True,
                                 rate_limiter=ops_bucket(ISSUE_OPS_PER_100MS)))
    guest = guests.start(ApiLauncher(sock), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    plain_dev, limited_dev = device_of(guest, "plain"), device_of(guest, "limited")

    # The slower of two runs: the machine is shared, so be conservative about the headroom.
    unthrottled = max(timed_reads(guest, plain_dev, ISSUE_READS) for _ in range(2))
    if unthrottled <= COMFORT_S:
        mode, ops = "issue", ISSUE_OPS_PER_100MS           # the config file's bucket, untouched
    else:
        mode, ops = "scaled", int(ISSUE_OPS_PER_100MS * COMFORT_S / unthrottled)
        assert ops >= 1, f"{ISSUE_READS} unthrottled reads took {unthrottled:.2f} s: too slow to time a limit"
        status, body = api(sock, "PATCH", "/drives/limited", {"drive_id": "limited",
                                                              "rate_limiter": ops_bucket(ops)})
        assert status == 204, body
    elapsed = timed_reads(guest, limited_dev, 10 * ops)

    # Half the rate: the same bucket refilled every 200 ms.  The first `ops` reads come from the
    # full bucket, the rest at 5*ops per second: ~0.9 s (1.0 s for ops=1); at the old rate ~0.45 s.
    slow_reads = 5 * ops + (ops + 1) // 2
    status, body = api(sock, "PATCH", "/drives/limited",
                       {"drive_id": "limited", "rate_limiter": ops_bucket(ops, refill_ms=200)})
    assert status == 204, body
    elapsed_half = timed_reads(guest, limited_dev, slow_reads)
    summary = (f"ops-limit: mode={mode} unthrottled {ISSUE_READS} reads {unthrottled:.2f} s; "
               f"{ops} ops/100 ms: {10 * ops} reads {elapsed:.2f} s; "
               f"after PATCH {ops} ops/200 ms: {slow_reads} reads {elapsed_half:.2f} s")
    print(summary)
    assert WINDOW_S[0] <= elapsed <= WINDOW_S[1], summary
    assert WINDOW_S[0] <= elapsed_half <= WINDOW_S[1], summary
    assert guest.stop() == 0, guest.tail()
