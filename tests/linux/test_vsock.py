"""virtio-vsock with a Debian guest (issue 12, vsock part): Firecracker's hybrid Unix-socket model.

One guest serves the whole module (each boot costs minutes inside the
emulated KVM host); Debian's ``socat`` speaks AF_VSOCK in the guest.  The
host side is this test: it connects to ``uds_path`` and says ``CONNECT
<port>`` to reach a guest listener, and listens on ``<uds_path>_<port>`` for
the guest's connections to host port ``port``.

* 64 MiB host to guest and 64 MiB guest to host, each checked by SHA-256 on
  both ends;
* 50 concurrent host connections to a guest echo server, each with its own
  64 KiB message;
* a guest listener killed mid-stream: the host's socket is closed;
* a host socket that closes early: the guest's sender gets an error, not a hang;
* a guest connecting to a port nobody listens on gets "Connection reset by peer";
* afterwards the VMM holds as many file descriptors as before, its memory
  outside guest RAM is back near its level, and the device's
  ``conns_added`` equals ``conns_removed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.linux.api import ApiLauncher, api, wait_for_api
from tests.linux.harness import GuestFactory, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MEM_MIB = 256
MiB = 1 << 20
BIG = 64 * MiB
GUEST_CID = 3


class VsockLauncher(ApiLauncher):
    """asyncvmm with a ``vsock`` and ``metrics`` in its config file."""

    def __init__(self, sock: Path, vsock: dict, metrics: Path) -> None:
        super().__init__(sock)
        self.vsock, self.metrics = vsock, metrics

    def config(self, spec):  # an instance method over the classmethod: argv calls self.config
        config = super().config(spec)
        config["vsock"] = self.vsock
        config["metrics"] = {"metrics_path": str(self.metrics)}
        return config


class VsockVm:
    def __init__(self, guest, sock: Path, uds: str, metrics: Path) -> None:
        self.guest, self.sock, self.uds, self.metrics = guest, sock, uds, metrics
        self.baseline: dict = {}

    def connect(self, port: int, timeout: float = 60) -> socket.socket:
        """A host connection to guest port ``port``, retried until the guest's listener is up."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(self.uds)
            s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            try:
                while not line.endswith(b"\n"):
                    c = s.recv(1)
                    if not c:
                        break
                    line += c
            except OSError:
                pass
            if line.startswith(b"OK "):
                return s
            s.close()                           # RST: nobody listens on the port (yet)
            assert time.monotonic() < deadline, f"guest port {port} never accepted; console:\n{self.guest.tail()}"
            time.sleep(0.5)

    def listen(self, port: int) -> socket.socket:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{port}")
        srv.listen(8)
        srv.settimeout(120)
        return srv

    def wait_all_closed(self, timeout: float = 60) -> dict:
        """Until every connection the device opened is closed again; its summed metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.vsock_metrics()
            if m.get("conns_added") == m.get("conns_removed"):
                return m
            assert time.monotonic() < deadline, (m, self.guest.tail())
            time.sleep(0.5)

    def vsock_metrics(self) -> dict:
        status, body = api(self.sock, "PUT", "/actions", {"action_type": "FlushMetrics"})
        assert status == 204, body
        total: dict = {}
        for line in self.metrics.read_text().splitlines():
            for k, v in json.loads(line).get("vsock", {}).items():
                total[k] = total.get(k, 0) + v
        return total


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_outside_guest_ram(pid: int) -> int:
    """Resident bytes of every mapping except guest RAM (the one mapping of at least MEM_MIB)."""
    total, size = 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and size < MEM_MIB * 1024:
            total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def vm(guest_images, tmp_path_factory):
    work = tmp_path_factory.mktemp("vsock")
    short = Path(tempfile.mkdtemp(prefix="avs", dir="/tmp"))     # sun_path holds 108 bytes
    uds = str(short / "v.sock")
    sock = short / "api.sock"
    factory = GuestFactory(guest_images, work)
    try:
        spec = default_spec(guest_images, work, mem_mib=MEM_MIB)
        guest = factory.start(VsockLauncher(sock, {"guest_cid": GUEST_CID, "uds_path": uds},
                                            work / "metrics.json"), spec)
        guest.wait_for(READY, BOOT_TIMEOUT)
        wait_for_api(sock, guest)
        vm = VsockVm(guest, sock, uds, work / "metrics.json")
        bound = guest.run("ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/").check().output
        assert "virtio" in bound, f"the vsock driver bound to nothing: {bound!r}"
        # Warm the path once (the first connection allocates the VMM's lasting state), then measure.
        guest.run("(socat -u VSOCK-LISTEN:4999 OPEN:/dev/null >/dev/null 2>&1 &)").check()
        with vm.connect(4999) as s:
            s.sendall(b"warm-up")
        vm.wait_all_closed()
        time.sleep(1)                            # the API server closes the metrics request's socket
        vm.baseline = {"fds": fd_count(guest.pid), "rss": rss_outside_guest_ram(guest.pid)}
        yield vm
        assert guest.stop() == 0, guest.tail()
    finally:
        factory.close()
        shutil.rmtree(short, ignore_errors=True)


def test_64_mib_host_to_guest_with_checksum(vm):
    data = random.Random(1).randbytes(BIG)
    vm.guest.run("rm -f /tmp/h2g.sum; (socat -u VSOCK-LISTEN:5000 STDOUT | sha256sum > /tmp/h2g.part "
                 "&& mv /tmp/h2g.part /tmp/h2g.sum) >/dev/null 2>&1 &").check()
    with vm.connect(5000) as s:
        for i in range(0, BIG, MiB):            # sendall's timeout covers the whole call: 1 MiB each
            s.sendall(data[i:i + MiB])
    out = vm.guest.run("while [ ! -s /tmp/h2g.sum ]; do sleep 0.2; done; cat /tmp/h2g.sum", timeout=240).check()
    assert out.output.split()[0] == hashlib.sha256(data).hexdigest(), out.output


def test_64_mib_guest_to_host_with_checksum(vm):
    srv = vm.listen(6000)
    got = {}

    def receive() -> None:
        conn, _ = srv.accept()
        h, n = hashlib.sha256(), 0
        with conn:
            conn.settimeout(120)
            while chunk := conn.recv(1 << 20):
                h.update(chunk)
                n += len(chunk)
        got.update(sha=h.hexdigest(), n=n)
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    # 64 blocks of 1 MiB, each led by its number, so a reordered or repeated block shows.
    stream = "for i in $(seq 64); do echo block $i; cat /tmp/blk; done"
    out = vm.guest.run(f"head -c 1048576 /dev/urandom > /tmp/blk && ({stream}) | sha256sum && "
                       f"({stream}) | socat -u STDIN VSOCK-CONNECT:2:6000", timeout=240).check()
    t.join(120)
    srv.close()
    expected_n = BIG + sum(len(f"block {i}\n") for i in range(1, 65))
    assert got.get("n") == expected_n, (got, out.output)
    assert got["sha"] == out.output.split()[0], (got, out.output)


def test_fifty_concurrent_connections(vm):
    vm.guest.run("(socat VSOCK-LISTEN:5001,fork,reuseaddr,backlog=64 EXEC:cat >/dev/null 2>&1 &)").check()
    vm.connect(5001).close()                     # the echo server is up
    results: dict[int, bool] = {}

    def one(i: int) -> None:
        msg = random.Random(i).randbytes(64 * 1024)
        with vm.connect(5001) as s:
            s.sendall(msg)
            back = b""
            while len(back) < len(msg):
                chunk = s.recv(65536)
                if not chunk:
                    break
                back += chunk
        results[i] = back == msg
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == 50 and all(results.values()), results
    vm.guest.run("pkill -f VSOCK-LISTEN:5001; true").check()


def test_guest_listener_disappearing_mid_stream_closes_the_host_socket(vm):
    vm.guest.run("(socat -u VSOCK-LISTEN:5002 OPEN:/dev/null >/dev/null 2>&1 & echo $! > /tmp/p5002)").check()
    s = vm.connect(5002)
    failed = threading.Event()

    def stream() -> None:
        chunk = bytes(64 * 1024)
        try:
            while True:
                s.sendall(chunk)
        except OSError:
            failed.set()
    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(2)
    assert not failed.is_set()                   # streaming while the listener lives
    vm.guest.run("kill $(cat /tmp/p5002)").check()
    assert failed.wait(60), "the host kept writing into a connection whose guest end was gone"
    s.close()


def test_host_socket_closing_early_stops_the_guest_sender(vm):
    srv = vm.listen(6001)

    def take_a_little() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(60)
            n = 0
            while n < MiB:
                n += len(conn.recv(65536) or b"x" * MiB)
    t = threading.Thread(target=take_a_little, daemon=True)
    t.start()
    out = vm.guest.run("timeout 120 socat -u OPEN:/dev/zero VSOCK-CONNECT:2:6001; echo rc=$?", timeout=180)
    t.join(30)
    srv.close()
    rc = int(out.output.rsplit("rc=", 1)[1].split()[0])
    assert rc not in (0, 124, 143), out.output   # an error, not a hang cut by timeout
    assert "reset" in out.output.lower() or "broken pipe" in out.output.lower(), out.output


def test_guest_connecting_to_a_port_nobody_listens_on_is_reset(vm):
    out = vm.guest.run("socat -u OPEN:/dev/null VSOCK-CONNECT:2:6999 2>&1; echo rc=$?", timeout=60)
    assert "rc=0" not in out.output and "Connection reset by peer" in out.output, out.output


def test_nothing_leaks(vm):
    m = vm.wait_all_closed()
    deadline = time.monotonic() + 30
    while (fds := fd_count(vm.guest.pid)) > vm.baseline["fds"] and time.monotonic() < deadline:
        time.sleep(0.5)                          # the API server closes the metrics request's socket
    rss = rss_outside_guest_ram(vm.guest.pid)
    print(f"vsock: VMM fds {vm.baseline['fds']} -> {fds}; RSS outside guest RAM "
          f"{vm.baseline['rss'] / MiB:.1f} -> {rss / MiB:.1f} MiB; metrics {m}")
    assert fds <= vm.baseline["fds"], (vm.baseline, fds)
    assert rss - vm.baseline["rss"] < 16 * MiB, (vm.baseline, rss)
    assert m["conns_added"] >= 50 + 5, m
    assert m["tx_bytes_count"] >= BIG and m["rx_bytes_count"] >= BIG, m
