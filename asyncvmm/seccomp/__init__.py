"""Per-thread seccomp filters for the VMM process (docs/seccomp.md).

:class:`ThreadFilters` holds one compiled BPF program per thread category
(``vmm``: the asyncio loop thread serving the API and the devices, and
every thread it starts after its filter is in; ``vcpu``: each vCPU
thread).  The default programs come from :mod:`.allowlist`; ``--seccomp-filter
FILE`` gives a Firecracker-format JSON document instead (:mod:`.policy`);
``--no-seccomp`` gives none.  Each thread installs its own program, without
TSYNC: a vCPU thread first thing when it starts, the loop thread once the
vCPU threads exist and before they are let run the guest.
"""

from __future__ import annotations

import functools
import logging
import threading

from . import allowlist, policy
from .bpf import Filter, compile_filter
from .install import SeccompError, install_program, install_sigsys_handler, run_test_hook
from .policy import PolicyError

__all__ = ["ThreadFilters", "PolicyError", "SeccompError"]

log = logging.getLogger(__name__)


Program = list[tuple[int, int, int, int]]


def _compile_all(filters: dict[str, Filter]) -> dict[str, Program]:
    return {c: compile_filter(f) for c, f in filters.items()}


@functools.cache
def default_programs() -> dict[str, Program]:
    """The default programs, compiled once per process.

    A fork server calls this before it forks, so its children share the
    compiled programs instead of each building its own (about 1.5 MiB of
    private memory per child, measured).  Callers must not mutate them.
    """
    return _compile_all(allowlist.default_filters())


class ThreadFilters:
    def __init__(self, programs: dict[str, Program], source: str) -> None:
        self.programs = programs
        self.source = source
        self._handler_lock = threading.Lock()
        self._handler_installed = False

    @classmethod
    def default(cls) -> "ThreadFilters":
        return cls(default_programs(), "the default filters")

    @classmethod
    def from_file(cls, path: str) -> "ThreadFilters":
        """Raises OSError (unreadable) or PolicyError (unusable), naming the file."""
        with open(path, "rb") as f:
            text = f.read()
        try:
            # Compiled up front: a policy that does not compile fails at start-up, not at boot.
            return cls(_compile_all(policy.parse_policy(text)), path)
        except (PolicyError, ValueError) as e:
            raise PolicyError(f"{path}: {e}") from None

    def install(self, category: str) -> None:
        """Install ``category``'s program on the calling thread (and the SIGSYS logger, once)."""
        with self._handler_lock:
            if not self._handler_installed:
                install_sigsys_handler()
                self._handler_installed = True
        install_program(self.programs[category])
        log.debug("seccomp: %s filter installed on thread %r (%d BPF instructions)",
                  category, threading.current_thread().name, len(self.programs[category]))
        run_test_hook(category)
