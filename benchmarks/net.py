"""Network benchmark: asyncvmm's virtio-net against QEMU microvm's, same Debian guest, same run.

Both VMMs boot the linux tier's Debian guest (cloud kernel, the project's
initramfs, the ext4 rootfs with iperf3; see docs/images.md), 1 vCPU,
256 MiB, each with one virtio-net device on its own tap in a private
network namespace, once per transport (virtio-mmio, virtio-pci):

``asyncvmm``
    ``asyncvmm --no-api --config-file vm.json`` with a ``network-interfaces``
    entry (``host_dev_name`` = the tap): userspace virtio-net, the only kind
    asyncvmm has, on virtio-mmio.
``qemu-microvm``
    ``-netdev tap,ifname=...,script=no,downscript=no,vhost=off
    -device virtio-net-device,netdev=...,mac=...``: QEMU's userspace
    virtio-net, no vhost, on modern virtio-mmio
    (``-global virtio-mmio.force-legacy=false``, the transport version
    asyncvmm and Firecracker offer).
``asyncvmm-pci``
    the same as ``asyncvmm`` with ``--enable-pci``: the NIC and the root disk
    are virtio-pci functions (modern only, MSI-X), the kernel runs without
    ``pci=off``.
``qemu-microvm-pci``
    the same microvm machine with ``pcie=on`` (a PCIe host bridge with ECAM,
    described in ACPI) and the devices moved onto it:
    ``-device virtio-net-pci,disable-legacy=on,netdev=...`` and the root disk
    on ``virtio-blk-pci,disable-legacy=on`` (the 1af4:1041/1042 functions
    asyncvmm offers), no ``pci=off`` either.

vhost-net, on request (``--variants``, not in the default set):

``asyncvmm-vhost`` / ``asyncvmm-pci-vhost``
    the interface with asyncvmm's ``"vhost": true``: the same device, its
    queues served by the host kernel's vhost-net (docs/network.md).
``qemu-microvm-vhost`` / ``qemu-microvm-pci-vhost``
    QEMU's ``-netdev tap,...,vhost=on``: its vhost-net, the same transports.

Each guest gets ``avm.ip=172.16.<i>.2/24`` and runs ``iperf3 -s -D``; the
host side of its tap is ``172.16.<i>.1/24``.  All guests are booted first
and stay up; then every round measures each variant in a rotated order, from
the host side, in the namespace:

* ``h2g``: ``iperf3 -c <guest> -t S -J``: TCP, host sends, the guest
  receives (the device's RX path);
* ``g2h``: the same with ``-R``: the guest sends (its TX path);
* ``h2g_udp`` and ``g2h_udp``: ``iperf3 -u -l 64 -b <rate>``, the same two
  directions with 64-byte datagrams offered at a fixed packet rate: the small-packet
  rate each path delivers, and what it loses;
* ``ping``: ``ping -c N -i I <guest>`` (busybox's, or the system's): ICMP
  echo round trips through the tap, the VMM and the guest kernel.

Throughput is what the receiver counted (iperf3's ``sum_received``), in
MiB/s, or for UDP in datagrams delivered per second (the receiver's highest
sequence number minus the gaps below it).  The VMM process's CPU time during
each iperf3 run is split with ``/proc/<pid>/stat``: ``guest_time`` (its vCPUs
running the guest) and the rest (exits, device emulation, tap I/O: the VMM's
own cost), each per MiB (TCP) or per delivered packet (UDP).

Where ``/dev/kvm`` is not hardware KVM (here: kvm_pvm) a Debian guest cannot
boot in useful time, so ``main`` re-runs this module inside the emulated KVM
host (``asyncvmm_tools.hostvm``: QEMU TCG with nested SVM) and brings its JSON
back through the host VM's results directory.  Everything there, the host
side's iperf3 included, runs emulated on one vCPU: the absolute numbers say
little about real hardware; the ratios compare the two VMMs under the same
conditions.

Pure helpers (parsing iperf3 and ping output, command lines, metrics and
comparisons) are at the top and unit-tested; the I/O is below them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import machine, report, stats
from benchmarks.rounds import interleaved_rounds

NAME = "net"
TITLE = ("Network: asyncvmm virtio-net vs QEMU microvm virtio-net (tap, no vhost; virtio-mmio and virtio-pci), "
         "same Debian guest, nested emulated host (ratios only)")
DEFAULT_RUNS = 10
QUICK_RUNS = 2
DEFAULT_SECONDS = 4
QUICK_SECONDS = 2
DEFAULT_PINGS = 50
QUICK_PINGS = 20
PING_INTERVAL_S = 0.2
MEM_MIB = 256
GUEST_MAC = "06:00:AC:10:00:02"
READY = r"asyncvmm-guest: ready \(rootfs\)"
BOOT_TIMEOUT_S = 400.0
MIB = 1 << 20
DIRECTIONS = ("h2g", "g2h")
# TCP sizes its TSO/GSO packets to about 1 ms of its pacing rate, at least tcp_min_tso_segs (2)
# segments.  Emulated, rates are ~100x below hardware, so a slow start leaves a connection sending
# ~3 KB packets whose per-packet cost keeps the rate low: a second, slow steady state that real
# hardware never reaches.  A floor of 32 segments (~46 KB) on both ends keeps TCP in the regime it
# has on hardware; 0 leaves the kernels' default.
MIN_TSO_SEGS = 32
MIN_TSO_SYSCTL = "/proc/sys/net/ipv4/tcp_min_tso_segs"     # per network namespace
# Small packets: iperf3 UDP datagrams of 64 bytes of payload (106-byte frames), offered at a fixed
# rate in both directions.  With -b 0 the sender takes as much of the emulated host's one CPU as
# the scheduler gives it, and every path then delivered the same ~450 pkt/s guest-to-host (the
# receiver starved; docs/benchmarks.md).  A fixed rate caps the sender alike for every variant;
# 5000/s is about the most any path delivered host-to-guest with -b 0.  In the emulated host the
# senders could not hold it (they share the one CPU with the path): the delivered rate is then the
# path's whole per-packet cost, and the loss shows where the device drops.  0 means iperf3's -b 0.
UDP_PAYLOAD = 64
DEFAULT_UDP_PPS = 5000


class RunFailed(RuntimeError):
    """A measurement produced no usable number; the message says why."""


# -- iperf3 and ping output ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IperfResult:
    received_bytes: int
    seconds: float
    retransmits: int | None        # the sender's TCP retransmissions, when iperf3 reports them

    @property
    def mib_s(self) -> float:
        return self.received_bytes / MIB / self.seconds


def _iperf3_end(text: str) -> dict[str, Any]:
    """The ``end`` object of ``iperf3 -J`` output; RunFailed when iperf3 failed or printed no JSON."""
    try:
        doc = json.loads(text)
    except ValueError:
        raise RunFailed(f"iperf3 printed no JSON: {text[-300:]!r}") from None
    if not isinstance(doc, dict):
        raise RunFailed("iperf3's JSON is not an object")
    if doc.get("error"):
        raise RunFailed(f"iperf3: {doc['error']}")
    end = doc.get("end")
    if not isinstance(end, dict):
        raise RunFailed("iperf3's JSON has no end")
    return end


def parse_iperf3(text: str) -> IperfResult:
    """The receiver's byte count and duration from ``iperf3 -J`` output."""
    end = _iperf3_end(text)
    received = end.get("sum_received")
    if not isinstance(received, dict):
        raise RunFailed("iperf3's JSON has no end.sum_received")
    try:
        nbytes, seconds = int(received["bytes"]), float(received["seconds"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise RunFailed(f"iperf3's end.sum_received lacks bytes/seconds: {received}") from None
    if nbytes <= 0 or not 0 < seconds < float("inf"):
        raise RunFailed(f"iperf3 moved nothing ({nbytes} bytes in {seconds} s)")
    sent = end.get("sum_sent")
    retrans = sent.get("retransmits") if isinstance(sent, dict) else None
    ok = isinstance(retrans, int) and not isinstance(retrans, bool) and retrans >= 0
    return IperfResult(nbytes, seconds, retrans if ok else None)


@dataclasses.dataclass(frozen=True)
class UdpResult:
    """One iperf3 UDP run as its receiver counted it, and what the sender sent."""
    packets: int                   # the highest sequence number the receiver saw (iperf3's "packets")
    lost: int                      # gaps below it (iperf3's "lost_packets")
    seconds: float                 # the receiver's duration
    sent: int                      # the sender's count; packets still queued at the end never arrive

    @property
    def delivered(self) -> int:
        return self.packets - self.lost

    @property
    def pps(self) -> float:
        """Packets per second delivered to the receiving socket."""
        return self.delivered / self.seconds

    @property
    def loss_pct(self) -> float:
        """What the sender sent and the receiver never counted, gaps and tail alike."""
        return 100 * (self.sent - self.delivered) / self.sent


def _udp_sum(end: dict[str, Any], key: str) -> dict[str, Any]:
    part = end.get(key)
    if not isinstance(part, dict):
        raise RunFailed(f"iperf3's JSON has no end.{key}")
    return part


def _count(part: dict[str, Any], key: str, where: str) -> int:
    value = part.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RunFailed(f"iperf3's end.{where}.{key} is not a count: {value!r}")
    return value


def parse_iperf3_udp(text: str) -> UdpResult:
    """The receiver's packets, losses and duration and the sender's count from ``iperf3 -u -J``.

    Both ``end.sum_received`` and ``end.sum_sent`` are there in either direction (iperf3 3.7 on;
    the client fetches the server's side).  iperf3's receiver counts the highest sequence number as
    "packets" and the gaps below it as "lost_packets", so what arrived is the difference.
    """
    end = _iperf3_end(text)
    received, sent = _udp_sum(end, "sum_received"), _udp_sum(end, "sum_sent")
    packets = _count(received, "packets", "sum_received")
    lost = _count(received, "lost_packets", "sum_received")
    sent_packets = _count(sent, "packets", "sum_sent")
    try:
        seconds = float(received["seconds"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise RunFailed(f"iperf3's end.sum_received lacks seconds: {received}") from None
    if not 0 < seconds < float("inf"):
        raise RunFailed(f"iperf3's receiver ran for {seconds} s")
    if lost > packets:
        raise RunFailed(f"iperf3 counted {lost} lost of {packets} packets")
    if packets == lost:
        raise RunFailed(f"no UDP datagram arrived ({sent_packets} sent)")
    return UdpResult(packets, lost, seconds, max(sent_packets, packets - lost))


_PING_REPLY = re.compile(r"(?:icmp_)?seq=(\d+) ttl=\d+ time=(\d+(?:\.\d+)?) ms")
_PING_SENT = re.compile(r"(\d+) packets transmitted")


@dataclasses.dataclass(frozen=True)
class PingResult:
    rtts_us: tuple[float, ...]     # one per answered sequence number, in sequence order
    transmitted: int

    @property
    def lost(self) -> int:
        return self.transmitted - len(self.rtts_us)


def parse_ping(text: str) -> PingResult:
    """Round trips from busybox or iputils ``ping`` output; duplicate replies count once."""
    by_seq: dict[int, float] = {}
    for m in _PING_REPLY.finditer(text):
        rtt = round(float(m[2]) * 1000, 3)      # ms with up to 3 decimals: whole µs, kept exact
        if not math.isfinite(rtt):
            raise RunFailed(f"ping printed an impossible round trip: {m[0][:80]!r}")
        by_seq.setdefault(int(m[1]), rtt)
    sent = _PING_SENT.search(text)
    if sent is None:
        raise RunFailed(f"ping printed no statistics: {text[-300:]!r}")
    transmitted = int(sent[1])
    if not by_seq:
        raise RunFailed(f"no ping reply out of {transmitted}")
    return PingResult(tuple(by_seq[s] for s in sorted(by_seq)), max(transmitted, len(by_seq)))


@dataclasses.dataclass(frozen=True)
class CpuTicks:
    """CPU time of a whole process (all its threads), in clock ticks."""
    user: int                      # utime: the guest's time is counted here too
    system: int                    # stime: syscalls, tap I/O, KVM handling the vCPUs' exits
    guest: int                     # guest_time: its vCPUs running the guest

    @property
    def own_user(self) -> int:
        """The VMM's userspace work: exit handlers, device emulation."""
        return self.user - self.guest

    @property
    def own(self) -> int:
        """Everything but the guest."""
        return self.own_user + self.system

    def __sub__(self, other: "CpuTicks") -> "CpuTicks":
        return CpuTicks(self.user - other.user, self.system - other.system, self.guest - other.guest)


def parse_cpu_ticks(stat: str) -> CpuTicks:
    """utime, stime and guest_time from ``/proc/<pid>/stat`` (fields 14, 15 and 43, proc(5)).

    The command name (field 2) may hold spaces and parentheses, so fields are
    counted from the last ')'.
    """
    try:
        rest = stat[stat.rindex(")") + 2:].split()
        return CpuTicks(int(rest[11]), int(rest[12]), int(rest[40]))
    except (ValueError, IndexError):
        raise RunFailed(f"not a /proc/<pid>/stat line: {stat[:120]!r}") from None


# -- command lines --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Link:
    """One guest's network: its tap in the namespace and the /24 around it."""
    tap: str
    subnet: int                    # 172.16.<subnet>.0/24

    @property
    def host_cidr(self) -> str:
        return f"172.16.{self.subnet}.1/24"

    @property
    def guest_ip(self) -> str:
        return f"172.16.{self.subnet}.2"

    @property
    def guest_args(self) -> str:
        return f"avm.ip={self.guest_ip}/24"


def min_tso_command(segments: int) -> str | None:
    """The shell command setting ``tcp_min_tso_segs`` (in the caller's namespace), or None for 0."""
    if segments < 0:
        raise ValueError("tcp_min_tso_segs cannot be negative")
    return f"echo {segments} > {MIN_TSO_SYSCTL}" if segments else None


def asyncvmm_interface(link: Link, vhost: bool = False) -> dict[str, Any]:
    """The Firecracker ``network-interfaces`` entry for ``link`` (asyncvmm's ``vhost`` if asked)."""
    entry = {"iface_id": "eth0", "host_dev_name": link.tap, "guest_mac": GUEST_MAC}
    return {**entry, "vhost": True} if vhost else entry


def qemu_net_args(link: Link, vhost: bool = False) -> list[str]:
    """QEMU's virtio-net on the tap (no helper scripts), modern virtio-mmio: userspace, or its
    vhost-net with ``vhost``."""
    return ["-global", "virtio-mmio.force-legacy=false",
            "-netdev", f"tap,id=bench0,ifname={link.tap},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
            "-device", f"virtio-net-device,netdev=bench0,mac={GUEST_MAC}"]


def without_pci_off(boot_args: str) -> str:
    """The kernel command line with PCI left on (the harness's base arguments say ``pci=off``)."""
    return " ".join(w for w in boot_args.split() if w != "pci=off")


QEMU_PCI_DEVICES = {"virtio-net-device": "virtio-net-pci", "virtio-blk-device": "virtio-blk-pci"}


def qemu_pci_argv(argv: Sequence[str]) -> list[str]:
    """A QEMU microvm command line moved onto PCI: ``pcie=on`` for the machine, each virtio-mmio
    device as its modern-only virtio-pci twin (``disable-legacy=on``), the virtio-mmio global gone.

    Everything else (memory, CPU, serial, kernel, drive backends) stays as it was, so the two QEMU
    variants differ by the transport only.
    """
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if arg == "-global" and value is not None and value.startswith("virtio-mmio."):
            i += 2
            continue
        if arg == "-M" and value is not None:
            machine = value.split(",")
            if not machine[0] == "microvm":
                raise ValueError(f"not a microvm machine: {value!r}")
            out += [arg, ",".join([w for w in machine if not w.startswith("pcie=")] + ["pcie=on"])]
            i += 2
            continue
        if arg == "-device" and value is not None:
            driver, sep, props = value.partition(",")
            if driver in QEMU_PCI_DEVICES:
                out += [arg, f"{QEMU_PCI_DEVICES[driver]},disable-legacy=on{sep}{props}"]
                i += 2
                continue
            if driver.startswith("virtio-") and driver.endswith("-device"):
                raise ValueError(f"no virtio-pci twin known for {driver}")
        out.append(arg)
        i += 1
    return out


def netns_argv(netns: str, argv: Sequence[str], ip: str = "ip") -> list[str]:
    """``ip netns exec`` execs ``argv`` in place, so the pid stays the command's."""
    return [ip, "netns", "exec", netns, *argv]


def iperf3_argv(link: Link, seconds: int, direction: str) -> list[str]:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    argv = ["iperf3", "-c", link.guest_ip, "-t", str(seconds), "-J"]
    return argv + (["-R"] if direction == "g2h" else [])


def udp_bitrate(pps: int, payload: int = UDP_PAYLOAD) -> int:
    """iperf3's ``-b`` (bits of payload per second) for ``pps`` datagrams of ``payload`` bytes; 0 stays
    0 (unlimited)."""
    if pps < 0:
        raise ValueError("a packet rate cannot be negative")
    return pps * payload * 8


def iperf3_udp_argv(link: Link, seconds: int, direction: str, pps: int) -> list[str]:
    """Small datagrams at ``pps`` offered packets per second (0: as fast as the sender can)."""
    tcp = iperf3_argv(link, seconds, direction)
    return [*tcp[:3], "-u", "-l", str(UDP_PAYLOAD), "-b", str(udp_bitrate(pps)), *tcp[3:]]


def ping_argv(link: Link, count: int, interval_s: float, ping: Sequence[str]) -> list[str]:
    return [*ping, "-c", str(count), "-i", f"{interval_s:g}", "-W", "5", link.guest_ip]


# -- metrics ------------------------------------------------------------------------

def round_metrics(iperfs: dict[str, tuple[IperfResult, CpuTicks]], pings: PingResult, tick_ms: float,
                  udps: dict[str, tuple[UdpResult, CpuTicks]] | None = None) -> dict[str, float]:
    """One round's numbers: ``iperfs`` (TCP) and ``udps`` (small datagrams) map a direction to
    (result, VMM CPU ticks during it).  Per-packet CPU is per packet delivered."""
    out: dict[str, float] = {}
    for direction, (result, cpu) in iperfs.items():
        mib = result.received_bytes / MIB
        out[f"{direction}_mib_s"] = result.mib_s
        out[f"{direction}_vmm_cpu_ms_per_mib"] = cpu.own * tick_ms / mib
        out[f"{direction}_vmm_user_ms_per_mib"] = cpu.own_user * tick_ms / mib
        out[f"{direction}_vmm_sys_ms_per_mib"] = cpu.system * tick_ms / mib
        out[f"{direction}_guest_cpu_ms_per_mib"] = cpu.guest * tick_ms / mib
        if result.retransmits is not None:
            out[f"{direction}_retransmits"] = result.retransmits
    for direction, (udp, cpu) in (udps or {}).items():
        pkts = udp.delivered
        out[f"{direction}_udp_pps"] = udp.pps
        out[f"{direction}_udp_sent_pps"] = udp.sent / udp.seconds
        out[f"{direction}_udp_loss_pct"] = udp.loss_pct
        out[f"{direction}_udp_vmm_cpu_us_per_pkt"] = cpu.own * tick_ms * 1000 / pkts
        out[f"{direction}_udp_vmm_user_us_per_pkt"] = cpu.own_user * tick_ms * 1000 / pkts
        out[f"{direction}_udp_vmm_sys_us_per_pkt"] = cpu.system * tick_ms * 1000 / pkts
        out[f"{direction}_udp_guest_cpu_us_per_pkt"] = cpu.guest * tick_ms * 1000 / pkts
    out["ping_median_us"] = stats.summarize(pings.rtts_us).median
    out["ping_p99_us"] = stats.percentile(pings.rtts_us, 99)
    out["ping_lost"] = pings.lost
    return out


# A metric's unit, by the end of its name.
_UNITS = (("_mib_s", "MiB/s"), ("_us", "us"), ("_ms_per_mib", "ms"), ("_us_per_pkt", "us"),
          ("_pps", "pkt/s"), ("_pct", "%"))


def unit_of(name: str) -> str:
    return next((unit for suffix, unit in _UNITS if name.endswith(suffix)), "count")


def higher_is_better(name: str) -> bool:
    """Rates: bytes or packets per second."""
    return name.endswith(("_mib_s", "_pps"))


COMPARED = ("h2g_mib_s", "g2h_mib_s", "ping_median_us", "ping_p99_us",
            "h2g_vmm_cpu_ms_per_mib", "g2h_vmm_cpu_ms_per_mib",
            "h2g_guest_cpu_ms_per_mib", "g2h_guest_cpu_ms_per_mib",
            "h2g_udp_pps", "g2h_udp_pps", "h2g_udp_vmm_cpu_us_per_pkt", "g2h_udp_vmm_cpu_us_per_pkt",
            "h2g_udp_guest_cpu_us_per_pkt", "g2h_udp_guest_cpu_us_per_pkt")
# Each VMM against its peer on the same transport, then what moving asyncvmm onto PCI costs.
PAIRS = (("asyncvmm", "qemu-microvm", COMPARED),
         ("asyncvmm-pci", "qemu-microvm-pci", COMPARED),
         ("asyncvmm-pci", "asyncvmm", COMPARED),
         # vhost-net (when asked for): each VMM's vhost against the other's, and against its own
         # userspace path on the same transport.
         ("asyncvmm-vhost", "qemu-microvm-vhost", COMPARED),
         ("asyncvmm-pci-vhost", "qemu-microvm-pci-vhost", COMPARED),
         ("asyncvmm-vhost", "asyncvmm", COMPARED),
         ("asyncvmm-pci-vhost", "asyncvmm-pci", COMPARED))


def comparisons(vdocs: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per metric, each pair of :data:`PAIRS` that ran; throughput ratios are marked higher_is_better."""
    return report.compare_pairs(vdocs, PAIRS, higher_is_better=higher_is_better)


def pooled_pings(rtts_us: Sequence[float]) -> dict[str, float]:
    """Percentiles over every round's round trips (per-round p99 of 50 pings is their maximum)."""
    s = stats.summarize(rtts_us)
    return {"n": s.n, "median_us": s.median, "p99_us": s.p99, "max_us": s.max}


NOTES = [
    "NESTED, EMULATED HOST: these numbers were measured inside the emulated KVM host (QEMU TCG with "
    "nested SVM, 1 vCPU; see docs/testing.md) because this machine's /dev/kvm (kvm_pvm) cannot boot a "
    "Linux guest in useful time. Everything there runs emulated, the host side's iperf3 and ping "
    "included; the absolute throughputs and latencies say nothing about real hardware. Only the ratios "
    "mean something: both VMMs ran in the same emulated host, in the same run, rounds interleaved.",
    "Ratios: h2g_mib_s and g2h_mib_s are rates (higher_is_better in the JSON): ABOVE 1.0 asyncvmm moves "
    "more. Latencies and CPU per MiB: below 1.0 asyncvmm is faster / cheaper.",
    "Transports: asyncvmm vs qemu-microvm compares the two VMMs on virtio-mmio, asyncvmm-pci vs "
    "qemu-microvm-pci on virtio-pci (QEMU microvm,pcie=on, modern-only virtio-pci functions, MSI-X, the root "
    "disk on PCI too, no pci=off on either), and asyncvmm-pci vs asyncvmm what the PCI transport costs or "
    "saves asyncvmm itself (above 1.0 for rates: PCI moves more).",
    "h2g: iperf3 client in the host namespace sends to iperf3 -s in the guest (the device's RX path); "
    "g2h: the same with -R (the guest sends: TX path). TCP, one stream, throughput as counted by the "
    "receiver. Before the rounds each guest had one discarded iperf3 run per direction and 5 pings.",
    "ping: per round, the median and nearest-rank p99 of that round's pings (with 50 pings the p99 is "
    "the maximum); the JSON's `pooled_ping` has percentiles over all rounds.",
    "*_vmm_cpu_ms_per_mib: the VMM process's CPU time per MiB received during the iperf3 run, all "
    "threads, minus guest_time (/proc/<pid>/stat field 43: its vCPUs running the guest). The JSON splits "
    "it into *_vmm_user_ms_per_mib (userspace: exit handlers, device emulation) and *_vmm_sys_ms_per_mib "
    "(the kernel on its behalf: tap I/O, eventfds, and KVM handling the vCPU's exits, which the nested "
    "emulation makes expensive for both VMMs). *_guest_cpu_ms_per_mib is guest_time: how hard the guest "
    "worked per MiB (more interrupts or smaller batches show there). All tick-sampled.",
    "Small packets: *_udp_pps is iperf3 UDP with 64-byte datagrams (-u -l 64), offered at a fixed "
    "rate (settings.udp_offered_pps; -b 0 when 0) in both directions, counted as datagrams delivered "
    "to the receiving socket per second (the receiver's highest sequence number minus the gaps). "
    "*_udp_loss_pct is what the sender sent and the receiver never counted (drops in the tap's queue, "
    "the device or the receiver's socket, and what was still queued at the end); *_udp_sent_pps what "
    "the sender managed to offer. *_udp_vmm_cpu_us_per_pkt and *_udp_guest_cpu_us_per_pkt are the "
    "same CPU split as for TCP, per delivered packet. A fixed offered rate keeps the sender's share of "
    "the emulated host's one CPU alike for every variant; with -b 0 it would take whatever the VMM "
    "left it.",
    "TCP's TSO floor: tcp_min_tso_segs is 32 (settings.tcp_min_tso_segs) in every guest and the host "
    "namespace. TCP sizes TSO packets to ~1 ms of its pacing rate; at emulated rates that is ~3 KB, and "
    "without the floor connections fell into a slow steady state of tiny packets (guest-to-host 0.3 vs "
    "8 MiB/s from one run to the next, for both VMMs), an artefact of emulation that hardware never "
    "reaches. `--min-tso-segs 0` measures with the kernels' default of 2.",
    "All guests stay booted for the whole run (each on its own tap and /24); those not being measured "
    "idle.",
]


# -- running a guest (I/O from here on) ------------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str
    description: str
    link: Link
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    rtts_us: list[float] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None
    guest: Any = None              # tests.linux.harness.Guest while booted


VARIANTS = (
    ("asyncvmm", "asyncvmm --no-api --config-file, one network-interfaces entry on a tap (virtio-mmio)"),
    ("qemu-microvm", "QEMU microvm, -netdev tap,vhost=off -device virtio-net-device (modern virtio-mmio)"),
    ("asyncvmm-pci", "asyncvmm --enable-pci --no-api --config-file, the same interface: virtio-net and the "
                     "root disk on virtio-pci (MSI-X)"),
    ("qemu-microvm-pci", "QEMU microvm,pcie=on, -netdev tap,vhost=off -device virtio-net-pci,disable-legacy=on "
                         "(the root disk on virtio-blk-pci)"),
)
# vhost-net variants: known to --variants, not run by default (they need /dev/vhost-net).
VHOST_VARIANTS = (
    ("asyncvmm-vhost", "asyncvmm, the same interface with \"vhost\": true: the host kernel's vhost-net "
                       "serves its queues (virtio-mmio)"),
    ("qemu-microvm-vhost", "QEMU microvm, -netdev tap,vhost=on -device virtio-net-device (modern virtio-mmio)"),
    ("asyncvmm-pci-vhost", "asyncvmm --enable-pci, \"vhost\": true (virtio-pci, MSI-X irqfds signalled by "
                           "the kernel)"),
    ("qemu-microvm-pci-vhost", "QEMU microvm,pcie=on, -netdev tap,vhost=on -device "
                               "virtio-net-pci,disable-legacy=on"),
)
PCI_VARIANTS = frozenset({"asyncvmm-pci", "qemu-microvm-pci", "asyncvmm-pci-vhost", "qemu-microvm-pci-vhost"})


def make_variants(names: Sequence[str] | None = None) -> list[Variant]:
    known = {name: (i, desc) for i, (name, desc) in enumerate(VARIANTS + VHOST_VARIANTS)}
    wanted = list(names) if names else [name for name, _ in VARIANTS]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown variants: {', '.join(unknown)} (known: {', '.join(known)})")
    return [Variant(n, known[n][1], Link(f"bench{known[n][0]}", known[n][0])) for n in wanted]


def _launchers(variant: Variant, netns: str, workdir: Path):
    """The harness launcher for ``variant``, with its NIC, run inside ``netns``."""
    from tests.linux.harness import AsyncVmmLauncher, QemuMicrovmLauncher

    ip = shutil.which("ip") or "/usr/sbin/ip"
    link = variant.link

    class AsyncVmmNet(AsyncVmmLauncher):
        def config(self, spec):
            return {**AsyncVmmLauncher.config(spec),
                    "network-interfaces": [asyncvmm_interface(link, vhost=variant.name.endswith("-vhost"))]}

        def argv(self, spec, wd):
            return netns_argv(netns, super().argv(spec, wd), ip)

    class QemuNet(QemuMicrovmLauncher):
        def argv(self, spec, wd):
            argv = super().argv(spec, wd) + qemu_net_args(link, vhost=variant.name.endswith("-vhost"))
            if variant.name in PCI_VARIANTS:
                # virtio-net-pci loads an iPXE option ROM by default, which a QEMU without the
                # ipxe ROMs (the emulated host's) cannot find: it exits before the guest runs.
                argv = qemu_pci_argv(argv) + ["-global", "virtio-net-pci.romfile="]
            return netns_argv(netns, argv, ip)

    if variant.name.startswith("asyncvmm"):
        # Logs to a file: the console then carries only the guest, as QEMU's does.
        pci = ["--enable-pci"] if variant.name in PCI_VARIANTS else []
        return AsyncVmmNet(extra_args=["--log-path", str(workdir / "vmm.log"), "--level", "Info", *pci])
    return QemuNet()


def boot(variant: Variant, netns: str, images, workdir: Path, min_tso_segs: int) -> None:
    """Boot ``variant``'s guest on its tap, set its TSO floor and start its iperf3 server."""
    from tests.linux.harness import Guest, GuestError, default_spec

    wd = workdir / variant.name
    wd.mkdir(parents=True, exist_ok=True)
    spec = default_spec(images, wd, extra_args=variant.link.guest_args, mem_mib=MEM_MIB)
    if variant.name in PCI_VARIANTS:
        spec = dataclasses.replace(spec, boot_args=without_pci_off(spec.boot_args))
    guest = Guest(_launchers(variant, netns, wd), spec, wd)
    variant.guest = guest
    variant.command = [a.replace(str(wd), "$WORKDIR").replace(netns, "$NETNS") for a in guest.argv]
    try:
        guest.wait_for(READY, BOOT_TIMEOUT_S)
        addr = guest.run("ip -o -4 addr show dev eth0", 60).check().output
        if variant.link.guest_ip not in addr:
            raise RunFailed(f"eth0 does not have {variant.link.guest_ip}: {addr.strip()!r}")
        tso = min_tso_command(min_tso_segs)
        if tso:
            guest.run(tso, 60).check()
        guest.run("iperf3 -s -D", 60).check()
    except GuestError as err:
        raise RunFailed(f"{variant.name} did not boot to a working eth0: {err}") from None


def _run(argv: list[str], timeout: float) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailed(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from None
    except OSError as err:
        raise RunFailed(f"{argv[0]}: {err}") from None
    if r.returncode != 0 and not r.stdout.strip():
        raise RunFailed(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-300:]}")
    return r.stdout


@dataclasses.dataclass(frozen=True)
class Options:
    netns: str
    seconds: int
    pings: int
    ping: tuple[str, ...]          # the ping command: ("busybox", "ping") or ("ping",)
    udp_pps: int = DEFAULT_UDP_PPS  # offered small-datagram rate; 0: iperf3 -b 0


def cpu_ticks(pid: int) -> CpuTicks:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return parse_cpu_ticks(f.read())
    except OSError as err:
        raise RunFailed(f"process {pid} is gone: {err}") from None


def iperf(v: Variant, opts: Options, direction: str, seconds: int) -> tuple[IperfResult, CpuTicks]:
    argv = netns_argv(opts.netns, iperf3_argv(v.link, seconds, direction))
    before = cpu_ticks(v.guest.pid)
    out = _run(argv, seconds + 120)
    return parse_iperf3(out), cpu_ticks(v.guest.pid) - before


def iperf_udp(v: Variant, opts: Options, direction: str, seconds: int) -> tuple[UdpResult, CpuTicks]:
    argv = netns_argv(opts.netns, iperf3_udp_argv(v.link, seconds, direction, opts.udp_pps))
    before = cpu_ticks(v.guest.pid)
    out = _run(argv, seconds + 120)
    return parse_iperf3_udp(out), cpu_ticks(v.guest.pid) - before


def ping(v: Variant, opts: Options, count: int) -> PingResult:
    argv = netns_argv(opts.netns, ping_argv(v.link, count, PING_INTERVAL_S, opts.ping))
    return parse_ping(_run(argv, count * PING_INTERVAL_S + 120))


def warm_up(v: Variant, opts: Options) -> None:
    """ARP, TCP slow start, page faults in both VMMs: one discarded run of each."""
    ping(v, opts, 5)
    for direction in DIRECTIONS:
        iperf(v, opts, direction, 1)
        iperf_udp(v, opts, direction, 1)


def measure(v: Variant, opts: Options) -> dict[str, float] | None:
    if v.guest is None or v.guest.exited() is not None:
        if v.guest is not None:                      # a boot failure is already recorded
            v.failures.append(f"the VMM exited ({v.guest.exited()}): {v.guest.tail(600)!r}")
            stop_guest(v)
        return None
    try:
        iperfs = {d: iperf(v, opts, d, opts.seconds) for d in DIRECTIONS}
        udps = {d: iperf_udp(v, opts, d, opts.seconds) for d in DIRECTIONS}
        pings = ping(v, opts, opts.pings)
    except (RunFailed, OSError) as err:
        v.failures.append(str(err))
        print(f"  {v.name}: measurement failed: {err}", file=sys.stderr)
        return None
    metrics = round_metrics(iperfs, pings, 1000 / os.sysconf("SC_CLK_TCK"), udps)
    for key, value in metrics.items():
        v.samples.setdefault(key, []).append(value)
    v.rtts_us.extend(pings.rtts_us)
    return metrics


def run_rounds(variants: list[Variant], opts: Options, runs: int,
               log: Callable[[str], None] = print) -> list[list[float]]:
    def describe(vs: list[Variant]) -> str:
        return "; ".join(f"{v.name} h2g {_last(v, 'h2g_mib_s'):.1f} g2h {_last(v, 'g2h_mib_s'):.1f} MiB/s "
                         f"udp h2g {_last(v, 'h2g_udp_pps'):.0f} g2h {_last(v, 'g2h_udp_pps'):.0f} pkt/s "
                         f"ping {_last(v, 'ping_median_us'):.0f} us" for v in vs)

    return interleaved_rounds(variants, runs, lambda v: measure(v, opts), describe=describe, log=log)


def _last(v: Variant, key: str) -> float:
    return v.samples.get(key, [float("nan")])[-1]


def stop_guest(v: Variant) -> None:
    if v.guest is None:
        return
    try:
        v.guest.stop(timeout=60)
    finally:
        v.guest.kill()
        v.guest = None


def ping_command() -> tuple[str, ...]:
    """busybox's ping where busybox exists (it is in the emulated host), else the system's."""
    return ("busybox", "ping") if shutil.which("busybox") else ("ping",)


@dataclasses.dataclass(frozen=True)
class Settings:
    runs: int
    seconds: int
    pings: int
    variants: tuple[str, ...]
    min_tso_segs: int = MIN_TSO_SEGS
    udp_pps: int = DEFAULT_UDP_PPS

    def argv(self) -> list[str]:
        """The same settings as command-line flags (for the run inside the emulated host)."""
        return ["--runs", str(self.runs), "--seconds", str(self.seconds), "--pings", str(self.pings),
                "--variants", ",".join(self.variants), "--min-tso-segs", str(self.min_tso_segs),
                "--udp-pps", str(self.udp_pps)]


def run_direct(settings: Settings, command: str) -> tuple[dict[str, Any], bool]:
    """Boot every variant's guest here, measure, and return (the result document, every variant measured)."""
    from asyncvmm_tools.images import ensure_images
    from asyncvmm.net.netns import NETNS_RUN_DIR, create_tap, temporary_netns

    images = ensure_images(refresh=False)
    os.makedirs(NETNS_RUN_DIR, exist_ok=True)
    variants = make_variants(settings.variants)
    load_before = machine.load_average()
    print(f"net benchmark: {settings.runs} rounds of {', '.join(v.name for v in variants)}; iperf3 "
          f"{settings.seconds} s per direction (TCP, then UDP at {settings.udp_pps or 'unlimited'} pkt/s), "
          f"{settings.pings} pings; load {load_before}", flush=True)
    with temporary_netns("avmbench-") as ns, tempfile.TemporaryDirectory(prefix="bench-net-") as tmp:
        opts = Options(ns, settings.seconds, settings.pings, ping_command(), settings.udp_pps)
        tso = min_tso_command(settings.min_tso_segs)
        if tso:
            _run(netns_argv(ns, ["sh", "-c", tso]), 30)
        try:
            for v in variants:
                create_tap(v.link.tap, netns=ns, addr=v.link.host_cidr)
                try:
                    boot(v, ns, images, Path(tmp), settings.min_tso_segs)
                    warm_up(v, opts)
                    print(f"{v.name}: booted, eth0 {v.link.guest_ip} up, iperf3 server running", flush=True)
                except (RunFailed, OSError) as err:
                    v.failures.append(str(err))
                    print(f"{v.name}: {err}", file=sys.stderr, flush=True)
                    stop_guest(v)
            loads = run_rounds(variants, opts, settings.runs, log=lambda s: print(s, flush=True))
        finally:
            for v in variants:
                stop_guest(v)
    doc = build_document(variants, settings, opts, command, load_before, loads)
    return doc, all(v.samples and not v.failures for v in variants)


def build_document(variants: list[Variant], settings: Settings, opts: Options, command: str,
                   load_before: list[float], loads: list[list[float]]) -> dict[str, Any]:
    from asyncvmm_tools.hostvm import in_hostvm

    vdocs: dict[str, Any] = {}
    for v in variants:
        vdocs[v.name] = {"description": v.description, "command": v.command, "failures": v.failures,
                         "link": {"tap": v.link.tap, "host": v.link.host_cidr, "guest": v.link.guest_ip},
                         "metrics": {k: report.metric(s, unit_of(k)) for k, s in v.samples.items()},
                         "pooled_ping": pooled_pings(v.rtts_us) if v.rtts_us else None}
    comps, notes = comparisons(vdocs)
    nested = in_hostvm()
    return report.new_document(
        NAME, TITLE if nested else TITLE.replace(", nested emulated host (ratios only)", ""), command,
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        nested_emulated_host=nested,
        settings={"runs": settings.runs, "iperf3_seconds": settings.seconds, "pings": settings.pings,
                  "ping_interval_s": PING_INTERVAL_S, "ping": list(opts.ping), "mem_mib": MEM_MIB,
                  "vcpus": 1, "guest_mac": GUEST_MAC, "tcp_min_tso_segs": settings.min_tso_segs,
                  "iperf3": [" ".join(iperf3_argv(Link("tapX", 0), settings.seconds, d)) for d in DIRECTIONS],
                  "udp_payload_bytes": UDP_PAYLOAD, "udp_offered_pps": settings.udp_pps,
                  "iperf3_udp": [" ".join(iperf3_udp_argv(Link("tapX", 0), settings.seconds, d, settings.udp_pps))
                                 for d in DIRECTIONS]},
        variants=vdocs, comparisons=comps,
        notes=notes + (NOTES if nested else NOTES[1:]))


# -- the emulated host ------------------------------------------------------------------

def hostvm_timeout(settings: Settings) -> float:
    """A generous bound for the whole inner run (boots are 20-60 s each there, iperf3 start-up seconds)."""
    per_round = 4 * (settings.seconds + 30) + settings.pings * PING_INTERVAL_S + 30
    return 600 + len(settings.variants) * (300 + settings.runs * per_round)


def nest_document(inner: dict[str, Any], outer_machine: dict[str, Any], git: dict[str, Any],
                  load: dict[str, Any], command: str, hostvm: dict[str, Any]) -> dict[str, Any]:
    """The inner run's document as seen from this machine: its machine becomes the emulated host's."""
    doc = dict(inner)
    doc["emulated_host"] = {"machine": inner.get("machine"), "load": inner.get("load"), **hostvm}
    doc["machine"] = outer_machine
    doc["load"] = load
    doc["git"] = git
    doc["command"] = command
    return doc


def run_nested(settings: Settings, command: str, timeout: float | None) -> tuple[dict[str, Any] | None, bool]:
    """Run this benchmark inside the emulated KVM host; its document, or None with the reason printed."""
    return run_benchmark_nested(NAME, settings.argv(), timeout or hostvm_timeout(settings), command)


def run_benchmark_nested(name: str, argv: Sequence[str], limit: float,
                         command: str) -> tuple[dict[str, Any] | None, bool]:
    """``python -m benchmarks.<name> argv`` inside the emulated KVM host, for at most ``limit`` s: the
    document it wrote, nested in this machine's facts (:func:`nest_document`), and whether it passed;
    None with the reason printed when it wrote none.  The net and vsock benchmarks' hostvm mode."""
    from asyncvmm_tools.hostvm import HostVmError, run_in_hostvm
    from asyncvmm_tools.hostvm.runner import FREEZE_HEARTBEAT_S, FREEZE_STALL_S, WAKE_AFTER_S

    load_before = machine.load_average()
    inner = [sys.executable, "-m", f"benchmarks.{name}", *argv]
    print(f"[{name}] running `{' '.join(inner[1:])}` inside the emulated KVM host (QEMU TCG, nested SVM), "
          f"at most {limit:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-hostvm-") as tmp:
        results = Path(tmp) / "results"
        try:
            # A frozen emulated host (docs/testing.md) ends the run after a minute of silence,
            # not after `limit`.
            r = run_in_hostvm(inner, timeout=limit, results_dir=results, echo=sys.stdout,
                              heartbeat=FREEZE_HEARTBEAT_S, stall_timeout=FREEZE_STALL_S,
                              progress=lambda m: print(m, file=sys.stderr, flush=True))
        except HostVmError as err:
            print(f"error: {err}", file=sys.stderr)
            return None, False
        path = results / f"{name}.json"
        if not path.exists():
            why = (f"the emulated host froze: no console output for {FREEZE_STALL_S:.0f} s" if r.stalled
                   else "timed out" if r.timed_out else f"exit status {r.returncode}")
            print(f"error: the run inside the emulated host left no {path.name} ({why})", file=sys.stderr)
            return None, False
        inner_doc = json.loads(path.read_text(encoding="utf-8"))
    hostvm = {"kvm": r.kvm_line, "timings_s": {k: round(v, 1) for k, v in r.timings.items()},
              "inner_exit_status": r.returncode,
              # Each a freeze a serial break ended (docs/testing.md): whatever ran then lost ~20 s.
              "silences_woken": r.woken}
    if r.wakes:
        print(f"[{name}] note: the emulated host's console went silent {len(r.wakes)} time(s) and got a "
              f"serial break (a freeze, docs/testing.md); the job running then lost ~{WAKE_AFTER_S:.0f} s",
              file=sys.stderr, flush=True)
    load = {"before": load_before, "after": machine.load_average()}
    doc = nest_document(inner_doc, machine.describe(), machine.git_state(), load, command, hostvm)
    return doc, r.returncode == 0


# -- command line -----------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.net", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_RUNS} rounds, {QUICK_SECONDS} s per iperf3 run, {QUICK_PINGS} pings")
    p.add_argument("--seconds", type=int, help=f"seconds per iperf3 run (default {DEFAULT_SECONDS})")
    p.add_argument("--pings", type=int, help=f"pings per round (default {DEFAULT_PINGS})")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(n for n, _ in VARIANTS)} "
                                      f"(default: all of them) and {','.join(n for n, _ in VHOST_VARIANTS)}")
    p.add_argument("--min-tso-segs", type=int, default=MIN_TSO_SEGS,
                   help=f"tcp_min_tso_segs in the guests and the host namespace (default {MIN_TSO_SEGS}; "
                        "0: the kernels' default)")
    p.add_argument("--udp-pps", type=int, default=DEFAULT_UDP_PPS,
                   help=f"offered rate of the {UDP_PAYLOAD}-byte UDP runs, packets/s per direction "
                        f"(default {DEFAULT_UDP_PPS}; 0: iperf3 -b 0, as fast as the sender can)")
    p.add_argument("--mode", choices=("auto", "direct", "hostvm"), default="auto",
                   help="direct: here; hostvm: inside the emulated KVM host; auto: direct on hardware KVM")
    p.add_argument("--hostvm-timeout", type=float, help="seconds for the whole run inside the emulated host")
    p.add_argument("--results-dir", type=Path, help="where net.json and SUMMARY.md go")
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = p.parse_args(argv)
    for name in ("runs", "seconds", "pings"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    if args.min_tso_segs < 0:
        p.error("--min-tso-segs cannot be negative")
    if args.udp_pps < 0:
        p.error("--udp-pps cannot be negative")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    names = tuple(args.variants.split(",")) if args.variants else tuple(n for n, _ in VARIANTS)
    make_variants(names)                                  # ValueError for an unknown name
    return Settings(
        runs=args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS),
        seconds=args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS),
        pings=args.pings or (QUICK_PINGS if args.quick else DEFAULT_PINGS),
        variants=names, min_tso_segs=args.min_tso_segs, udp_pps=args.udp_pps)


def choose_mode(requested: str, kvm: str, inside: bool) -> str:
    if requested != "auto":
        return requested
    return "direct" if inside or kvm == "hardware" else "hostvm"


def results_dir(requested: Path | None, inside: bool) -> Path:
    """Inside the emulated host the results go where the host VM hands them back."""
    from asyncvmm_tools.hostvm import RESULTS_ENV

    if requested is not None:
        return requested
    if inside and os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    return report.RESULTS_DIR


def run_and_conclude(args: argparse.Namespace, settings: Any, command: str, run_nested: Callable[..., Any],
                     run_direct: Callable[..., Any], note: str = "") -> int:
    """Run here or nested in the emulated KVM host (``--mode``), then report and write the results
    (:func:`report.conclude_document`); the exit code.  The net and vsock benchmarks' main()."""
    from asyncvmm_tools.hostvm import in_hostvm, kvm_kind

    inside = in_hostvm()
    if choose_mode(args.mode, kvm_kind(), inside) == "hostvm":
        doc, ok = run_nested(settings, command, args.hostvm_timeout)
        if doc is None:
            return 1
    else:
        doc, ok = run_direct(settings, command)
    out = results_dir(args.results_dir, inside) if not args.no_write or inside else None
    return report.conclude_document(doc, ok, results_dir=out, note=note)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.net", *argv])
    return run_and_conclude(args, settings, command, run_nested, run_direct,
                            note="(throughput ratios are of rates: above 1.0 asyncvmm is faster; latency and "
                                 "CPU: below 1.0)")


if __name__ == "__main__":
    sys.exit(main())
