"""benchmarks.net without a VMM: iperf3 and ping output, command lines, metrics, the document."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from benchmarks import net, report
from benchmarks.net import CpuTicks, IperfResult, Link, PingResult, RunFailed, UdpResult

LINK = Link("bench1", 1)


def iperf_json(received: dict | None = None, sent: dict | None = None, **extra) -> str:
    end = {}
    if received is not None:
        end["sum_received"] = received
    if sent is not None:
        end["sum_sent"] = sent
    return json.dumps({"start": {}, "intervals": [], "end": end, **extra})


# -- iperf3 ----------------------------------------------------------------------------

def test_iperf3_throughput_is_what_the_receiver_counted():
    text = iperf_json({"seconds": 2.0, "bytes": 8 << 20, "bits_per_second": 1.0},
                      {"seconds": 2.0, "bytes": 9 << 20, "retransmits": 7})
    result = net.parse_iperf3(text)
    assert result == IperfResult(8 << 20, 2.0, 7)
    assert result.mib_s == 4.0


def test_iperf3_without_retransmit_counts_still_gives_a_rate():
    result = net.parse_iperf3(iperf_json({"seconds": 1, "bytes": 1 << 20}))
    assert result.retransmits is None and result.mib_s == 1.0


@pytest.mark.parametrize("text, why", [
    ("iperf3: error - unable to connect", "no JSON"),
    ("[1, 2]", "not an object"),
    (json.dumps({"start": {}, "end": {}, "error": "unable to connect to server: Connection refused"}),
     "Connection refused"),
    (iperf_json(None), "no end.sum_received"),
    (iperf_json({"seconds": 1}), "lacks bytes/seconds"),
    (iperf_json({"seconds": 1, "bytes": 0}), "moved nothing"),
    (iperf_json({"seconds": 0, "bytes": 100}), "moved nothing"),
])
def test_iperf3_failures_are_run_failures(text, why):
    with pytest.raises(RunFailed, match=why):
        net.parse_iperf3(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["end", "sum_received", "sum_sent", "bytes", "seconds", "retransmits", "error"]),
        inner, max_size=4),
    max_leaves=20)


@given(json_values)
def test_any_json_gives_a_positive_rate_or_a_run_failure(value):
    try:
        result = net.parse_iperf3(json.dumps(value))
    except RunFailed:
        return
    assert result.received_bytes > 0 and 0 < result.mib_s < float("inf")
    assert result.retransmits is None or result.retransmits >= 0


# -- iperf3 UDP ------------------------------------------------------------------------

def udp_json(received: dict | None, sent: dict | None) -> str:
    return iperf_json(received, sent, start={"test_start": {"protocol": "UDP", "blksize": 64}})


def test_udp_delivered_packets_are_the_highest_sequence_number_minus_the_gaps():
    # iperf3 3.12, the host sending 64-byte datagrams to the guest: sum_received is the server's view.
    text = udp_json({"seconds": 2.0, "bytes": 640000, "packets": 10000, "lost_packets": 1000, "jitter_ms": 0.1},
                    {"seconds": 2.0, "bytes": 700000, "packets": 12000, "lost_packets": 0})
    result = net.parse_iperf3_udp(text)
    assert result == UdpResult(packets=10000, lost=1000, seconds=2.0, sent=12000)
    assert result.delivered == 9000 and result.pps == 4500.0
    assert result.loss_pct == 25.0                      # 2000 sent after the last arrival count too


def test_udp_loss_is_zero_when_everything_sent_arrived():
    result = net.parse_iperf3_udp(udp_json({"seconds": 1.0, "packets": 500, "lost_packets": 0},
                                           {"seconds": 1.0, "packets": 500}))
    assert (result.pps, result.loss_pct) == (500.0, 0.0)
    # a sender count below what arrived (it cannot be) is read as "all of it arrived"
    low = net.parse_iperf3_udp(udp_json({"seconds": 1.0, "packets": 500, "lost_packets": 0},
                                        {"seconds": 1.0, "packets": 400}))
    assert low.sent == 500 and low.loss_pct == 0.0


@pytest.mark.parametrize("text, why", [
    ("iperf3: error - unable to connect", "no JSON"),
    (json.dumps({"error": "unable to receive control message"}), "control message"),
    (json.dumps({"start": {}}), "no end"),
    (udp_json(None, {"packets": 1}), "no end.sum_received"),
    (udp_json({"seconds": 1, "packets": 1, "lost_packets": 0}, None), "no end.sum_sent"),
    (udp_json({"seconds": 1, "packets": 5}, {"packets": 5}), "lost_packets is not a count"),
    (udp_json({"seconds": 1, "packets": True, "lost_packets": 0}, {"packets": 5}), "packets is not a count"),
    (udp_json({"seconds": 1, "packets": 5, "lost_packets": -1}, {"packets": 5}), "not a count"),
    (udp_json({"packets": 5, "lost_packets": 0}, {"packets": 5}), "lacks seconds"),
    (udp_json({"seconds": 0, "packets": 5, "lost_packets": 0}, {"packets": 5}), "ran for 0.0 s"),
    (udp_json({"seconds": 1, "packets": 5, "lost_packets": 6}, {"packets": 5}), "6 lost of 5"),
    (udp_json({"seconds": 1, "packets": 0, "lost_packets": 0}, {"packets": 9}), "no UDP datagram arrived"),
])
def test_iperf3_udp_failures_are_run_failures(text, why):
    with pytest.raises(RunFailed, match=why):
        net.parse_iperf3_udp(text)


udp_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=4),
    lambda inner: st.dictionaries(
        st.sampled_from(["end", "sum_received", "sum_sent", "packets", "lost_packets", "seconds", "error"]),
        inner, max_size=5),
    max_leaves=20)


@given(udp_values)
def test_any_udp_json_gives_a_packet_rate_or_a_run_failure(value):
    try:
        result = net.parse_iperf3_udp(json.dumps(value))
    except RunFailed:
        return
    assert 0 < result.delivered <= result.sent and 0 < result.pps < float("inf")
    assert 0 <= result.loss_pct < 100


# -- ping ------------------------------------------------------------------------------

BUSYBOX_PING = """PING 172.16.1.2 (172.16.1.2): 56 data bytes
64 bytes from 172.16.1.2: seq=0 ttl=64 time=1.250 ms
64 bytes from 172.16.1.2: seq=2 ttl=64 time=0.500 ms
64 bytes from 172.16.1.2: seq=2 ttl=64 time=9.000 ms (DUP!)
64 bytes from 172.16.1.2: seq=1 ttl=64 time=0.750 ms

--- 172.16.1.2 ping statistics ---
4 packets transmitted, 3 packets received, +1 duplicates, 25% packet loss
round-trip min/avg/max = 0.500/2.875/9.000 ms
"""

IPUTILS_PING = """PING 172.16.1.2 (172.16.1.2) 56(84) bytes of data.
64 bytes from 172.16.1.2: icmp_seq=1 ttl=64 time=0.043 ms
64 bytes from 172.16.1.2: icmp_seq=2 ttl=64 time=0.051 ms

--- 172.16.1.2 ping statistics ---
2 packets transmitted, 2 received, 0% packet loss, time 1001ms
"""


def test_busybox_ping_round_trips_in_sequence_order_duplicates_once():
    result = net.parse_ping(BUSYBOX_PING)
    assert result.rtts_us == (1250.0, 750.0, 500.0)
    assert (result.transmitted, result.lost) == (4, 1)


def test_iputils_ping_is_read_too():
    assert net.parse_ping(IPUTILS_PING) == PingResult((43.0, 51.0), 2)


@pytest.mark.parametrize("text, why", [
    ("ping: sendto: Network unreachable\n", "no statistics"),
    ("--- x ping statistics ---\n5 packets transmitted, 0 packets received, 100% packet loss\n",
     "no ping reply out of 5"),
])
def test_ping_without_replies_fails(text, why):
    with pytest.raises(RunFailed, match=why):
        net.parse_ping(text)


@given(st.lists(st.tuples(st.integers(0, 99), st.integers(1, 10**7)), max_size=60), st.integers(0, 100))
def test_lost_pings_are_the_sequence_numbers_never_answered(replies, transmitted):
    lines = [f"64 bytes from 10.0.0.2: seq={s} ttl=64 time={us // 1000}.{us % 1000:03d} ms"
             for s, us in replies]
    text = "\n".join(lines + [f"{transmitted} packets transmitted, {len(replies)} packets received"])
    try:
        result = net.parse_ping(text)
    except RunFailed:
        assert not replies
        return
    answered = {s for s, _ in replies}
    assert len(result.rtts_us) == len(answered)
    assert result.lost == max(transmitted - len(answered), 0)
    first = {}
    for s, us in replies:
        first.setdefault(s, float(us))
    assert result.rtts_us == tuple(first[s] for s in sorted(first))


@given(st.text(max_size=300))
def test_any_ping_output_gives_round_trips_or_a_run_failure(text):
    try:
        result = net.parse_ping(text)
    except RunFailed:
        return
    assert result.rtts_us and result.lost >= 0


# -- command lines ------------------------------------------------------------------------

def test_links_have_their_own_slash_24():
    assert (LINK.host_cidr, LINK.guest_ip, LINK.guest_args) == (
        "172.16.1.1/24", "172.16.1.2", "avm.ip=172.16.1.2/24")
    variants = net.make_variants()
    assert [v.name for v in variants] == ["asyncvmm", "qemu-microvm", "asyncvmm-pci", "qemu-microvm-pci"]
    assert len({v.link.tap for v in variants}) == len({v.link.subnet for v in variants}) == 4
    assert [v.link for v in net.make_variants(["qemu-microvm-pci"])] == [variants[3].link]


def test_unknown_variants_are_refused():
    with pytest.raises(ValueError, match="firecracker"):
        net.make_variants(["asyncvmm", "firecracker"])


def test_qemu_uses_userspace_virtio_net_on_the_tap_without_vhost_or_scripts():
    args = net.qemu_net_args(LINK)
    netdev = args[args.index("-netdev") + 1].split(",")
    assert netdev[0] == "tap" and {"ifname=bench1", "script=no", "downscript=no", "vhost=off"} <= set(netdev)
    device = args[args.index("-device") + 1]
    assert device.startswith("virtio-net-device,netdev=bench0,") and f"mac={net.GUEST_MAC}" in device
    assert args[args.index("-global") + 1] == "virtio-mmio.force-legacy=false"


def test_asyncvmm_gets_the_same_tap_and_mac_through_a_firecracker_interface():
    assert net.asyncvmm_interface(LINK) == {"iface_id": "eth0", "host_dev_name": "bench1",
                                            "guest_mac": net.GUEST_MAC}


def test_iperf3_and_ping_command_lines():
    assert net.iperf3_argv(LINK, 4, "h2g") == ["iperf3", "-c", "172.16.1.2", "-t", "4", "-J"]
    assert net.iperf3_argv(LINK, 4, "g2h")[-1] == "-R"
    with pytest.raises(ValueError):
        net.iperf3_argv(LINK, 4, "sideways")
    assert net.iperf3_udp_argv(LINK, 4, "h2g", 20000) == [
        "iperf3", "-c", "172.16.1.2", "-u", "-l", "64", "-b", "10240000", "-t", "4", "-J"]
    assert net.iperf3_udp_argv(LINK, 2, "g2h", 0) == [
        "iperf3", "-c", "172.16.1.2", "-u", "-l", "64", "-b", "0", "-t", "2", "-J", "-R"]
    with pytest.raises(ValueError):
        net.iperf3_udp_argv(LINK, 2, "h2g", -1)
    assert net.ping_argv(LINK, 50, 0.2, ("busybox", "ping")) == [
        "busybox", "ping", "-c", "50", "-i", "0.2", "-W", "5", "172.16.1.2"]
    assert net.netns_argv("ns1", ["iperf3", "-s"], "/sbin/ip") == [
        "/sbin/ip", "netns", "exec", "ns1", "iperf3", "-s"]


def test_launchers_run_inside_the_namespace_with_one_nic(tmp_path):
    from tests.linux.harness import VmSpec

    spec = VmSpec(kernel=Path("/k"), boot_args="console=ttyS0")
    a, q, apci, qpci = net.make_variants()
    argv = net._launchers(a, "ns1", tmp_path).argv(spec, tmp_path)
    assert argv[1:4] == ["netns", "exec", "ns1"]
    config = json.loads((tmp_path / "vm.json").read_text())
    assert config["network-interfaces"] == [net.asyncvmm_interface(a.link)]
    assert argv[argv.index("--log-path") + 1] == str(tmp_path / "vmm.log")
    assert "--enable-pci" not in argv
    qargv = net._launchers(q, "ns1", tmp_path).argv(spec, tmp_path)
    assert qargv[1:4] == ["netns", "exec", "ns1"] and "tap,id=bench0,ifname=bench1" in " ".join(qargv)
    assert "virtio-net-device" in " ".join(qargv) and "pcie=on" not in " ".join(qargv)

    pargv = net._launchers(apci, "ns1", tmp_path).argv(spec, tmp_path)
    assert pargv[1:4] == ["netns", "exec", "ns1"] and "--enable-pci" in pargv
    assert json.loads((tmp_path / "vm.json").read_text())["network-interfaces"] == [
        net.asyncvmm_interface(apci.link)]
    qpargv = net._launchers(qpci, "ns1", tmp_path).argv(spec, tmp_path)
    joined = " ".join(qpargv)
    assert qpargv[1:4] == ["netns", "exec", "ns1"] and f"ifname={qpci.link.tap}" in joined
    assert "virtio-net-pci,disable-legacy=on,netdev=bench0" in joined and "virtio-mmio" not in joined
    assert "pcie=on" in qpargv[qpargv.index("-M") + 1]


def test_qemu_pci_argv_moves_the_virtio_devices_and_nothing_else_onto_pci():
    argv = ["qemu", "-M", "microvm,acpi=on,rtc=off", "-m", "256", "-append", "console=ttyS0 root=/dev/vda",
            "-drive", "id=disk0,file=/r.ext4,format=raw,if=none,cache=unsafe,readonly=on",
            "-device", "virtio-blk-device,drive=disk0,serial=rootfs",
            "-global", "virtio-mmio.force-legacy=false",
            "-netdev", "tap,id=bench0,ifname=t0", "-device", "virtio-net-device,netdev=bench0,mac=m"]
    assert net.qemu_pci_argv(argv) == [
        "qemu", "-M", "microvm,acpi=on,rtc=off,pcie=on", "-m", "256", "-append", "console=ttyS0 root=/dev/vda",
        "-drive", "id=disk0,file=/r.ext4,format=raw,if=none,cache=unsafe,readonly=on",
        "-device", "virtio-blk-pci,disable-legacy=on,drive=disk0,serial=rootfs",
        "-netdev", "tap,id=bench0,ifname=t0", "-device", "virtio-net-pci,disable-legacy=on,netdev=bench0,mac=m"]
    assert net.qemu_pci_argv(["q", "-M", "microvm,pcie=off"]) == ["q", "-M", "microvm,pcie=on"]
    with pytest.raises(ValueError, match="microvm"):
        net.qemu_pci_argv(["q", "-M", "q35"])
    with pytest.raises(ValueError, match="virtio-rng-device"):
        net.qemu_pci_argv(["q", "-device", "virtio-rng-device"])


def test_pci_variants_boot_without_pci_off():
    assert net.without_pci_off("console=ttyS0 pci=off quiet") == "console=ttyS0 quiet"
    assert net.without_pci_off("console=ttyS0") == "console=ttyS0"


# -- metrics and the document ----------------------------------------------------------------

def test_round_metrics():
    iperfs = {"h2g": (IperfResult(4 << 20, 2.0, 3), CpuTicks(user=25, system=5, guest=20)),
              "g2h": (IperfResult(2 << 20, 1.0, None), CpuTicks(user=3, system=1, guest=3))}
    pings = PingResult((100.0, 300.0, 200.0), 4)
    m = net.round_metrics(iperfs, pings, tick_ms=10.0)
    assert m == {"h2g_mib_s": 2.0, "h2g_vmm_cpu_ms_per_mib": 25.0, "h2g_vmm_user_ms_per_mib": 12.5,
                 "h2g_vmm_sys_ms_per_mib": 12.5, "h2g_guest_cpu_ms_per_mib": 50.0, "h2g_retransmits": 3,
                 "g2h_mib_s": 2.0, "g2h_vmm_cpu_ms_per_mib": 5.0, "g2h_vmm_user_ms_per_mib": 0.0,
                 "g2h_vmm_sys_ms_per_mib": 5.0, "g2h_guest_cpu_ms_per_mib": 15.0,
                 "ping_median_us": 200.0, "ping_p99_us": 300.0, "ping_lost": 1}
    units = {k: net.unit_of(k) for k in m}
    assert net.round_metrics(iperfs, pings, tick_ms=10.0, udps={}) == m
    assert {k for k, u in units.items() if u == "ms"} == {k for k in m if k.endswith("_ms_per_mib")}
    assert {k for k, u in units.items() if u == "count"} == {"h2g_retransmits", "ping_lost"}
    assert units["h2g_mib_s"] == "MiB/s" and units["ping_p99_us"] == "us"


def test_round_metrics_small_packets_per_delivered_packet():
    iperfs = {"h2g": (IperfResult(1 << 20, 1.0, None), CpuTicks(1, 1, 0))}
    udps = {"h2g": (UdpResult(packets=3000, lost=1000, seconds=2.0, sent=4000), CpuTicks(user=30, system=10, guest=20)),
            "g2h": (UdpResult(packets=500, lost=0, seconds=1.0, sent=500), CpuTicks(user=5, system=0, guest=5))}
    m = net.round_metrics(iperfs, PingResult((1.0,), 1), tick_ms=10.0, udps=udps)
    udp = {k: v for k, v in m.items() if "_udp_" in k}
    assert udp == {"h2g_udp_pps": 1000.0, "h2g_udp_sent_pps": 2000.0, "h2g_udp_loss_pct": 50.0,
                   "h2g_udp_vmm_cpu_us_per_pkt": 100.0, "h2g_udp_vmm_user_us_per_pkt": 50.0,
                   "h2g_udp_vmm_sys_us_per_pkt": 50.0, "h2g_udp_guest_cpu_us_per_pkt": 100.0,
                   "g2h_udp_pps": 500.0, "g2h_udp_sent_pps": 500.0, "g2h_udp_loss_pct": 0.0,
                   "g2h_udp_vmm_cpu_us_per_pkt": 0.0, "g2h_udp_vmm_user_us_per_pkt": 0.0,
                   "g2h_udp_vmm_sys_us_per_pkt": 0.0, "g2h_udp_guest_cpu_us_per_pkt": 100.0}
    assert {net.unit_of(k) for k in udp if k.endswith("_per_pkt")} == {"us"}
    assert net.unit_of("h2g_udp_pps") == "pkt/s" and net.unit_of("g2h_udp_loss_pct") == "%"
    for k in udp:
        report.metric([udp[k]], net.unit_of(k))           # every unit is one the report can show
    assert {k for k in udp if net.higher_is_better(k)} == {
        "h2g_udp_pps", "h2g_udp_sent_pps", "g2h_udp_pps", "g2h_udp_sent_pps"}
    assert net.higher_is_better("g2h_mib_s") and not net.higher_is_better("h2g_udp_vmm_cpu_us_per_pkt")


def _stat(comm: str, utime: int, stime: int, guest: int) -> str:
    fields = ["S"] + ["0"] * 50                        # field 3 onwards
    fields[14 - 3], fields[15 - 3], fields[43 - 3] = str(utime), str(stime), str(guest)
    return f"4242 ({comm}) " + " ".join(fields) + "\n"


def test_cpu_ticks_split_the_vmm_own_work_from_the_guest():
    ticks = net.parse_cpu_ticks(_stat("qemu-system-x86", 700, 50, 600))
    assert ticks == CpuTicks(user=700, system=50, guest=600)
    assert (ticks.own_user, ticks.own) == (100, 150)
    assert (ticks - CpuTicks(100, 10, 50)) == CpuTicks(600, 40, 550)


def test_a_command_name_with_spaces_and_parentheses_does_not_shift_the_fields():
    assert net.parse_cpu_ticks(_stat("fc_vcpu 0) (x", 1, 2, 3)) == CpuTicks(1, 2, 3)


@pytest.mark.parametrize("stat", ["", "4242 (x) S 1 2", "no parenthesis at all"])
def test_a_bad_stat_line_is_a_run_failure(stat):
    with pytest.raises(RunFailed):
        net.parse_cpu_ticks(stat)


def _vdocs(a: dict[str, list[float]], q: dict[str, list[float]]) -> dict:
    from benchmarks import report
    return {name: {"metrics": {k: report.metric(s, net.unit_of(k)) for k, s in d.items()}}
            for name, d in (("asyncvmm", a), ("qemu-microvm", q))}


def test_comparisons_pair_each_transport_with_its_peer_and_asyncvmm_pci_with_mmio():
    from benchmarks import report
    m = {"h2g_mib_s": [10.0]}
    vdocs = {name: {"metrics": {k: report.metric(s, net.unit_of(k)) for k, s in m.items()}}
             for name, _ in net.VARIANTS}
    comps, _ = net.comparisons(vdocs)
    assert [(c["subject"], c["peer"]) for c in comps] == [
        ("asyncvmm", "qemu-microvm"), ("asyncvmm-pci", "qemu-microvm-pci"), ("asyncvmm-pci", "asyncvmm")]
    only_pci = {k: v for k, v in vdocs.items() if k.endswith("-pci")}
    assert [(c["subject"], c["peer"]) for c in net.comparisons(only_pci)[0]] == [
        ("asyncvmm-pci", "qemu-microvm-pci")]


def test_comparisons_mark_rates_higher_is_better():
    a = {"h2g_mib_s": [10, 20, 30], "ping_median_us": [400, 500], "g2h_udp_pps": [900, 1100],
         "g2h_udp_vmm_cpu_us_per_pkt": [300]}
    q = {"h2g_mib_s": [40], "ping_median_us": [250], "g2h_udp_pps": [4000], "g2h_udp_vmm_cpu_us_per_pkt": [100]}
    comps, notes = net.comparisons(_vdocs(a, q))
    by = {c["metric"]: c for c in comps}
    assert by["h2g_mib_s"]["ratio"] == 0.5 and by["h2g_mib_s"]["higher_is_better"]
    assert by["ping_median_us"]["ratio"] == 1.8 and not by["ping_median_us"]["higher_is_better"]
    assert by["g2h_udp_pps"]["ratio"] == 0.25 and by["g2h_udp_pps"]["higher_is_better"]
    assert by["g2h_udp_vmm_cpu_us_per_pkt"]["ratio"] == 3.0
    assert not by["g2h_udp_vmm_cpu_us_per_pkt"]["higher_is_better"]
    assert len(notes) == len(net.COMPARED) - 4 and all("comparison skipped" in n for n in notes)
    assert net.comparisons({"asyncvmm": {}}) == ([], [])


def test_pooled_pings():
    assert net.pooled_pings([float(i) for i in range(1, 201)]) == {
        "n": 200, "median_us": 100.5, "p99_us": 198.0, "max_us": 200.0}


def test_settings_survive_the_trip_into_the_emulated_host():
    s = net.settings_from(net.parse_args(["--quick", "--pings", "7", "--variants", "qemu-microvm"]))
    assert s == net.Settings(runs=net.QUICK_RUNS, seconds=net.QUICK_SECONDS, pings=7,
                             variants=("qemu-microvm",))
    assert net.settings_from(net.parse_args(s.argv())) == s
    assert s.udp_pps == net.DEFAULT_UDP_PPS
    unlimited = net.settings_from(net.parse_args(["--udp-pps", "0"]))
    assert unlimited.udp_pps == 0 and net.settings_from(net.parse_args(unlimited.argv())) == unlimited
    with pytest.raises(SystemExit):
        net.parse_args(["--udp-pps", "-1"])
    with pytest.raises(SystemExit):
        net.parse_args(["--runs", "0"])
    with pytest.raises(ValueError):
        net.settings_from(net.parse_args(["--variants", "vhost"]))


def test_the_tso_floor_is_set_on_both_ends_or_left_alone():
    assert net.min_tso_command(32) == "echo 32 > /proc/sys/net/ipv4/tcp_min_tso_segs"
    assert net.min_tso_command(0) is None
    with pytest.raises(ValueError):
        net.min_tso_command(-1)
    s = net.settings_from(net.parse_args(["--min-tso-segs", "0"]))
    assert s.min_tso_segs == 0 and net.settings_from(net.parse_args(s.argv())) == s
    with pytest.raises(SystemExit):
        net.parse_args(["--min-tso-segs", "-2"])


@pytest.mark.parametrize("requested, kvm, inside, mode", [
    ("auto", "software", False, "hostvm"),
    ("auto", "absent", False, "hostvm"),
    ("auto", "hardware", False, "direct"),
    ("auto", "software", True, "direct"),      # never nest a second emulated host
    ("direct", "software", False, "direct"),
    ("hostvm", "hardware", False, "hostvm"),
])
def test_mode(requested, kvm, inside, mode):
    assert net.choose_mode(requested, kvm, inside) == mode


def test_results_come_back_through_the_host_vm_results_directory(monkeypatch, tmp_path):
    from asyncvmm_tools.hostvm import RESULTS_ENV

    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    assert net.results_dir(None, inside=True) == tmp_path
    assert net.results_dir(None, inside=False) == net.report.RESULTS_DIR
    assert net.results_dir(Path("/x"), inside=True) == Path("/x")


def test_the_nested_document_names_both_machines():
    inner = {"benchmark": "net", "machine": {"cpus": 1, "kvm": "kvm_amd"}, "load": {"before": [1.0]},
             "git": {"commit": None}, "command": "inner", "variants": {}}
    doc = net.nest_document(inner, {"cpus": 2, "kvm": "kvm_pvm"}, {"commit": "abc"}, {"before": [3.0]},
                            "python -m benchmarks.net", {"kvm": "kvm ready"})
    assert doc["machine"] == {"cpus": 2, "kvm": "kvm_pvm"} and doc["git"] == {"commit": "abc"}
    assert doc["emulated_host"] == {"machine": {"cpus": 1, "kvm": "kvm_amd"}, "load": {"before": [1.0]},
                                    "kvm": "kvm ready"}
    assert doc["command"] == "python -m benchmarks.net" and inner["machine"]["cpus"] == 1


def test_the_host_vm_timeout_grows_with_the_work():
    small = net.Settings(1, 1, 1, ("asyncvmm",))
    big = net.Settings(10, 10, 100, ("asyncvmm", "qemu-microvm"))
    assert 600 < net.hostvm_timeout(small) < net.hostvm_timeout(big)


def test_a_benchmark_run_nested_hands_back_the_inner_document_or_says_why_not(monkeypatch, capsys):
    import asyncvmm_tools.hostvm as hostvm

    seen = {}

    def fake_run_in_hostvm(argv, *, timeout, results_dir, echo, progress, heartbeat, stall_timeout, write=True,
                           stalled=False, wakes=()):
        seen.update(argv=argv, timeout=timeout, heartbeat=heartbeat, stall_timeout=stall_timeout)
        if write:
            results_dir.mkdir(parents=True)
            (results_dir / "vsock.json").write_text(json.dumps({"benchmark": "vsock", "machine": {"cpus": 1},
                                                                "load": {}, "variants": {}}))
        return hostvm.HostVmResult(None if stalled else 0, "", "", results_dir, timed_out=stalled, stalled=stalled,
                                   kvm_line="kvm ready", timings={"boot": 1.234}, wakes=list(wakes))

    monkeypatch.setattr(hostvm, "run_in_hostvm", fake_run_in_hostvm)
    doc, ok = net.run_benchmark_nested("vsock", ["--quick"], 77.0, "python -m benchmarks.vsock")
    assert ok and seen["argv"][1:] == ["-m", "benchmarks.vsock", "--quick"] and seen["timeout"] == 77.0
    assert doc["benchmark"] == "vsock" and doc["command"] == "python -m benchmarks.vsock"
    assert doc["emulated_host"]["machine"] == {"cpus": 1}
    assert doc["emulated_host"]["timings_s"] == {"boot": 1.2} and doc["emulated_host"]["inner_exit_status"] == 0
    assert doc["emulated_host"]["silences_woken"] == 0
    monkeypatch.setattr(hostvm, "run_in_hostvm", lambda *a, **k: fake_run_in_hostvm(
        *a, **k, wakes=["after 20.0 s of console silence:\n(the console spoke again 20.0 s into the silence)\n"]))
    doc, ok = net.run_benchmark_nested("vsock", [], 77.0, "c")
    assert ok and doc["emulated_host"]["silences_woken"] == 1
    assert "went silent 1 time(s) and got a serial break" in capsys.readouterr().err
    monkeypatch.setattr(hostvm, "run_in_hostvm", lambda *a, **k: fake_run_in_hostvm(*a, **k, write=False))
    assert net.run_benchmark_nested("vsock", [], 5.0, "c") == (None, False)
    assert "left no vsock.json (exit status 0)" in capsys.readouterr().err
    assert 0 < seen["heartbeat"] < seen["stall_timeout"] < 77.0          # a frozen host ends the run early
    monkeypatch.setattr(hostvm, "run_in_hostvm", lambda *a, **k: fake_run_in_hostvm(*a, **k, write=False,
                                                                                    stalled=True))
    assert net.run_benchmark_nested("vsock", [], 500.0, "c") == (None, False)
    assert "the emulated host froze: no console output for 60 s" in capsys.readouterr().err


def test_run_and_conclude_picks_the_mode_and_writes_unless_told_not_to(monkeypatch, tmp_path, capsys):
    import argparse

    import asyncvmm_tools.hostvm as hostvm

    monkeypatch.setattr(hostvm, "in_hostvm", lambda: False)
    monkeypatch.setattr(hostvm, "kvm_kind", lambda: "kvm_pvm")        # auto: not hardware, so hostvm
    doc = report.new_document("net", "Net", "c", variants={"asyncvmm": {"failures": []}}, comparisons=[])
    ran = []

    def direct(settings, command):
        ran.append(("direct", settings, command))
        return doc, True

    def nested(settings, command, timeout):
        ran.append(("nested", settings, command, timeout))
        return None, False

    args = argparse.Namespace(mode="auto", hostvm_timeout=9.0, results_dir=tmp_path, no_write=False)
    assert net.run_and_conclude(args, "s", "c", nested, direct) == 1       # the nested run wrote nothing
    assert ran == [("nested", "s", "c", 9.0)] and list(tmp_path.iterdir()) == []
    args.mode = "direct"
    assert net.run_and_conclude(args, "s", "c", nested, direct, note="(a note)") == 0
    assert ran[-1] == ("direct", "s", "c") and (tmp_path / report.SUMMARY_NAME).exists()
    assert "(a note)" in capsys.readouterr().out
    args.no_write, args.results_dir = True, tmp_path / "not-written"
    assert net.run_and_conclude(args, "s", "c", nested, direct) == 0
    assert not args.results_dir.exists()
