"""``asyncvmm`` as a thin launcher in front of the fork server.

When ``ASYNCVMM_FORKSERVER`` names a fork server's socket, ``asyncvmm``
(``cli.main``) calls :func:`main` before it parses anything.  The launcher
sends its argv, working directory, environment, umask, rlimits and its
stdin/stdout/stderr (``SCM_RIGHTS``) to the server, which forks one VMM for
it; from then on it stands in for that VMM as a client sees it:

* the signals a client sends a VMM (TERM, INT, HUP, QUIT, USR1, USR2) are
  forwarded to the child through a pidfd, so they cannot reach a recycled pid;
* the child's exit code becomes the launcher's; a child killed by a signal
  has the launcher kill itself with the same signal, so a waiter sees the
  same status as for a directly started VMM;
* the launcher's death (even SIGKILL) closes the connection, and the child
  treats that as its own end (``child.py``), as killing ``firecracker``
  kills its microVM;
* once the pid is known it re-execs itself (same pid) as the server's
  native waiter (``native.py``, ~0.2 MiB) or else ``waiter.py`` in a bare
  interpreter (~3 MiB), which do the waiting and forwarding.

Imports: stdlib only, and of it the C modules (``_socket``, ``_signal``,
``resource``, ``array``) rather than ``socket`` and ``signal``, whose enum
classes cost ~6 ms at every start; plus ``json`` for the protocol.  The
launcher must start in a few ms and hold little memory for the microVM's
lifetime.
"""

from __future__ import annotations

import _signal as signal
import _socket as socket
import array
import os
import resource
import sys

from asyncvmm.forkserver import ENV_VAR, protocol

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)
EXIT_GENERIC = 1                  # Firecracker's generic error: the fork server could not serve us

# Set in a forked VMM child, whose environment still names the fork server:
# that process is the VMM, not another launcher.
in_forked_child = False


def server_path() -> str | None:
    """The fork server socket this process should launch through, or None to run the VMM itself."""
    if in_forked_child:
        return None
    return os.environ.get(ENV_VAR) or None


def current_rlimits() -> dict[str, tuple[int, int]]:
    limits = {}
    for name in protocol.RLIMITS:
        number = getattr(resource, "RLIMIT_" + name, None)
        if number is not None:
            limits[name] = resource.getrlimit(number)
    return limits


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Forwarder:
    """Signal handlers that pass each signal to the child (queued until its pid is known)."""

    def __init__(self) -> None:
        self.pidfd: int | None = None
        self.pending: list[int] = []

    def install(self) -> None:
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if self.pidfd is None:
            self.pending.append(signum)
        else:
            self._send(signum)

    def _send(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass                  # already exited: its status is on the way

    def attach(self, pid: int) -> None:
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return                # exited before we looked: nothing left to signal
        for signum in self.pending:
            self._send(signum)
        self.pending.clear()


def _stdio_fds() -> list[int]:
    """Descriptors 0, 1 and 2, with /dev/null standing in for any that is closed."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_RDWR)
        fds.append(fd)
    return fds


def _die_like(signum: int) -> int:
    """Leave with the child's fate: killed by the same signal (128 + n if it is not fatal here)."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:                          # SIGKILL and SIGSTOP cannot (and need not) be reset
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signum)
    return 128 + signum


def _become_waiter(sock: socket.socket, forwarder: _Forwarder, native: str | None) -> None:
    """Re-exec (same pid) as the server's native waiter, else as ``waiter.py`` in a bare
    interpreter, to hold less memory while waiting.

    The forwarded signals stay blocked across the exec (the mask and pending signals survive
    it), so none is lost or kills us with its default action meanwhile.  If the exec fails
    this process just goes on waiting itself.
    """
    waiter = os.path.join(os.path.dirname(os.path.abspath(__file__)), "waiter.py")
    pidfd = -1 if forwarder.pidfd is None else forwarder.pidfd
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        os.set_inheritable(sock.fileno(), True)
        if pidfd >= 0:
            os.set_inheritable(pidfd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        args = [str(sock.fileno()), str(pidfd), *(str(int(s)) for s in FORWARDED)]
        if native is not None and os.access(native, os.X_OK):
            try:
                os.execv(native, [native, *args])
            except OSError:
                pass                      # fall back to the Python waiter
        os.execv(sys.executable, [sys.executable, "-I", "-S", waiter, *args])
    except OSError:
        pass
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


def main(argv: list[str], path: str, jail: list[str] | None = None) -> int:
    """Run the VMM for ``argv`` through the fork server at ``path``; its exit code.

    ``jail``: asyncvmm-jailer's flags, for a child that jails itself after the fork."""
    def fail(text: str) -> int:
        print(f"Error: fork server {path} ({ENV_VAR}): {text}", file=sys.stderr)
        return EXIT_GENERIC

    try:
        request = protocol.make_request(list(argv), os.getcwd(), dict(os.environ),
                                        current_rlimits(), current_umask(), jail)
    except (OSError, protocol.ProtocolError) as err:
        return fail(f"cannot describe this process: {err}")
    forwarder = _Forwarder()
    forwarder.install()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(path)
    except OSError as err:
        return fail(f"cannot reach it: {err}")
    try:
        sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", _stdio_fds()))])
    except OSError as err:
        # A server that refuses us at once (wrong uid) has answered and hung up already.
        try:
            kind, value = protocol.parse_reply(sock.recv(protocol.MAX_MESSAGE, socket.MSG_DONTWAIT))
        except (OSError, protocol.ProtocolError):
            return fail(f"cannot send the request: {err}")
        return fail(value if kind == "error" else f"cannot send the request: {err}")
    native: str | None = None
    while True:
        try:
            data = sock.recv(protocol.MAX_MESSAGE)
        except OSError as err:
            return fail(f"connection lost: {err}")
        if not data:
            return fail("the connection closed without an exit status "
                        "(the fork server and the microVM are both gone)")
        try:
            kind, value = protocol.parse_reply(data)
        except protocol.ProtocolError as err:
            return fail(f"bad reply: {err}")
        if kind == "waiter":
            native = value
        elif kind == "pid":
            forwarder.attach(value)
            _become_waiter(sock, forwarder, native)
        elif kind == "exit":
            return value
        elif kind == "signal":
            return _die_like(value)
        else:
            return fail(value)
