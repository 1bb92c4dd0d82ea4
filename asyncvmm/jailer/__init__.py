"""``asyncvmm-jailer``: Firecracker's jailer for the asyncvmm VMM (docs/jailer.md).

:mod:`.env` checks the command line (no side effects), :mod:`.cgroups`
makes and joins cgroups, :mod:`.jail` does the privileged steps and execs
the VMM.  ``main`` returns only on failure.
"""

from __future__ import annotations

import sys
import time

from asyncvmm import FIRECRACKER_API_VERSION, __version__

EXIT_OK = 0
EXIT_ERROR = 1


def main(argv: list[str] | None = None) -> int:
    start_us = time.monotonic_ns() // 1000
    start_cpu_us = time.process_time_ns() // 1000
    argv = sys.argv[1:] if argv is None else argv
    from .env import ArgumentsError, JailerError, build_parser, parse, split_argv

    try:
        flags = build_parser().parse_args(split_argv(argv)[0])
    except ArgumentsError as e:
        print(f"Arguments parsing error: {e} \n\nFor more information try --help.", file=sys.stderr)
        return EXIT_ERROR
    if flags.help:
        print(build_parser().format_help())
        return EXIT_OK
    if flags.version:
        print(f"Jailer v{FIRECRACKER_API_VERSION}\nasyncvmm-jailer v{__version__}")
        return EXIT_OK
    try:
        env = parse(argv)
    except ArgumentsError as e:
        print(f"Arguments parsing error: {e} \n\nFor more information try --help.", file=sys.stderr)
        return EXIT_ERROR
    except JailerError as e:
        print(f"Jailer error: {e}", file=sys.stderr)
        return EXIT_ERROR
    from asyncvmm.forkserver import launcher

    server = launcher.server_path()
    if server is not None:
        # Through the fork server (docs/jailer.md): it forks a child that runs these same
        # steps on itself and then the VMM; this process relays stdio, signals and the code.
        jailer_args = split_argv(argv)[0]
        return launcher.main(["--id", env.id, *env.extra_args], server, jail=jailer_args)
    from .jail import _close_inherited_fds, run

    _close_inherited_fds()
    try:
        run(env, start_us, start_cpu_us)
    except JailerError as e:
        print(f"Jailer error: {e}", file=sys.stderr)
    return EXIT_ERROR
