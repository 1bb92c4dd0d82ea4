"""vhost-net (asyncvmm extension ``"vhost": true``) with a Debian guest (issue 16, vhost-net part).

Two boots, one per transport (a module-scoped microVM each: a boot costs
minutes in the emulated KVM host), each in its own network namespace with a
tap (host side 172.16.0.1/30, guest 172.16.0.2/30):

* virtio-mmio: the kernel's used-buffer signals reach the loop, which sets
  InterruptStatus and raises the line.  The guest pings the host and the
  host the guest; 64 MiB go host to guest and 64 MiB guest to host over TCP,
  each checked by SHA-256 on both ends.
* virtio-pci (``--enable-pci``): the kernel signals the queue's MSI-X irqfd
  itself.  Ping both ways, and 64 MiB guest to host with its checksum.

Both prove the frames took the kernel's path, not Python's: the VMM has a
``vhost-<pid>`` worker, and the device's own frame counters (``net_eth0``,
which only the userspace path counts) stay at zero while the transfers go
through.  The host side of each transfer is a small Python program run in
the namespace (``ip netns exec``); the guest side is Debian's ``socat``.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import require
from tests.linux.api import ApiLauncher, HostNetwork, api, host_network, wait_for_api
from tests.linux.harness import Guest, GuestFactory, default_spec
from tests.linux.test_net import ping_argv

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MiB = 1 << 20
BIG = 64 * MiB
H2G_PORT, G2H_PORT = 5000, 6000

# Run by the host's Python inside the namespace: "send <ip> <port> <seed> <bytes>" connects and
# sends Random(seed)'s bytes 1 MiB at a time; "receive <ip> <port>" takes one connection and
# prints how many bytes came and their SHA-256.
HOST_PEER = r"""
import hashlib, random, socket, sys, time
mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "send":
    seed, size = int(sys.argv[4]), int(sys.argv[5])
    deadline = time.monotonic() + 120
    while True:                 # the guest's listener may not be up yet
        try:
            s = socket.create_connection((ip, port), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    rng = random.Random(seed)
    with s:
        for _ in range(size // (1 << 20)):
            s.sendall(rng.randbytes(1 << 20))
else:
    srv = socket.create_server((ip, port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    h, n = hashlib.sha256(), 0
    with conn:
        conn.settimeout(120)
        while chunk := conn.recv(1 << 20):
            h.update(chunk)
            n += len(chunk)
    print(n, h.hexdigest(), flush=True)
"""


def vhost_spec(images, workdir: Path, net: HostNetwork, *, pci: bool):
    spec = default_spec(images, workdir, extra_args=net.boot_args)
    args = " ".join(w for w in spec.boot_args.split() if not (pci and w == "pci=off"))
    return replace(spec, boot_args=args, network_interfaces=[{**net.interface(), "vhost": True}])


def start_vm(factory: GuestFactory, images, workdir: Path, net: HostNetwork, *, pci: bool):
    require(Path("/dev/vhost-net").exists(), "/dev/vhost-net is missing (modprobe vhost_net)")
    sock = workdir / "api.sock"
    metrics = workdir / "metrics.json"
    extra = ["--metrics-path", str(metrics), *(["--enable-pci"] if pci else [])]
    spec = vhost_spec(images, workdir, net, pci=pci)
    guest = factory.start(ApiLauncher(sock, extra_args=extra, netns=net.ns), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    return guest, sock, metrics


def net_frames(sock: Path, metrics: Path) -> dict[str, int]:
    """``net_eth0``'s counters summed over every metrics line so far (after a flush)."""
    status, body = api(sock, "PUT", "/actions", {"action_type": "FlushMetrics"})
    assert status == 204, body
    sums: dict[str, int] = {}
    for line in metrics.read_text().splitlines():
        for key, value in json.loads(line).get("net_eth0", {}).items():
            sums[key] = sums.get(key, 0) + value
    return sums


def vhost_worker(pid: int) -> bool:
    """Whether the kernel runs a ``vhost-<pid>`` worker for the VMM (a thread of it since 6.4)."""
    for comm in [*Path(f"/proc/{pid}/task").glob("*/comm"), *Path("/proc").glob("[0-9]*/comm")]:
        try:
            if comm.read_text().strip() == f"vhost-{pid}":
                return True
        except OSError:
            continue
    return False


def ping_both_ways(guest, net: HostNetwork) -> None:
    out = guest.run(f"ping -c 3 -W 10 {net.host_ip}", timeout=90).check().output
    assert "3 packets received" in out, out
    r = subprocess.run(net.argv([*ping_argv(), "-c", "3", "-W", "10", net.guest_ip]),
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0 and re.search(r"\b3 (packets )?received", r.stdout), r.stdout + r.stderr


def host_to_guest(guest, net: HostNetwork) -> None:
    guest.run(f"rm -f /tmp/h2g.sum; (socat -u TCP-LISTEN:{H2G_PORT},reuseaddr STDOUT | sha256sum "
              "> /tmp/h2g.part && mv /tmp/h2g.part /tmp/h2g.sum) >/dev/null 2>&1 &").check()
    subprocess.run(net.argv([sys.executable, "-c", HOST_PEER, "send", net.guest_ip, str(H2G_PORT), "1",
                             str(BIG)]), check=True, timeout=300)
    out = guest.run("while [ ! -s /tmp/h2g.sum ]; do sleep 0.2; done; cat /tmp/h2g.sum", timeout=240).check()
    rng = random.Random(1)
    expected = hashlib.sha256()
    for _ in range(BIG // MiB):
        expected.update(rng.randbytes(MiB))
    assert out.output.split()[0] == expected.hexdigest(), out.output


def guest_to_host(guest, net: HostNetwork) -> None:
    receiver = subprocess.Popen(net.argv([sys.executable, "-c", HOST_PEER, "receive", net.host_ip,
                                          str(G2H_PORT)]), stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout.readline().strip() == "listening"
        # 64 blocks of 1 MiB, each led by its number, so a reordered or repeated block shows.
        stream = "for i in $(seq 64); do echo block $i; cat /tmp/blk; done"
        out = guest.run(f"head -c {MiB} /dev/urandom > /tmp/blk && ({stream}) | sha256sum && "
                        f"({stream}) | socat -u STDIN TCP:{net.host_ip}:{G2H_PORT}", timeout=300).check()
        n, sha = receiver.communicate(timeout=120)[0].split()
    finally:
        receiver.kill()
    assert int(n) == BIG + sum(len(f"block {i}\n") for i in range(1, 65)), (n, out.output)
    assert sha == out.output.split()[0], (sha, out.output)


@dataclass
class VhostVm:
    guest: Guest
    sock: Path
    metrics: Path
    net: HostNetwork


def vhost_vm(images, workdir: Path, *, pci: bool) -> Iterator[VhostVm]:
    """One microVM for the module (each boot costs minutes in the emulated host)."""
    with host_network() as net:
        factory = GuestFactory(images, workdir)
        try:
            guest, sock, metrics = start_vm(factory, images, workdir, net, pci=pci)
            yield VhostVm(guest, sock, metrics, net)
            assert guest.stop() == 0, guest.tail()
        finally:
            factory.close()


@pytest.fixture(scope="module")
def mmio_vm(guest_images, tmp_path_factory) -> Iterator[VhostVm]:
    yield from vhost_vm(guest_images, tmp_path_factory.mktemp("vhost-mmio"), pci=False)


@pytest.fixture(scope="module")
def pci_vm(guest_images, tmp_path_factory) -> Iterator[VhostVm]:
    yield from vhost_vm(guest_images, tmp_path_factory.mktemp("vhost-pci"), pci=True)


# --------------------------------------------------------------------------- virtio-mmio

def test_mmio_the_kernel_serves_the_queues_and_the_guest_pings_both_ways(mmio_vm):
    assert vhost_worker(mmio_vm.guest.pid), "no vhost worker for the VMM"
    ping_both_ways(mmio_vm.guest, mmio_vm.net)


def test_mmio_64_mib_host_to_guest_with_checksum(mmio_vm):
    host_to_guest(mmio_vm.guest, mmio_vm.net)


def test_mmio_64_mib_guest_to_host_with_checksum(mmio_vm):
    guest_to_host(mmio_vm.guest, mmio_vm.net)


def test_mmio_no_frame_took_the_userspace_path_and_limiters_are_refused(mmio_vm):
    frames = net_frames(mmio_vm.sock, mmio_vm.metrics)
    # The userspace path counts every frame it moves; the kernel moved them all.
    assert frames.get("tx_packets_count", 0) == 0 and frames.get("rx_packets_count", 0) == 0, frames
    assert frames.get("activate_fails", 0) == 0 and frames.get("event_fails", 0) == 0, frames
    limit = {"bandwidth": {"size": 1000, "refill_time": 100}}
    status, body = api(mmio_vm.sock, "PATCH", "/network-interfaces/eth0",
                       {"iface_id": "eth0", "rx_rate_limiter": limit})
    assert status == 400 and "cannot have a rate limiter" in body, body


# --------------------------------------------------------------------------- virtio-pci

def test_pci_the_nic_is_a_pci_function_and_pings_both_ways(pci_vm):
    path = pci_vm.guest.run("readlink -f /sys/class/net/eth0/device").check().output
    assert re.search(r"/0000:00:[0-9a-f]{2}\.0/virtio\d+$", path.strip()), path
    ping_both_ways(pci_vm.guest, pci_vm.net)


def test_pci_64_mib_guest_to_host_with_checksum_and_msix_interrupts(pci_vm):
    guest_to_host(pci_vm.guest, pci_vm.net)
    # The queues' MSI-X vectors took the interrupts, which the kernel signalled on their irqfds.
    interrupts = pci_vm.guest.run("grep -E 'virtio[0-9]+-(input|output)' /proc/interrupts").check().output
    assert any(int(line.split()[1]) > 0 for line in interrupts.splitlines()), interrupts
    assert "PCI-MSI" in interrupts, interrupts
    frames = net_frames(pci_vm.sock, pci_vm.metrics)
    assert frames.get("tx_packets_count", 0) == 0 and frames.get("activate_fails", 0) == 0, frames
