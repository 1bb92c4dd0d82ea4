"""virtio-net on a real tap, driven by the test guest on the local /dev/kvm.

Each test makes a network namespace with a tap in it (pyroute2, through
``asyncvmm.net.netns``), runs the real ``asyncvmm`` process inside that
namespace (``ip netns exec``, as Firecracker's jailer would), and talks to
the guest from the host side of the tap with an ``AF_PACKET`` socket opened
in the namespace.  IPv6 is off in the namespace so the kernel sends nothing
of its own (router solicitations, MLD) that the guest could receive first.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import require_netns_and_taps
from tests.guest.output import find, parse_lines
from tests.kvm.conftest import VMM_TIMEOUT_S, ApiProcess, asyncvmm_argv, guest_config

pytestmark = pytest.mark.kvm

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
ETHERTYPE_TEST = 0x88B5              # IEEE local experimental
GUEST_MAC = bytes.fromhex("06000ac80002")
HOST_MAC = bytes.fromhex("06000ac80001")
MMDS_MAC = bytes.fromhex("060123456701")
HOST_CIDR = "10.200.0.1/24"           # the tap's address; the guest pretends to be 10.200.0.2


@pytest.fixture
def netns_tap():
    require_netns_and_taps()
    from asyncvmm.net.netns import temporary_netns, temporary_tap

    with temporary_netns("asyncvmm-kvmnet-") as ns:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        name = f"avt{secrets.token_hex(4)}"
        with temporary_tap(name, netns=ns, addr=HOST_CIDR, up=True):
            yield ns, name


def in_netns(ns: str, fn):
    """Run ``fn`` on a thread inside ``ns``; sockets it makes stay in that namespace."""
    from asyncvmm.net.netns import enter_netns

    out: list = []

    def work():
        try:
            enter_netns(ns)
            out.append(fn())
        except BaseException as e:    # handed back below
            out.append(e)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def packet_socket(ns: str, ifname: str) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((ifname, ETH_P_ALL))
        return s
    return in_netns(ns, make)


def recv_frame(sock: socket.socket, want, timeout: float) -> bytes | None:
    """The first frame entering the host from the tap for which ``want(frame)`` holds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65536)
        except socket.timeout:
            return None
        if addr[2] != PACKET_OUTGOING and want(data):
            return data
    return None


@contextlib.contextmanager
def vmm_in_netns(ns: str, tmp_path: Path, config: dict):
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(config))
    log = tmp_path / "vmm.log"
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *asyncvmm_argv(), "--no-api", "--config-file", str(cfg),
                             "--level", "Info", "--log-path", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.wait(VMM_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


def finish(proc) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=VMM_TIMEOUT_S)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def net_config(test_guest, cmdline: str, tap: str, **extra) -> dict:
    iface = {"iface_id": "eth0", "host_dev_name": tap, "guest_mac": GUEST_MAC.hex(":")}
    return guest_config(test_guest.elf_pvh, cmdline, **{"network-interfaces": [iface], **extra})


def arp_request(sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    arp = (b"\x00\x01\x08\x00\x06\x04\x00\x01" + sender_mac + sender_ip + bytes(6) + target_ip)
    return b"\xff" * 6 + sender_mac + b"\x08\x06" + arp


def test_guest_frame_reaches_the_tap_and_a_host_frame_reaches_the_guest(test_guest, tmp_path, netns_tap):
    ns, tap = netns_tap
    sock = packet_socket(ns, tap)
    out_frame = b"\xff" * 6 + GUEST_MAC + ETHERTYPE_TEST.to_bytes(2, "big") + b"guest->host " + bytes(range(40))
    in_frame = GUEST_MAC + HOST_MAC + ETHERTYPE_TEST.to_bytes(2, "big") + b"host->guest " + bytes(range(64, 120))
    cfg = net_config(test_guest, f"net=send:{out_frame.hex()} net=recv exit=reset", tap)
    with vmm_in_netns(ns, tmp_path, cfg) as proc:
        got = recv_frame(sock, lambda f: f[12:14] == out_frame[12:14], timeout=VMM_TIMEOUT_S)
        assert got == out_frame, (got, proc.poll())
        # The guest is now waiting in net=recv with a receive buffer posted.
        sock.send(in_frame)
        code, stdout, stderr = finish(proc)
    sock.close()
    lines = parse_lines(stdout)
    assert code == 0, stdout + stderr + (tmp_path / "vmm.log").read_text()
    assert find(lines, "net device")[0].fields["mac"] == GUEST_MAC.hex()          # as configured
    assert find(lines, "net send")[0].number("len") == len(out_frame)
    recv, = find(lines, "net recv")
    assert recv.fields["frame"] == in_frame.hex()
    assert recv.number("len") == len(in_frame)


def test_the_host_kernel_answers_the_guests_arp(test_guest, tmp_path, netns_tap):
    ns, tap = netns_tap
    request = arp_request(GUEST_MAC, bytes([10, 200, 0, 2]), bytes([10, 200, 0, 1]))
    cfg = net_config(test_guest, f"net=send:{request.hex()} net=recv exit=reset", tap)
    with vmm_in_netns(ns, tmp_path, cfg) as proc:
        code, stdout, stderr = finish(proc)
    assert code == 0, stdout + stderr
    reply = bytes.fromhex(find(parse_lines(stdout), "net recv")[0].fields["frame"])
    assert reply[:6] == GUEST_MAC and reply[12:14] == b"\x08\x06"
    assert reply[20:22] == b"\x00\x02"                          # ARP reply
    assert reply[28:32] == bytes([10, 200, 0, 1])               # from the host's address
    assert reply[32:38] == GUEST_MAC and reply[38:42] == bytes([10, 200, 0, 2])


def test_arp_for_the_mmds_is_answered_by_the_vmm_not_the_tap(test_guest, tmp_path, netns_tap):
    ns, tap = netns_tap
    sock = packet_socket(ns, tap)
    request = arp_request(GUEST_MAC, bytes([10, 200, 0, 2]), bytes([169, 254, 169, 254]))
    cfg = net_config(test_guest, f"net=send:{request.hex()} net=recv exit=reset", tap,
                     **{"mmds-config": {"network_interfaces": ["eth0"], "version": "V2"}})
    with vmm_in_netns(ns, tmp_path, cfg) as proc:
        code, stdout, stderr = finish(proc)
    assert code == 0, stdout + stderr
    reply = bytes.fromhex(find(parse_lines(stdout), "net recv")[0].fields["frame"])
    assert reply[:6] == GUEST_MAC and reply[6:12] == MMDS_MAC
    assert reply[20:22] == b"\x00\x02" and reply[22:28] == MMDS_MAC
    assert reply[28:32] == bytes([169, 254, 169, 254])
    # Nothing of it reached the host side of the tap.
    assert recv_frame(sock, lambda f: f[12:14] == b"\x08\x06", timeout=0.2) is None
    sock.close()


def test_a_tap_that_cannot_be_opened_is_a_clear_start_error(test_guest, tmp_path, netns_tap):
    ns, _ = netns_tap
    # TUNSETIFF would create a missing tap (as Firecracker's open does); a name
    # longer than IFNAMSIZ cannot exist, so the open fails and the start with it.
    cfg = net_config(test_guest, "exit=reset", "x" * 20)
    with vmm_in_netns(ns, tmp_path, cfg) as proc:
        code, stdout, stderr = finish(proc)
    log = (tmp_path / "vmm.log").read_text()
    assert code != 0
    assert "Open tap device failed" in log + stderr


def test_patch_rate_limiters_after_boot_and_net_metrics(test_guest, tmp_path, netns_tap):
    ns, tap = netns_tap
    metrics = tmp_path / "metrics.json"
    request = arp_request(GUEST_MAC, bytes([10, 200, 0, 2]), bytes([169, 254, 169, 254]))
    vmm = ApiProcess(tmp_path, "ip", "netns", "exec", ns)
    try:
        steps = [
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh),
                                     "boot_args": f"net=send:{request.hex()} net=recv"}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap,
                                                 "guest_mac": GUEST_MAC.hex(":")}),
            ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]
        vmm.configure(steps)
        limited = {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 100000, "refill_time": 100}},
                   "tx_rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}
        assert vmm("PATCH", "/network-interfaces/eth0", limited)[0] == 204
        status, answer = vmm("PATCH", "/network-interfaces/eth9", {"iface_id": "eth9", "rx_rate_limiter": {}})
        assert status == 400 and "Network config error" in answer["fault_message"]
        iface = vmm("GET", "/vm/config")[1]["network-interfaces"][0]
        assert iface["rx_rate_limiter"]["bandwidth"]["size"] == 100000
        assert iface["tx_rate_limiter"]["ops"]["size"] == 10
        # The guest's ARP to the MMDS is sent and answered; wait for the counters to say so.
        vmm.wait_output("testguest: net recv")
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
    assert sum(r["net_eth0"]["tx_packets_count"] for r in reports) == 1
    assert sum(r["net"]["rx_packets_count"] for r in reports) == 1
    assert sum(r["mmds"]["rx_accepted"] for r in reports) == 1
    assert sum(r["net_eth0"]["tx_count"] for r in reports) == 0        # nothing reached the tap


def test_tx_ops_limit_throttles_by_its_counters_and_patch_lifts_it(test_guest, tmp_path, netns_tap):
    """One op per second on TX: of two back-to-back frames the second waits for the throttle
    timer (counted once each); after PATCH disables the bucket, three more go unthrottled.
    Proven by the device's counters and the frames on the tap, not by a time window."""
    ns, tap = netns_tap
    sock = packet_socket(ns, tap)
    metrics = tmp_path / "metrics.json"

    def test_frame(tag: bytes) -> bytes:
        return b"\xff" * 6 + GUEST_MAC + ETHERTYPE_TEST.to_bytes(2, "big") + tag + bytes(40)

    first, second = [test_frame(b"A%d" % i) for i in range(2)]
    after = [test_frame(b"B%d" % i) for i in range(3)]
    wake = GUEST_MAC + HOST_MAC + ETHERTYPE_TEST.to_bytes(2, "big") + b"go on" + bytes(50)
    cmdline = " ".join([f"net=send:{f.hex()}" for f in (first, second)] + ["net=recv"]
                       + [f"net=send:{f.hex()}" for f in after] + ["exit=halt"])
    vmm = ApiProcess(tmp_path, "ip", "netns", "exec", ns)
    try:
        steps = [
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
            ("PUT", "/boot-source", {"kernel_image_path": str(test_guest.elf_pvh), "boot_args": cmdline}),
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
            ("PUT", "/network-interfaces/eth0", {
                "iface_id": "eth0", "host_dev_name": tap, "guest_mac": GUEST_MAC.hex(":"),
                "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 1000}}}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]
        vmm.configure(steps)
        is_test = lambda f: f[12:14] == ETHERTYPE_TEST.to_bytes(2, "big")     # noqa: E731
        assert recv_frame(sock, is_test, VMM_TIMEOUT_S) == first
        assert recv_frame(sock, is_test, VMM_TIMEOUT_S) == second
        limited = vmm.flush_metrics(metrics)
        assert sum(r["net_eth0"]["tx_rate_limiter_throttled"] for r in limited) == 1, limited
        assert sum(r["net_eth0"]["tx_rate_limiter_event_count"] for r in limited) == 1, limited
        assert sum(r["net_eth0"]["tx_count"] for r in limited) == 2
        patch = {"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}
        assert vmm("PATCH", "/network-interfaces/eth0", patch)[0] == 204
        iface = vmm("GET", "/vm/config")[1]["network-interfaces"][0]
        assert iface["tx_rate_limiter"]["ops"]["size"] == 0, iface        # zero size: disabled
        sock.send(wake)                                   # the guest waits in net=recv for this
        for frame in after:
            assert recv_frame(sock, is_test, VMM_TIMEOUT_S) == frame
        vmm.wait_output("testguest: exit halt")
        reports = vmm.flush_metrics(metrics)
    finally:
        vmm.close()
        sock.close()
    assert sum(r["net_eth0"]["tx_rate_limiter_throttled"] for r in reports) == 1     # none after PATCH
    assert sum(r["net_eth0"]["tx_rate_limiter_event_count"] for r in reports) == 1
    assert sum(r["net_eth0"]["tx_count"] for r in reports) == 5
