"""A fork server whose children report what they inherited instead of running a VMM.

The server side is the real :class:`ForkServer` and the real child set-up
(``child.become_vmm``); only the entry point differs: ``report(argv)`` writes
one JSON line about the process to stdout (the launcher's, handed over), then
does what ``argv`` says.  Run as ``python -m tests.unit.forkserver.probe <socket> [native waiter]``.

Before serving, the probe server draws an MMDS token key, seeds ``random`` and
installs its own signal handlers, so the tests can see that none of that
reaches a child.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import sys
import time

from asyncvmm.forkserver.server import ForkServer
from asyncvmm.mmds.token import TokenAuthority

ZYGOTE_AUTHORITY = TokenAuthority()


def _fds() -> dict[str, list[int]]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue                       # the listing's own descriptor
        out[name] = [st.st_dev, st.st_ino]
    return out


def _key_digest(authority: TokenAuthority) -> str:
    return hashlib.sha256(authority._key).hexdigest()


def report(argv: list[str]) -> int:
    fresh = TokenAuthority()
    state = {
        "pid": os.getpid(), "sid": os.getsid(0), "pgid": os.getpgid(0), "ppid": os.getppid(),
        "fds": _fds(), "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(),
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "sigterm": _handler_name(signal.SIGTERM), "sigchld": _handler_name(signal.SIGCHLD),
        "sigint": _handler_name(signal.SIGINT),
        "sigmask": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
        "zygote_key": _key_digest(ZYGOTE_AUTHORITY), "fresh_key": _key_digest(fresh),
        "zygote_token": ZYGOTE_TOKEN, "zygote_token_valid_here": ZYGOTE_AUTHORITY.is_valid(ZYGOTE_TOKEN),
        "random": random.random(), "argv": argv, "sys_argv": sys.argv,
    }
    print(json.dumps(state), flush=True)
    return act(argv)


def act(argv: list[str]) -> int:
    verb = argv[0] if argv else "exit"
    if verb == "exit":
        return int(argv[1]) if len(argv) > 1 else 0
    if verb == "echo":                     # stdin line -> stdout, stderr gets a marker
        line = sys.stdin.readline()
        sys.stdout.write("echo:" + line)
        sys.stderr.write("to-stderr\n")
        return 0
    if verb == "term-exits":               # a SIGTERM handler that exits with a code
        code = int(argv[1])
        signal.signal(signal.SIGTERM, lambda *_: os._exit(code))
        print("waiting", flush=True)
        while True:
            time.sleep(1)
    if verb == "sleep":
        print("sleeping", flush=True)
        time.sleep(float(argv[1]))
        return 0
    if verb == "kill-self":
        os.kill(os.getpid(), int(argv[1]))
        time.sleep(5)
        return 99
    raise SystemExit(f"unknown probe verb {verb!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _handler_name(sig: int) -> str:
    handler = signal.getsignal(sig)
    if handler is signal.SIG_DFL:
        return "SIG_DFL"
    if handler is signal.SIG_IGN:
        return "SIG_IGN"
    return getattr(handler, "__name__", repr(handler))


ZYGOTE_TOKEN = ZYGOTE_AUTHORITY.generate(600)


def main(path: str, waiter: str | None = None) -> None:
    random.seed(1234)                      # children must not inherit this state
    server = ForkServer(path, report, waiter=waiter)
    print(f"ready {path}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:3])
