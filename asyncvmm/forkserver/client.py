"""Spawn VMMs from the fork server directly, without a launcher process per microVM.

For programs that start many microVMs themselves (benchmark harnesses, an
orchestrator written in Python): :func:`spawn` sends the request a launcher
would send and returns a :class:`ForkedVmm`, which plays the launcher's part
inside the calling process.  Its connection to the server is the microVM's
lifeline: closing it (or the calling process dying) kills the microVM, as
killing ``firecracker`` does.  Stdlib only.

    vmm = spawn(path, ["--api-sock", "/tmp/vm1.sock"], stdout=fd)
    vmm.send_signal(signal.SIGTERM)
    code = await vmm.wait_async()       # or vmm.wait(); < 0: killed by that signal
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from asyncvmm.forkserver import protocol


class SpawnError(RuntimeError):
    """The fork server could not be reached or refused the request."""


class ForkedVmm:
    """One VMM forked for this process: its pid, signals, and exit status."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        self.pid = pid
        self.returncode: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self._pidfd = None

    def send_signal(self, sig: int) -> None:
        if self._pidfd is not None and self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def _status(self, data: bytes) -> int | None:
        """The return code a reply means (Popen's convention), or None for a reply to skip."""
        if not data:
            raise SpawnError("the connection closed without an exit status")
        kind, value = protocol.parse_reply(data)
        if kind == "exit":
            return value
        if kind == "signal":
            return -value
        if kind == "error":
            raise SpawnError(value)
        return None

    def wait(self) -> int:
        while self.returncode is None:
            self.returncode = self._status(self._sock.recv(protocol.MAX_MESSAGE))
        self.close()
        return self.returncode

    async def wait_async(self) -> int:
        self._sock.setblocking(False)
        loop = asyncio.get_running_loop()
        while self.returncode is None:
            self.returncode = self._status(await loop.sock_recv(self._sock, protocol.MAX_MESSAGE))
        self.close()
        return self.returncode

    def close(self) -> None:
        """Let go of the microVM: if it still runs, this ends it (the launcher's death)."""
        self._sock.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


def spawn(path: str, argv: list[str], *, stdin: int | None = None, stdout: int | None = None,
          stderr: int | None = None, cwd: str | None = None, env: dict[str, str] | None = None) -> ForkedVmm:
    """Fork a VMM running ``asyncvmm`` with ``argv``; stdio default to this process's 0/1/2,
    cwd, environment, umask and rlimits to this process's."""
    from asyncvmm.forkserver.launcher import current_rlimits, current_umask

    request = protocol.make_request(list(argv), cwd or os.getcwd(), dict(os.environ if env is None else env),
                                    current_rlimits(), current_umask())
    fds = [0 if stdin is None else stdin, 1 if stdout is None else stdout, 2 if stderr is None else stderr]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
        socket.send_fds(sock, [request], fds)
        kind, value = protocol.parse_reply(sock.recv(protocol.MAX_MESSAGE))
        while kind == "waiter":                   # for launchers; this process waits itself
            kind, value = protocol.parse_reply(sock.recv(protocol.MAX_MESSAGE))
    except (OSError, protocol.ProtocolError) as err:
        sock.close()
        raise SpawnError(f"fork server {path}: {err}") from None
    if kind != "pid":
        sock.close()
        raise SpawnError(f"fork server {path}: {value}")
    return ForkedVmm(sock, value)
