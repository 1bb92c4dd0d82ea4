"""The one import a benchmark needs: everything shared, re-exported.

The pieces live in small modules, each with its own contract:

* ``benchmarks.launch``  spawn with a precise start instant, timestamp output
  chunks, wait for markers (probing the process as one arrives), connect to
  a Unix socket as soon as it accepts, read a process's CPU time, kill every
  child at exit.
* ``benchmarks.stats``   median, nearest-rank p99, min, max, stdev; ratios.
* ``benchmarks.smaps``   a process's memory minus its guest-RAM mapping.
* ``benchmarks.machine`` CPU, kernel, KVM module kind, load, git commit.
* ``benchmarks.report``  result documents, the ratio table, SUMMARY.md.
* ``benchmarks.rounds``  every variant once per round, order rotated, warm-ups dropped.
* ``benchmarks.vmms``    asyncvmm and QEMU microvm command lines, the
  Firecracker API client and a QMP client.
"""

from benchmarks.launch import (Chunk, Launched, LaunchError, StreamRecorder, arrival_of,
                               connect_unix, first_arrivals, install_cleanup, kill_all, launch,
                               process_cpu_ms)
from benchmarks.machine import describe as describe_machine
from benchmarks.machine import git_state, kvm_kind, load_average
from benchmarks.report import (RESULTS_DIR, ResultError, compare, format_comparisons, metric,
                               new_document, regenerate_summary, render_summary, write_result)
from benchmarks.rounds import interleaved_rounds
from benchmarks.smaps import SmapsError, VmmMemory, parse_smaps, read_process_memory, vmm_memory
from benchmarks.stats import StatsError, Summary, format_ratio, percentile, ratio, summarize
from benchmarks.vmms import (ApiClient, ControlError, GuestSpec, QmpClient, asyncvmm_api_argv,
                             asyncvmm_config, asyncvmm_config_argv, qemu_microvm_argv)

__all__ = [
    "ApiClient", "Chunk", "ControlError", "GuestSpec", "LaunchError", "Launched", "QmpClient",
    "RESULTS_DIR", "ResultError", "SmapsError", "StatsError", "StreamRecorder", "Summary",
    "VmmMemory", "arrival_of", "asyncvmm_api_argv", "asyncvmm_config", "asyncvmm_config_argv",
    "compare", "connect_unix", "describe_machine", "first_arrivals", "format_comparisons",
    "format_ratio", "git_state", "install_cleanup", "interleaved_rounds", "kill_all", "kvm_kind", "launch",
    "load_average", "metric", "new_document", "parse_smaps", "percentile", "process_cpu_ms", "qemu_microvm_argv",
    "ratio", "read_process_memory", "regenerate_summary", "render_summary", "summarize",
    "vmm_memory", "write_result",
]
