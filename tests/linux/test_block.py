"""virtio-block with a Debian guest (issue 5, acceptance point 3).

* A Writeback root on ``/dev/vda`` survives SIGKILL of the VMM: what the guest
  wrote and ``sync``ed is in the ext4 image afterwards, read on the host with
  e2fsprogs (``e2fsck`` replays the journal as the next mount would, then
  ``debugfs`` reads the files; nothing is mounted).  The guest's ``sync`` must
  have reached the device as a FLUSH (metrics ``flush_count``).
* ``PATCH /drives/<id>`` with a file of another size: the guest gets the
  config-change interrupt and sees the new capacity and the new file's data.
* An ops rate limiter paces direct 4 KiB reads, proven by the device's own
  counters (``--metrics-path`` and ``FlushMetrics``), not by a time window
  (timing belongs to benchmarks/).  The limited drive's bucket holds
  :data:`SMALL_OPS` ops and refills them every :data:`REFILL_MS` ms -- a token
  per 500 ms, far slower than a direct read even inside the emulated KVM host
  (~10 ms) -- so of :data:`READS` back-to-back reads (``dd iflag=direct``,
  one request each) the first come from the full bucket and the rest must be
  put back and resumed by the throttle timer: ``rate_limiter_throttled_events``
  counts them and ``rate_limiter_event_count`` counts one resumption each,
  while every read completes (``read_count``).  An unthrottled drive shows
  no throttling for the same reads.  ``PATCH /drives`` to a bucket larger than
  the workload stops the throttling (the counters stay at 0), and a PATCH back
  to a one-op bucket starts it again -- so the PATCH changed the rate the
  device applies, in both directions.
"""

from __future__ import annotations

import hashlib
import json
import os
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

SMALL_OPS = 2                      # the limited drive's bucket: 2 ops ...
REFILL_MS = 1000                   # ... per second: a token every 500 ms
READS = 8                          # direct 4 KiB reads per step
LARGE_OPS = 1000                   # a bucket the workload cannot empty


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

def direct_reads(guest, dev: str, count: int) -> None:
    """``count`` direct 4 KiB reads, one request each, back to back."""
    out = guest.run(f"dd if={dev} of=/dev/null bs=4k count={count} iflag=direct", timeout=120).check().output
    assert f"{count}+0 records in" in out, out


def ops_bucket(ops: int, refill_ms: int = REFILL_MS) -> dict:
    return {"ops": {"size": ops, "refill_time": refill_ms}}


class BlockCounters:
    """The drives' counters since the last call, summed over every metrics line written meanwhile
    (FlushMetrics writes one; the periodic writer may have written others in between)."""

    def __init__(self, sock: Path, path: Path) -> None:
        self.sock, self.path = sock, path
        self.seen = 0
        self.take()

    def take(self) -> dict[str, dict[str, int]]:
        status, body = api(self.sock, "PUT", "/actions", {"action_type": "FlushMetrics"})
        assert status == 204, body
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        new, self.seen = lines[self.seen:], len(lines)
        assert new, f"FlushMetrics wrote no line to {self.path}"
        out: dict[str, dict[str, int]] = {}
        for line in new:
            for group, values in line.items():
                if group.startswith("block_"):
                    sums = out.setdefault(group, {})
                    for key, value in values.items():
                        sums[key] = sums.get(key, 0) + value
        return out


def test_ops_rate_limit_throttles_reads_by_its_counters_and_patch_changes_it(guests, guest_images, tmp_path):
    sock = tmp_path / "api.sock"
    metrics = tmp_path / "metrics.json"
    plain = sparse_file(tmp_path / "plain.img", 8 << 20)
    limited = sparse_file(tmp_path / "limited.img", 8 << 20)
    spec = with_drives(default_spec(guest_images, tmp_path),
                       DriveSpec(plain, "plain", read_only=True),
                       DriveSpec(limited, "limited", read_only=True, rate_limiter=ops_bucket(SMALL_OPS)))
    guest = guests.start(ApiLauncher(sock, extra_args=["--metrics-path", str(metrics)]), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    plain_dev, limited_dev = device_of(guest, "plain"), device_of(guest, "limited")
    counters = BlockCounters(sock, metrics)          # boot-time I/O (partition scans) left behind

    def step(dev: str, drive: str) -> dict[str, int]:
        direct_reads(guest, dev, READS)
        got = counters.take()[f"block_{drive}"]
        print(f"ops-limit: {drive}: {READS} reads -> read_count {got['read_count']}, throttled "
              f"{got['rate_limiter_throttled_events']}, resumed {got['rate_limiter_event_count']}")
        assert got["read_count"] >= READS, got                       # every read was answered
        # Refused requests were resumed by the throttle timer (a timer fires for one or more refusals).
        throttled, resumed = got["rate_limiter_throttled_events"], got["rate_limiter_event_count"]
        assert (resumed >= 1) == (throttled >= 1) and resumed <= throttled, got
        return got

    assert step(plain_dev, "plain")["rate_limiter_throttled_events"] == 0
    # The bucket starts full (SMALL_OPS reads pass); the others find it empty.
    got = step(limited_dev, "limited")
    assert 1 <= got["rate_limiter_throttled_events"] <= got["read_count"] - SMALL_OPS, got

    status, body = api(sock, "PATCH", "/drives/limited", {"drive_id": "limited",
                                                          "rate_limiter": ops_bucket(LARGE_OPS)})
    assert status == 204, body
    counters.take()                                  # the new bucket's counting starts here
    assert step(limited_dev, "limited")["rate_limiter_throttled_events"] == 0

    status, body = api(sock, "PATCH", "/drives/limited", {"drive_id": "limited",
                                                          "rate_limiter": ops_bucket(1)})
    assert status == 204, body
    counters.take()
    got = step(limited_dev, "limited")
    assert 1 <= got["rate_limiter_throttled_events"] <= got["read_count"] - 1, got
    assert guest.stop() == 0, guest.tail()
