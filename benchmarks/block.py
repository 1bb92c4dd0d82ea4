"""Block benchmark: asyncvmm's virtio-blk against QEMU microvm's, same guest, same file.

Every round boots the kvm-tier test guest once per VMM variant with the
same command line, ``blkbench=randread:4096:5000:1
blkbench=randread:4096:10000:32 blkbench=seqread:1048576:1073741824:4
exit=halt`` (see ``tests/guest/blkbench.c``), on the same read-only 256 MiB
file of random data, and reads the host's own speed on that file in the
same round.  Variants, run in a rotated order each round:

``asyncvmm-sync`` / ``asyncvmm-async``
    ``asyncvmm --no-api --config-file`` with the file as a read-only drive,
    ``io_engine`` Sync or Async (io_uring; refused on a host without it).
``qemu-microvm``
    ``-drive file=...,format=raw,if=none,readonly=on,cache=writeback,aio=threads
    -device virtio-blk-device``: userspace virtio-blk, no vhost.  Writeback
    because asyncvmm opens the file without O_DIRECT: both VMMs then read
    through the same warm page cache (cache=none would send QEMU to the disk
    and compare a disk with memory).  aio=threads is QEMU's portable
    thread-pool path; ``qemu-microvm-io_uring`` (not run by default) is the
    same with aio=io_uring.
``asyncvmm-sync-pci`` / ``asyncvmm-async-pci`` / ``qemu-microvm-pci``
    the same on virtio-pci: asyncvmm with ``--enable-pci``, QEMU microvm
    with ``pcie=on`` and ``-device virtio-blk-pci,disable-legacy=on``; the
    guest runs ``pci-blkbench=`` (the same loop, kicks at the PCI notify
    address, no MSI-X vector: it polls).  QEMU microvm's ECAM is at
    0xe0000000 and no firmware assigns BARs there, so the guest places
    BAR4 itself from 0xc0000000 (``pci_ecam=``/``pci_mmio=``).
``asyncvmm-vhost-user``
    the same file exported read-only by ``qemu-storage-daemon`` as
    ``vhost-user-blk`` (page cache on, as for the others) and the drive's
    ``socket`` pointing at it: the guest's requests go from its ring to the
    daemon, never through asyncvmm (docs/devices.md).
``qemu-microvm-vhost-user``
    QEMU microvm on the same kind of daemon: ``-device vhost-user-blk`` on
    virtio-mmio, guest RAM a shared memfd backend.  The peer of the vhost-user
    variant (a vhost path compares with a vhost path).
``host-cached`` / ``host-direct``
    this process reading the file with ``os.preadv`` at the same offsets in
    the same order, one request at a time: through the page cache (the
    physical limit the VMMs are measured against) and with O_DIRECT
    (``/dev/vda`` as this kernel sees it; for the record only).

The page cache is warm for every variant: the whole file is read just
before each run and its residency (``mincore``) is recorded.

Rates come from host-side timestamps: the arrival of the last byte of the
guest's ``testguest: blkbench start`` line and of the first byte of its
``testguest: blkbench done`` line.  Both VMMs put each UART byte on stdout
as the guest writes it, so the window holds the I/O plus one UART write at
each end, the same for both.  The guest's TSC delta is kept as a cross-check
(``*_tsc_mhz`` = guest TSC ticks per host microsecond): it is not used for
the ratios because a VMM may offset or scale the guest's TSC, whereas the
host's clock is one clock for every variant.  Every run's ``check=`` (a sum
over the data read) must equal the sum computed from the file, so a VMM that
returned wrong data fails the run instead of posting a number.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from benchmarks import machine, report
from benchmarks.launch import Chunk, Launched, LaunchError, arrival_of, launch
from benchmarks.rounds import interleaved_rounds
from benchmarks.vmms import (DONE, GuestSpec, asyncvmm_config, asyncvmm_config_argv, load_test_guest,
                             qemu_microvm_argv)

NAME = "block"
DEFAULT_RUNS = 20
QUICK_RUNS = 3
DISK_BYTES = 256 << 20
MEM_MIB = 128
SEED = 0x9E3779B97F4A7C15                  # tests/guest/blkbench.c BENCH_SEED
U64 = (1 << 64) - 1
MICROVM_VIRTIO = "virtio_base=0xfeb00000 virtio_stride=0x200 virtio_count=24"   # tests/guest/qemu.py
# QEMU microvm with pcie=on: ECAM at 0xe0000000, the 32-bit PCIe window from 0xc0000000 (QEMU's
# include/hw/i386/microvm.h; the ECAM base is also in its MCFG).  Nothing assigns BARs on that machine,
# so the test guest places them from pci_mmio= itself.
MICROVM_PCIE = "pci_ecam=0xe0000000 pci_mmio=0xc0000000"
HOST_MIN_S = 0.5                           # host loops repeat their pass until this long
HOST_DIRECT_MAX_S = 5.0                    # ...and O_DIRECT stops after this long
PAGE = mmap.PAGESIZE


class RunFailed(RuntimeError):
    """A run produced no usable numbers; the message says why."""


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    mode: str                 # "randread" | "seqread"
    block: int                # bytes per request
    amount: int               # randread: requests; seqread: total bytes
    depth: int

    @property
    def ops(self) -> int:
        return self.amount if self.mode == "randread" else self.amount // self.block

    @property
    def token(self) -> str:
        return f"blkbench={self.mode}:{self.block}:{self.amount}:{self.depth}"

    @property
    def pci_token(self) -> str:
        """The same run on the virtio-pci block device (tests/guest/pci.c)."""
        return "pci-" + self.token

    @property
    def metric(self) -> str:
        return f"{self.name}_iops" if self.mode == "randread" else f"{self.name}_mib_s"

    def rate(self, ops: int, ns: int) -> float:
        """IOPS (randread) or MiB/s (seqread) for ``ops`` requests in ``ns``."""
        if self.mode == "randread":
            return ops * 1e9 / ns
        return ops * self.block / (1 << 20) * 1e9 / ns

    def scaled(self, factor: float) -> "Workload":
        unit = 1 if self.mode == "randread" else self.block
        amount = max(1, round(self.amount / unit * factor)) * unit
        return dataclasses.replace(self, amount=amount)


# Short runs, many rounds: on 2 shared CPUs a run's rate depends on where the
# scheduler puts the VMM's threads next to the spinning vCPU and other jobs,
# so more (shorter) rounds sample those conditions better than longer ones.
WORKLOADS = (
    Workload("randread_4k_qd1", "randread", 4096, 5_000, 1),
    Workload("randread_4k_qd32", "randread", 4096, 10_000, 32),
    Workload("seqread_1m_qd4", "seqread", 1 << 20, 1 << 30, 4),
)
UNITS = {"randread": "count", "seqread": "MiB/s"}


# -- the access pattern, as the guest generates it -----------------------------

def block_offsets(mode: str, block: int, ops: int, blocks: int) -> Iterator[int]:
    """Byte offsets of the guest's requests, in issue order (blkbench.c)."""
    if blocks <= 0:
        raise ValueError("the file holds no whole block")
    x, n = SEED, 0
    for _ in range(ops):
        if mode == "randread":
            x ^= (x << 13) & U64
            x ^= x >> 7
            x ^= (x << 17) & U64
            yield (x % blocks) * block
        else:
            yield n * block
            n = 0 if n + 1 == blocks else n + 1


def expected_check(fd: int, w: Workload, size: int) -> int:
    """The guest's ``check=``: sum of the first 8 bytes of every block read, mod 2^64."""
    total = 0
    for off in block_offsets(w.mode, w.block, w.ops, size // w.block):
        total += struct.unpack("<Q", os.pread(fd, 8, off))[0]
    return total & U64


# -- the backing file and the page cache ---------------------------------------

def default_disk_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "asyncvmm" / "bench" / f"block-{DISK_BYTES >> 20}MiB.img"


def ensure_disk(path: Path, size: int = DISK_BYTES) -> Path:
    """Create ``path`` with ``size`` random bytes once; an existing file of that size is reused."""
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size % (1 << 20)))
    tmp.replace(path)
    return path


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(1 << 22):
            pass


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore(2) on a shared mapping)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 1.0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(b & 1 for b in vec) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


# -- reading the guest's report ---------------------------------------------------

_BENCH_LINE = re.compile(rb"testguest: blkbench (start|done|error)[^\n]*\n")


@dataclasses.dataclass(frozen=True)
class Window:
    """One blkbench run as the host saw it."""

    start: dict[str, str]     # fields of the start line
    done: dict[str, str]      # fields of the done line
    t_begin_ns: int           # last byte of the start line arrived
    t_end_ns: int             # first byte of the done line arrived

    @property
    def ns(self) -> int:
        return self.t_end_ns - self.t_begin_ns


def _fields(line: bytes) -> dict[str, str]:
    return dict(tok.split("=", 1) for tok in line.decode(errors="replace").split() if "=" in tok)


def bench_windows(chunks: Sequence[Chunk]) -> list[Window]:
    """Pair each ``blkbench start`` line with the ``done`` line after it."""
    stream = b"".join(c.data for c in chunks)
    out: list[Window] = []
    pending: tuple[dict[str, str], int] | None = None
    for m in _BENCH_LINE.finditer(stream):
        kind = m[1]
        if kind == b"error":
            raise RunFailed(f"the guest reported {m[0].decode(errors='replace').strip()!r}")
        if kind == b"start":
            if pending is not None:
                raise RunFailed("a blkbench start line without its done line")
            pending = (_fields(m[0]), arrival_of(chunks, m.end() - 1))
            continue
        if pending is None:
            raise RunFailed("a blkbench done line without a start line")
        out.append(Window(pending[0], _fields(m[0]), pending[1], arrival_of(chunks, m.start())))
        pending = None
    if pending is not None:
        raise RunFailed("the last blkbench run never printed its done line")
    return out


def window_metrics(workloads: Sequence[Workload], windows: Sequence[Window],
                   checks: Sequence[int]) -> dict[str, float]:
    """Rates from the host-side windows, after checking each run did what was asked."""
    if len(windows) != len(workloads):
        raise RunFailed(f"{len(windows)} blkbench runs reported, {len(workloads)} expected")
    out: dict[str, float] = {}
    for w, win, want in zip(workloads, windows, checks):
        done = win.done
        if done.get("mode") != w.mode or int(done.get("ops", -1)) != w.ops:
            raise RunFailed(f"{w.name}: the guest reported {done}")
        if int(done["errors"]) != 0:
            raise RunFailed(f"{w.name}: {done['errors']} requests failed")
        if int(done["check"], 16) != want:
            raise RunFailed(f"{w.name}: check={done['check']} but the file gives {want:#x}: wrong data")
        if win.ns <= 0:
            raise RunFailed(f"{w.name}: the done line arrived before the start line")
        out[w.metric] = w.rate(w.ops, win.ns)
        out[f"{w.name}_tsc_mhz"] = int(done["tsc"]) / (win.ns / 1000)
        out["used_idx_glitches"] = out.get("used_idx_glitches", 0) + int(done.get("glitches", 0))
    return out


# -- variants ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
    kernel: Path
    disk: Path
    workloads: tuple[Workload, ...]
    checks: tuple[int, ...]
    timeout_s: float

    def cmdline(self, pci: bool = False) -> str:
        return " ".join([*(w.pci_token if pci else w.token for w in self.workloads), "exit=halt"])


def _tail(data: bytes, n: int = 600) -> str:
    return data[-n:].decode(errors="replace")


def _guest_run(vmm: Launched, opts: Options, log: Path | None = None) -> dict[str, float]:
    if not vmm.stdout.wait_for(DONE, opts.timeout_s):
        vmm.stop()
        extra = f" log: {_tail(log.read_bytes())!r}" if log is not None and log.exists() else ""
        raise RunFailed(f"no {DONE.decode()!r} within {opts.timeout_s} s (exit {vmm.proc.returncode}); "
                        f"stdout: {_tail(vmm.stdout.data)!r} stderr: {_tail(vmm.stderr.data)!r}{extra}")
    chunks = list(vmm.stdout.chunks)        # the reader only appends; a copy is a consistent prefix
    return window_metrics(opts.workloads, bench_windows(chunks), opts.checks)


def asyncvmm_runner(engine: str,
                    pci: bool = False) -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        config = asyncvmm_config(GuestSpec(opts.kernel, opts.cmdline(pci), mem_mib=MEM_MIB))
        config["drives"] = [{"drive_id": "bench", "path_on_host": str(opts.disk),
                             "is_root_device": False, "is_read_only": True, "io_engine": engine}]
        path, log = tmp / "vm.json", tmp / "vmm.log"
        path.write_text(json.dumps(config))
        argv = asyncvmm_config_argv(path, log, boot_timer=False) + (["--enable-pci"] if pci else [])
        with launch(argv) as vmm:
            return _guest_run(vmm, opts, log), argv
    return run


QSD = "qemu-storage-daemon"
QSD_SOCKET_WAIT_S = 10.0


def storage_daemon_args(disk: Path, sock: Path) -> list[str]:
    """The daemon's export: read-only, through the page cache (as asyncvmm's and QEMU's reads)."""
    return ["--blockdev", f"driver=file,node-name=bench,filename={disk}",
            "--export", f"type=vhost-user-blk,id=bench,node-name=bench,addr.type=unix,"
                        f"addr.path={sock},writable=off"]


def vhost_user_drive(sock: Path) -> dict[str, Any]:
    return {"drive_id": "bench", "socket": str(sock), "is_root_device": False}


def qemu_vhost_user(sock: Path) -> list[str]:
    """QEMU's vhost-user-blk on virtio-mmio; the back end maps guest RAM, so RAM is a shared memfd."""
    return ["-global", "virtio-mmio.force-legacy=false",
            "-object", f"memory-backend-memfd,id=ram,size={MEM_MIB}M,share=on",
            "-machine", "memory-backend=ram",
            "-chardev", f"socket,id=vu,path={sock}",
            "-device", "vhost-user-blk,chardev=vu,num-queues=1"]


@contextlib.contextmanager
def storage_daemon(disk: Path, sock: Path) -> Iterator[list[str]]:
    """``qemu-storage-daemon`` exporting ``disk`` read-only as vhost-user-blk at ``sock``."""
    exe = shutil.which(QSD)
    if exe is None:
        raise RunFailed(f"{QSD} is not installed (Debian: qemu-system-common)")
    argv = [exe, *storage_daemon_args(disk, sock)]
    with launch(argv) as daemon:
        deadline = time.monotonic() + QSD_SOCKET_WAIT_S
        while not sock.exists():
            if daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"{QSD} did not serve {sock}: {_tail(daemon.stderr.data)!r}")
            time.sleep(0.01)
        yield argv


def asyncvmm_vhost_user_runner() -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        sock = tmp / "vu.sock"
        with storage_daemon(opts.disk, sock) as daemon:
            config = asyncvmm_config(GuestSpec(opts.kernel, opts.cmdline(), mem_mib=MEM_MIB))
            config["drives"] = [vhost_user_drive(sock)]
            path, log = tmp / "vm.json", tmp / "vmm.log"
            path.write_text(json.dumps(config))
            argv = asyncvmm_config_argv(path, log, boot_timer=False)
            with launch(argv) as vmm:
                return _guest_run(vmm, opts, log), argv + ["# back end:", *daemon]
    return run


def qemu_vhost_user_runner() -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        sock = tmp / "vu.sock"
        with storage_daemon(opts.disk, sock) as daemon:
            guest = GuestSpec(opts.kernel, f"{MICROVM_VIRTIO} {opts.cmdline()}", mem_mib=MEM_MIB)
            argv = qemu_microvm_argv(guest, extra=qemu_vhost_user(sock))
            with launch(argv) as vmm:
                return _guest_run(vmm, opts), argv + ["# back end:", *daemon]
    return run


def qemu_drive(disk: Path, aio: str) -> list[str]:
    return ["-global", "virtio-mmio.force-legacy=false",
            "-drive", f"id=bench,file={disk},format=raw,if=none,readonly=on,cache=writeback,aio={aio}",
            "-device", "virtio-blk-device,drive=bench"]


def qemu_pci_drive(disk: Path, aio: str) -> list[str]:
    """The same drive as a modern-only virtio-pci function (1af4:1042, as asyncvmm's)."""
    return ["-drive", f"id=bench,file={disk},format=raw,if=none,readonly=on,cache=writeback,aio={aio}",
            "-device", "virtio-blk-pci,drive=bench,disable-legacy=on"]


def with_pcie(argv: Sequence[str]) -> list[str]:
    """A QEMU microvm command line with ``pcie=on`` added to its machine (its GPEX host bridge)."""
    out = list(argv)
    at = out.index("-M") + 1
    if not out[at].startswith("microvm"):
        raise ValueError(f"not a microvm machine: {out[at]!r}")
    out[at] += ",pcie=on"
    return out


def qemu_pci_runner(aio: str) -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        guest = GuestSpec(opts.kernel, f"{MICROVM_PCIE} {opts.cmdline(pci=True)}", mem_mib=MEM_MIB)
        argv = with_pcie(qemu_microvm_argv(guest, extra=qemu_pci_drive(opts.disk, aio)))
        with launch(argv) as vmm:
            return _guest_run(vmm, opts), argv
    return run


def qemu_runner(aio: str) -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        guest = GuestSpec(opts.kernel, f"{MICROVM_VIRTIO} {opts.cmdline()}", mem_mib=MEM_MIB)
        argv = qemu_microvm_argv(guest, extra=qemu_drive(opts.disk, aio))
        with launch(argv) as vmm:
            return _guest_run(vmm, opts), argv
    return run


def host_pass(fd: int, offsets: Sequence[int], buf: memoryview, *, min_s: float,
              max_s: float | None = None, clock: Callable[[], int] = time.monotonic_ns) -> tuple[int, int, int]:
    """Read ``offsets`` in order, repeating the pass until ``min_s`` has passed.

    Stops early after ``max_s``.  Returns (requests done, ns, check of the
    first complete pass or -1 if the first pass was cut short).
    """
    block = len(buf)
    done, check, t0 = 0, -1, clock()
    end_min = t0 + int(min_s * 1e9)
    end_max = None if max_s is None else t0 + int(max_s * 1e9)
    while True:
        total = 0
        for off in offsets:
            if os.preadv(fd, [buf], off) != block:
                raise RunFailed(f"short read at {off}")
            total += int.from_bytes(buf[:8], "little")
            done += 1
            if end_max is not None and done % 64 == 0 and clock() > end_max:
                return done, clock() - t0, check
        if check < 0:
            check = total & U64
        if clock() >= end_min:
            return done, clock() - t0, check


def host_runner(direct: bool) -> Callable[[Options, Path], tuple[dict[str, float], list[str]]]:
    def run(opts: Options, tmp: Path) -> tuple[dict[str, float], list[str]]:
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        fd = os.open(opts.disk, flags)
        out: dict[str, float] = {}
        try:
            size = os.fstat(fd).st_size
            for w, want in zip(opts.workloads, opts.checks):
                area = mmap.mmap(-1, w.block)               # page-aligned, as O_DIRECT needs
                try:
                    offsets = list(block_offsets(w.mode, w.block, w.ops, size // w.block))
                    ops, ns, check = host_pass(fd, offsets, memoryview(area), min_s=HOST_MIN_S,
                                               max_s=HOST_DIRECT_MAX_S if direct else None)
                finally:
                    area.close()
                if check >= 0 and check != want:
                    raise RunFailed(f"{w.name}: host check {check:#x} != {want:#x}")
                out[w.metric] = w.rate(ops, ns)
        finally:
            os.close(fd)
        mode = "O_DIRECT" if direct else "page cache"
        return out, [f"os.preadv one request at a time ({mode})"]
    return run


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    run: Callable[[Options, Path], tuple[dict[str, float], list[str]]]
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None


def make_variants() -> list[Variant]:
    return [
        Variant("asyncvmm-sync", "asyncvmm --no-api --config-file, read-only drive, io_engine Sync",
                asyncvmm_runner("Sync")),
        Variant("asyncvmm-async", "asyncvmm --no-api --config-file, read-only drive, io_engine Async",
                asyncvmm_runner("Async")),
        Variant("qemu-microvm", "QEMU microvm virtio-blk-device, cache=writeback, aio=threads",
                qemu_runner("threads")),
        Variant("asyncvmm-sync-pci", "asyncvmm --enable-pci, the same drive on virtio-pci, io_engine Sync",
                asyncvmm_runner("Sync", pci=True)),
        Variant("asyncvmm-async-pci", "asyncvmm --enable-pci, the same drive on virtio-pci, io_engine Async",
                asyncvmm_runner("Async", pci=True)),
        Variant("qemu-microvm-pci", "QEMU microvm pcie=on, virtio-blk-pci disable-legacy=on, "
                "cache=writeback, aio=threads", qemu_pci_runner("threads")),
        Variant("qemu-microvm-io_uring", "QEMU microvm virtio-blk-device, cache=writeback, aio=io_uring",
                qemu_runner("io_uring")),
        Variant("asyncvmm-vhost-user", "asyncvmm, drive `socket` on qemu-storage-daemon's read-only "
                "vhost-user-blk export", asyncvmm_vhost_user_runner()),
        Variant("qemu-microvm-vhost-user", "QEMU microvm vhost-user-blk on virtio-mmio, the same "
                "daemon export, memfd RAM", qemu_vhost_user_runner()),
        Variant("host-cached", "this process, os.preadv, page cache warm", host_runner(False)),
        Variant("host-direct", "this process, os.preadv, O_DIRECT", host_runner(True)),
    ]


DEFAULT_VARIANTS = ("asyncvmm-sync", "asyncvmm-async", "qemu-microvm", "asyncvmm-sync-pci",
                    "qemu-microvm-pci", "asyncvmm-vhost-user", "qemu-microvm-vhost-user", "host-cached",
                    "host-direct")
SUBJECTS = ("asyncvmm-sync", "asyncvmm-async", "asyncvmm-vhost-user")
PEERS = ("qemu-microvm", "qemu-microvm-io_uring", "host-cached")


def run_once(v: Variant, opts: Options) -> dict[str, float] | None:
    warm_page_cache(opts.disk)
    resident = resident_fraction(opts.disk)
    with tempfile.TemporaryDirectory(prefix=f"bench-block-{v.name}-") as tmpdir:
        try:
            metrics, argv = v.run(opts, Path(tmpdir))
        except (RunFailed, LaunchError, OSError) as err:
            v.failures.append(str(err))
            print(f"  {v.name}: run failed: {err}", file=sys.stderr)
            return None
        if v.command is None:
            v.command = [a.replace(tmpdir, "$TMP") for a in argv]
    metrics["page_cache_resident_pct"] = resident * 100
    for key, value in metrics.items():
        v.samples.setdefault(key, []).append(value)
    return metrics


def run_rounds(variants: list[Variant], opts: Options, runs: int, warmup: int,
               log: Callable[[str], None] = print) -> list[list[float]]:
    """Warm-up rounds (discarded), then ``runs`` rounds in rotated order; load per round."""
    def discard(v: Variant) -> None:
        v.samples.clear()
        v.failures.clear()

    def describe(vs: list[Variant]) -> str:
        first = opts.workloads[0].metric
        return f"{first}: " + ", ".join(f"{v.name} {v.samples.get(first, [float('nan')])[-1]:,.0f}"
                                        for v in vs)

    return interleaved_rounds(variants, runs, lambda v: run_once(v, opts), warmup=warmup,
                              discard=discard, describe=describe, log=log)


def unit_of(metric: str) -> str:
    if metric.endswith("_mib_s"):
        return "MiB/s"
    return "count"


def comparisons(vdocs: dict[str, Any], workloads: Sequence[Workload]) -> tuple[list[dict], list[str]]:
    """Ratios subject/peer of every rate; here higher is better (the flag says so)."""
    pairs = [(s, p) for s in SUBJECTS for p in PEERS] + [("asyncvmm-async", "asyncvmm-sync"),
                                                         ("asyncvmm-vhost-user", "qemu-microvm-vhost-user"),
                                                         ("asyncvmm-vhost-user", "asyncvmm-sync")]
    # virtio-pci: the two VMMs on the same transport, then what the transport changes for each
    pairs += [("asyncvmm-sync-pci", "qemu-microvm-pci"), ("asyncvmm-async-pci", "qemu-microvm-pci"),
              ("asyncvmm-sync-pci", "asyncvmm-sync"), ("asyncvmm-async-pci", "asyncvmm-async"),
              ("qemu-microvm-pci", "qemu-microvm")]
    return report.compare_pairs(vdocs, [(s, p, [w.metric for w in workloads]) for s, p in pairs],
                                higher_is_better=lambda name: True)


NOTES = [
    "Ratios here are of rates (IOPS, MiB/s): ABOVE 1.0 asyncvmm is faster. The summary's general "
    "'below 1.0 is better' applies to times and sizes only.",
    "Guest: the kvm-tier test guest, 1 vCPU, 128 MiB, polling its used ring with interrupts masked "
    "(ring 3, native on kvm_pvm); each request is header + one data descriptor + status, "
    "VIRTIO_RING_F_EVENT_IDX negotiated on both VMMs, one kick per batch of refills.",
    "Rates are timed on the host: last byte of the guest's 'blkbench start' line to the first byte of "
    "its 'blkbench done' line (both VMMs write each UART byte to stdout at once). The guest TSC delta "
    "is kept as *_tsc_mhz (guest ticks per host microsecond), a cross-check of the two clocks.",
    "Page cache: warm for every variant (the whole file is read right before each run; "
    "page_cache_resident_pct is mincore's view at that point). QEMU uses cache=writeback because "
    "asyncvmm reads without O_DIRECT: both then read the same cached pages.",
    "host-cached is the physical limit: one thread, os.preadv of the same offsets in the same order, "
    "one request at a time, repeated until 0.5 s passed. host-direct is the same with O_DIRECT "
    "(this kernel's /dev/vda, itself a virtual disk), for the record.",
    "Every VMM run's check= (sum of the first 8 bytes of each block read) matched the sum computed from "
    "the file, or the run counts as failed.",
    "virtio-pci variants (*-pci): the same loop (pci-blkbench=), kicks at the function's notify address "
    "(an ioeventfd on asyncvmm), no MSI-X vector assigned and IF=0: the guest polls, so neither transport's "
    "interrupt path is in these numbers. On virtio-mmio the guest reads no InterruptStatus and writes no "
    "InterruptACK during the timed part either (asyncvmm then raises an edge only when InterruptStatus gains "
    "a bit), so asyncvmm-sync-pci / asyncvmm-sync shows the transports' data path (kick, queue, used ring) "
    "and NOT what MSI-X saves over virtio-mmio's two exits per interrupt (blkbench's :ack mode measures those).",
    "used_idx_glitches: times the guest saw used->idx further ahead than its requests in flight, i.e. "
    "the device caught writing the index non-atomically; the guest re-reads instead of consuming "
    "stale entries. Any value above 0 is a device bug (a Linux guest would take stale used entries).",
]


def build_document(variants: list[Variant], opts: Options, runs: int, argv: list[str],
                   load_before: list[float], loads: list[list[float]]) -> dict[str, Any]:
    vdocs: dict[str, Any] = {}
    for v in variants:
        vdocs[v.name] = {"description": v.description, "command": v.command, "failures": v.failures,
                         "metrics": {k: report.metric(s, unit_of(k)) for k, s in v.samples.items()}}
    comps, notes = comparisons(vdocs, opts.workloads)
    return report.new_document(
        NAME, "Block: asyncvmm virtio-blk vs QEMU microvm virtio-blk, same guest and file "
        "(ratios of rates: above 1.0 asyncvmm is faster)",
        " ".join(["python -m benchmarks.block", *argv]),
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        settings={"runs": runs, "kernel": str(opts.kernel),
                  "kernel_sha256": hashlib.sha256(opts.kernel.read_bytes()).hexdigest(),
                  "cmdline": opts.cmdline(), "cmdline_pci": opts.cmdline(pci=True),
                  "cmdline_qemu_pci_settings": MICROVM_PCIE, "mem_mib": MEM_MIB, "disk": str(opts.disk),
                  "disk_bytes": opts.disk.stat().st_size,
                  "workloads": [dataclasses.asdict(w) for w in opts.workloads],
                  "expected_checks": [f"{c:#x}" for c in opts.checks]},
        variants=vdocs, comparisons=comps, notes=notes + NOTES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.block", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer rounds, a quarter of the I/O, no warm-up")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every workload's amount")
    p.add_argument("--disk", type=Path, default=None,
                   help=f"backing file (default {default_disk_path()}, created once, random data)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per VMM run")
    p.add_argument("--variants", help=f"comma-separated (default {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be at least 1")
    if args.scale <= 0:
        p.error("--scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    images = load_test_guest()
    if images is None:
        return 1
    kernel = images.elf_pvh
    try:
        variants = report.select_variants(make_variants(), args.variants, DEFAULT_VARIANTS)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    disk = ensure_disk(args.disk or default_disk_path())
    factor = args.scale * (0.25 if args.quick else 1.0)
    workloads = tuple(w.scaled(factor) for w in WORKLOADS)
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        checks = tuple(expected_check(fd, w, os.fstat(fd).st_size) for w in workloads)
    finally:
        os.close(fd)
    opts = Options(kernel, disk, workloads, checks, args.timeout)
    load_before = machine.load_average()
    print(f"block benchmark: {runs} rounds of {', '.join(v.name for v in variants)}; "
          f"guest command line {opts.cmdline()!r}; load {load_before}")
    loads = run_rounds(variants, opts, runs, warmup=0 if args.quick else 1)
    doc = build_document(variants, opts, runs, argv, load_before, loads)
    return report.conclude(doc, variants, write=not args.no_write, results_dir=args.results_dir,
                           note="(ratios of rates: above 1.0 the asyncvmm variant is faster)")


if __name__ == "__main__":
    sys.exit(main())
