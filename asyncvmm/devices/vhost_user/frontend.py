"""The front end's socket: one vhost-user connection, request by request.

Contract: every method sends one message (with its fds as ``SCM_RIGHTS``)
and, when the protocol has an answer for it, waits for that answer on the
blocking socket with a timeout (:attr:`Frontend.timeout`).  Each failure --
the back end gone (EOF, EPIPE, ECONNRESET), silent past the timeout, or
answering something else (:class:`~.protocol.ProtocolError`) -- raises
:class:`VhostUserError` named after the step, in Firecracker's words
("Set mem table failed: ..."); the connection is useless afterwards.

With the ``REPLY_ACK`` protocol feature negotiated, every message that has
no answer of its own asks for one (``NEED_REPLY_MASK``), so a back end that
refuses a memory table or a vring says so at once instead of later.

Callers run on the asyncio loop and block it for at most one exchange's
timeout: this is set-up and tear-down traffic (construction, activation,
reset), never the data path, which is the guest's rings, the kick eventfd and
the call eventfd.  The encoding is :mod:`.protocol` (sans-I/O).
"""

from __future__ import annotations

import array
import os
import socket
from typing import Sequence

from asyncvmm.devices.vhost_user import protocol as p
from asyncvmm.devices.vhost_user.protocol import ProtocolError, Request

#: Seconds to wait for one answer from the back end.
DEFAULT_TIMEOUT_S = 5.0

# Firecracker's names of each step, for error messages.
_STEP = {
    Request.VHOST_USER_SET_OWNER: "Set owner",
    Request.VHOST_USER_GET_FEATURES: "Get features",
    Request.VHOST_USER_SET_FEATURES: "Set features",
    Request.VHOST_USER_GET_PROTOCOL_FEATURES: "Get protocol features",
    Request.VHOST_USER_SET_PROTOCOL_FEATURES: "Set protocol features",
    Request.VHOST_USER_SET_MEM_TABLE: "Set mem table",
    Request.VHOST_USER_SET_VRING_NUM: "Set vring num",
    Request.VHOST_USER_SET_VRING_ADDR: "Set vring addr",
    Request.VHOST_USER_SET_VRING_BASE: "Set vring base",
    Request.VHOST_USER_GET_VRING_BASE: "Get vring base",
    Request.VHOST_USER_SET_VRING_KICK: "Set vring kick",
    Request.VHOST_USER_SET_VRING_CALL: "Set vring call",
    Request.VHOST_USER_SET_VRING_ENABLE: "Set vring enable",
    Request.VHOST_USER_GET_CONFIG: "Get config",
}


class VhostUserError(Exception):
    """A vhost-user exchange failed; the message names the step and the cause."""


def os_error_text(err: OSError) -> str:
    """An OSError as Rust's io::Error prints it: ``<strerror> (os error <n>)``."""
    if err.errno is None:
        return str(err)
    return f"{os.strerror(err.errno)} (os error {err.errno})"


class Frontend:
    """One connection to a vhost-user back end."""

    def __init__(self, sock: socket.socket, path: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.sock = sock
        self.path = path
        self.timeout = timeout
        sock.settimeout(timeout)
        self.reply_ack = False
        self.protocol_features = 0

    @classmethod
    def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> "Frontend":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise VhostUserError(f"Failed to connect to UDS Unix stream: {os_error_text(e)}") from None
        return cls(sock, path, timeout=timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    # -- one exchange -----------------------------------------------------------

    def _exchange(self, request: Request, payload: bytes = b"", fds: Sequence[int] = ()) -> bytes | None:
        """Send one message; its answer's payload if it has one (an ack is checked here)."""
        step = _STEP.get(request, request.name)
        need_ack = self.reply_ack and request not in p.ANSWERED
        data = p.message(request, payload, need_reply=need_ack)
        try:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", fds))])
                self.sock.sendall(data[sent:])      # the fds went with the first byte
            else:
                self.sock.sendall(data)
            if request not in p.ANSWERED and not need_ack:
                return None
            header = p.parse_header(self._recv_exact(p.HEADER.size))
            p.check_reply(header, request)
            answer = self._recv_exact(header.size)
            if need_ack:
                status = p.parse_u64(answer)
                if status != 0:
                    raise ProtocolError(f"the back end refused it (status {status})")
                return None
            return answer
        except TimeoutError:
            raise VhostUserError(f"{step} failed: no answer from the back end within "
                                 f"{self.timeout:g} s") from None
        except OSError as e:
            raise VhostUserError(f"{step} failed: {os_error_text(e)}") from None
        except ProtocolError as e:
            raise VhostUserError(f"{step} failed: {e}") from None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ProtocolError("the back end closed the connection")
            buf += chunk
        return bytes(buf)

    # -- messages -----------------------------------------------------------------

    def set_owner(self) -> None:
        self._exchange(Request.VHOST_USER_SET_OWNER)

    def get_features(self) -> int:
        return self._parse(Request.VHOST_USER_GET_FEATURES, p.parse_u64,
                           self._exchange(Request.VHOST_USER_GET_FEATURES))

    def set_features(self, features: int) -> None:
        self._exchange(Request.VHOST_USER_SET_FEATURES, p.u64(features))

    def get_protocol_features(self) -> int:
        return self._parse(Request.VHOST_USER_GET_PROTOCOL_FEATURES, p.parse_u64,
                           self._exchange(Request.VHOST_USER_GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int) -> None:
        self._exchange(Request.VHOST_USER_SET_PROTOCOL_FEATURES, p.u64(features))
        self.protocol_features = features
        # From the next message on: every message without an answer of its own asks for an ack.
        self.reply_ack = bool(features & 1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK)

    def set_mem_table(self, regions: Sequence[p.MemoryRegion], fds: Sequence[int]) -> None:
        if len(fds) != len(regions):
            raise ValueError("one fd per memory region")
        self._exchange(Request.VHOST_USER_SET_MEM_TABLE, p.memory_table(regions), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_NUM, p.vring_state(index, num))

    def set_vring_addr(self, addr: p.VringAddr) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_ADDR, p.vring_addr(addr))

    def set_vring_base(self, index: int, base: int) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_BASE, p.vring_state(index, base))

    def get_vring_base(self, index: int) -> int:
        """Stop vring ``index``; the back end answers the next available index it would read."""
        answer = self._exchange(Request.VHOST_USER_GET_VRING_BASE, p.vring_state(index, 0))
        got, base = self._parse(Request.VHOST_USER_GET_VRING_BASE, p.parse_vring_state, answer)
        if got != index:
            raise VhostUserError(f"Get vring base failed: the answer names vring {got}, not {index}")
        return base

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_KICK, p.vring_fd(index, has_fd=True), [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_CALL, p.vring_fd(index, has_fd=True), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self._exchange(Request.VHOST_USER_SET_VRING_ENABLE, p.vring_state(index, int(enable)))

    def get_config(self, offset: int, size: int) -> bytes:
        answer = self._exchange(Request.VHOST_USER_GET_CONFIG, p.config(offset, size))
        return self._parse(Request.VHOST_USER_GET_CONFIG,
                           lambda data: p.parse_config(data, offset, size), answer)

    @staticmethod
    def _parse(request: Request, parse, payload):
        try:
            return parse(payload)
        except ProtocolError as e:
            raise VhostUserError(f"{_STEP[request]} failed: {e}") from None

    # -- negotiation ----------------------------------------------------------------

    def negotiate(self, features: int, protocol_features: int) -> tuple[int, int]:
        """SET_OWNER, then both feature words: what the front end offers and the back end has.

        The protocol features are asked for only when the back end offers
        ``VHOST_USER_F_PROTOCOL_FEATURES`` (and the front end wants it).
        Returns ``(features, protocol_features)`` as agreed.
        """
        self.set_owner()
        acked = features & self.get_features()
        acked_protocol = 0
        if acked & 1 << p.VHOST_USER_F_PROTOCOL_FEATURES:
            acked_protocol = protocol_features & self.get_protocol_features()
            self.set_protocol_features(acked_protocol)
        return acked, acked_protocol
