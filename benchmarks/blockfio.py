"""Block benchmark with a real Linux guest: Debian's fio on a virtio-blk data disk, asyncvmm vs QEMU microvm.

Every variant boots the linux tier's Debian guest (cloud kernel, the project's
initramfs, the ext4 rootfs with fio; see docs/images.md), 1 vCPU, 256 MiB,
root on ``/dev/vda`` and a second, writable drive ``/dev/vdb``: one 256 MiB
file of random data made for the run and shared by every variant (only one
guest does I/O at a time).  All guests are booted first and stay up; every
round then runs each variant's fio jobs, the order of the variants rotated
from round to round.  Variants:

``asyncvmm`` / ``asyncvmm-async``
    ``asyncvmm --no-api --config-file``, the data drive with ``io_engine``
    Sync or Async (io_uring), ``cache_type`` Writeback: virtio-mmio.
``qemu-microvm``
    ``-drive ...,cache=writeback,aio=threads -device virtio-blk-device`` on
    modern virtio-mmio (``-global virtio-mmio.force-legacy=false``): QEMU's
    userspace virtio-blk.  Writeback because asyncvmm does not use O_DIRECT:
    both VMMs then go through the host's page cache.
``asyncvmm-pci`` / ``qemu-microvm-pci``
    the same on virtio-pci: asyncvmm with ``--enable-pci`` (Sync), QEMU
    microvm with ``pcie=on`` and ``virtio-blk-pci,disable-legacy=on`` (the
    root disk moves to PCI too); the kernel runs without ``pci=off``.
``asyncvmm-vhost-user`` / ``qemu-microvm-vhost-user``
    the data drive served by ``qemu-storage-daemon``'s writable
    ``vhost-user-blk`` export of the same file (one daemon, one export per
    VMM): asyncvmm's drive ``socket``, QEMU's ``-device vhost-user-blk`` with
    guest RAM a shared memfd.  The requests never pass through the VMM.

Each job is one fio run in the guest on ``/dev/vdb`` with ``--direct=1
--ioengine=libaio``, time-based (:data:`JOBS`: 4 KiB random read and write
at queue depth 1 and 32, 1 MiB sequential read and write at depth 4), framed
on the console by ``AVMFIO:<n>:begin`` / ``AVMFIO:<n>:end:<status>`` lines;
fio's terse output stays in the guest and only the fields used here are
printed (:data:`TERSE_FIELDS`).  The host reads the VMM's CPU time
(``/proc/<pid>/stat``: utime + stime minus guest_time, as the net benchmark
does) when each marker arrives, and the storage daemon's for the vhost-user
variants, giving CPU milliseconds per GiB moved.  Rates are fio's own (IOPS
for the 4 KiB jobs, MiB/s for the 1 MiB ones).

Where ``/dev/kvm`` is not hardware KVM (here: kvm_pvm) a Debian guest cannot
boot in useful time, so ``main`` re-runs this module inside the emulated KVM
host (``asyncvmm_tools.hostvm``), as the net benchmark does: only the ratios
mean something there.

Pure helpers (fio command lines and output, VMM command-line pieces, metrics)
are at the top and unit-tested; the I/O is below them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks import machine, report
from benchmarks.net import (READY, CpuTicks, RunFailed, cpu_ticks, qemu_pci_argv, run_and_conclude,
                            run_benchmark_nested, stop_guest, without_pci_off)
from benchmarks.rounds import interleaved_rounds

NAME = "blockfio"
TITLE = ("Block with a Linux guest: fio in the Debian guest, asyncvmm virtio-blk vs QEMU microvm "
         "(virtio-mmio, virtio-pci, vhost-user), nested emulated host (ratios only)")
DEFAULT_RUNS = 5
QUICK_RUNS = 2
DEFAULT_SECONDS = 5
QUICK_SECONDS = 2
MEM_MIB = 256
DISK_BYTES = 256 << 20
DEVICE = "/dev/vdb"
ENGINE = "libaio"
MARK = "AVMFIO"
BOOT_TIMEOUT_S = 400.0
JOB_SLACK_S = 180.0              # beyond --runtime: fio's start-up and the console, emulated
MIB = 1 << 20
GIB = 1 << 30
QSD = "qemu-storage-daemon"
QSD_SOCKET_WAIT_S = 30.0


# -- fio ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    rw: str                        # fio's rw=: randread | randwrite | read | write
    block: int                     # bytes per request
    depth: int

    @property
    def sequential(self) -> bool:
        return self.rw in ("read", "write")

    @property
    def rate_metric(self) -> str:
        """IOPS for small random requests, MiB/s for the large sequential ones."""
        return f"{self.name}_mib_s" if self.sequential else f"{self.name}_iops"


JOBS = (
    Job("randread_4k_qd1", "randread", 4096, 1),
    Job("randread_4k_qd32", "randread", 4096, 32),
    Job("randwrite_4k_qd1", "randwrite", 4096, 1),
    Job("randwrite_4k_qd32", "randwrite", 4096, 32),
    Job("seqread_1m_qd4", "read", 1 << 20, 4),
    Job("seqwrite_1m_qd4", "write", 1 << 20, 4),
)

# fio's terse output, version 3: the 1-based fields this benchmark reads (fio's HOWTO,
# "Terse output"): the guest prints only these, in this order, ';'-separated.
TERSE_FIELDS = (("terse_version", 1), ("jobname", 3), ("error", 5),
                ("read_kib", 6), ("read_iops", 8), ("read_runtime_ms", 9),
                ("write_kib", 47), ("write_iops", 49), ("write_runtime_ms", 50))


def fio_argv(job: Job, seconds: int, device: str = DEVICE) -> list[str]:
    """One time-based fio job on ``device``: O_DIRECT (no guest page cache), :data:`ENGINE`, one
    thread (no SysV shared memory needed), random offsets without fio's coverage bitmap."""
    if seconds < 1:
        raise ValueError("a job runs for at least 1 s")
    return ["fio", f"--name={job.name}", f"--filename={device}", f"--rw={job.rw}", f"--bs={job.block}",
            f"--iodepth={job.depth}", f"--ioengine={ENGINE}", "--direct=1", "--thread", "--norandommap",
            "--time_based", f"--runtime={seconds}", "--output-format=terse", "--terse-version=3"]


def job_script(n: int, job: Job, seconds: int, device: str = DEVICE) -> str:
    """The guest shell script for job ``n``: markers around fio, then the few terse fields.

    fio's full output stays in /tmp (a terse line is ~1 KB; the emulated serial console is slow).
    The markers are assembled by printf from pieces so that no echo of the script could match.
    """
    fields = ",".join(str(f) for _, f in TERSE_FIELDS)
    fio = " ".join(shlex.quote(a) for a in fio_argv(job, seconds, device))
    return "\n".join([
        f"printf '%s:%s:begin\\n' {MARK} {n}",
        f"{fio} --output=/tmp/fio.out 2>/tmp/fio.err",
        "s=$?",
        f"printf '%s:%s:end:%s\\n' {MARK} {n} $s",
        f"grep '^3;' /tmp/fio.out | cut -d';' -f{fields}",
        "tail -c 400 /tmp/fio.err",
        "exit $s",
    ])


def begin_marker(n: int) -> str:
    return rf"{MARK}:{n}:begin\r?\n"


def end_marker(n: int) -> str:
    return rf"{MARK}:{n}:end:(\d+)\r?\n"


@dataclasses.dataclass(frozen=True)
class FioResult:
    job: str
    read_bytes: int
    write_bytes: int
    iops: float                    # read + write (a job does one of them)
    runtime_ms: int                # fio's, the longer of the two directions

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes

    @property
    def mib_s(self) -> float:
        return self.bytes / MIB / (self.runtime_ms / 1000)


_TERSE_LINE = re.compile(r"^3;[^\r\n]*", re.MULTILINE)


def parse_fio_terse(text: str, job: str) -> FioResult:
    """The result of ``job`` from the guest's output: the line of :data:`TERSE_FIELDS`."""
    m = _TERSE_LINE.search(text)
    if m is None:
        raise RunFailed(f"{job}: fio printed no terse line: {text[-300:]!r}")
    parts = m[0].split(";")
    if len(parts) != len(TERSE_FIELDS):
        raise RunFailed(f"{job}: {len(parts)} terse fields, {len(TERSE_FIELDS)} expected: {m[0][:200]!r}")
    f = dict(zip((name for name, _ in TERSE_FIELDS), parts))
    if f["jobname"] != job:
        raise RunFailed(f"fio reported job {f['jobname']!r}, {job!r} expected")
    try:
        error = int(f["error"])
        read_kib, write_kib = int(f["read_kib"]), int(f["write_kib"])
        iops = float(f["read_iops"]) + float(f["write_iops"])
        runtime = max(int(f["read_runtime_ms"]), int(f["write_runtime_ms"]))
    except ValueError:
        raise RunFailed(f"{job}: not a fio terse line: {m[0][:200]!r}") from None
    if error:
        raise RunFailed(f"{job}: fio reported error {error}")
    if read_kib + write_kib <= 0 or runtime <= 0 or not 0 < iops < float("inf"):
        raise RunFailed(f"{job}: fio moved nothing ({read_kib + write_kib} KiB in {runtime} ms)")
    return FioResult(job, read_kib * 1024, write_kib * 1024, iops, runtime)


# -- metrics --------------------------------------------------------------------------

def job_metrics(job: Job, result: FioResult, vmm: CpuTicks, backend: int | None,
                tick_ms: float) -> dict[str, float]:
    """One job's numbers: its rate, and CPU per GiB moved from the ticks taken between its markers.

    ``backend`` is the vhost-user back end's CPU ticks (utime + stime) in the same window, if any.
    """
    gib = result.bytes / GIB
    out = {job.rate_metric: result.mib_s if job.sequential else result.iops,
           f"{job.name}_vmm_cpu_ms_per_gib": vmm.own * tick_ms / gib,
           f"{job.name}_vmm_user_ms_per_gib": vmm.own_user * tick_ms / gib,
           f"{job.name}_vmm_sys_ms_per_gib": vmm.system * tick_ms / gib,
           f"{job.name}_guest_cpu_ms_per_gib": vmm.guest * tick_ms / gib}
    if backend is not None:
        out[f"{job.name}_backend_cpu_ms_per_gib"] = backend * tick_ms / gib
    return out


def unit_of(name: str) -> str:
    if name.endswith("_mib_s"):
        return "MiB/s"
    if name.endswith("_ms_per_gib"):
        return "ms"
    return "count"


def compared(jobs: Sequence[Job], backend: bool = False) -> list[str]:
    """Per job, the rate and the VMM's CPU per GiB (and the back end's, for vhost-user pairs)."""
    names = []
    for job in jobs:
        names += [job.rate_metric, f"{job.name}_vmm_cpu_ms_per_gib"]
        if backend:
            names.append(f"{job.name}_backend_cpu_ms_per_gib")
    return names


def pairs(jobs: Sequence[Job]) -> list[tuple[str, str, list[str]]]:
    """Each asyncvmm variant against its QEMU peer on the same transport and data path, then what
    asyncvmm's own options change (io_uring, PCI)."""
    return [("asyncvmm", "qemu-microvm", compared(jobs)),
            ("asyncvmm-async", "qemu-microvm", compared(jobs)),
            ("asyncvmm-pci", "qemu-microvm-pci", compared(jobs)),
            ("asyncvmm-vhost-user", "qemu-microvm-vhost-user", compared(jobs, backend=True)),
            ("asyncvmm-async", "asyncvmm", compared(jobs)),
            ("asyncvmm-pci", "asyncvmm", compared(jobs))]


def comparisons(vdocs: dict[str, Any], jobs: Sequence[Job]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rates are higher_is_better (above 1.0 asyncvmm is faster); CPU per GiB is not."""
    return report.compare_pairs(vdocs, pairs(jobs), higher_is_better=lambda n: not n.endswith("_per_gib"))


# -- VMM command-line pieces -------------------------------------------------------------

def asyncvmm_data_drive(disk: Path, engine: str) -> dict[str, Any]:
    """The Firecracker ``drives`` entry: writable, writeback (flushes honoured, as QEMU's)."""
    return {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False, "is_read_only": False,
            "cache_type": "Writeback", "io_engine": engine}


def asyncvmm_vhost_user_drive(sock: Path) -> dict[str, Any]:
    return {"drive_id": "data", "socket": str(sock), "is_root_device": False}


def qemu_data_drive(disk: Path) -> list[str]:
    """QEMU's userspace virtio-blk on modern virtio-mmio, page cache on, its thread pool.

    ``file.locking=off``: every variant's VMM keeps the same file open at once (and the storage
    daemon holds its lock), while only the one being measured touches it."""
    return ["-global", "virtio-mmio.force-legacy=false",
            "-drive", f"id=data,file={disk},format=raw,if=none,cache=writeback,aio=threads,file.locking=off",
            "-device", "virtio-blk-device,drive=data"]


def qemu_vhost_user_drive(sock: Path, mem_mib: int = MEM_MIB) -> list[str]:
    """QEMU's vhost-user-blk on modern virtio-mmio; the back end maps guest RAM: a shared memfd."""
    return ["-global", "virtio-mmio.force-legacy=false",
            "-object", f"memory-backend-memfd,id=ram,size={mem_mib}M,share=on",
            "-machine", "memory-backend=ram",
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", "vhost-user-blk,chardev=vu,num-queues=1"]


def storage_daemon_args(disk: Path, socks: Sequence[Path]) -> list[str]:
    """One writable vhost-user-blk export of ``disk`` per socket (a front end each), page cache on."""
    args = ["--blockdev", f"driver=file,node-name=data,filename={disk}"]
    for i, sock in enumerate(socks):
        args += ["--export", f"type=vhost-user-blk,id=vu{i},node-name=data,addr.type=unix,"
                             f"addr.path={sock},writable=on"]
    return args


# -- variants -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Kind:
    vmm: str                       # "asyncvmm" | "qemu"
    pci: bool = False
    engine: str = "Sync"           # asyncvmm's io_engine
    vhost_user: bool = False


VARIANTS: dict[str, tuple[str, Kind]] = {
    "asyncvmm": ("asyncvmm --no-api --config-file, data drive io_engine Sync, cache_type Writeback "
                 "(virtio-mmio)", Kind("asyncvmm")),
    "asyncvmm-async": ("asyncvmm, the same drive with io_engine Async (io_uring)",
                       Kind("asyncvmm", engine="Async")),
    "qemu-microvm": ("QEMU microvm, -drive cache=writeback,aio=threads -device virtio-blk-device "
                     "(modern virtio-mmio)", Kind("qemu")),
    "asyncvmm-pci": ("asyncvmm --enable-pci, the same drive (Sync) and the root disk on virtio-pci (MSI-X)",
                     Kind("asyncvmm", pci=True)),
    "qemu-microvm-pci": ("QEMU microvm,pcie=on, virtio-blk-pci,disable-legacy=on (the root disk too), "
                         "cache=writeback,aio=threads", Kind("qemu", pci=True)),
    "asyncvmm-vhost-user": ("asyncvmm, the data drive's `socket` on qemu-storage-daemon's writable "
                            "vhost-user-blk export (virtio-mmio)", Kind("asyncvmm", vhost_user=True)),
    "qemu-microvm-vhost-user": ("QEMU microvm, -device vhost-user-blk on the same daemon, memfd RAM "
                                "(virtio-mmio)", Kind("qemu", vhost_user=True)),
}


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    kind: Kind
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None
    guest: Any = None              # tests.linux.harness.Guest while booted
    sock: Path | None = None       # its vhost-user socket
    seq: int = 0                   # jobs run so far (numbers the markers)


def make_variants(names: Sequence[str] | None = None) -> list[Variant]:
    wanted = list(names) if names else list(VARIANTS)
    unknown = [n for n in wanted if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    return [Variant(n, *VARIANTS[n]) for n in wanted]


NOTES = [
    "NESTED, EMULATED HOST: measured inside the emulated KVM host (QEMU TCG with nested SVM, 1 vCPU; see "
    "docs/testing.md) because this machine's /dev/kvm (kvm_pvm) cannot boot a Linux guest in useful time. "
    "Guests, VMMs and the storage daemon all run emulated; absolute IOPS and MiB/s say nothing about real "
    "hardware. Only the ratios mean something: every variant ran in the same emulated host, in the same "
    "run, rounds interleaved.",
    "Ratios: *_iops and *_mib_s are rates (higher_is_better): ABOVE 1.0 asyncvmm is faster. "
    "*_cpu_ms_per_gib: below 1.0 asyncvmm is cheaper.",
    "Guest: the linux tier's Debian guest (1 vCPU, 256 MiB), Debian's fio 3.33 on /dev/vdb, --direct=1 "
    "--ioengine=libaio --thread --norandommap, time-based (settings.fio has the command lines). The data "
    "drive is one 256 MiB file of random data in the host's page cache (the emulated host's tmpfs), "
    "shared by all variants; QEMU uses cache=writeback,aio=threads (asyncvmm opens without O_DIRECT), "
    "asyncvmm cache_type Writeback.",
    "*_vmm_cpu_ms_per_gib: the VMM process's CPU time (all threads, utime + stime minus guest_time, "
    "/proc/<pid>/stat, tick-sampled) between the arrivals of the job's begin and end markers on the "
    "console, per GiB fio moved. The window also holds fio's start-up and exit in the guest (guest CPU, "
    "little VMM work) and the two marker lines. The JSON splits it into *_vmm_user_ms_per_gib (userspace: "
    "device emulation, exit handlers) and *_vmm_sys_ms_per_gib (the kernel on its behalf: file I/O, "
    "eventfds, KVM handling exits, which nesting makes dear for both VMMs); *_guest_cpu_ms_per_gib is "
    "guest_time.",
    "vhost-user: the requests go from the guest's ring to qemu-storage-daemon, so the VMM's CPU per GiB is "
    "small for both; *_backend_cpu_ms_per_gib is the daemon's CPU (utime + stime) in the same window.",
    "Each guest ran one discarded 1 s fio job after boot (loads fio and its libraries into the guest's "
    "page cache).",
]


# -- running it (I/O from here on) ------------------------------------------------------

def ensure_data_disk(path: Path, size: int = DISK_BYTES) -> Path:
    """``size`` bytes of random data (rewritten by the write jobs, so made fresh for every run)."""
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    return path


@contextlib.contextmanager
def storage_daemon(disk: Path, socks: Sequence[Path]) -> Iterator[Any]:
    """``qemu-storage-daemon`` exporting ``disk`` at every socket; yields its :class:`Launched`."""
    from benchmarks.launch import launch

    exe = shutil.which(QSD)
    if exe is None:
        raise RunFailed(f"{QSD} is not installed (Debian: qemu-system-common)")
    with launch([exe, *storage_daemon_args(disk, socks)]) as daemon:
        deadline = time.monotonic() + QSD_SOCKET_WAIT_S
        while not all(s.exists() for s in socks):
            if daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"{QSD} did not serve {socks}: {daemon.stderr.data[-400:]!r}")
            time.sleep(0.05)
        yield daemon


def _launcher(v: Variant, disk: Path, workdir: Path):
    from tests.linux.harness import AsyncVmmLauncher, QemuMicrovmLauncher

    kind = v.kind
    if kind.vmm == "asyncvmm":
        drive = asyncvmm_vhost_user_drive(v.sock) if kind.vhost_user else asyncvmm_data_drive(disk, kind.engine)

        class AsyncVmmData(AsyncVmmLauncher):
            def config(self, spec):
                config = AsyncVmmLauncher.config(spec)
                return {**config, "drives": [*config["drives"], drive]}

        # Logs to a file: the console then carries only the guest, as QEMU's does.
        pci = ["--enable-pci"] if kind.pci else []
        return AsyncVmmData(extra_args=["--log-path", str(workdir / "vmm.log"), "--level", "Info", *pci])

    extra = qemu_vhost_user_drive(v.sock) if kind.vhost_user else qemu_data_drive(disk)

    class QemuData(QemuMicrovmLauncher):
        def argv(self, spec, wd):
            argv = super().argv(spec, wd) + extra
            return qemu_pci_argv(argv) if kind.pci else argv

    return QemuData()


def run_job(v: Variant, job: Job, seconds: int, backend_pid: int | None) -> tuple[FioResult, CpuTicks, int | None]:
    """Run one fio job in ``v``'s guest; its result and the CPU ticks between its markers."""
    from tests.linux.harness import GuestError

    guest = v.guest
    v.seq += 1
    n = v.seq
    limit = seconds + JOB_SLACK_S
    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(guest.run, job_script(n, job, seconds), limit)
        try:
            guest.wait_for(begin_marker(n), limit)
            vmm0 = cpu_ticks(guest.pid)
            back0 = backend_ticks(backend_pid)
            end = guest.wait_for(end_marker(n), limit)
            vmm1 = cpu_ticks(guest.pid)
            back1 = backend_ticks(backend_pid)
            result = done.result(limit)
        except GuestError as err:
            raise RunFailed(f"{job.name}: {str(err)[-600:]}") from None
    if end[1] != "0" or result.status != 0:
        raise RunFailed(f"{job.name}: fio exited {end[1]}: {result.output[-400:]!r}")
    backend = None if back0 is None or back1 is None else back1 - back0
    return parse_fio_terse(result.output, job.name), vmm1 - vmm0, backend


def backend_ticks(pid: int | None) -> int | None:
    if pid is None:
        return None
    t = cpu_ticks(pid)
    return t.user + t.system


def boot(v: Variant, images, disk: Path, workdir: Path) -> None:
    """Boot ``v``'s guest, check its data disk and warm fio up."""
    from tests.linux.harness import Guest, GuestError, default_spec

    wd = workdir / v.name
    wd.mkdir(parents=True, exist_ok=True)
    spec = default_spec(images, wd, mem_mib=MEM_MIB)
    if v.kind.pci:
        spec = dataclasses.replace(spec, boot_args=without_pci_off(spec.boot_args))
    v.guest = Guest(_launcher(v, disk, wd), spec, wd)
    v.command = [a.replace(str(wd), "$WORKDIR").replace(str(disk.parent), "$TMP") for a in v.guest.argv]
    try:
        v.guest.wait_for(READY, BOOT_TIMEOUT_S)
        size = v.guest.run(f"cat /sys/block/{Path(DEVICE).name}/size", 60).check().output.strip()
        if size != str(DISK_BYTES // 512):
            raise RunFailed(f"{DEVICE} has {size!r} sectors, not the data disk's {DISK_BYTES // 512}")
    except GuestError as err:
        raise RunFailed(f"{v.name} did not boot: {str(err)[-600:]}") from None


def measure(v: Variant, jobs: Sequence[Job], seconds: int, backend_pid: int | None) -> dict[str, float] | None:
    if v.guest is None or v.guest.exited() is not None:
        if v.guest is not None:
            v.failures.append(f"the VMM exited ({v.guest.exited()}): {v.guest.tail(600)!r}")
            stop_guest(v)
        return None
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        for job in jobs:
            result, vmm, backend = run_job(v, job, seconds, backend_pid if v.kind.vhost_user else None)
            out.update(job_metrics(job, result, vmm, backend, tick_ms))
    except (RunFailed, OSError) as err:
        v.failures.append(str(err))
        print(f"  {v.name}: measurement failed: {err}", file=sys.stderr, flush=True)
        return None
    for key, value in out.items():
        v.samples.setdefault(key, []).append(value)
    print(f"  {v.name}: {len(jobs)} jobs done", flush=True)
    return out


def describe(variants: Sequence[Variant]) -> str:
    def last(v: Variant, key: str) -> float:
        return v.samples.get(key, [float("nan")])[-1]

    return "; ".join(f"{v.name} rr1 {last(v, 'randread_4k_qd1_iops'):.0f} rw32 {last(v, 'randwrite_4k_qd32_iops'):.0f} "
                     f"IOPS, sr {last(v, 'seqread_1m_qd4_mib_s'):.1f} MiB/s" for v in variants)


@dataclasses.dataclass(frozen=True)
class Settings:
    runs: int
    seconds: int
    variants: tuple[str, ...]

    def argv(self) -> list[str]:
        """The same settings as flags (for the run inside the emulated host)."""
        return ["--runs", str(self.runs), "--seconds", str(self.seconds), "--variants", ",".join(self.variants)]


def run_direct(settings: Settings, command: str) -> tuple[dict[str, Any], bool]:
    """Boot every variant's guest here, measure, and return (the result document, every variant measured)."""
    from asyncvmm_tools.images import ensure_images

    images = ensure_images(refresh=False)
    variants = make_variants(settings.variants)
    load_before = machine.load_average()
    print(f"blockfio benchmark: {settings.runs} rounds of {', '.join(v.name for v in variants)}; "
          f"{len(JOBS)} fio jobs of {settings.seconds} s each; load {load_before}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-blockfio-") as tmp, contextlib.ExitStack() as stack:
        disk = ensure_data_disk(Path(tmp) / "data.img")
        users = [v for v in variants if v.kind.vhost_user]
        for i, v in enumerate(users):
            v.sock = Path(tmp) / f"vu{i}.sock"
        daemon = stack.enter_context(storage_daemon(disk, [v.sock for v in users])) if users else None
        backend_pid = daemon.pid if daemon else None
        try:
            for v in variants:
                try:
                    boot(v, images, disk, Path(tmp))
                    run_job(v, Job("warmup", "randread", 4096, 1), 1, None)
                    if daemon is not None and v.kind.vhost_user:
                        v.command = [*v.command, "# back end:", *daemon.proc.args]
                    print(f"{v.name}: booted, {DEVICE} is the data disk, fio ran", flush=True)
                except (RunFailed, OSError) as err:
                    v.failures.append(str(err))
                    print(f"{v.name}: {err}", file=sys.stderr, flush=True)
                    stop_guest(v)
            loads = interleaved_rounds(variants, settings.runs,
                                       lambda v: measure(v, JOBS, settings.seconds, backend_pid),
                                       describe=describe, log=lambda s: print(s, flush=True))
        finally:
            for v in variants:
                stop_guest(v)
    return build_document(variants, settings, command, load_before, loads), \
        all(v.samples and not v.failures for v in variants)


def build_document(variants: list[Variant], settings: Settings, command: str,
                   load_before: list[float], loads: list[list[float]]) -> dict[str, Any]:
    from asyncvmm_tools.hostvm import in_hostvm

    vdocs = {v.name: {"description": v.description, "command": v.command, "failures": v.failures,
                      "metrics": {k: report.metric(s, unit_of(k)) for k, s in v.samples.items()}}
             for v in variants}
    comps, notes = comparisons(vdocs, JOBS)
    nested = in_hostvm()
    return report.new_document(
        NAME, TITLE if nested else TITLE.replace(", nested emulated host (ratios only)", ""), command,
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        nested_emulated_host=nested,
        settings={"runs": settings.runs, "seconds_per_job": settings.seconds, "mem_mib": MEM_MIB, "vcpus": 1,
                  "disk_bytes": DISK_BYTES, "device": DEVICE, "engine": ENGINE,
                  "jobs": [dataclasses.asdict(j) for j in JOBS],
                  "fio": [" ".join(fio_argv(j, settings.seconds)) for j in JOBS]},
        variants=vdocs, comparisons=comps, notes=notes + (NOTES if nested else NOTES[1:]))


def hostvm_timeout(settings: Settings) -> float:
    """A generous bound for the whole inner run (boots take 20-60 s there)."""
    per_round = len(JOBS) * (settings.seconds + 30)
    return 900 + len(settings.variants) * (300 + settings.runs * per_round)


def run_nested(settings: Settings, command: str, timeout: float | None) -> tuple[dict[str, Any] | None, bool]:
    return run_benchmark_nested(NAME, settings.argv(), timeout or hostvm_timeout(settings), command)


# -- command line -----------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blockfio", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} rounds, {QUICK_SECONDS} s per job")
    p.add_argument("--seconds", type=int, help=f"seconds per fio job (default {DEFAULT_SECONDS})")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    p.add_argument("--mode", choices=("auto", "direct", "hostvm"), default="auto",
                   help="direct: here; hostvm: inside the emulated KVM host; auto: direct on hardware KVM")
    p.add_argument("--hostvm-timeout", type=float, help="seconds for the whole run inside the emulated host")
    p.add_argument("--results-dir", type=Path, help="where blockfio.json and SUMMARY.md go")
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = p.parse_args(argv)
    for name in ("runs", "seconds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    names = tuple(args.variants.split(",")) if args.variants else tuple(VARIANTS)
    make_variants(names)                                  # ValueError for an unknown name
    return Settings(runs=args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS),
                    seconds=args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS),
                    variants=names)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.blockfio", *argv])
    return run_and_conclude(args, settings, command, run_nested, run_direct,
                            note="(rates: above 1.0 asyncvmm is faster; CPU per GiB: below 1.0 it is cheaper)")


if __name__ == "__main__":
    sys.exit(main())
