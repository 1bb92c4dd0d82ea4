"""The MMDS stack fed raw Ethernet frames, as the virtio-net device will feed it."""

import ipaddress
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from asyncvmm.mmds.http_handler import MmdsHttpHandler, MmdsVersion
from asyncvmm.mmds.metrics import MmdsMetrics
from asyncvmm.mmds.pdu import (ARPOP_REPLY, ETHERTYPE_IPV4, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST,
                               TCP_SYN, TcpSegment, build_ethernet, build_ipv4, internet_checksum)
from asyncvmm.mmds.stack import MmdsNetworkStack
from asyncvmm.mmds.store import MmdsStore
from asyncvmm.mmds.tcp import TcpConfig
from asyncvmm.mmds.token import TokenAuthority
from tests.unit.mmds.guest import (GUEST_IP, GUEST_MAC, MMDS_IP, FakeClock, GuestConnection,
                                   arp_request, decode, decode_arp, http_request, tcp_frame)

MMDS_MAC = bytes.fromhex("060123456701")
DATA = {"latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-fea54097",
                                 "network": {"interfaces": {"macs": {}}}}}}


def make_stack(version=MmdsVersion.V1, data=DATA, **kwargs):
    clock = FakeClock()
    store = MmdsStore()
    if data is not None:
        store.put(data)
    metrics = MmdsMetrics()
    handler = MmdsHttpHandler(store, TokenAuthority(clock), version=version, metrics=metrics)
    stack = MmdsNetworkStack(handler, clock=clock, metrics=metrics, **kwargs)
    return stack, clock, store


# -- ARP --------------------------------------------------------------------

def test_arp_request_for_the_mmds_address_is_answered_and_consumed():
    stack, _, _ = make_stack()
    assert stack.handle_guest_frame(arp_request())
    assert stack.has_pending()
    [frame] = stack.pop_frames_for_guest()
    eth, arp = decode_arp(frame)
    assert (eth.dst, eth.src) == (GUEST_MAC, MMDS_MAC)
    assert (arp.oper, arp.sha, arp.spa, arp.tha, arp.tpa) == (ARPOP_REPLY, MMDS_MAC, MMDS_IP,
                                                              GUEST_MAC, GUEST_IP)
    assert not stack.has_pending() and stack.pop_frames_for_guest() == []


def test_arp_for_other_addresses_goes_to_the_tap():
    stack, _, _ = make_stack()
    assert not stack.handle_guest_frame(arp_request(target_ip=bytes([172, 16, 0, 1])))
    assert not stack.has_pending()


def test_arp_replies_are_deduplicated_and_bounded():
    stack, _, _ = make_stack()
    for i in range(100):
        stack.handle_guest_frame(arp_request(sender_ip=bytes([10, 0, 0, i % 50])))
    assert len(stack.pop_frames_for_guest()) == 16
    assert stack.metrics.tx_errors == 68  # 34 distinct requesters per round found the queue full


def test_reset_queue_is_bounded():
    stack, _, _ = make_stack(max_pending_resets=3)
    for port in range(5):
        seg = TcpSegment(42000 + port, 80, 1, 1, TCP_ACK, 100)
        assert stack.handle_guest_frame(tcp_frame(seg))
    frames = stack.pop_frames_for_guest()
    assert [decode(f)[1].dst_port for f in frames] == [42000, 42001, 42002]
    assert stack.metrics.tx_errors == 2


def test_arp_reply_or_broadcast_sender_is_consumed_but_not_answered():
    stack, _, _ = make_stack()
    assert stack.handle_guest_frame(arp_request(sender_mac=b"\xff" * 6))
    assert stack.pop_frames_for_guest() == []
    assert stack.metrics.rx_accepted_err == 1


def test_custom_mmds_address():
    stack, _, _ = make_stack(ipv4_addr="169.254.170.2")
    custom = ipaddress.IPv4Address("169.254.170.2").packed
    assert not stack.handle_guest_frame(arp_request())
    assert stack.handle_guest_frame(arp_request(target_ip=custom))
    _, arp = decode_arp(stack.pop_frames_for_guest()[0])
    assert arp.spa == custom


def test_non_mmds_ipv4_and_other_ethertypes_go_to_the_tap():
    stack, _, _ = make_stack()
    seg = TcpSegment(40000, 80, 1, 0, TCP_SYN, 1000)
    assert not stack.handle_guest_frame(tcp_frame(seg, dst_ip=bytes([8, 8, 8, 8])))
    assert not stack.handle_guest_frame(build_ethernet(b"\xff" * 6, GUEST_MAC, 0x86DD, bytes(60)))
    assert not stack.handle_guest_frame(b"\x00" * 5)
    assert stack.metrics.rx_bad_eth == 1


# -- TCP and HTTP ---------------------------------------------------------------

def test_tcp_handshake():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack, mss=1400)
    synack = guest.connect()
    assert synack.mss == 1460 and synack.window > 0
    assert stack.metrics.connections_created == 1
    assert guest.pump() == []  # the handshake ACK needs no answer


def test_v1_get_meta_data():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    reply = guest.get("/latest/meta-data/")
    assert reply.status == 200 and reply.headers["content-type"] == "text/plain"
    assert reply.text == "ami-id\nnetwork/\nreservation-id"
    assert guest.get("/latest/meta-data/ami-id").text == "ami-12345678"  # keep-alive


def test_v2_token_flow():
    stack, clock, _ = make_stack(MmdsVersion.V2)
    guest = GuestConnection(stack)
    guest.connect()
    assert guest.get("/latest/meta-data/ami-id").status == 401
    put = guest.put("/latest/api/token", X_metadata_token_ttl_seconds="60")
    assert put.status == 200 and put.headers["x-metadata-token-ttl-seconds"] == "60"
    token = put.text
    ok = guest.get("/latest/meta-data/ami-id", X_metadata_token=token)
    assert (ok.status, ok.text) == (200, "ami-12345678")
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    assert guest.get("/latest/meta-data/ami-id", X_metadata_token=forged).status == 401
    clock.advance(60)
    expired = guest.get("/latest/meta-data/ami-id", X_metadata_token=token)
    assert (expired.status, expired.text) == (401, "MMDS token not valid.")
    for ttl in ("0", "21601"):
        assert guest.put("/latest/api/token", X_metadata_token_ttl_seconds=ttl).status == 400


def test_json_versus_imds_text():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    as_json = guest.get("/latest/meta-data", Accept="application/json")
    assert as_json.headers["content-type"] == "application/json"
    assert json.loads(as_json.body) == DATA["latest"]["meta-data"]
    assert guest.get("/latest/meta-data").text == "ami-id\nnetwork/\nreservation-id"


def test_404_405_501():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    assert guest.get("/nope").status == 404
    reply = guest.request(http_request("POST", "/"))
    assert reply.status == 405 and reply.headers["allow"] == "GET, PUT"
    assert guest.request(http_request("OPTIONS", "/")).status == 501
    assert guest.request(b"GET / HTTP/3.0\r\n\r\n").status == 501


def test_response_larger_than_one_segment_is_split_by_mss():
    big = "x" * 5000
    stack, _, _ = make_stack(data={"big": big})
    guest = GuestConnection(stack, mss=1000)
    guest.connect()
    guest.send_data(http_request("GET", "/big"))
    segments = guest.pump()
    data_segments = [s for s in segments if s.payload]
    assert len(data_segments) > 5
    assert all(len(s.payload) <= 1000 for s in data_segments)
    assert data_segments[-1].has(TCP_PSH)
    while guest.pump():
        pass
    reply = guest.request(b"")  # already complete: parse what arrived
    assert reply.text == big


def test_response_respects_the_guest_window():
    stack, _, _ = make_stack(data={"big": "y" * 6000})
    guest = GuestConnection(stack, mss=1000, window=2500)
    guest.connect()
    guest.send_data(http_request("GET", "/big"))
    first = [s for s in guest.pump(auto_ack=False) if s.payload]
    assert sum(len(s.payload) for s in first) == 2500
    assert guest.pump(auto_ack=False) == []  # window full: nothing more until ACKed
    guest.send(TCP_ACK)
    assert sum(len(s.payload) for s in guest.pump()) == 2500


def test_bad_content_length_is_answered_400_without_waiting_and_closed():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    reply = guest.request(b"GET / HTTP/1.1\r\nContent-Length: 100\r\nAccept: application/json"
                          b"\r\n\r\nsome body")
    assert reply.status == 400 and reply.text == "Invalid request."
    assert reply.headers["connection"] == "close"
    guest.pump()
    assert guest.fin_received


def test_huge_request_head_does_not_hang():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    synack = guest.connect()
    chunk = b"GET /" + b"a" * 1400
    sent = 0
    while sent < 20000:
        guest.send_data(chunk)
        sent += len(chunk)
        guest.pump()
        if guest.received:
            break
    reply = guest.request(b"")
    assert reply.status == 400
    assert sent <= synack.window + len(chunk) * 2


def test_connection_close_and_http10_close_after_the_response():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    reply = guest.request(http_request("GET", "/latest/meta-data/ami-id", "HTTP/1.0"))
    assert reply.text == "ami-12345678" and reply.headers["connection"] == "close"
    guest.pump()
    assert guest.fin_received
    guest.send(TCP_FIN | TCP_ACK)
    guest.seq += 1
    guest.pump()
    assert stack.metrics.connections_destroyed == 1
    assert not stack.has_pending()


def test_guest_fin_is_acked_and_answered_with_fin():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    guest.send(TCP_FIN | TCP_ACK)
    guest.seq += 1
    segs = guest.pump()
    assert any(s.has(TCP_FIN) for s in segs) and segs[-1].ack == guest.seq
    assert stack.metrics.connections_destroyed == 1


def test_request_with_fin_in_the_same_segment_is_answered_then_closed():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    raw = http_request("GET", "/latest/meta-data/ami-id")
    guest.send(TCP_ACK | TCP_PSH | TCP_FIN, raw)
    guest.seq += len(raw) + 1
    for _ in range(5):
        guest.pump()
    assert b"ami-12345678" in guest.received and guest.fin_received
    assert stack.metrics.connections_destroyed == 1


def test_segment_for_no_connection_gets_rst_and_other_ports_are_refused():
    stack, _, _ = make_stack()
    guest = GuestConnection(stack)
    guest.seq, guest.ack = 5000, 777
    assert guest.send(TCP_ACK, b"data")
    [rst] = guest.pump()
    assert rst.has(TCP_RST) and rst.seq == 777
    assert stack.handle_guest_frame(tcp_frame(TcpSegment(40001, 22, 9, 0, TCP_SYN, 100)))
    _, rst = decode(stack.pop_frames_for_guest()[0])
    assert rst.has(TCP_RST) and rst.has(TCP_ACK) and rst.ack == 10
    assert not stack.handle_guest_frame(b"") and stack.pop_frames_for_guest() == []


def test_connection_limit_refuses_then_evicts_idle_connections():
    stack, clock, _ = make_stack(max_connections=2)
    guests = [GuestConnection(stack, port=41000 + i) for i in range(3)]
    guests[0].connect()
    guests[1].connect()
    guests[2].seq = 1000
    guests[2].send(TCP_SYN, mss=1460)
    [rst] = guests[2].pump()
    assert rst.has(TCP_RST)
    clock.advance(5)
    guests[1].send(TCP_ACK)  # guest 1 is alive; guest 0 goes quiet
    clock.advance(6)
    guests[2].send(TCP_SYN, mss=1460)
    replies = {seg.dst_port: seg for seg in map(lambda f: decode(f)[1],
                                                   stack.pop_frames_for_guest())}
    assert replies[41000].has(TCP_RST) and replies[41000].seq == guests[0].ack
    assert replies[41002].has(TCP_SYN)
    assert 41001 not in replies
    assert stack.metrics.connections_destroyed == 1 and stack.metrics.connections_created == 3


def test_retransmission_after_a_lost_response():
    stack, clock, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    guest.send_data(http_request("GET", "/latest/meta-data/ami-id"))
    lost = stack.pop_frames_for_guest()  # dropped on the way to the guest
    assert lost and not stack.has_pending()
    deadline = stack.next_deadline()
    assert deadline is not None and deadline > clock()
    clock.t = deadline
    assert stack.has_pending()
    reply = guest.request(b"")
    assert reply.text == "ami-12345678"


def test_gives_up_with_rst_when_the_guest_never_acks():
    stack, clock, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    guest.send_data(http_request("GET", "/"))
    frames = 0
    for _ in range(50):
        frames += len(stack.pop_frames_for_guest())
        deadline = stack.next_deadline()
        if deadline is None:
            break
        clock.t = deadline
    assert stack.next_deadline() is None and frames > 5
    assert stack.metrics.connections_destroyed == 1


def test_checksum_offloaded_tcp_is_accepted_without_verification():
    stack, _, _ = make_stack()
    seg = TcpSegment(40000, 80, 1, 0, TCP_SYN, 1000, 1460)
    frame = bytearray(tcp_frame(seg))
    frame[14 + 20 + 16:14 + 20 + 18] = b"\x12\x34"  # only a partial checksum
    assert stack.handle_guest_frame(bytes(frame))
    assert stack.pop_frames_for_guest() == []  # verified: dropped
    assert stack.handle_guest_frame(bytes(frame), csum_offloaded=True)
    assert decode(stack.pop_frames_for_guest()[0])[1].has(TCP_SYN)


# -- malformed frames -----------------------------------------------------------

def _ipv4_frame(packet: bytes) -> bytes:
    return build_ethernet(MMDS_MAC, GUEST_MAC, ETHERTYPE_IPV4, packet)


def _valid_syn_frame() -> bytes:
    return tcp_frame(TcpSegment(40000, 80, 1, 0, TCP_SYN, 1000, 1460))


@pytest.mark.parametrize("mutate", [
    lambda f: f[:14 + 20 + 10],                                  # truncated TCP header
    lambda f: f[:14 + 18] + MMDS_IP[:2],                         # truncated IPv4 header
    lambda f: f[:14 + 10] + b"\0\0" + f[14 + 12:],               # bad IPv4 checksum
    lambda f: f[:14 + 20 + 16] + b"\xde\xad" + f[14 + 20 + 18:],  # bad TCP checksum
    lambda f: f[:16] + b"\xff\xff" + f[18:],                     # bogus total length
    lambda f: f[:14] + b"\x4f" + f[15:],                         # IHL beyond the packet
    lambda f: f[:14 + 20 + 12] + b"\xf0" + f[14 + 20 + 13:],     # TCP data offset too big
])
def test_malformed_frames_to_the_mmds_are_consumed_and_dropped(mutate):
    stack, _, _ = make_stack()
    assert stack.handle_guest_frame(mutate(_valid_syn_frame()))
    assert stack.pop_frames_for_guest() == [] and not stack.has_pending()
    assert stack.metrics.rx_accepted_err == 1


def test_fragments_and_non_tcp_to_the_mmds_are_dropped():
    stack, _, _ = make_stack()
    frag = bytearray(build_ipv4(GUEST_IP, MMDS_IP, 6, 1, bytes(20)))
    frag[6:8] = b"\x20\x00"
    frag[10:12] = b"\0\0"
    frag[10:12] = internet_checksum(bytes(frag[:20])).to_bytes(2, "big")
    assert stack.handle_guest_frame(_ipv4_frame(bytes(frag)))
    assert stack.handle_guest_frame(_ipv4_frame(build_ipv4(GUEST_IP, MMDS_IP, 17, 1, bytes(8))))
    assert stack.pop_frames_for_guest() == []
    assert stack.metrics.rx_accepted_unusual == 1 and stack.metrics.rx_accepted_err == 1


def test_a_bug_below_the_frame_boundary_costs_the_frame_not_the_vmm(monkeypatch, caplog):
    stack, _, _ = make_stack()

    def broken(*_args):
        raise KeyError("bug")
    monkeypatch.setattr(stack, "_on_ipv4", broken)
    assert stack.handle_guest_frame(_valid_syn_frame())
    assert stack.metrics.rx_accepted_err == 1
    assert "MMDS failed on a guest frame" in caplog.text


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120), st.booleans())
def test_fuzzed_frames_never_raise(tail, offloaded):
    stack, _, _ = make_stack()
    for prefix in (_valid_syn_frame()[:34], arp_request()[:38], b""):
        stack.handle_guest_frame(prefix + tail, csum_offloaded=offloaded)
    stack.pop_frames_for_guest()


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([0, TCP_ACK, TCP_SYN, TCP_FIN | TCP_ACK, TCP_RST,
                                           TCP_ACK | TCP_PSH, TCP_SYN | TCP_ACK, 0xFF]),
                          st.integers(-3000, 3000), st.integers(-3000, 3000),
                          st.integers(0, 65535), st.binary(max_size=60), st.floats(0, 3)),
                max_size=25))
def test_fuzzed_segments_on_an_open_connection_never_raise(steps):
    stack, clock, _ = make_stack()
    guest = GuestConnection(stack)
    guest.connect()
    base_seq, base_ack = guest.seq, guest.ack
    guest.send_data(http_request("GET", "/latest/meta-data/"))
    for flags, dseq, dack, window, payload, dt in steps:
        guest.send(flags, payload, seq=(base_seq + dseq) & 0xFFFFFFFF,
                   ack=(base_ack + dack) & 0xFFFFFFFF, window=window)
        clock.advance(dt)
        for frame in stack.pop_frames_for_guest(7):
            decode(frame)  # every frame the stack emits is well formed
    assert len(stack._conns) <= 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.booleans(), max_size=40), st.integers(300, 4000))
def test_lossy_link_still_delivers_the_exact_response(drops, window):
    body = "".join(chr(ord("a") + i % 26) for i in range(7000))
    stack, clock, _ = make_stack(data={"k": body}, tcp_config=TcpConfig(max_retransmissions=60))
    guest = GuestConnection(stack, mss=700, window=window)
    guest.connect()
    guest.send_data(http_request("GET", "/k"))
    pattern = iter(drops)
    for _ in range(2000):
        if guest.received.endswith(body.encode()):
            break
        frames = stack.pop_frames_for_guest()
        kept = [f for f in frames if not next(pattern, False)]
        delivered = False
        for frame in kept:
            _, seg = decode(frame)
            if seg.seq == guest.ack and seg.payload:
                guest.received += seg.payload
                guest.ack = (guest.ack + len(seg.payload)) & 0xFFFFFFFF
                delivered = True
        if kept:
            guest.send(TCP_ACK)
        if not delivered and not stack.has_pending():
            deadline = stack.next_deadline()
            assert deadline is not None, "stalled with nothing scheduled"
            clock.t = deadline
    head, _, got = bytes(guest.received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and got == body.encode()
    assert not guest.rst_received
