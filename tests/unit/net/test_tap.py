"""Tap devices: ioctl encoding without privileges, then a real tap in a real namespace."""

import errno
import ipaddress
import os
import select
import time

import pytest

from asyncvmm.mmds.pdu import (ETHERTYPE_ARP, ETHERTYPE_IPV4, build_arp, build_ethernet,
                               build_ipv4, internet_checksum, parse_arp, parse_ethernet,
                               parse_ipv4)
from asyncvmm.net import tap as tapmod
from asyncvmm.net.netns import temporary_netns, temporary_tap
from asyncvmm.net.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
                              VNET_HDR_SIZE, Tap, TapIoctlError, TapOpenError,
                              offload_for_guest_features)
from tests.conftest import require

MY_MAC = bytes.fromhex("aafc00000002")
HOST_IP = "10.200.0.1"
GUEST_IP = "10.200.0.2"


def test_ioctl_numbers_are_the_kernels():
    # Values of the _IOW/_IOR macros in include/uapi/linux/if_tun.h on x86-64.
    assert tapmod.TUNSETIFF == 0x400454CA
    assert tapmod.TUNSETOFFLOAD == 0x400454D0
    assert tapmod.TUNGETIFF == 0x800454D2
    assert tapmod.TUNGETVNETHDRSZ == 0x800454D7
    assert tapmod.TUNSETVNETHDRSZ == 0x400454D8


def test_offload_flags_follow_guest_features():
    bit = lambda n: 1 << n  # noqa: E731
    assert offload_for_guest_features(0) == 0
    assert offload_for_guest_features(bit(7) | bit(8)) == 0  # TSO needs GUEST_CSUM
    assert offload_for_guest_features(bit(1)) == TUN_F_CSUM
    assert offload_for_guest_features(bit(1) | bit(7) | bit(8) | bit(10)) == (
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
    assert offload_for_guest_features(bit(1) | bit(9)) == TUN_F_CSUM | TUN_F_TSO_ECN


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b"])
def test_bad_names_are_refused_before_any_syscall(name):
    with pytest.raises(TapOpenError) as exc:
        Tap.open(name)
    assert exc.value.errno == errno.EINVAL


def test_missing_netns_is_a_tap_open_error():
    with pytest.raises(TapOpenError) as exc:
        Tap.open("tapx", netns="asyncvmm-does-not-exist")
    assert exc.value.errno == errno.ENOENT


def _require_tap_privileges() -> None:
    require(os.path.exists("/dev/net/tun"), "/dev/net/tun is missing")
    require(os.geteuid() == 0, "creating namespaces and taps needs root")


def _exchange(tap: Tap, bufs: list[bytes], want, deadline_s: float = 10.0) -> bytes:
    """Send ``bufs`` as one frame until a frame for which ``want(frame)`` comes back.

    Resending is needed, not cosmetic: the tap gets its carrier when we
    attach, and until the kernel's link watcher activates the queueing
    discipline (asynchronously, within about a second) replies are dropped.
    Other frames (IPv6 router solicitations and the like) are skipped.
    """
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert tap.writev(bufs) == sum(len(b) for b in bufs)
        resend_at = time.monotonic() + 0.2
        while (left := resend_at - time.monotonic()) > 0:
            ready, _, _ = select.select([tap], [], [], left)
            data = tap.read() if ready else None
            if data is not None and want(data[VNET_HDR_SIZE:]):
                return data[VNET_HDR_SIZE:]
    raise AssertionError("expected frame did not arrive from the tap")


def _is_ethertype(frame: bytes, ethertype: int) -> bool:
    return len(frame) >= 14 and int.from_bytes(frame[12:14], "big") == ethertype


def _icmp_echo(src: bytes, dst: bytes, ident: int, payload: bytes) -> bytes:
    header = bytes([8, 0, 0, 0]) + ident.to_bytes(2, "big") + (1).to_bytes(2, "big")
    csum = internet_checksum(header, payload).to_bytes(2, "big")
    return build_ipv4(src, dst, 1, 1, header[:2] + csum + header[4:] + payload)


def test_frames_cross_a_real_tap_in_a_real_netns():
    _require_tap_privileges()
    host = ipaddress.IPv4Address(HOST_IP).packed
    guest = ipaddress.IPv4Address(GUEST_IP).packed
    vnet = bytes(VNET_HDR_SIZE)
    with temporary_netns() as ns, temporary_tap("avtap0", netns=ns, addr=f"{HOST_IP}/24"), \
            Tap.open("avtap0", netns=ns) as tap:
        assert tap.name == "avtap0" and tap.vnet_hdr_size() == VNET_HDR_SIZE
        tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO)
        tap.set_offload(0)
        assert tap.read() is None  # non-blocking: nothing queued is None, not a hang

        # ARP: the namespace's kernel answers for its own address.
        arp = build_arp(1, MY_MAC, guest, bytes(6), host)
        request = build_ethernet(b"\xff" * 6, MY_MAC, ETHERTYPE_ARP, arp)
        reply = _exchange(tap, [vnet + request], lambda f: _is_ethertype(f, ETHERTYPE_ARP)
                          and parse_arp(f[14:]).oper == 2)
        eth, payload = parse_ethernet(reply)
        answer = parse_arp(payload)
        assert (answer.spa, answer.tpa, answer.tha, eth.dst) == (host, guest, MY_MAC, MY_MAC)
        host_mac = answer.sha

        # ICMP echo through the IPv4 path, gathered from two buffers.
        echo = _icmp_echo(guest, host, 0x4242, b"asyncvmm")
        frame = build_ethernet(host_mac, MY_MAC, ETHERTYPE_IPV4, echo)
        pong = _exchange(tap, [vnet, frame[:20], frame[20:]],
                         lambda f: _is_ethertype(f, ETHERTYPE_IPV4)
                         and parse_ipv4(f[14:])[0].protocol == 1)
        ip, icmp = parse_ipv4(pong[14:])
        assert (ip.src, ip.dst) == (host, guest)
        assert icmp[0] == 0 and icmp[4:6] == (0x4242).to_bytes(2, "big")
        assert icmp.endswith(b"asyncvmm")


def test_second_open_of_a_single_queue_tap_is_busy():
    _require_tap_privileges()
    with temporary_netns() as ns, temporary_tap("avtap1", netns=ns), \
            Tap.open("avtap1", netns=ns):
        with pytest.raises(TapOpenError) as exc:
            Tap.open("avtap1", netns=ns)
        assert exc.value.errno == errno.EBUSY and exc.value.ifname == "avtap1"


def test_bad_offload_flags_are_a_typed_error():
    _require_tap_privileges()
    with temporary_netns() as ns, Tap.open("avtap2", netns=ns) as tap:
        with pytest.raises(TapIoctlError) as exc:
            tap.set_offload(1 << 30)
        assert exc.value.errno == errno.EINVAL
