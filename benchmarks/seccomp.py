"""Seccomp benchmark: what the filters cost, asyncvmm with and without them in the same run.

Two variants, run interleaved (a round runs each once, in a rotated order):
``seccomp`` (the default filters, docs/seccomp.md) and ``no-seccomp``
(``--no-seccomp``).  Each run boots the kvm-tier test guest with
``boottimer=1 blkbench=randread:4096:N:1 exit=halt`` and a read-only drive
(256 MiB of random data, page cache warm, io_engine Sync) and measures:

``reported_boot_time_us``
    asyncvmm's own ``Guest-boot-time`` (InstanceStart to the boot-timer
    write): the start-up cost of compiling and installing the filters is in it.
``start_to_boottimer_ms``
    launch to the arrival of ``testguest: boottimer written`` on stdout.
``randread_4k_qd1_iops``
    4 KiB random reads at queue depth 1 (``tests/guest/blkbench.c``), from
    host-side timestamps of the guest's start/done lines (benchmarks/block.py):
    the per-exit cost, since every request takes a few MMIO exits and
    several system calls on the loop and vCPU threads, each through the filter.

The result goes to ``benchmarks/results/seccomp.json`` with medians and the
``seccomp / no-seccomp`` ratio of each metric.  Usage:
``python -m benchmarks.seccomp [--runs N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import machine
from benchmarks.block import (Options, Workload, bench_windows, default_disk_path, ensure_disk, expected_check,
                              warm_page_cache, window_metrics)
from benchmarks.launch import arrival_of, launch
from benchmarks.rounds import interleaved_rounds
from benchmarks.vmms import (BOOTTIMER_WRITTEN, DONE, GuestSpec, asyncvmm_config, asyncvmm_config_argv,
                             load_test_guest, parse_boot_time_us)

NAME = "seccomp"
DEFAULT_RUNS = 10
QUICK_RUNS = 3
MEM_MIB = 128
VARIANTS = {"seccomp": [], "no-seccomp": ["--no-seccomp"]}
METRICS = ("reported_boot_time_us", "start_to_boottimer_ms", "randread_4k_qd1_iops")


def run_one(extra: list[str], kernel: Path, disk: Path, workload: Workload, check: int,
            timeout_s: float = 120) -> dict[str, float]:
    opts = Options(kernel, disk, (workload,), (check,), timeout_s)
    cmdline = f"boottimer=1 {workload.token} exit=halt"
    config = asyncvmm_config(GuestSpec(kernel, cmdline, mem_mib=MEM_MIB))
    config["drives"] = [{"drive_id": "bench", "path_on_host": str(disk), "is_root_device": False,
                         "is_read_only": True, "io_engine": "Sync"}]
    with tempfile.TemporaryDirectory(prefix="avm-seccomp-bench-") as tmp:
        path, log = Path(tmp) / "vm.json", Path(tmp) / "vmm.log"
        path.write_text(json.dumps(config))
        log.touch()
        warm_page_cache(disk)
        with launch([*asyncvmm_config_argv(path, log, boot_timer=True), *extra]) as vmm:
            if not vmm.stdout.wait_for(DONE, opts.timeout_s):
                raise RuntimeError(f"no {DONE!r}: {vmm.stdout.data[-400:]!r} {log.read_text()[-400:]!r}")
            chunks = list(vmm.stdout.chunks)
            out = window_metrics(opts.workloads, bench_windows(chunks), opts.checks)
            stream = b"".join(c.data for c in chunks)
            at = arrival_of(chunks, stream.index(BOOTTIMER_WRITTEN))
            out["start_to_boottimer_ms"] = (at - vmm.t_start_ns) / 1e6
            # The log line is written by the loop after the guest's write: wait for it.
            deadline = time.monotonic() + 10
            while (boot := parse_boot_time_us(log.read_text())) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if boot is None:
                raise RuntimeError("no Guest-boot-time in the log")
            out["reported_boot_time_us"] = boot
            return {m: out[m] for m in METRICS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seccomp", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ops", type=int, default=5000, help="4K QD1 reads per run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"{NAME}.json")
    args = p.parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    guest = load_test_guest()
    if guest is None:
        return 1
    disk = ensure_disk(default_disk_path())
    workload = Workload("randread_4k_qd1", "randread", 4096, args.ops, 1)
    import os
    fd = os.open(disk, os.O_RDONLY)
    try:
        check = expected_check(fd, workload, disk.stat().st_size)
    finally:
        os.close(fd)
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}

    def run(variant: str) -> None:
        samples[variant].append(run_one(VARIANTS[variant], guest.elf_pvh, disk, workload, check))

    loads = interleaved_rounds(list(VARIANTS), runs, run,
                               describe=lambda vs: " ".join(f"{v}={samples[v][-1]}" for v in vs),
                               log=lambda s: print(s, file=sys.stderr))
    medians = {v: {m: statistics.median(s[m] for s in samples[v]) for m in METRICS} for v in VARIANTS}
    doc: dict[str, Any] = {
        "benchmark": NAME, "runs": runs, "argv": sys.argv, "machine": machine.describe(),
        "load_average_per_round": loads, "guest_cmdline": f"boottimer=1 {workload.token} exit=halt",
        "samples": samples, "medians": medians,
        "ratio_seccomp_over_no_seccomp": {m: medians["seccomp"][m] / medians["no-seccomp"][m] for m in METRICS},
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    for m in METRICS:
        print(f"{m}: seccomp {medians['seccomp'][m]:.1f}  no-seccomp {medians['no-seccomp'][m]:.1f}  "
              f"ratio {doc['ratio_seccomp_over_no_seccomp'][m]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
