"""``asyncvmm-zygote``: run a fork server for ``asyncvmm`` (docs/forkserver.md).

    asyncvmm-zygote --socket /run/user/1000/asyncvmm-zygote.sock
    ASYNCVMM_FORKSERVER=/run/user/1000/asyncvmm-zygote.sock asyncvmm --api-sock /tmp/vm1.sock

It prints ``ready <socket>`` on stdout once it accepts requests, and stops on
SIGTERM/SIGINT (running microVMs keep running).
"""

from __future__ import annotations

import argparse
import sys

from asyncvmm.forkserver import ENV_VAR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="asyncvmm-zygote",
        description=f"Fork server for asyncvmm: set {ENV_VAR}=<socket> for asyncvmm to launch through it.")
    parser.add_argument("--socket", required=True, help="Path of the Unix socket to serve on (created 0600).")
    parser.add_argument("--no-native-waiter", action="store_true",
                        help="Do not build the C waiter; launchers then wait in a bare Python (~3 MiB each).")
    args = parser.parse_args(argv)
    from asyncvmm.forkserver.server import ForkServer, ForkServerError, warm_up

    warm_up()
    from asyncvmm.cli import main as vmm_main

    from asyncvmm.forkserver.native import build_waiter

    waiter = None if args.no_native_waiter else build_waiter()
    try:
        server = ForkServer(args.socket, vmm_main, waiter=waiter)
    except ForkServerError as err:
        print(f"asyncvmm-zygote: {err}", file=sys.stderr)
        return 1
    print(f"ready {args.socket}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
