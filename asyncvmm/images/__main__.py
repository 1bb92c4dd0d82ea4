"""``python -m asyncvmm.images build [--only KIND ...] [--force] | paths [--no-build]``."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import DEFAULT_KINDS, KINDS, ImagesMissingError, ensure_images, load_manifest
from .bzimage import BzImageError
from .debian import DebianError
from .kmod import ModuleError
from .minikernel import MiniKernelError
from .rootfs import RootfsError

ERRORS = (DebianError, BzImageError, ModuleError, RootfsError, MiniKernelError, ImagesMissingError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncvmm.images",
                                     description="Build and locate asyncvmm guest images.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse from the cache) the guest images")
    b.add_argument("--only", action="append", choices=KINDS,
                   help=f"build only these (repeatable); default: {' '.join(DEFAULT_KINDS)}")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--rootfs-size-mib", type=int, default=128)
    p = sub.add_parser("paths", help="print the artifact paths as JSON")
    p.add_argument("--no-build", action="store_true", help="only report what is built; never build")
    args = parser.parse_args(argv)

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        if args.command == "build":
            start = time.monotonic()
            images = ensure_images(only=args.only, force=args.force, progress=progress,
                                   rootfs_size_mib=args.rootfs_size_mib)
            progress(f"[images] all done in {time.monotonic() - start:.1f} s")
        elif args.no_build:
            images = load_manifest()
        else:
            images = ensure_images(progress=progress)
    except ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(images.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
