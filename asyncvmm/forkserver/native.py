"""A native waiter for the launcher, built once by the fork server where a C compiler exists.

``waiter.py`` waits in a bare Python interpreter, ~3 MiB per microVM.  The
same job in C (below, the same arguments and behaviour: forward the signals
named on its command line through the pidfd, read the statuses, leave with
the child's exit code or signal) holds ~0.2 MiB and starts in ~1 ms.  The
fork server compiles it at start into the user's cache
(``$XDG_CACHE_HOME/asyncvmm`` or ``~/.cache/asyncvmm``), named by the
source's hash, and tells each launcher its path (``{"waiter": path}``);
without a compiler, or if the build fails, launchers use ``waiter.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int pidfd = -1;

/* Async-signal-safe: one syscall.  ESRCH (the child is gone) needs nothing. */
static void forward(int sig) {
    if (pidfd >= 0)
        syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

static int fail(const char *text) {
    dprintf(2, "Error: fork server: %s\n", text);
    return 1;
}

/* Parse {"<kind>":<int>} exactly; 1 on success. */
static int number_reply(const char *msg, const char *kind, int *value) {
    char head[32];
    int used = 0;
    snprintf(head, sizeof head, "{\"%s\":", kind);
    size_t n = strlen(head);
    if (strncmp(msg, head, n) != 0)
        return 0;
    if (sscanf(msg + n, "%d}%n", value, &used) != 1 || used == 0 || msg[n + used] != '\0')
        return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3)
        return fail("usage: waiter <connection fd> <pidfd or -1> <signals...>");
    int conn = atoi(argv[1]);
    pidfd = atoi(argv[2]);
    sigset_t forwarded;
    sigemptyset(&forwarded);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = forward;
    action.sa_flags = SA_RESTART;
    for (int i = 3; i < argc; i++) {
        int sig = atoi(argv[i]);
        sigaction(sig, &action, NULL);
        sigaddset(&forwarded, sig);
    }
    /* Blocked across the exec by the launcher: pending ones are delivered (forwarded) now. */
    sigprocmask(SIG_UNBLOCK, &forwarded, NULL);
    static char msg[128 * 1024 + 1];
    for (;;) {
        ssize_t n = read(conn, msg, sizeof msg - 1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return fail("connection lost");
        }
        if (n == 0)
            return fail("the connection closed without an exit status "
                        "(the fork server and the microVM are both gone)");
        msg[n] = '\0';
        int value;
        if (number_reply(msg, "exit", &value) && value >= 0 && value <= 255)
            return value;
        if (number_reply(msg, "signal", &value) && value > 0 && value < 65) {
            sigset_t one;
            sigemptyset(&one);
            sigaddset(&one, value);
            signal(value, SIG_DFL);
            sigprocmask(SIG_UNBLOCK, &one, NULL);
            kill(getpid(), value);
            return 128 + value;
        }
        if (strncmp(msg, "{\"error\":", 9) == 0) {
            dprintf(2, "Error: fork server: %.*s\n", (int)(n - 10), msg + 9);
            return 1;
        }
        /* {"pid": N} again, or anything newer: nothing to do. */
    }
}
"""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncvmm"


def build_waiter(directory: Path | None = None) -> str | None:
    """The native waiter's path (built now if not cached), or None: no compiler or the build failed."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    directory = cache_dir() if directory is None else directory
    target = directory / f"forkserver-waiter-{digest}"
    if os.access(target, os.X_OK):
        return str(target)
    cc = os.environ.get("CC") or shutil.which("gcc")     # gcc: the package scripts/quickstart installs
    if cc is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            src = Path(tmp) / "waiter.c"
            src.write_text(SOURCE)
            out = Path(tmp) / "waiter"
            subprocess.run([cc, "-O2", "-s", "-o", str(out), str(src)], check=True, capture_output=True,
                           timeout=120)
            os.replace(out, target)               # atomic: a concurrent build writes the same bytes
    except (OSError, subprocess.SubprocessError):
        return None
    return str(target)
