"""Snapshot benchmark: create time, file sizes and restore latency, asyncvmm against QEMU microvm.

For each guest size (128 MiB and 1 GiB by default) and each round, the kvm-tier test guest
(``count=N``: it prints a counter line every 2^26 TSC ticks) is booted by each VMM, paused
after it printed ``count i=2``, and saved:

* asyncvmm: ``PUT /snapshot/create`` Full, then (resumed, paused again) Diff (machine-config
  ``track_dirty_pages``); create time is the API call's duration.
* QEMU: QMP ``stop``, then ``migrate`` to ``exec:cat > FILE`` polled with ``query-migrate``
  until ``completed``; create time is from the ``migrate`` command to completion.

Sizes: the memory file's apparent size and the disk it takes (``st_blocks``; asyncvmm leaves
zero pages as holes), plus asyncvmm's state file.  Restore latency is from spawning a new
process to the first counter line the restored guest prints: asyncvmm started with only an
API socket, connected, ``PUT /snapshot/load`` (File backend, ``resume_vm``); QEMU started with
``-incoming "exec:cat FILE"``, QMP ``cont`` once ``query-status`` leaves ``inmigrate``.
The equal-work caveat is stated in the JSON: QEMU's migration stream has no holes and carries
device state in its own format; both restore lazily or eagerly as each does by design
(asyncvmm maps the memory file copy-on-write; QEMU reads the whole stream before running).

asyncvmm's restore is also measured through the Uffd backend (``restore_uffd_ms``) with the kvm
tier's page-fault handler, and into a child of the fork server (``restore_forkserver_ms``,
File backend, ``ASYNCVMM_FORKSERVER`` set).

    .venv/bin/python -m benchmarks.snapshot [--runs N] [--sizes 128,1024] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (ApiClient, ControlError, GuestSpec, LaunchError, connect_unix,
                               describe_machine, git_state, launch, load_average, metric,
                               new_document, qemu_microvm_argv, write_result)
from benchmarks.report import compare, format_comparisons
from benchmarks.vmms import QmpClient, asyncvmm_executable, load_test_guest

COUNT_CMDLINE = "count=100000000 exit=halt"
TIMEOUT_S = 120.0
SUBJECT, PEER = "asyncvmm", "qemu-microvm"


def _alloc_kib(path: Path) -> float:
    return os.stat(path).st_blocks * 512 / 1024


class Qmp(QmpClient):
    def call(self, command: str, **arguments: Any) -> Any:
        msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise ControlError(f"QMP {command}: {reply['error']}")


def _wait_count(proc, n: int) -> None:
    if not proc.stdout.wait_for(f"testguest: count i={n}\n".encode(), TIMEOUT_S):
        raise LaunchError(f"no count i={n}; output: {proc.stdout.data[-400:]!r}")


def _counts(data: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"testguest: count i=(\d+)", data)]


def _api(workdir: Path, name: str, env: dict[str, str] | None = None):
    sock_path = workdir / f"{name}.sock"
    proc = launch([asyncvmm_executable(), "--api-sock", str(sock_path), "--level", "Warning"], env=env)
    sock, _ = connect_unix(sock_path, TIMEOUT_S, alive=lambda: proc.proc.poll() is None)
    return proc, ApiClient(sock, timeout=TIMEOUT_S)


def asyncvmm_round(guest: GuestSpec, workdir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    snap, mem = workdir / "vm.snap", workdir / "vm.mem"
    dsnap, dmem = workdir / "vm.diff.snap", workdir / "vm.diff.mem"
    proc, api = _api(workdir, "boot")
    try:
        api.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": guest.mem_mib,
                                    "track_dirty_pages": True})
        api.put("/boot-source", {"kernel_image_path": str(guest.kernel), "boot_args": guest.cmdline})
        api.put("/actions", {"action_type": "InstanceStart"})
        _wait_count(proc, 2)
        _patch(api, "Paused")
        t0 = time.monotonic_ns()
        api.put("/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(snap),
                                     "mem_file_path": str(mem)})
        out["full_create_ms"] = (time.monotonic_ns() - t0) / 1e6
        _patch(api, "Resumed")
        _wait_count(proc, max(_counts(proc.stdout.data)) + 1)
        _patch(api, "Paused")
        t0 = time.monotonic_ns()
        api.put("/snapshot/create", {"snapshot_type": "Diff", "snapshot_path": str(dsnap),
                                     "mem_file_path": str(dmem)})
        out["diff_create_ms"] = (time.monotonic_ns() - t0) / 1e6
        last = max(_counts(proc.stdout.data))
    finally:
        api.close()
        proc.stop()
    out["full_file_alloc_kib"] = _alloc_kib(mem)
    out["diff_file_alloc_kib"] = _alloc_kib(dmem)
    out["state_file_kib"] = os.path.getsize(snap) / 1024
    out["mem_file_size_kib"] = os.path.getsize(mem) / 1024
    # Restore the Full snapshot in a new process: spawn to the first counter line after it.
    t0 = time.monotonic_ns()
    proc, api = _api(workdir, "restore")
    try:
        t_load = time.monotonic_ns()
        api.put("/snapshot/load", {"snapshot_path": str(snap), "resume_vm": True,
                                   "mem_backend": {"backend_type": "File", "backend_path": str(mem)}})
        out["load_api_ms"] = (time.monotonic_ns() - t_load) / 1e6
        marker = b"testguest: count i="
        if not proc.stdout.wait_for(marker, TIMEOUT_S):
            raise LaunchError("the restored guest printed nothing")
        out["restore_ms"] = (proc.stdout.arrivals([marker], edge="start")[marker] - t0) / 1e6
        first = _counts(proc.stdout.data)
        if first and first[0] > last + 1:
            raise LaunchError(f"restored count {first[0]} does not follow {last}")
    finally:
        api.close()
        proc.stop()
    out["restore_uffd_ms"] = _restore_uffd(workdir, snap, mem, last)
    if FORKSERVER_ENV is not None:
        out["restore_forkserver_ms"] = _restore_file(workdir, snap, mem, FORKSERVER_ENV)
    for p in (snap, mem, dsnap, dmem):
        p.unlink(missing_ok=True)
    return out


def _restore_file(workdir: Path, snap: Path, mem: Path, env: dict[str, str] | None) -> float:
    """Spawn to first counter line, File backend (``env``: through the fork server)."""
    t0 = time.monotonic_ns()
    proc, api = _api(workdir, "restore-fs", env)
    try:
        api.put("/snapshot/load", {"snapshot_path": str(snap), "resume_vm": True,
                                   "mem_backend": {"backend_type": "File", "backend_path": str(mem)}})
        marker = b"testguest: count i="
        if not proc.stdout.wait_for(marker, TIMEOUT_S):
            raise LaunchError("the guest restored through the fork server printed nothing")
        return (proc.stdout.arrivals([marker], edge="start")[marker] - t0) / 1e6
    finally:
        api.close()
        proc.stop()


def _restore_uffd(workdir: Path, snap: Path, mem: Path, last: int) -> float:
    """The same restore through the Uffd backend and the kvm tier's page-fault handler
    (a thread of this process answering each fault with UFFDIO_COPY from the memory file)."""
    from tests.kvm.uffd_handler import PageFaultHandler
    handler = PageFaultHandler(str(workdir / "uffd.sock"), str(mem))
    handler.start()
    t0 = time.monotonic_ns()
    proc, api = _api(workdir, "restore-uffd")
    try:
        api.put("/snapshot/load", {"snapshot_path": str(snap), "resume_vm": True,
                                   "mem_backend": {"backend_type": "Uffd",
                                                   "backend_path": str(workdir / "uffd.sock")}})
        marker = b"testguest: count i="
        if not proc.stdout.wait_for(marker, TIMEOUT_S):
            raise LaunchError("the guest restored through Uffd printed nothing")
        took = (proc.stdout.arrivals([marker], edge="start")[marker] - t0) / 1e6
    finally:
        api.close()
        proc.stop()
        handler.stop()
    if handler.error is not None:
        raise LaunchError(f"page-fault handler: {handler.error}")
    return took


def _patch(api: ApiClient, state: str) -> None:
    status, data = api.request("PATCH", "/vm", {"state": state})
    if status != 204:
        raise ControlError(f"PATCH /vm {state} -> {status}: {data[:200]!r}")


def qemu_round(guest: GuestSpec, workdir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    state = workdir / "qemu.migration"
    qmp_path = workdir / "qmp.sock"
    proc = launch(qemu_microvm_argv(guest, qmp_sock=qmp_path))
    try:
        sock, _ = connect_unix(qmp_path, TIMEOUT_S, alive=lambda: proc.proc.poll() is None)
        qmp = Qmp(sock, timeout=TIMEOUT_S)
        qmp.call("qmp_capabilities")
        qmp.call("cont")
        _wait_count(proc, 2)
        qmp.call("stop")
        t0 = time.monotonic_ns()
        qmp.call("migrate", uri=f"exec:cat > {state}")
        _wait_migration(qmp, "completed")
        out["full_create_ms"] = (time.monotonic_ns() - t0) / 1e6
        qmp.close()
    finally:
        proc.stop()
    out["full_file_alloc_kib"] = _alloc_kib(state)
    out["mem_file_size_kib"] = os.path.getsize(state) / 1024
    t0 = time.monotonic_ns()
    qmp_path.unlink(missing_ok=True)
    proc = launch(qemu_microvm_argv(guest, qmp_sock=qmp_path, extra=["-incoming", f"exec:cat {state}"]))
    try:
        sock, _ = connect_unix(qmp_path, TIMEOUT_S, alive=lambda: proc.proc.poll() is None)
        qmp = Qmp(sock, timeout=TIMEOUT_S)
        qmp.call("qmp_capabilities")
        deadline = time.monotonic() + TIMEOUT_S
        while qmp.call("query-status")["status"] == "inmigrate":
            if time.monotonic() > deadline:
                raise LaunchError("QEMU never left inmigrate")
            time.sleep(0.002)
        qmp.call("cont")
        marker = b"testguest: count i="
        if not proc.stdout.wait_for(marker, TIMEOUT_S):
            raise LaunchError("the restored QEMU guest printed nothing")
        out["restore_ms"] = (proc.stdout.arrivals([marker], edge="start")[marker] - t0) / 1e6
        qmp.close()
    finally:
        proc.stop()
    state.unlink(missing_ok=True)
    return out


def _wait_migration(qmp: Qmp, want: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while (status := qmp.call("query-migrate").get("status")) != want:
        if status == "failed" or time.monotonic() > deadline:
            raise LaunchError(f"QEMU migration ended {status}")
        time.sleep(0.001)


FORKSERVER_ENV: dict[str, str] | None = None     # set by main() once the fork server is ready

UNITS = {"restore_forkserver_ms": "ms",
         "full_create_ms": "ms", "diff_create_ms": "ms", "load_api_ms": "ms", "restore_ms": "ms",
         "restore_uffd_ms": "ms",
         "full_file_alloc_kib": "KiB", "diff_file_alloc_kib": "KiB", "state_file_kib": "KiB",
         "mem_file_size_kib": "KiB"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="128,1024", help="guest sizes in MiB")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    images = load_test_guest()
    if images is None or shutil.which("qemu-system-x86_64") is None:
        print("needs /dev/kvm, the test guest and qemu-system-x86_64", file=sys.stderr)
        return 1
    global FORKSERVER_ENV
    zygote_dir = tempfile.mkdtemp(prefix="avm-snapbench-zygote-")
    zygote_sock = os.path.join(zygote_dir, "zygote.sock")
    zygote = launch([sys.executable, "-m", "asyncvmm.forkserver", "--socket", zygote_sock])
    if zygote.stdout.wait_for(f"ready {zygote_sock}".encode(), TIMEOUT_S):
        FORKSERVER_ENV = dict(os.environ, ASYNCVMM_FORKSERVER=zygote_sock)
    else:
        print("the fork server did not start; restore_forkserver_ms is not measured", file=sys.stderr)
    try:
        return _run(args, images)
    finally:
        zygote.stop()
        shutil.rmtree(zygote_dir, ignore_errors=True)


def _run(args: argparse.Namespace, images: Any) -> int:
    load_before = load_average()
    variants: dict[str, dict[str, Any]] = {}
    failures: dict[str, list[str]] = {}
    for mib in (int(s) for s in args.sizes.split(",")):
        guest = GuestSpec(kernel=Path(images.elf_pvh), cmdline=COUNT_CMDLINE, mem_mib=mib)
        samples: dict[str, dict[str, list[float]]] = {}
        for r in range(args.runs):
            for name, fn in ((SUBJECT, asyncvmm_round), (PEER, qemu_round))[::1 if r % 2 == 0 else -1]:
                key = f"{name}-{mib}MiB"
                with tempfile.TemporaryDirectory(prefix="avm-snapbench-") as d:
                    try:
                        got = fn(guest, Path(d))
                    except (LaunchError, ControlError, OSError) as e:
                        failures.setdefault(key, []).append(str(e))
                        print(f"{key}: {e}", file=sys.stderr)
                        continue
                for m, v in got.items():
                    samples.setdefault(key, {}).setdefault(m, []).append(v)
                print(key, {k: round(v, 1) for k, v in got.items()}, flush=True)
        for key, metrics in samples.items():
            variants[key] = {"metrics": {m: metric(v, UNITS[m]) for m, v in metrics.items()},
                             "failures": failures.get(key, [])}
    comparisons = []
    for mib in args.sizes.split(","):
        a, b = f"{SUBJECT}-{mib}MiB", f"{PEER}-{mib}MiB"
        if a in variants and b in variants:
            for m in ("full_create_ms", "restore_ms", "full_file_alloc_kib"):
                c = compare(variants, a, b, m) | {"higher_is_better": False}
                if m == "full_file_alloc_kib":
                    c["unequal_work"] = ("asyncvmm leaves zero pages as holes in its memory file; "
                                         "QEMU's migration stream is a plain file")
                if m == "restore_ms":
                    c["unequal_work"] = ("asyncvmm maps guest memory copy-on-write and faults pages in "
                                         "as the guest touches them; QEMU reads the whole stream first")
                comparisons.append(c)
    doc = new_document("snapshot", "Snapshots: create, sizes, restore (asyncvmm vs QEMU microvm)",
                       "python -m benchmarks.snapshot " + " ".join(sys.argv[1:]),
                       machine=describe_machine(), git=git_state(),
                       load={"before": load_before, "after": load_average()},
                       variants=variants, comparisons=comparisons,
                       notes=["restore_forkserver_ms: the File restore with ASYNCVMM_FORKSERVER set "
                              "(the VMM is a forked child of a warm asyncvmm-zygote).",
                              "restore_uffd_ms: the Uffd backend with tests/kvm/uffd_handler.py, a "
                              "Python handler thread in the benchmark process (one UFFDIO_COPY per "
                              "faulted 4 KiB page).",
                              "Diff: the test guest dirties few pages between the Full and the "
                              "Diff; diff_file_alloc_kib is what that Diff took on disk."])
    print()
    print(format_comparisons(comparisons))
    if not args.no_write:
        print("wrote", write_result(doc))
    return 0 if variants and not any(failures.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
