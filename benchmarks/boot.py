"""Boot benchmark: asyncvmm against QEMU microvm booting the same test guest.

Every run starts a fresh VMM process with the kvm-tier test guest
(``tests/guest``, PVH ELF by default, 1 vCPU, 128 MiB, command line
``boottimer=1 exit=halt``) and measures, from the instant just before the
process is spawned (``benchmarks.launch``):

``start_to_first_output``
    the first byte of the guest's first console line (``testguest: hello``)
    reaching us on stdout: the earliest guest action both VMMs expose alike.
``start_to_boottimer``
    the line ``testguest: boottimer written``, which the guest prints right
    after its boot-timer write.  A console marker rather than asyncvmm's
    ``Guest-boot-time`` log, because QEMU has no boot timer: the same
    observation, through the same path, for both.  asyncvmm's own figure
    (from InstanceStart, its clock) is kept as ``reported_boot_time``.
``vmm_rss`` / ``vmm_pss`` / ``vmm_anon`` / ``vmm_private`` / ``vmm_private_dirty``
    the process's memory minus its guest-RAM mapping (``benchmarks.smaps``;
    private = Private_Clean + Private_Dirty from ``smaps_rollup``), read
    once the guest has printed ``testguest: done`` and halted, after a
    short settle.
``cpu_to_boottimer`` / ``cpu_to_idle``
    the CPU time (utime + stime from ``/proc/<pid>/stat``, all threads,
    10 ms ticks) the VMM process used from its start to the arrival of the
    boot-timer line (read by the stdout reader as that line arrives) and to
    the idle point; guest ring-3 time included, the same guest for both.
API variants also measure ``start_to_socket`` (the API socket, or QMP
socket, first accepts a connection: a listening socket queues connections
before the server can answer them), ``start_to_first_response`` (the first
request answered: ``PUT /boot-source``, or ``qmp_capabilities``) and
``cpu_to_first_response`` (the CPU time at that answer),
``socket_to_running`` (socket accepts → InstanceStart / ``cont`` response,
configuration requests included), ``instance_start_request`` (that last
request's round trip) and ``start_request_to_boottimer``.  The last three,
and the first response, are unequal work: ``qemu -S`` creates the VM and
loads the kernel before QMP answers, asyncvmm on ``InstanceStart``; the
comparisons carry that label (``UNEQUAL_WORK``).

Variants run interleaved (a round runs each once, in a rotated order), so
load from other work on the machine spreads over all of them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import machine, report
from benchmarks.launch import Launched, LaunchError, connect_unix, launch, process_cpu_ms
from benchmarks.rounds import interleaved_rounds
from benchmarks.smaps import SmapsError, read_process_memory
from benchmarks.vmms import (BOOTTIMER_WRITTEN, DONE, GUEST_PREFIX, ApiClient, ControlError, GuestSpec,
                             QmpClient, asyncvmm_api_argv, asyncvmm_config, asyncvmm_config_argv,
                             load_test_guest, parse_boot_time_us, parse_startup_us, qemu_microvm_argv)

NAME = "boot"
DEFAULT_RUNS = 10
QUICK_RUNS = 3
CMDLINE = "boottimer=1 exit=halt"
MS = 1e6                                 # ns per ms

COMPARISONS = [
    ("asyncvmm-config", "qemu-microvm",
     ["start_to_first_output", "start_to_boottimer", "vmm_rss", "vmm_pss", "vmm_private",
      "vmm_private_dirty", "vmm_anon", "cpu_to_boottimer", "cpu_to_idle"]),
    ("asyncvmm-api", "qemu-microvm-qmp",
     ["start_to_socket", "start_to_first_response", "cpu_to_first_response", "socket_to_running",
      "instance_start_request", "start_request_to_boottimer", "start_to_boottimer", "vmm_rss",
      "vmm_pss", "vmm_private", "vmm_private_dirty", "cpu_to_boottimer", "cpu_to_idle"]),
]
_LOADED_BEFORE_QMP = ("QEMU -S creates the VM and loads the kernel before QMP answers (and QMP "
                      "needs its greeting and qmp_capabilities first); asyncvmm answers "
                      "PUT /boot-source before doing either: QEMU did more work here")
_LOADED_ON_START = ("InstanceStart loads the kernel and creates the VM and its devices; QMP cont "
                    "resumes a VM that QEMU built and loaded before its socket answered: asyncvmm "
                    "did more work here")
UNEQUAL_WORK = {("asyncvmm-api", "qemu-microvm-qmp"): {
    "start_to_first_response": _LOADED_BEFORE_QMP,
    "cpu_to_first_response": _LOADED_BEFORE_QMP,
    "socket_to_running": _LOADED_ON_START,
    "instance_start_request": _LOADED_ON_START,
    "start_request_to_boottimer": _LOADED_ON_START,
}}
UNITS = {"vmm_rss": "KiB", "vmm_pss": "KiB", "vmm_anon": "KiB", "vmm_private": "KiB",
         "vmm_private_dirty": "KiB", "guest_rss": "KiB", "guest_private": "KiB"}
# Read by the stdout reader the moment the boot-timer line arrives.
PROBES = {BOOTTIMER_WRITTEN: process_cpu_ms}


class RunFailed(RuntimeError):
    """One run did not produce its markers; the message carries the output tail."""


@dataclasses.dataclass(frozen=True)
class Options:
    guest: GuestSpec
    settle_s: float
    timeout_s: float


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    run: Callable[[Options, Path], tuple[dict[str, float], list[str]]]
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.samples.setdefault(key, []).append(value)


def _tail(data: bytes, n: int = 600) -> str:
    return data[-n:].decode(errors="replace")


def _diagnosis(vmm: Launched, log: Path | None = None) -> str:
    """Exit status and output tails, for a failed run's message."""
    vmm.stop()
    text = f"(exit {vmm.proc.returncode}); stdout: {_tail(vmm.stdout.data)!r} stderr: {_tail(vmm.stderr.data)!r}"
    if log is not None and log.exists():
        text += f" log: {_tail(log.read_bytes())!r}"
    return text


def _finish(vmm: Launched, opts: Options, t_ref: dict[str, int], log: Path | None = None) -> dict[str, float]:
    """Wait for the guest to finish, read memory, stop the VMM; console + memory metrics."""
    if not vmm.stdout.wait_for(DONE, opts.timeout_s):
        why = "before the VMM exited" if vmm.stdout.eof else f"within {opts.timeout_s} s"
        raise RunFailed(f"no {DONE.decode()!r} {why} {_diagnosis(vmm, log)}")
    time.sleep(opts.settle_s)
    if vmm.proc.poll() is not None:
        raise RunFailed(f"the VMM exited ({vmm.proc.returncode}) while the guest should idle")
    try:
        mem = read_process_memory(vmm.pid, opts.guest.region_sizes_kib)
        cpu_ms = process_cpu_ms(vmm.pid)
    except (OSError, ValueError, SmapsError) as err:
        raise RunFailed(f"memory: {err}") from err
    first = vmm.stdout.arrivals([GUEST_PREFIX], edge="start")[GUEST_PREFIX]
    booted = vmm.stdout.arrivals([BOOTTIMER_WRITTEN])
    if BOOTTIMER_WRITTEN not in booted:
        raise RunFailed("the guest finished without printing the boot-timer line")
    cpu_at_boottimer = vmm.stdout.probed.get(BOOTTIMER_WRITTEN)
    if not isinstance(cpu_at_boottimer, float):
        raise RunFailed(f"no CPU time read at the boot-timer line: {cpu_at_boottimer!r}")
    t_start = vmm.t_start_ns
    out = {"start_to_first_output": (first - t_start) / MS,
           "start_to_boottimer": (booted[BOOTTIMER_WRITTEN] - t_start) / MS,
           **mem.metrics(), "cpu_to_boottimer": cpu_at_boottimer, "cpu_to_idle": cpu_ms}
    if "ready" in t_ref:
        out["start_to_socket"] = (t_ref["ready"] - t_start) / MS
        out["start_to_first_response"] = (t_ref["first_response"] - t_start) / MS
        out["socket_to_running"] = (t_ref["running"] - t_ref["ready"]) / MS
        out["instance_start_request"] = (t_ref["running"] - t_ref["start_sent"]) / MS
        out["start_request_to_boottimer"] = (booted[BOOTTIMER_WRITTEN] - t_ref["start_sent"]) / MS
    return out


def _asyncvmm_log_metrics(log_path: Path) -> dict[str, float]:
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    out: dict[str, float] = {}
    boot_us, startup_us = parse_boot_time_us(text), parse_startup_us(text)
    if boot_us is None:
        raise RunFailed(f"no Guest-boot-time line in the log: {text[-600:]!r}")
    out["reported_boot_time"] = boot_us / 1000
    if startup_us is not None:
        out["reported_startup"] = startup_us / 1000
    return out


def run_asyncvmm_config(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
    config, log = tmp / "vm.json", tmp / "vmm.log"
    config.write_text(json.dumps(asyncvmm_config(opts.guest)))
    argv = asyncvmm_config_argv(config, log)
    with launch(argv, probes=PROBES) as vmm:
        metrics = _finish(vmm, opts, {}, log)
    return metrics | _asyncvmm_log_metrics(log), argv


def run_asyncvmm_api(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
    sock_path, log = tmp / "api.sock", tmp / "vmm.log"
    argv = asyncvmm_api_argv(sock_path, log)
    config = asyncvmm_config(opts.guest)
    with launch(argv, probes=PROBES) as vmm:
        try:
            sock, t_ready = connect_unix(sock_path, opts.timeout_s, alive=lambda: vmm.proc.poll() is None)
            api = ApiClient(sock, opts.timeout_s)
            try:
                api.put("/boot-source", config["boot-source"])
                t_first = time.monotonic_ns()
                cpu_first = process_cpu_ms(vmm.pid)
                api.put("/machine-config", config["machine-config"])
                t_sent = time.monotonic_ns()
                api.put("/actions", {"action_type": "InstanceStart"})
                t_running = time.monotonic_ns()
            finally:
                api.close()
        except (LaunchError, ControlError) as err:
            raise RunFailed(f"{err} {_diagnosis(vmm, log)}") from err
        metrics = _finish(vmm, opts, {"ready": t_ready, "first_response": t_first,
                                      "start_sent": t_sent, "running": t_running}, log)
    return metrics | {"cpu_to_first_response": cpu_first} | _asyncvmm_log_metrics(log), argv


def run_qemu(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
    argv = qemu_microvm_argv(opts.guest)
    with launch(argv, probes=PROBES) as vmm:
        return _finish(vmm, opts, {}), argv


def run_qemu_qmp(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
    sock_path = tmp / "qmp.sock"
    argv = qemu_microvm_argv(opts.guest, qmp_sock=sock_path)
    with launch(argv, probes=PROBES) as vmm:
        try:
            sock, t_ready = connect_unix(sock_path, opts.timeout_s, alive=lambda: vmm.proc.poll() is None)
            qmp = QmpClient(sock, opts.timeout_s)
            try:
                qmp.execute("qmp_capabilities")
                t_first = time.monotonic_ns()
                cpu_first = process_cpu_ms(vmm.pid)
                t_sent = time.monotonic_ns()          # after the read: it is not the request's time
                qmp.execute("cont")
                t_running = time.monotonic_ns()
            finally:
                qmp.close()
        except (LaunchError, ControlError) as err:
            raise RunFailed(f"{err} {_diagnosis(vmm)}") from err
        metrics = _finish(vmm, opts, {"ready": t_ready, "first_response": t_first,
                                      "start_sent": t_sent, "running": t_running})
    return metrics | {"cpu_to_first_response": cpu_first}, argv


def make_variants() -> list[Variant]:
    return [
        Variant("asyncvmm-config", "asyncvmm --no-api --config-file vm.json --boot-timer",
                run_asyncvmm_config),
        Variant("asyncvmm-api", "asyncvmm --api-sock; PUT /boot-source, /machine-config, "
                "/actions InstanceStart", run_asyncvmm_api),
        Variant("qemu-microvm", "qemu-system-x86_64 -M microvm ... -kernel (starts running)", run_qemu),
        Variant("qemu-microvm-qmp", "qemu-system-x86_64 -M microvm ... -S -qmp; qmp_capabilities, cont",
                run_qemu_qmp),
    ]


def run_once(variant: Variant, opts: Options) -> dict[str, float] | None:
    with tempfile.TemporaryDirectory(prefix=f"bench-boot-{variant.name}-") as tmpdir:
        try:
            metrics, argv = variant.run(opts, Path(tmpdir))
        except (RunFailed, LaunchError, ControlError, OSError) as err:
            return _failed(variant, str(err))
        if variant.command is None:
            variant.command = [a.replace(tmpdir, "$TMP") for a in argv]
    return metrics


def _failed(variant: Variant, message: str) -> None:
    variant.failures.append(message)
    print(f"  {variant.name}: run failed: {message}", file=sys.stderr)
    return None


def run_rounds(variants: list[Variant], opts: Options, runs: int, warmup: int,
               log: Callable[[str], None] = print) -> list[list[float]]:
    """Warm-up runs (discarded), then ``runs`` rounds; returns the load average per round."""
    def run(v: Variant) -> None:
        metrics = run_once(v, opts)
        if metrics is not None:
            v.add(metrics)

    def discard(v: Variant) -> None:
        v.samples.clear()
        v.failures.clear()

    def describe(vs: list[Variant]) -> str:
        return ", ".join(f"{v.name} {v.samples.get('start_to_boottimer', [float('nan')])[-1]:.0f} ms"
                         for v in vs)

    return interleaved_rounds(variants, runs, run, warmup=warmup, discard=discard, describe=describe,
                              log=log)


def build_document(variants: list[Variant], opts: Options, runs: int, argv: list[str],
                   load_before: list[float], loads: list[list[float]]) -> dict[str, Any]:
    vdocs: dict[str, Any] = {}
    for v in variants:
        vdocs[v.name] = {"description": v.description, "command": v.command,
                         "failures": v.failures,
                         "metrics": {k: report.metric(s, UNITS.get(k, "ms")) for k, s in v.samples.items()}}
    comparisons, notes = report.compare_pairs(vdocs, COMPARISONS, higher_is_better=lambda name: False)
    comparisons = report.label_unequal(comparisons, UNEQUAL_WORK)
    notes += [
        "Process start = time.monotonic_ns() just before Popen; output times = arrival of the "
        "pipe chunk on the benchmark's reader thread.",
        "Boot-timer time for both VMMs = arrival of the guest's 'testguest: boottimer written' line, "
        "printed right after its write of 123 to 0xC000_0000; asyncvmm's own Guest-boot-time log "
        "(from InstanceStart) is `reported_boot_time`.",
        "Memory = smaps Rss/Pss/Anonymous of the process minus its guest-RAM mapping, read after "
        f"the guest halted plus {opts.settle_s} s.",
        "vmm_private = Private_Clean + Private_Dirty (smaps_rollup, read right after smaps) minus the "
        "guest-RAM mapping's private pages: both VMMs map guest RAM anonymous MAP_PRIVATE, so pages the "
        "guest touched are private to the VMM and are taken out, like guest_rss. Private is what the host "
        "gets back when the VMM exits. A clean file page counts only while no other process maps it: "
        "asyncvmm's interpreter is shared with the benchmark's own Python, QEMU's binary only with "
        "another QEMU running at that moment (none of this benchmark's), which favours asyncvmm; "
        "vmm_private_dirty (written pages: heap, stacks, relocated data) is not affected by sharing.",
        "cpu_to_boottimer / cpu_to_first_response / cpu_to_idle = utime + stime of /proc/<pid>/stat "
        "(all threads, exited ones included; 10 ms ticks), read by the stdout reader as the boot-timer "
        "line arrives / right after the first answer / at the memory reading. They include the vCPU "
        "thread's time in the guest (the same guest and work on both sides).",
        "Rows marked 'no' under 'equal work' compare unequal work (reasons under the table): QEMU -S "
        "creates the VM and loads the kernel before QMP is up, asyncvmm on InstanceStart. "
        "`start_to_boottimer`, memory and CPU at the idle point cover the whole boot for both.",
        "`start_to_socket` is when the socket first accepts a connection; a server that binds "
        "early queues it before it can answer, so `start_to_first_response` is the readiness figure.",
        "Variants ran interleaved, one warm-up round discarded; other engineers' jobs shared the "
        "machine (see the load average per round in the JSON).",
    ]
    return report.new_document(
        NAME, "Boot: asyncvmm vs QEMU microvm, same test guest",
        " ".join(["python -m benchmarks.boot", *argv]),
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        settings={"runs": runs, "kernel": str(opts.guest.kernel),
                  "kernel_sha256": hashlib.sha256(opts.guest.kernel.read_bytes()).hexdigest(),
                  "cmdline": opts.guest.cmdline,
                  "mem_mib": opts.guest.mem_mib, "vcpus": opts.guest.vcpus,
                  "settle_s": opts.settle_s, "clk_tck": os.sysconf("SC_CLK_TCK")},
        variants=vdocs, comparisons=comparisons, notes=notes)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.boot", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} rounds, no warm-up")
    p.add_argument("--kernel", choices=("elf_pvh", "bzimage"), default="elf_pvh",
                   help="test guest image (both VMMs boot the same one)")
    p.add_argument("--mem-mib", type=int, default=128)
    p.add_argument("--settle", type=float, default=0.5, help="seconds idle before reading memory")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per boot")
    p.add_argument("--variants", help="comma-separated subset of variants")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    images = load_test_guest()
    if images is None:
        return 1
    opts = Options(GuestSpec(images.variants()[args.kernel], CMDLINE, mem_mib=args.mem_mib),
                   settle_s=args.settle, timeout_s=args.timeout)
    try:
        variants = report.select_variants(make_variants(), args.variants)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    load_before = machine.load_average()
    print(f"boot benchmark: {runs} rounds of {', '.join(v.name for v in variants)}; load {load_before}")
    if load_before[0] > (os.cpu_count() or 1):
        print("note: the load average exceeds the CPU count; absolute times include waiting for a CPU, "
              "ratios are fairer (variants are interleaved) but noisier")
    loads = run_rounds(variants, opts, runs, warmup=0 if args.quick else 1)
    doc = build_document(variants, opts, runs, argv, load_before, loads)
    return report.conclude(doc, variants, write=not args.no_write, results_dir=args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
