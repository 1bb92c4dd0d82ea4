"""virtio-net on a tap with a Debian guest (issue 6, acceptance point 3: ping and rate limits).

Each test makes a network namespace with a tap in it (host side
172.16.0.1/30) and runs the VMM inside that namespace (``ip netns exec``, as
Firecracker's jailer does), so nothing touches the root namespace and
deleting the namespace removes the tap.  The guest configures ``eth0`` as
172.16.0.2/30 (``avm.ip=``).

The bandwidth test: the issue asks that a 10 MiB-per-100-ms bucket give a TCP
throughput within 10% of the limit.  A limit is only what is measured if the
path can carry more than it; inside the emulated KVM host the unthrottled TCP
path carries a few Mbit/s, far below the issue's 839 Mbit/s.  So the test
first measures unthrottled iperf3 throughput both ways, then applies (by
``PATCH /network-interfaces``, to rx and tx at once) the issue's bucket if
the slower direction carried at least 1.5x it, and otherwise a bucket of a
third of the slower direction's throughput; both directions must then land
within 10% of the applied limit.  It prints which (``net-limit: mode=issue|
scaled ...``).

The capacity is the *lowest* of three runs per direction.  In the emulated
host the VMM is CPU-bound per frame and the guest's TCP sizes its GSO frames
from its pacing rate, so one run may catch large frames (measured up to
37 Mbit/s guest to host) while a paced, throttled flow sends two-segment
frames that the same path carries at only 3-4 Mbit/s; a third of a lucky run
was once more than the path could carry.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import pytest

from asyncvmm_tools.hostvm.process import Child
from tests.conftest import require
from tests.linux.api import GUEST_MAC, ApiLauncher, api, host_network, wait_for_api
from tests.linux.harness import VmSpec, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"

ISSUE_BUCKET_BYTES = 10 << 20      # 10 MiB per 100 ms
REFILL_MS = 100
HEADROOM = 1.5                     # the issue's bucket only where the path carries 1.5x it
SCALE = 3                          # otherwise a third of what the path carried
CAPACITY_RUNS = 3                  # per direction; the lowest counts
TOLERANCE = 0.10
IPERF_PORT = 5201


@pytest.fixture
def net():
    with host_network() as n:
        yield n


def net_guest(guests, guest_images, tmp_path, net, sock):
    spec = default_spec(guest_images, tmp_path, extra_args=net.boot_args)
    spec = VmSpec(**{**spec.__dict__, "network_interfaces": [net.interface()]})
    guest = guests.start(ApiLauncher(sock, netns=net.ns), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    return guest


def ping_argv() -> list[str]:
    if shutil.which("ping"):
        return ["ping"]
    require(shutil.which("busybox") is not None, "needs ping or busybox on the host")
    return ["busybox", "ping"]


def test_guest_and_host_ping_each_other_over_the_tap(guests, guest_images, tmp_path, net):
    guest = net_guest(guests, guest_images, tmp_path, net, tmp_path / "api.sock")
    assert guest.run("cat /sys/class/net/eth0/address").check().output.strip() == GUEST_MAC.lower()
    out = guest.run(f"ping -c 3 -W 10 {net.host_ip}", timeout=90).check().output
    assert "3 packets received" in out, out
    r = subprocess.run(net.argv([*ping_argv(), "-c", "3", "-W", "10", net.guest_ip]),
                       capture_output=True, text=True, timeout=90)
    # busybox says "3 packets received", iputils "3 received".
    assert r.returncode == 0 and re.search(r"\b3 (packets )?received", r.stdout), r.stdout + r.stderr
    assert guest.stop() == 0, guest.tail()


# --------------------------------------------------------------------------- bandwidth

class HostProcess:
    """A host process in the test's namespace whose output can be waited for; killed on close."""

    def __init__(self, argv: list[str]) -> None:
        self._out: list[bytes] = []
        self._cond = threading.Condition()
        self.child = Child(argv, self._sink)

    def _sink(self, data: bytes) -> None:
        with self._cond:
            self._out.append(data)
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return b"".join(self._out).decode(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while text not in b"".join(self._out).decode(errors="replace"):
                left = deadline - time.monotonic()
                if left <= 0 or self.child.proc.poll() is not None:
                    raise AssertionError(f"no {text!r} from {self.child.proc.args}: {self.output}")
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        self.child.kill()


@pytest.fixture
def iperf_server(net):
    require(shutil.which("iperf3") is not None, "iperf3 is needed on the host side of the tap")
    server = HostProcess(net.argv(["iperf3", "-s", "--forceflush", "-B", net.host_ip, "-p", str(IPERF_PORT)]))
    try:
        server.wait_for("Server listening", 60)
        yield server
    finally:
        server.close()


UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def iperf(guest, host_ip: str, reverse: bool, seconds: int, omit: int) -> float:
    """TCP goodput in bits/s as the receiver counted it; ``reverse``: host to guest."""
    cmd = (f"iperf3 -c {host_ip} -p {IPERF_PORT} -t {seconds} -O {omit} {'-R' if reverse else ''} "
           f"> /tmp/iperf.out 2>&1; s=$?; grep -E 'sender|receiver' /tmp/iperf.out || cat /tmp/iperf.out; exit $s")
    out = guest.run(cmd, timeout=seconds + omit + 60).check().output
    m = re.search(r"([\d.]+) ([KMG]?)bits/sec.*receiver", out)
    assert m, out
    return float(m.group(1)) * UNITS[m.group(2)]


def mbits(runs: list[float]) -> str:
    return "/".join(f"{r / 1e6:.2f}" for r in runs)


def bandwidth(size: int) -> dict:
    return {"bandwidth": {"size": size, "refill_time": REFILL_MS}}


def test_bandwidth_rate_limit_holds_tcp_throughput_within_10_percent(guests, guest_images, tmp_path,
                                                                     net, iperf_server):
    sock = tmp_path / "api.sock"
    guest = net_guest(guests, guest_images, tmp_path, net, sock)
    ups, downs = [], []
    for _ in range(CAPACITY_RUNS):
        ups.append(iperf(guest, net.host_ip, reverse=False, seconds=4, omit=1))
        downs.append(iperf(guest, net.host_ip, reverse=True, seconds=4, omit=1))
    capacity = min(ups + downs)

    issue_bps = ISSUE_BUCKET_BYTES * 8 * 1000 / REFILL_MS
    if capacity >= HEADROOM * issue_bps:
        mode, size = "issue", ISSUE_BUCKET_BYTES
    else:
        mode, size = "scaled", int(capacity / SCALE / 8 * REFILL_MS / 1000)
    limit_bps = size * 8 * 1000 / REFILL_MS
    status, body = api(sock, "PATCH", "/network-interfaces/eth0",
                       {"iface_id": "eth0", "rx_rate_limiter": bandwidth(size), "tx_rate_limiter": bandwidth(size)})
    assert status == 204, body

    # Two seconds omitted: the bucket starts full and TCP is in slow start.
    tx = iperf(guest, net.host_ip, reverse=False, seconds=10, omit=2)
    rx = iperf(guest, net.host_ip, reverse=True, seconds=10, omit=2)
    summary = (f"net-limit: mode={mode} unthrottled guest->host {mbits(ups)} Mbit/s, host->guest "
               f"{mbits(downs)} Mbit/s; bucket {size} B per {REFILL_MS} ms = {limit_bps / 1e6:.2f} Mbit/s; "
               f"limited guest->host {tx / 1e6:.2f} Mbit/s, host->guest {rx / 1e6:.2f} Mbit/s")
    print(summary)
    assert abs(tx - limit_bps) <= TOLERANCE * limit_bps, summary
    assert abs(rx - limit_bps) <= TOLERANCE * limit_bps, summary
    assert guest.stop() == 0, guest.tail()
