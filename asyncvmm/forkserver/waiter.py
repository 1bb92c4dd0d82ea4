"""The launcher's second half: wait for the VMM's status in as little memory as Python allows.

Once the fork server has answered with the child's pid, the launcher has
nothing left to do but forward signals and wait; it ``exec``s this script
with ``python -I -S`` (same pid, so a client's ``waitpid`` and ``kill`` still
reach it) and drops the ~5 MiB its interpreter holds for ``site``, the
editable-install finder and ``asyncvmm.cli``'s imports.  This file imports
only built-in modules (``_signal``, ``_json``), never ``asyncvmm``: it runs
as a bare script.

    python -I -S waiter.py <connection fd> <pidfd or -1> <signals to forward...>

The forwarded signals were blocked across the ``exec``; any that arrived
meanwhile are pending and are forwarded as soon as the handlers are in.
Statuses are ``protocol.py``'s replies; see ``launcher.py`` for what each one
does to this process.
"""

import os
import sys

import _signal

EXIT_GENERIC = 1
MAX_MESSAGE = 128 * 1024


def _fail(text):
    os.write(2, f"Error: fork server: {text}\n".encode(errors="replace"))
    return EXIT_GENERIC


def _reply(data):
    """(kind, value) from one reply: {"pid": N}, {"exit": N}, {"signal": N} or {"error": "..."}."""
    import _json                  # the C scanner only: the json package imports re and more
    text = data.decode()
    if not (text.startswith('{"') and text.endswith("}")):
        raise ValueError(text[:100])
    kind, end = _json.scanstring(text, 2)
    rest = text[end:-1]
    if not rest.startswith(":"):
        raise ValueError(text[:100])
    value = rest[1:]
    if kind in ("error", "waiter"):
        return kind, _json.scanstring(value, 1)[0]
    return kind, int(value)


def main(argv):
    conn, pidfd = int(argv[1]), int(argv[2])
    forwarded = [int(s) for s in argv[3:]]

    def forward(signum, _frame):
        if pidfd >= 0:
            try:
                _signal.pidfd_send_signal(pidfd, signum)
            except ProcessLookupError:
                pass

    for signum in forwarded:
        _signal.signal(signum, forward)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, forwarded)
    while True:
        try:
            data = os.read(conn, MAX_MESSAGE)
        except OSError as err:
            return _fail(f"connection lost: {err}")
        if not data:
            return _fail("the connection closed without an exit status "
                         "(the fork server and the microVM are both gone)")
        try:
            kind, value = _reply(data)
        except ValueError as err:
            return _fail(f"bad reply: {err}")
        if kind == "exit":
            return value
        if kind == "signal":
            try:                  # SIGKILL and SIGSTOP cannot (and need not) be reset
                _signal.signal(value, _signal.SIG_DFL)
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [value])
            except (OSError, ValueError):
                pass
            os.kill(os.getpid(), value)
            return 128 + value
        if kind == "error":
            return _fail(value)
        # "pid" again or anything newer: nothing to do


if __name__ == "__main__":
    sys.exit(main(sys.argv))
