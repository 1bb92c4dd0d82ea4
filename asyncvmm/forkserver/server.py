"""The fork server: one warm parent, one forked VMM per request.

A single-threaded ``selectors`` loop (no threads may exist when it forks)
over the listening socket, the connections, and the wake-up pipe that
``SIGCHLD`` writes to:

* accept: the peer must be this server's own uid (``SO_PEERCRED``), on top
  of the socket file's 0600 mode; anyone else gets an error (once its
  request is read, so the answer is not lost to a reset) and is dropped;
* a request: one ``SOCK_SEQPACKET`` message with three descriptors; garbage,
  an oversized or truncated message, a wrong descriptor count or a bad field
  gets ``{"error": ...}`` and the connection is closed (descriptors received
  with it are closed too); the server goes on serving;
* a good request: fork; the child becomes the VMM (``child.py``); the server
  answers ``{"pid": N}`` and watches the connection;
* the connection closes before the child ends (the launcher died): the
  child is killed (SIGKILL).  The pid cannot have been reused: only this
  server reaps it;
* ``SIGCHLD``: every ended child is reaped (``waitpid(-1, WNOHANG)``) and its
  status sent to its launcher.  A crashing child is only a status.

SIGTERM or SIGINT stop the server (its socket file is removed); running
VMMs keep running, each in its own session with its own copy of its
launcher's connection.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
from typing import Any, Callable

from asyncvmm.forkserver import child, protocol


_UCRED = struct.Struct("3i")      # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


class ForkServerError(Exception):
    """The server cannot start (its socket path is taken or cannot be bound)."""


def peer_uid(conn: socket.socket) -> int:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)[1]


def bind_private_socket(path: str) -> socket.socket:
    """A listening SEQPACKET socket at ``path`` that only this uid can connect to.

    A stale socket file (no server behind it) is replaced; a live one is an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ForkServerError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
        except OSError as err:
            raise ForkServerError(f"{path}: {err}") from None
        else:
            raise ForkServerError(f"{path}: another fork server is listening there")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)   # created 0600: no window in which others could connect
    try:
        listener.bind(path)
    except OSError as err:
        listener.close()
        raise ForkServerError(f"cannot bind {path}: {err}") from None
    finally:
        os.umask(old_umask)
    listener.listen(128)
    return listener


class ForkServer:
    """Serves fork requests on ``path``; each child runs ``entry(argv)`` as its whole life."""

    def __init__(self, path: str, entry: Callable[[list[str]], int], *, waiter: str | None = None) -> None:
        _raise_nofile()
        _ensure_std_fds()
        self.path = path
        self.waiter = waiter                      # a native waiter's path for launchers (native.py)
        self.entry = entry
        self._fresh = child.fresh_signal_dispositions()
        self._listener = bind_private_socket(path)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._pending: dict[socket.socket, int] = {}     # accepted, request not yet read: peer uid
        self._children: dict[int, socket.socket] = {}    # pid -> its launcher's connection
        self._stopping = False
        self.served = 0

    # -- lifecycle ------------------------------------------------------------

    def serve_forever(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)   # the wake-up fd does the work
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        try:
            while not self._stopping:
                for key, _ in self._selector.select():
                    # An earlier event of this batch may have closed this one's connection
                    # (a child reaped): its readiness is stale.
                    if isinstance(key.fileobj, socket.socket) and key.fileobj.fileno() < 0:
                        continue
                    try:
                        key.data(key.fileobj)
                    except Exception as err:  # noqa: BLE001 - one bad event must not end the server
                        _warn(f"internal error, serving on: {type(err).__name__}: {err}")
                    if self._stopping:
                        break
        finally:
            self.close()

    def _stop(self, *_: object) -> None:
        self._stopping = True

    def close(self) -> None:
        """Stop listening; running children keep running (they hold their own connections)."""
        signal.set_wakeup_fd(-1)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        for obj in self._inherited():
            try:
                obj.close()
            except OSError:
                pass
        self._pending.clear()
        self._children.clear()

    def _inherited(self) -> list[Any]:
        """Every object holding a descriptor of the server's: what a child must close."""
        return [self._listener, self._selector, _Fd(self._wake_r), _Fd(self._wake_w),
                *self._pending, *self._children.values()]

    # -- events ---------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as err:                    # EMFILE and friends: live on, without spinning
            _warn(f"accept failed: {err}")
            time.sleep(0.05)                      # the connection waits in the backlog meanwhile
            return
        # The uid is checked once the request is read: closing a socket with an unread request
        # would reset the peer's connection and lose our answer.
        self._pending[conn] = peer_uid(conn)
        self._selector.register(conn, selectors.EVENT_READ, self._on_request)

    def _refuse(self, conn: socket.socket, why: str) -> None:
        _warn(f"refused a request: {why}")
        _send(conn, {"error": why})
        conn.close()

    def _drop_pending(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        del self._pending[conn]

    def _on_request(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            data, fds, flags, _ = socket.recv_fds(conn, protocol.MAX_MESSAGE + 1,
                                                  protocol.STDIO_FDS + 1, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop_pending(conn)
            self._refuse(conn, f"cannot read the request: {err}")
            return
        uid = self._pending[conn]
        self._drop_pending(conn)
        try:
            if not data and not fds:
                conn.close()                       # connected and left: nothing to answer
                return
            if uid != os.geteuid():
                raise protocol.ProtocolError(f"uid {uid} may not use this fork server (owner uid {os.geteuid()})")
            if flags & socket.MSG_TRUNC or len(data) > protocol.MAX_MESSAGE:
                raise protocol.ProtocolError(f"request exceeds the {protocol.MAX_MESSAGE}-byte limit")
            if flags & socket.MSG_CTRUNC or len(fds) != protocol.STDIO_FDS:
                raise protocol.ProtocolError(
                    f"a request carries exactly {protocol.STDIO_FDS} descriptors (stdin, stdout, stderr)")
            request = protocol.parse_request(data)
        except protocol.ProtocolError as err:
            for fd in fds:
                os.close(fd)
            self._refuse(conn, str(err))
            return
        self._fork(conn, request, fds)

    def _fork(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        for stream in (sys.stdout, sys.stderr):   # nothing buffered here may be written twice
            stream.flush()
        try:
            pid = os.fork()
        except OSError as err:
            for fd in fds:
                os.close(fd)
            self._refuse(conn, f"fork failed: {err}")
            return
        if pid == 0:
            try:      # detach: this object must never close the descriptor number the child reuses
                child.become_vmm(request, conn.detach(), fds, self._inherited(), self._fresh, self.entry)
            finally:
                os._exit(1)                        # never back into the server's loop
        for fd in fds:
            os.close(fd)
        self.served += 1
        self._children[pid] = conn
        if self.waiter is not None:
            _send(conn, {"waiter": self.waiter})
        _send(conn, {"pid": pid})
        self._selector.register(conn, selectors.EVENT_READ, self._on_launcher)

    def _on_launcher(self, conn: socket.socket) -> None:
        """A running child's connection is readable: its launcher has gone (or misbehaves)."""
        try:
            data = conn.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            data, why = b"", f"its connection failed ({err})"
        else:
            why = "it closed its connection"
        if data:
            return                                 # launchers send nothing more; ignore it
        self._selector.unregister(conn)
        for pid, c in self._children.items():
            if c is conn:
                # Said in the server's log: a VMM that dies with SIGKILL this way is not a crash.
                _warn(f"the launcher of child {pid} is gone ({why}): killing the child")
                try:
                    os.kill(pid, signal.SIGKILL)   # not reaped yet, so still our child
                except ProcessLookupError:
                    pass

    def _on_wake(self, fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self._children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            _send(conn, {"exit": code} if code >= 0 else {"signal": -code})
            try:
                self._selector.unregister(conn)
            except KeyError:
                pass
            conn.close()


def _ensure_std_fds() -> None:
    """/dev/null on any of 0, 1, 2 that is closed, so that no socket or received descriptor
    of the server's ever gets one of those numbers (the children put their stdio there)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _raise_nofile() -> None:
    """One descriptor per running child's connection: take the hard limit, not the soft 1024.

    Children do not inherit it: each takes its launcher's rlimits.
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _Fd:
    """A bare descriptor with the ``close()`` the child's clean-up calls."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _warn(text: str) -> None:
    # Not the logging module: a child must not inherit a configured root logger.
    print(f"asyncvmm-zygote: {text}", file=sys.stderr, flush=True)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.send(protocol.encode(message), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
    except OSError:
        pass                                       # the launcher is gone or not reading


def warm_up() -> None:
    """Import everything a VMM imports, then freeze the GC so children share those pages.

    Nothing here may start a thread or open a descriptor: the children are forked from this.
    """
    import asyncio  # noqa: F401
    import asyncvmm.cli  # noqa: F401
    import asyncvmm.config  # noqa: F401
    import asyncvmm.controller  # noqa: F401
    import asyncvmm.http.metrics  # noqa: F401
    import asyncvmm.http.server  # noqa: F401
    import asyncvmm.logger  # noqa: F401
    import asyncvmm.metrics_writer  # noqa: F401
    import asyncvmm.mmds.store  # noqa: F401
    import asyncvmm.vmm  # noqa: F401
    from asyncvmm.seccomp import default_programs

    default_programs()                             # compiled once, shared by every child
    try:
        import uvloop  # noqa: F401
    except ImportError:
        pass
    gc.collect()
    gc.freeze()
