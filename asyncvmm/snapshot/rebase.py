"""Merge a Diff snapshot's memory file onto its base: ``python -m asyncvmm.snapshot.rebase``.

    python -m asyncvmm.snapshot.rebase --base-file vm.mem --diff-file vm.diff.mem \\
        [--diff-state vm.diff.snap]

The base file is changed in place; afterwards it is the memory file of the Diff snapshot
(load it with the Diff's state file).  With ``--diff-state`` exactly the ranges the state
file lists are copied (the state file's checksum is verified first); without it the diff
file's data extents are, as Firecracker's ``rebase-snap`` does.  Diffs are applied oldest
first onto the Full snapshot they follow.  docs/snapshots.md.
"""

from __future__ import annotations

import argparse
import sys

from .format import SnapshotFormatError, read_state_file
from .memfile import merge_diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncvmm.snapshot.rebase", description=__doc__.split("\n")[0])
    p.add_argument("--base-file", required=True, help="the base memory file (changed in place)")
    p.add_argument("--diff-file", required=True, help="the Diff snapshot's memory file")
    p.add_argument("--diff-state", help="the Diff snapshot's state file (its dirty ranges)")
    args = p.parse_args(argv)
    ranges = None
    try:
        if args.diff_state is not None:
            state = read_state_file(args.diff_state)
            if state.dirty_ranges is None:
                print(f"error: {args.diff_state} is a {state.snapshot_type} snapshot, not a Diff",
                      file=sys.stderr)
                return 1
            ranges = state.dirty_ranges
        copied = merge_diff(args.base_file, args.diff_file, ranges)
    except (SnapshotFormatError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {copied} bytes of {args.diff_file} onto {args.base_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
