"""TcpConnection driven segment by segment (no frames)."""

import pytest

from asyncvmm.mmds.http11 import HttpRequest, HttpResponse
from asyncvmm.mmds.pdu import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TcpSegment
from asyncvmm.mmds.tcp import (TRANSITIONS, TcpConfig, TcpConnection, TcpEvent, TcpState, seq_add,
                               seq_diff)

REQ = b"GET /x HTTP/1.1\r\n\r\n"


def echo_app(body: bytes = b"ok"):
    def app(request: HttpRequest) -> HttpResponse:
        return HttpResponse(200, body + request.target.encode())
    return app


class Peer:
    """Drives one TcpConnection from the guest's side."""

    def __init__(self, iss_local=0x1000, iss_peer=5000, window=65535, mss=1460,
                 app=None, config=TcpConfig(), now=0.0):
        syn = TcpSegment(40000, 80, iss_peer, 0, TCP_SYN, window, mss)
        self.conn = TcpConnection(syn, iss_local, now, app or echo_app(), config)
        self.seq = seq_add(iss_peer, 1)
        self.ack = 0
        self.window = window
        self.now = now

    def send(self, flags, payload=b"", seq=None, ack=None, window=None):
        self.conn.on_segment(TcpSegment(40000, 80, self.seq if seq is None else seq,
                                        self.ack if ack is None else ack, flags,
                                        self.window if window is None else window, None, payload),
                             self.now)

    def drain(self):
        out = []
        while (seg := self.conn.next_segment(self.now)) is not None:
            out.append(seg)
            assert len(out) < 1000
        return out

    def establish(self):
        [synack] = self.drain()
        assert synack.flags == TCP_SYN | TCP_ACK
        self.ack = seq_add(synack.seq, 1)
        self.send(TCP_ACK)
        assert self.conn.state is TcpState.ESTABLISHED

    def data(self, segs):
        return b"".join(s.payload for s in segs)


def test_seq_arithmetic_wraps():
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert seq_diff(1, 0xFFFFFFFF) == 2
    assert seq_diff(0xFFFFFFFF, 1) == -2


def test_transition_table_is_the_passive_side_of_rfc9293():
    assert TRANSITIONS[(TcpState.SYN_RECEIVED, TcpEvent.ACK_OF_SYN)] is TcpState.ESTABLISHED
    assert TRANSITIONS[(TcpState.CLOSE_WAIT, TcpEvent.SND_FIN)] is TcpState.LAST_ACK
    reachable = {TcpState.SYN_RECEIVED} | set(TRANSITIONS.values())
    assert reachable == set(TcpState)


def test_request_response_across_sequence_wraparound():
    p = Peer(iss_local=0xFFFFFFFE, iss_peer=0xFFFFFFF0)
    p.establish()
    p.send(TCP_ACK | TCP_PSH, REQ)
    p.seq = seq_add(p.seq, len(REQ))
    segs = p.drain()
    assert segs[0].ack == p.seq
    assert p.data(segs).endswith(b"ok/x")
    assert seq_diff(segs[0].seq, 0xFFFFFFFF) == 0


def test_syn_ack_is_retransmitted_on_a_repeated_syn_and_on_timeout():
    p = Peer()
    [first] = p.drain()
    p.conn.on_segment(TcpSegment(40000, 80, 5000, 0, TCP_SYN, 65535, 1460), p.now)
    [again] = p.drain()
    assert again == first
    p.now = p.conn.deadline
    [third] = p.drain()
    assert third.has(TCP_SYN) and third.seq == first.seq


def test_out_of_order_data_is_dropped_with_a_duplicate_ack():
    p = Peer()
    p.establish()
    p.send(TCP_ACK, REQ[5:], seq=seq_add(p.seq, 5))
    [dup] = p.drain()
    assert dup.ack == p.seq and not dup.payload
    p.send(TCP_ACK, REQ[:5])
    p.send(TCP_ACK, REQ, seq=p.seq)  # retransmission overlapping what arrived
    p.seq = seq_add(p.seq, len(REQ))
    segs = p.drain()
    assert segs[-1].ack == p.seq and p.data(segs).endswith(b"ok/x")


def test_pipelined_requests_are_answered_in_order_one_at_a_time():
    p = Peer()
    p.establish()
    two = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"
    p.send(TCP_ACK, two)
    p.seq = seq_add(p.seq, len(two))
    first = p.data(p.drain())
    assert first.endswith(b"ok/a") and b"ok/b" not in first
    p.ack = seq_add(p.ack, len(first))
    p.send(TCP_ACK)
    assert p.data(p.drain()).endswith(b"ok/b")


def test_rst_needs_the_exact_sequence_number():
    p = Peer()
    p.establish()
    p.send(TCP_RST, seq=seq_add(p.seq, 10))
    [challenge] = p.drain()
    assert challenge.flags == TCP_ACK and p.conn.state is TcpState.ESTABLISHED
    p.send(TCP_RST, seq=seq_add(p.seq, 70000))  # outside the window: ignored
    assert p.drain() == []
    p.send(TCP_RST)
    assert p.conn.done and not p.conn.reset_needed


def test_syn_on_an_established_connection_draws_a_challenge_ack():
    p = Peer()
    p.establish()
    p.send(TCP_SYN, seq=seq_add(p.seq, 100))
    [challenge] = p.drain()
    assert challenge.flags == TCP_ACK and challenge.ack == p.seq
    assert p.conn.state is TcpState.ESTABLISHED


def test_ack_of_unsent_data_is_refused():
    p = Peer()
    p.establish()
    p.send(TCP_ACK, REQ, ack=seq_add(p.ack, 100))
    [ack] = p.drain()
    assert not ack.payload and ack.ack == p.seq  # the data was not taken


def test_zero_window_is_probed_and_reopened():
    p = Peer(window=65535)
    p.establish()
    p.send(TCP_ACK | TCP_PSH, REQ, window=0)
    p.seq = seq_add(p.seq, len(REQ))
    assert [s.payload for s in p.drain()] == [b""]  # only the ACK of the request
    assert p.conn.deadline is not None
    p.now = p.conn.deadline
    [probe] = p.drain()
    assert len(probe.payload) == 1
    p.send(TCP_ACK, window=0)  # probe dropped by the peer
    p.now = p.conn.deadline
    [probe2] = p.drain()
    assert probe2.seq == probe.seq and len(probe2.payload) == 1
    p.send(TCP_ACK, window=65535)
    rest = p.drain()
    assert (probe2.payload + p.data(rest)).endswith(b"ok/x")


def test_fin_handshakes_reach_closed():
    # We close first (HTTP/1.0): FIN-WAIT-1 -> FIN-WAIT-2 -> CLOSED.
    p = Peer()
    p.establish()
    req = b"GET /x HTTP/1.0\r\n\r\n"
    p.send(TCP_ACK, req)
    p.seq = seq_add(p.seq, len(req))
    segs = p.drain()
    assert segs[-1].has(TCP_FIN) and p.conn.state is TcpState.FIN_WAIT_1
    fin_end = seq_add(segs[-1].seq, len(segs[-1].payload) + 1)
    p.ack = fin_end
    p.send(TCP_ACK)
    assert p.conn.state is TcpState.FIN_WAIT_2
    p.send(TCP_FIN | TCP_ACK)
    assert p.conn.state is TcpState.CLOSED and not p.conn.done
    [last] = p.drain()
    assert last.ack == seq_add(p.seq, 1) and p.conn.done


def test_simultaneous_close_goes_through_closing():
    p = Peer()
    p.establish()
    req = b"GET /x HTTP/1.0\r\n\r\n"
    p.send(TCP_ACK, req)
    p.seq = seq_add(p.seq, len(req))
    segs = p.drain()
    p.send(TCP_FIN | TCP_ACK)  # crosses our FIN: acks nothing new
    assert p.conn.state is TcpState.CLOSING
    p.ack = seq_add(segs[-1].seq, len(segs[-1].payload) + 1)
    p.send(TCP_ACK, seq=seq_add(p.seq, 1))
    assert p.conn.state is TcpState.CLOSED


def test_peer_closes_first_close_wait_last_ack():
    p = Peer()
    p.establish()
    p.send(TCP_FIN | TCP_ACK)
    p.seq = seq_add(p.seq, 1)
    [fin] = p.drain()
    assert fin.has(TCP_FIN) and p.conn.state is TcpState.LAST_ACK
    p.ack = seq_add(fin.seq, 1)
    p.send(TCP_ACK)
    assert p.conn.done


def test_handler_exception_becomes_a_500_not_a_crash():
    def broken(_request):
        raise RuntimeError("bug")
    p = Peer(app=broken)
    p.establish()
    p.send(TCP_ACK, REQ)
    assert p.data(p.drain()).startswith(b"HTTP/1.1 500 ")


def test_retransmission_backs_off_then_resets():
    cfg = TcpConfig(rto_initial=1.0, rto_max=4.0, max_retransmissions=4)
    p = Peer(config=cfg)
    p.establish()
    p.send(TCP_ACK, REQ)
    p.drain()
    gaps = []
    while not p.conn.done:
        before = p.now
        p.now = p.conn.deadline
        gaps.append(p.now - before)
        p.drain()
    assert gaps == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert p.conn.reset_needed and p.conn.rst_segment().has(TCP_RST)


@pytest.mark.parametrize("peer_mss,expected", [(None, 536), (100, 100), (9000, 1460), (1, 64)])
def test_mss_choice(peer_mss, expected):
    p = Peer(mss=peer_mss, app=echo_app(b"z" * 5000))
    p.establish()
    p.send(TCP_ACK, REQ)
    sizes = [len(s.payload) for s in p.drain() if s.payload]
    assert max(sizes) == expected
