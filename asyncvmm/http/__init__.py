"""The Firecracker-compatible REST API: pure parsing (:mod:`.parse`), the aiohttp server
(:mod:`.server`) and its metrics (:mod:`.metrics`).

This package's ``__init__`` stays import-light: :func:`bind_api_socket` runs before
aiohttp is imported, so the socket exists (and queues connections) while the rest loads.
"""

from __future__ import annotations

import errno
import os
import socket


class ApiSocketError(OSError):
    """The API socket cannot be bound; the message names the path and the reason."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"Failed to open the API socket at: {path}. {reason}")
        self.path = path


class SocketInUseError(ApiSocketError):
    def __init__(self, path: str) -> None:
        super().__init__(path, "Check that it is not already used.")


def bind_api_socket(path: str, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``path``; an existing path (even a stale socket) is refused, as in Firecracker."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise SocketInUseError(path) from None
        if err.errno is None:  # e.g. "AF_UNIX path too long"
            raise ApiSocketError(path, f"{err}.") from None
        directory = os.path.dirname(path) or "."
        hint = f" (no directory {directory})" if not os.path.isdir(directory) else ""
        raise ApiSocketError(path, f"{os.strerror(err.errno)} (os error {err.errno}){hint}.") from None
    return sock
