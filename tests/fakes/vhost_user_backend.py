"""A fake vhost-user back end: a thread on one end of a Unix socket that records and answers.

It answers as a back end must (GET_* and, under REPLY_ACK, every message
with NEED_REPLY_MASK) from a few settable values, keeps every message it got
with its fds (dup'ed, so the test can use them), and can misbehave on cue:
close the connection after a given request, or send garbage instead of an
answer.  Written from the protocol description, not from any implementation.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
from dataclasses import dataclass, field

from asyncvmm.devices.vhost_user import protocol as p


@dataclass
class Received:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


class FakeBackend:
    def __init__(self, features: int = 0, protocol_features: int = 0, config: bytes = bytes(60)) -> None:
        self.features = features
        self.protocol_features = protocol_features
        self.config = config
        self.vring_base = 0
        self.got: list[Received] = []
        self.close_after: int | None = None        # a request number: hang up after it
        self.garbage_for: int | None = None        # a request number: answer it with garbage
        self.refuse: int | None = None             # a request number: ack it with status 1
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.done = threading.Event()

    # -- where it listens ------------------------------------------------------------

    def serve_socket(self, sock: socket.socket) -> None:
        self.sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def listen(self, path: str) -> None:
        """Accept one connection at ``path`` (in a thread) and serve it."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)

        def accept() -> None:
            conn, _ = listener.accept()
            listener.close()
            self.sock = conn
            self._run()

        self._thread = threading.Thread(target=accept, daemon=True)
        self._thread.start()

    def hang_up(self) -> None:
        if self.sock is not None:
            self.sock.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def requests(self) -> list[int]:
        return [m.request for m in self.got]

    def last(self, request: int) -> Received:
        return [m for m in self.got if m.request == request][-1]

    def close(self) -> None:
        for m in self.got:
            for fd in m.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.sock is not None:
            self.sock.close()

    # -- the loop ----------------------------------------------------------------------

    def _recv(self, n: int) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < n:
            chunk, anc, _flags, _addr = self.sock.recvmsg(n - len(data), socket.CMSG_SPACE(8 * 4))
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[:len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
            if not chunk:
                raise EOFError
            data += chunk
        return data, fds

    def _run(self) -> None:
        try:
            while True:
                head, fds = self._recv(12)
                request, flags, size = struct.unpack("<III", head)
                payload, more = self._recv(size) if size else (b"", [])
                msg = Received(request, flags, payload, fds + more)
                self.got.append(msg)
                if request == self.garbage_for:
                    self.sock.sendall(b"\xff" * 12)
                    continue
                self._answer(msg)
                if request == self.close_after:
                    self.sock.close()
                    return
        except (EOFError, OSError):
            pass
        finally:
            self.done.set()

    def _reply(self, request: int, payload: bytes) -> None:
        self.sock.sendall(struct.pack("<III", request, p.VHOST_USER_VERSION | p.VHOST_USER_REPLY_MASK,
                                      len(payload)) + payload)

    def _answer(self, msg: Received) -> None:
        r = p.Request
        if msg.request == r.VHOST_USER_GET_FEATURES:
            self._reply(msg.request, struct.pack("<Q", self.features))
        elif msg.request == r.VHOST_USER_GET_PROTOCOL_FEATURES:
            self._reply(msg.request, struct.pack("<Q", self.protocol_features))
        elif msg.request == r.VHOST_USER_GET_CONFIG:
            offset, size, flags = struct.unpack_from("<III", msg.payload)
            self._reply(msg.request, struct.pack("<III", offset, size, flags)
                        + self.config[offset:offset + size])
        elif msg.request == r.VHOST_USER_GET_VRING_BASE:
            index, _ = struct.unpack("<II", msg.payload)
            self._reply(msg.request, struct.pack("<II", index, self.vring_base))
        elif msg.flags & p.VHOST_USER_NEED_REPLY_MASK:
            self._reply(msg.request, struct.pack("<Q", 1 if msg.request == self.refuse else 0))
