"""virtio-balloon with a Debian guest (issue 12, balloon part).

One guest (256 MiB, ``deflate_on_oom``, statistics every second) carries the
whole story, since every boot costs minutes inside the emulated KVM host:

* The guest's ``virtio_balloon`` driver binds the device.
* Fill: the guest writes nearly all its free memory into a tmpfs file and
  deletes it, so its free pages are resident in the VMM process.  Then
  ``PATCH /balloon`` inflates by :data:`INFLATE_MIB`: the guest reports the
  new size (statistics' ``actual_mib``) and the VMM's RSS (``VmRSS`` of the
  process, read on the host) drops by about that much -- the inflated pages
  went back to the host.
* Statistics agree with the guest's ``/proc/meminfo`` (``MemTotal`` exactly,
  ``MemFree`` within a tolerance: the guest keeps running between the two
  readings).
* A target larger than guest memory is refused with Firecracker's message.
* ``deflate_on_oom``: with the balloon inflated so that less is available
  than a guest program then writes into a tmpfs file (no swap, so only the
  balloon can give that memory), the write succeeds and the balloon's actual
  size drops below its target.
* ``PATCH /balloon`` back to 0 deflates the balloon completely.
* Free page hinting: after another fill and free, a hinting run
  (``/balloon/hinting/start``) ends with the guest's STOP acknowledged by
  DONE, and the hinted free pages left the VMM's RSS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.linux.api import ApiLauncher, api, wait_for_api
from tests.linux.harness import default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MEM_MIB = 256
INFLATE_MIB = 64
MiB = 1 << 20


class BalloonLauncher(ApiLauncher):
    """asyncvmm with a ``balloon`` in its config file (PUT /balloon is pre-boot only)."""

    def __init__(self, sock: Path, balloon: dict) -> None:
        super().__init__(sock)
        self.balloon = balloon

    def config(self, spec):  # an instance method over the classmethod: argv calls self.config
        config = super().config(spec)
        config["balloon"] = self.balloon
        return config


def vmm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def meminfo(guest) -> dict[str, int]:
    out = guest.run("cat /proc/meminfo").check().output
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def stats(sock) -> dict:
    status, body = api(sock, "GET", "/balloon/statistics")
    assert status == 200, body
    return json.loads(body)


def wait_actual(sock, guest, done, what: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        got = stats(sock)
        if done(got["actual_mib"]):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"balloon never got {what}: {got}; console:\n{guest.tail()}")
        time.sleep(1)


def fill_and_free(guest) -> int:
    """Write nearly all free guest memory into tmpfs and delete it: those pages are now resident in the VMM."""
    fill_mib = meminfo(guest)["MemFree"] // MiB - 24
    guest.run(f"dd if=/dev/zero of=/run/fill/a bs=1M count={fill_mib} 2>/dev/null; rm /run/fill/a",
              timeout=240).check()
    return fill_mib


def patch_target(sock, amount_mib: int) -> None:
    status, body = api(sock, "PATCH", "/balloon", {"amount_mib": amount_mib})
    assert status == 204, body


def test_balloon_gives_memory_back_reports_statistics_and_deflates_on_oom(guests, guest_images, tmp_path):
    sock = tmp_path / "api.sock"
    balloon = {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 1, "free_page_hinting": True}
    spec = default_spec(guest_images, tmp_path, mem_mib=MEM_MIB)
    guest = guests.start(BalloonLauncher(sock, balloon), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    bound = guest.run("ls /sys/bus/virtio/drivers/virtio_balloon/").check().output
    assert "virtio" in bound, f"virtio_balloon bound to nothing: {bound!r}"

    guest.run("mkdir -p /run/fill && mount -t tmpfs -o size=95% tmpfs /run/fill").check()
    fill_mib = fill_and_free(guest)
    rss_filled = vmm_rss(guest.pid)

    patch_target(sock, INFLATE_MIB)
    got = wait_actual(sock, guest, lambda mib: mib >= INFLATE_MIB, f"to {INFLATE_MIB} MiB")
    assert got["target_mib"] == INFLATE_MIB
    time.sleep(1)
    rss_inflated = vmm_rss(guest.pid)
    print(f"balloon: filled {fill_mib} MiB; VMM RSS {rss_filled / MiB:.1f} MiB -> {rss_inflated / MiB:.1f} MiB "
          f"after inflating {INFLATE_MIB} MiB")
    assert rss_filled - rss_inflated >= INFLATE_MIB * MiB * 3 // 4, (rss_filled, rss_inflated)

    # Statistics agree with the guest's own view (the device's copy is at most a poll old).
    time.sleep(3)
    info = meminfo(guest)
    got = stats(sock)
    print(f"balloon: stats {got}; meminfo MemTotal {info['MemTotal']} MemFree {info['MemFree']}")
    assert got["total_memory"] == info["MemTotal"], (got, info)
    assert abs(got["free_memory"] - info["MemFree"]) <= 16 * MiB, (got, info)
    assert abs(got["available_memory"] - info["MemAvailable"]) <= 16 * MiB, (got, info)

    # Bad input answers Firecracker's message and changes nothing.
    status, body = api(sock, "PATCH", "/balloon", {"amount_mib": MEM_MIB + 1})
    assert status == 400
    assert json.loads(body)["fault_message"] == (
        f"Balloon update error: Balloon: Requested memory should be less than {MEM_MIB + 1}MiB")
    assert stats(sock)["target_mib"] == INFLATE_MIB

    # deflate_on_oom: inflate until little is available, then need more than that.
    patch_target(sock, MEM_MIB - 64)
    wait_actual(sock, guest, lambda mib: mib >= MEM_MIB - 140, "most of the way to its target")
    time.sleep(3)                                    # let inflation settle
    before = stats(sock)["actual_mib"]
    available = meminfo(guest)["MemAvailable"] // MiB
    need = available + 48
    out = guest.run(f"dd if=/dev/zero of=/run/fill/b bs=1M count={need} 2>/dev/null && ls -l /run/fill/b",
                    timeout=240)
    print(f"balloon: actual {before} MiB, available {available} MiB, wrote {need} MiB: {out.status}")
    assert out.status == 0, out.output
    after = stats(sock)["actual_mib"]            # read while the file still holds the memory
    assert after < before, (before, after)
    guest.run("rm /run/fill/b").check()

    # And back to nothing: the guest takes every page back.
    patch_target(sock, 0)
    wait_actual(sock, guest, lambda mib: mib == 0, "back to 0")

    # Free page hinting: the guest hands its free blocks over for the run, the device gives them back.
    fill_and_free(guest)
    rss_filled = vmm_rss(guest.pid)
    status, body = api(sock, "PATCH", "/balloon/hinting/start", {"acknowledge_on_stop": True})
    assert status == 204, body
    deadline = time.monotonic() + 180
    while True:
        status, body = api(sock, "GET", "/balloon/hinting/status")
        assert status == 200, body
        hinting = json.loads(body)
        if hinting == {"host_cmd": 1, "guest_cmd": 0}:          # the guest's STOP, answered with DONE
            break
        assert time.monotonic() < deadline, f"hinting run did not finish: {hinting}; console:\n{guest.tail()}"
        time.sleep(1)
    rss_hinted = vmm_rss(guest.pid)
    print(f"balloon: hinting run: VMM RSS {rss_filled / MiB:.1f} MiB -> {rss_hinted / MiB:.1f} MiB")
    assert rss_filled - rss_hinted >= 32 * MiB, (rss_filled, rss_hinted)
    # The hinted pages are the guest's again.
    guest.run("dd if=/dev/zero of=/run/fill/c bs=1M count=32 2>/dev/null && rm /run/fill/c").check()
    assert guest.stop() == 0, guest.tail()
