"""One server-side TCP connection carrying HTTP requests to the MMDS (sans-I/O).

Primer (RFC 9293).  Each side numbers the bytes it sends; SYN and FIN each
take one number.  The passive side answers a SYN with SYN-ACK, and the
connection is ESTABLISHED when the peer acknowledges it.  Every segment we
send acknowledges ``rcv_nxt`` (the next byte we expect) and advertises a
window: how many bytes beyond ``rcv_nxt`` we can buffer.  We may have at most
the peer's window of unacknowledged bytes in flight.

What this implementation does, and why it is enough for a link to the guest
that neither loses nor reorders much:

* In-order receive only: a segment starting beyond ``rcv_nxt`` is dropped and
  answered with a duplicate ACK; overlap with bytes already received is
  trimmed.  The receive buffer is the HTTP request buffer, so the window we
  advertise is its free space and the guest can never make us buffer more.
* Sending: responses are cut into segments of at most the peer's MSS (its
  SYN option, 536 if absent, capped by ``mss_cap``) within its window;
  go-back-N retransmission on a timer that doubles up to ``rto_max``; after
  ``max_retransmissions`` timeouts in a row the connection is reset.  A zero
  window is probed with one byte when the timer fires.
* One response at a time: the next request is parsed only when the previous
  response is fully acknowledged, which bounds memory per connection to one
  request buffer plus one response.
* RST and SYN in a synchronized state are checked as RFC 5961 asks (exact
  sequence number for RST, challenge ACK otherwise), so a blind guest process
  cannot kill another's connection.
* No TIME-WAIT: the remote side is a guest on a private link, and a stale
  duplicate at worst draws a RST.

The connection never touches frames or clocks: the stack feeds it parsed
segments and the current time and asks it for segments to send.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from dataclasses import dataclass
from typing import Callable

from asyncvmm.mmds.http11 import (HttpParseError, HttpRequest, HttpResponse, RequestReader,
                                  MAX_REQUEST_BYTES)
from asyncvmm.mmds.pdu import TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, TcpSegment

log = logging.getLogger(__name__)

RequestHandler = Callable[[HttpRequest], HttpResponse]

_MASK = 0xFFFFFFFF
DEFAULT_MSS = 536  # RFC 9293 section 3.7.1: assumed when the SYN has no MSS option
MIN_MSS = 64
MAX_WINDOW = 0xFFFF  # no window scaling is offered


def seq_add(a: int, n: int) -> int:
    return (a + n) & _MASK


def seq_diff(a: int, b: int) -> int:
    """``a - b`` in sequence space, as a signed 32-bit distance."""
    d = (a - b) & _MASK
    return d - (1 << 32) if d & 0x8000_0000 else d


@dataclass(frozen=True)
class TcpConfig:
    mss_cap: int = 1460
    rcv_buffer: int = MAX_REQUEST_BYTES
    rto_initial: float = 0.3
    rto_max: float = 5.0
    max_retransmissions: int = 8


class TcpState(enum.Enum):
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    CLOSED = "CLOSED"


class TcpEvent(enum.Enum):
    ACK_OF_SYN = "our SYN acknowledged"
    RCV_FIN = "peer FIN received"
    SND_FIN = "our FIN sent"
    ACK_OF_FIN = "our FIN acknowledged"


S, E = TcpState, TcpEvent
# RFC 9293 section 3.3.2 (Figure 5), passive-open side.  TIME-WAIT is folded
# into CLOSED (see module docstring).  A RST or an abort leaves any state for
# CLOSED and is not listed.
TRANSITIONS: dict[tuple[TcpState, TcpEvent], TcpState] = {
    (S.SYN_RECEIVED, E.ACK_OF_SYN): S.ESTABLISHED,
    (S.ESTABLISHED, E.RCV_FIN): S.CLOSE_WAIT,
    (S.ESTABLISHED, E.SND_FIN): S.FIN_WAIT_1,
    (S.CLOSE_WAIT, E.SND_FIN): S.LAST_ACK,
    (S.FIN_WAIT_1, E.ACK_OF_FIN): S.FIN_WAIT_2,
    (S.FIN_WAIT_1, E.RCV_FIN): S.CLOSING,
    (S.FIN_WAIT_2, E.RCV_FIN): S.CLOSED,
    (S.CLOSING, E.ACK_OF_FIN): S.CLOSED,
    (S.LAST_ACK, E.ACK_OF_FIN): S.CLOSED,
}
del S, E

# States in which the peer may still send us data.
_RECEIVING = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})


class TcpConnection:
    """The MMDS end of one connection; see the module docstring."""

    def __init__(self, syn: TcpSegment, iss: int, now: float, app: RequestHandler,
                 config: TcpConfig = TcpConfig()) -> None:
        self.config = config
        self.app = app
        self.local_port = syn.dst_port
        self.remote_port = syn.src_port
        self.state = TcpState.SYN_RECEIVED
        self.last_rx = now
        # Receive side.
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self._reader = RequestReader(config.rcv_buffer)
        self._ack_pending = False
        self._input_closed = False  # after Connection: close or an error, input is discarded
        self.fin_received = False
        # Send side: sequence space is [SYN][data...][FIN], the data starting at iss + 1.
        self.iss = iss & _MASK
        self.snd_una = self.iss
        self.snd_nxt = self.iss
        self.snd_max = self.iss
        self.snd_wnd = syn.window
        # The floor bounds how many frames one response can take.
        self.mss = max(MIN_MSS, min(syn.mss or DEFAULT_MSS, config.mss_cap))
        self._data_seq = seq_add(self.iss, 1)  # sequence number of _send_buf[0]
        self._send_buf = bytearray()
        self._fin_queued = False
        # Retransmission timer.
        self._rto = config.rto_initial
        self._deadline: float | None = None
        self._retries = 0
        self._probe = False
        self.reset_needed = False  # aborted by us: the stack sends a RST

    # -- state --------------------------------------------------------------

    def _fire(self, event: TcpEvent) -> None:
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is not None:
            self.state = nxt

    def abort(self, send_rst: bool) -> None:
        self.state = TcpState.CLOSED
        self.reset_needed = send_rst
        self._ack_pending = False
        self._deadline = None

    @property
    def done(self) -> bool:
        """Nothing left to do: the stack may forget this connection."""
        return self.state is TcpState.CLOSED and not self._ack_pending

    @property
    def deadline(self) -> float | None:
        return self._deadline

    @property
    def _fin_seq(self) -> int:
        return seq_add(self._data_seq, len(self._send_buf))

    @property
    def window(self) -> int:
        # Once input is discarded any amount fits; the window only grows then.
        room = self.config.rcv_buffer if self._input_closed else self._reader.free_space
        return min(room, MAX_WINDOW)

    # -- receiving ----------------------------------------------------------

    def _acceptable(self, seg: TcpSegment) -> bool:
        # RFC 9293 section 3.10.7.4, first check.
        wnd = self.window
        start = seq_diff(seg.seq, self.rcv_nxt)
        if seg.seg_len == 0:
            return start == 0 if wnd == 0 else 0 <= start < wnd
        end = start + seg.seg_len - 1
        return wnd > 0 and (0 <= start < wnd or 0 <= end < wnd)

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment from the peer."""
        self.last_rx = now
        if self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.SYN_RECEIVED and seg.flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_SYN:
            if seg.seq == self.irs:
                self.snd_nxt = self.iss  # our SYN-ACK was lost: send it again
            return
        if not self._acceptable(seg):
            if not seg.has(TCP_RST):
                self._ack_pending = True
            return
        if seg.has(TCP_RST):
            if seg.seq == self.rcv_nxt:
                self.abort(send_rst=False)
            else:
                self._ack_pending = True  # RFC 5961 section 3.2: challenge ACK
            return
        if seg.has(TCP_SYN):
            self._ack_pending = True  # RFC 5961 section 4.2: challenge ACK
            return
        if not seg.has(TCP_ACK) or not self._on_ack(seg, now):
            return
        self._on_data(seg)
        self._serve()
        if self._deadline is None and self._unsent() and self.snd_wnd == 0 \
                and self.snd_una == self.snd_max:
            self._deadline = now + self._rto  # persist timer for the zero window

    def _on_ack(self, seg: TcpSegment, now: float) -> bool:
        """Process the ACK field; False if the segment must be dropped."""
        if seq_diff(seg.ack, self.snd_max) > 0:
            self._ack_pending = True  # acknowledges something never sent
            return False
        if self.state is TcpState.SYN_RECEIVED:
            if seg.ack != seq_add(self.iss, 1):
                return False
            self._fire(TcpEvent.ACK_OF_SYN)
        advanced = seq_diff(seg.ack, self.snd_una)
        if advanced >= 0:
            self.snd_wnd = seg.window
        if advanced > 0:
            self._acknowledge(seg.ack, now)
        return True

    def _acknowledge(self, ack: int, now: float) -> None:
        self.snd_una = ack
        if seq_diff(self.snd_nxt, ack) < 0:
            self.snd_nxt = ack
        acked_data = min(max(seq_diff(ack, self._data_seq), 0), len(self._send_buf))
        if acked_data:
            del self._send_buf[:acked_data]
            self._data_seq = seq_add(self._data_seq, acked_data)
        if self._fin_queued and ack == seq_add(self._fin_seq, 1):
            self._fire(TcpEvent.ACK_OF_FIN)
        self._retries = 0
        self._rto = self.config.rto_initial
        self._deadline = now + self._rto if self.snd_una != self.snd_max else None

    def _on_data(self, seg: TcpSegment) -> None:
        if self.state not in _RECEIVING:
            return
        skip = seq_diff(self.rcv_nxt, seg.seq)
        if skip < 0:
            if seg.seg_len:
                self._ack_pending = True  # out of order: dropped, duplicate ACK
            return
        data = seg.payload[skip:]
        if data:
            taken = len(data) if self._input_closed else self._reader.feed(data)
            self.rcv_nxt = seq_add(self.rcv_nxt, taken)
            self._ack_pending = True
            if taken < len(data):
                return  # the rest was beyond our window, and so is the FIN
        if seg.has(TCP_FIN) and skip <= len(seg.payload):
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.fin_received = True
            self._ack_pending = True
            self._fire(TcpEvent.RCV_FIN)

    # -- the application ----------------------------------------------------

    def _respond(self, request: HttpRequest) -> HttpResponse:
        try:
            response = self.app(request)
        except Exception:  # a handler bug must not take the VMM down
            log.exception("MMDS request handler failed")
            response = HttpResponse.text(500, "Internal error.", close=True)
        if not request.keep_alive and not response.close:
            response = dataclasses.replace(response, close=True)
        return response

    def _serve(self) -> None:
        """Turn buffered requests into responses, one unacknowledged response at a time."""
        while not self._send_buf and not self._fin_queued and not self._input_closed:
            item = self._reader.next_request()
            if item is None:
                if self.fin_received:
                    self._fin_queued = True  # the peer is done and everything is answered
                break
            if isinstance(item, HttpParseError):
                response, version = item.response, "HTTP/1.1"
            else:
                response, version = self._respond(item), item.version
            self._send_buf += response.encode(version)
            if response.close:
                self._input_closed = True
        if self._input_closed:
            self._fin_queued = True  # after the response, which is already queued

    # -- sending ------------------------------------------------------------

    def _unsent(self) -> int:
        return len(self._send_buf) - max(seq_diff(self.snd_nxt, self._data_seq), 0)

    def _next_kind(self, now: float) -> str | None:
        if self.state is TcpState.CLOSED:
            return "ack" if self._ack_pending else None
        if self._deadline is not None and now >= self._deadline:
            return "timeout"
        if self.state is TcpState.SYN_RECEIVED:
            return "syn" if self.snd_nxt == self.iss else ("ack" if self._ack_pending else None)
        unsent = self._unsent()
        if unsent > 0 and (seq_diff(seq_add(self.snd_una, self.snd_wnd), self.snd_nxt) > 0
                           or self._probe):
            return "data"
        if self._fin_queued and unsent == 0 and self.snd_nxt == self._fin_seq:
            return "fin"
        return "ack" if self._ack_pending else None

    def has_output(self, now: float) -> bool:
        return self._next_kind(now) is not None

    def _segment(self, seq: int, flags: int, payload: bytes = b"", mss: int | None = None) -> TcpSegment:
        self._ack_pending = False
        return TcpSegment(self.local_port, self.remote_port, seq, self.rcv_nxt,
                          flags | TCP_ACK, self.window, mss, payload)

    def _sent(self, seq_len: int, now: float) -> None:
        self.snd_nxt = seq_add(self.snd_nxt, seq_len)
        if seq_diff(self.snd_nxt, self.snd_max) > 0:
            self.snd_max = self.snd_nxt
        if self._deadline is None:
            self._deadline = now + self._rto

    def _on_timeout(self, now: float) -> None:
        self._retries += 1
        if self._retries > self.config.max_retransmissions:
            self.abort(send_rst=True)
            return
        self.snd_nxt = self.snd_una  # go back N
        self._probe = self.snd_wnd == 0
        self._rto = min(self._rto * 2, self.config.rto_max)
        self._deadline = now + self._rto

    def next_segment(self, now: float) -> TcpSegment | None:
        """The next segment to send now, or None."""
        kind = self._next_kind(now)
        if kind == "timeout":
            self._on_timeout(now)
            kind = self._next_kind(now)
        if kind is None or kind == "timeout":
            return None
        if kind == "ack":
            return self._segment(self.snd_nxt, 0)
        if kind == "syn":
            seg = self._segment(self.iss, TCP_SYN, mss=self.config.mss_cap)
            self._sent(1, now)
            return seg
        if kind == "fin":
            seg = self._segment(self.snd_nxt, TCP_FIN)
            self._sent(1, now)
            self._fire(TcpEvent.SND_FIN)
            return seg
        offset = seq_diff(self.snd_nxt, self._data_seq)
        room = seq_diff(seq_add(self.snd_una, self.snd_wnd), self.snd_nxt)
        if room <= 0:  # a zero-window probe
            room, self._probe = 1, False
        payload = bytes(self._send_buf[offset:offset + min(self.mss, room)])
        last = offset + len(payload) == len(self._send_buf)
        flags = TCP_PSH if last else 0
        if last and self._fin_queued:
            flags |= TCP_FIN
        seg = self._segment(self.snd_nxt, flags, payload)
        self._sent(len(payload) + (1 if flags & TCP_FIN else 0), now)
        if flags & TCP_FIN:
            self._fire(TcpEvent.SND_FIN)
        return seg

    def rst_segment(self) -> TcpSegment:
        """The RST that tells the peer we gave up on this connection."""
        # snd_una: the peer has received at least that much, and when the
        # connection is idle it is exactly the peer's rcv_nxt (RFC 5961).
        return TcpSegment(self.local_port, self.remote_port, self.snd_una, self.rcv_nxt,
                          TCP_RST | TCP_ACK, 0)
