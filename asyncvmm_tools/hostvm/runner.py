"""Run a command inside the emulated KVM host and collect what it left.

``run_in_hostvm(argv, timeout=..., env=..., console_log=...)`` boots QEMU
(TCG, ``-cpu max`` so the guest sees SVM, ``-smp 1``: with 2 vCPUs the
emulated host hung in 2 of 25 boots) on Debian's cloud kernel with the
host initramfs of :mod:`.hostinit`, the cached runtime disk of
:mod:`.hostdisk` and a fresh job disk holding ``job.sh``.  The command runs
in the project directory with the same paths as on the host; whatever it
writes under ``$ASYNCVMM_HOSTVM_RESULTS`` comes back in ``results_dir``
when one is given (with ``hostvm-timings.json``); nothing else is left
behind (the per-run work directory and its job disk are deleted).  QEMU is killed on timeout, on any exception,
on SIGINT/SIGTERM/SIGHUP and (PDEATHSIG) when this process dies.

The emulated host sometimes freezes (docs/testing.md: TCG's nested SVM holds
back its maskable interrupts; seen with either VMM as the inner one, and with
QEMU 10 as well as 7.2): its console then goes silent for good.  ``heartbeat=N`` has the job print
``asyncvmm-hostvm: alive`` every N seconds beside the command, and
``stall_timeout=S`` kills QEMU when the console has printed nothing for S
seconds (``HostVmResult.stalled``), so a frozen host costs S seconds, not the
whole timeout.  Before it is killed, QEMU's human monitor (a Unix socket in the
run's work directory) is asked where the emulated CPU is (:data:`FREEZE_QUERIES`):
the answers are ``HostVmResult.freeze`` and ``hostvm-freeze.txt`` in
``results_dir``.  Heartbeat lines are left out of ``stdout``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, TextIO

from ..images import GuestImages, busybox_binary, ensure_images
from ..images.cache import cache_root, content_key, publishing, sha256_file
from ..images.kernel import KernelArtifact
from ..images.rootfs import make_ext4
from .detect import tsc_khz
from .hostdisk import copy_project, ensure_host_disk, project_root
from .hostinit import HOST_MODULES, JOB_MOUNT, JOB_SERIAL, ROOT_SERIAL, host_init_script, host_initramfs_tree
from .process import Child, terminate_on_signals
from .qemu import Disk, MachineSpec, host_cmdline, machine_argv

log = logging.getLogger(__name__)

IN_HOSTVM_ENV = "ASYNCVMM_IN_HOSTVM"
RESULTS_ENV = "ASYNCVMM_HOSTVM_RESULTS"
JOB_DISK_MIB = 2048
INITRAMFS_KEEP_S = 24 * 3600
MARK_KVM = "asyncvmm-hostvm: kvm "
MARK_START = "asyncvmm-hostvm: job start"
MARK_EXIT = "asyncvmm-hostvm: job exit="
MARK_ALIVE = "asyncvmm-hostvm: alive"
# What the linux tier and the nested benchmarks ask for: a beat every 10 s, given up on after
# 60 s of silence (six missed beats; long tests kept beating through).
FREEZE_HEARTBEAT_S = 10.0
FREEZE_STALL_S = 60.0
# Asked of QEMU's monitor when the host froze: where the CPU is, three times a second apart
# (one place: stuck there; moving: a loop), its interrupt controller, then an NMI and both again.
# The freezes caught so far (docs/testing.md) were all the same: halted in native_safe_halt with IF
# set and the local timer's vector pending in IRR above the PPR, never delivered, and CS's cached
# attributes those a #VMEXIT loads (no interrupt taken since the last one).  The NMI is taken (CS
# reloaded, the idle loop ran once more and halted again), so GIF is set: it is the maskable
# interrupts alone that the emulated CPU holds back.  (An NMI does not end a freeze: the host's NMI
# printk waits for a tick.)  Only a host that a serial break did not wake (below) gets here.
# A host silent this long gets a serial break (the monitor's `chardev-send-break` on its console):
# the UART's interrupt reaches the local APIC from QEMU's main thread, which makes the vCPU look at
# its APIC again and ends a freeze, an interrupt request lost between QEMU's threads (docs/testing.md,
# measured).  Harmless to a host that is only busy: no character follows the break, so it starts no
# SysRq (an interactive run, where a typed key could, gets none).  Runs without a stall limit
# (`asyncvmm-hostvm run`, the quickstart's boot) get it too.  What the CPU and APIC showed just
# before is kept (``HostVmResult.wakes``, ``hostvm-wakes.txt``).
WAKE_AFTER_S = 20.0
SPOKE_AGAIN_END = " s into the silence)\n"   # how a wake the console spoke again after ends
WAKE_QUERIES = ("info registers", "info lapic", "chardev-send-break console0")
FREEZE_QUERIES = ("info registers", "x/4i $pc", "info registers", "info registers", "info lapic",
                  "nmi", "info registers", "info lapic")
MONITOR_PROMPT = b"(qemu) "


class HostVmError(RuntimeError):
    """The emulated host could not be prepared or did not report a result."""


@dataclass
class HostVmResult:
    returncode: int | None          # None: the job never reported (timeout, crash)
    console: str                    # the whole serial console
    stdout: str                     # the console between the job's start and exit markers
    results_dir: Path | None
    timed_out: bool = False         # killed: the timeout, or the stall watchdog (then stalled too)
    stalled: bool = False           # killed because the console was silent for stall_timeout
    kvm_line: str = ""              # "kvm ready: /dev/kvm present, nested=1" or "kvm missing..."
    timings: dict = field(default_factory=dict)   # seconds: prepare, boot (to job start), job, total
    freeze: str = ""                # when stalled: QEMU's monitor on where the CPU was (FREEZE_QUERIES)
    wakes: list[str] = field(default_factory=list)   # each silence a break was sent into (WAKE_QUERIES)

    @property
    def woken(self) -> int:
        """How many of :attr:`wakes` the console spoke again after: freezes the break ended."""
        return sum(w.endswith(SPOKE_AGAIN_END) for w in self.wakes)


def in_hostvm() -> bool:
    return os.environ.get(IN_HOSTVM_ENV) == "1"


def job_script(argv: list[str], env: dict[str, str], cwd: str, heartbeat: float = 0.0) -> str:
    """The ``job.sh`` the host init runs chrooted: environment, cwd, a heartbeat if asked, then ``exec argv``."""
    if not argv:
        raise ValueError("empty command")
    lines = ["#!/bin/sh", "# written by asyncvmm_tools.hostvm.runner"]
    # The venv's bin first: `python`, `pytest` and `asyncvmm` inside are this runtime's.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
    # The image cache by its resolved path: inside, $ASYNCVMM_CACHE or ~ would otherwise not be set alike.
    base = {"PATH": path, "HOME": os.path.expanduser("~"), "ASYNCVMM_CACHE": str(cache_root()),
            "LANG": "C.UTF-8", IN_HOSTVM_ENV: "1", RESULTS_ENV: f"{JOB_MOUNT}/results",
            "TERM": "dumb", "PYTHONUNBUFFERED": "1"}
    for key, value in {**base, **env}.items():
        if not key.isidentifier():
            raise ValueError(f"bad environment variable name {key!r}")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    if heartbeat > 0:
        # Its own line, even when it lands inside a line of the command's output; $$ is the
        # command's pid after the exec, so the beat stops with it.
        lines.append(f"( while sleep {heartbeat:g} && kill -0 $$ 2>/dev/null; do printf '\\n{MARK_ALIVE}\\n'; "
                     "done ) &")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "\n".join(lines) + "\n"


def split_console(console: str) -> tuple[str, int | None, str]:
    """``(stdout between the markers, exit status from the marker or None, kvm line)``."""
    text = console.replace("\r\n", "\n").replace(f"\n{MARK_ALIVE}\n", "")
    kvm = next((l[len("asyncvmm-hostvm: "):] for l in text.splitlines() if l.startswith(MARK_KVM)), "")
    start = text.find(MARK_START + "\n")
    if start < 0:
        return "", None, kvm
    body = text[start + len(MARK_START) + 1:]
    end = body.rfind(MARK_EXIT)
    if end < 0:
        return body, None, kvm
    status = body[end + len(MARK_EXIT):].split("\n", 1)[0].strip()
    return body[:end], int(status) if status.isdigit() else None, kvm


def host_initramfs(cache: Path, kernel: KernelArtifact, busybox: Path) -> Path:
    # The module list is part of the key: adding a module must build a new initramfs.
    key = content_key(["hostinit", kernel.root.name, sha256_file(busybox), host_init_script().decode(),
                       repr(HOST_MODULES)])
    out = cache / "hostvm" / f"initramfs-{key}.cpio"
    if not out.exists():
        with publishing(out) as target:
            target.write_bytes(host_initramfs_tree(kernel, busybox).to_cpio())
    os.utime(out)   # in use
    for old in out.parent.glob("initramfs-*.cpio"):
        # Small, and another clone at another commit may still use its own: a day unused, then gone.
        try:
            if old != out and time.time() - old.stat().st_mtime > INITRAMFS_KEEP_S:
                old.unlink()
        except FileNotFoundError:
            pass
    return out


def make_job_disk(path: Path, script: str) -> None:
    """``job.sh``, an empty ``results/`` and a copy of the project, as ext4."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        (Path(tmp) / "job.sh").write_text(script)
        copy_project(Path(tmp) / "project")
        (Path(tmp) / "results").mkdir()
        (Path(tmp) / "results").chmod(0o1777)
        make_ext4(Path(tmp), path, JOB_DISK_MIB, label="avmjob", key=content_key(script))


def read_job_disk(path: Path, dest: Path) -> int | None:
    """Copy ``/results`` out of the job disk with debugfs (no mount); the recorded exit status."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        subprocess.run(["debugfs", "-R", f"rdump /results {tmp}", str(path)], capture_output=True)
        if (Path(tmp) / "results").is_dir():
            for item in (Path(tmp) / "results").iterdir():
                os.replace(item, dest / item.name)
    r = subprocess.run(["debugfs", "-R", "cat /exitcode", str(path)], capture_output=True, text=True)
    text = r.stdout.strip()
    return int(text) if text.isdigit() else None


def wait_watched(child: Child, deadline: float, stall_timeout: float,
                 last_output: Callable[[], float]) -> tuple[int | None, bool]:
    """Wait for ``child`` until ``deadline`` (monotonic); give up early when its output has been
    silent for ``stall_timeout`` s (0: never).  ``(exit status or None, stalled)``; no kill."""
    while True:
        now = time.monotonic()
        step = deadline - now
        if stall_timeout > 0:
            quiet_until = last_output() + stall_timeout
            if now >= quiet_until:
                return None, True
            step = min(step, quiet_until - now)
        rc = child.wait(max(step, 0.0))
        if rc is not None or time.monotonic() >= deadline:
            return rc, False


def wait_waking(child: Child, deadline: float, stall_timeout: float, last_output: Callable[[], float],
                wake_after: float, wake: Callable[[], str]) -> tuple[int | None, bool, list[str]]:
    """:func:`wait_watched`, with one more step in each silence: after ``wake_after`` s of it
    ``wake()`` is called and the wait goes on; the console speaking again ends that silence, and
    ``stall_timeout`` s of it (0: never) end the wait as before.  ``(exit status or None, stalled,
    [what each wake() answered, and whether the console spoke again])``."""
    woken: list[str] = []
    if wake_after <= 0 or 0 < stall_timeout <= wake_after:
        return (*wait_watched(child, deadline, stall_timeout, last_output), woken)
    while True:
        rc, quiet = wait_watched(child, deadline, wake_after, last_output)
        if not quiet:
            return rc, False, woken
        silent_since = last_output()
        woken.append(f"after {time.monotonic() - silent_since:.1f} s of console silence:\n{wake()}")
        give_up = silent_since + stall_timeout if stall_timeout > 0 else deadline
        while last_output() == silent_since:
            now = time.monotonic()
            if stall_timeout > 0 and now >= give_up:
                woken[-1] += "(the console stayed silent)\n"
                return None, True, woken
            if now >= deadline:
                return None, False, woken
            rc = child.wait(min(0.5, give_up - now, deadline - now))
            if rc is not None:
                return rc, False, woken
        woken[-1] += f"(the console spoke again {last_output() - silent_since:.1f}{SPOKE_AGAIN_END}"


def monitor_dump(path: Path, queries=FREEZE_QUERIES, timeout: float = 5.0, pause: float = 1.0) -> str:
    """Ask QEMU's human monitor listening at ``path`` each of ``queries`` (``pause`` s apart)
    and return the answers, each under its ``(qemu) <query>`` line; a failure is said in the
    text, never raised (this runs while giving up on a frozen host)."""
    out: list[str] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            _until_prompt(sock)                       # the banner
            for i, query in enumerate(queries):
                if i:
                    time.sleep(pause)
                sock.sendall(query.encode() + b"\n")
                answer = _until_prompt(sock).decode(errors="replace").replace("\r", "")
                # The monitor echoes the command line first.
                first, _, rest = answer.partition("\n")
                out.append(f"(qemu) {query}\n{rest if query in first else answer}".rstrip())
    except OSError as err:
        out.append(f"(the monitor at {path} did not answer: {err})")
    return "\n".join(out) + "\n"


def _until_prompt(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(MONITOR_PROMPT):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the monitor closed the connection")
        data += chunk
    return data[:-len(MONITOR_PROMPT)]


@dataclass
class HostVm:
    """Everything a boot needs, prepared once per session."""
    kernel: KernelArtifact
    initramfs: Path
    root_disk: Path
    images: GuestImages
    root_lock: BinaryIO | None = None   # a shared flock keeping root_disk from being pruned

    @classmethod
    def prepare(cls, progress: Callable[[str], None] = log.info) -> "HostVm":
        if shutil.which("qemu-system-x86_64") is None:
            raise HostVmError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        images = ensure_images(progress=progress, refresh=False)
        cache = cache_root()
        kernel = KernelArtifact(images.kernel_dir)
        initramfs = host_initramfs(cache, kernel, busybox_binary(cache))
        extra = [p for p in (images.bzimage, images.vmlinux, images.initramfs, images.rootfs,
                             images.minikernel, images.minikernel_bzimage, cache / "images.json",
                             images.initramfs.with_suffix(".modules")) if p]
        manifest = str(cache / "images.json")   # rewritten by every `images build`: keyed by its bytes
        root, lock = ensure_host_disk(cache, extra, progress, by_content=frozenset([manifest]))
        return cls(kernel, initramfs, root, images, lock)


def run_in_hostvm(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
                  console_log: Path | None = None, cwd: str | None = None,
                  echo: TextIO | None = None, mem_mib: int = 4096, results_dir: Path | None = None,
                  prepared: HostVm | None = None, interactive: bool = False, heartbeat: float = 0.0,
                  stall_timeout: float = 0.0, progress: Callable[[str], None] = log.info) -> HostVmResult:
    t0 = time.monotonic()
    vm = prepared or HostVm.prepare(progress)
    workdir = Path(tempfile.mkdtemp(prefix="asyncvmm-hostvm-"))
    try:
        return _run(vm, workdir, argv, t0=t0, timeout=timeout, env=env, console_log=console_log, cwd=cwd,
                    echo=echo, mem_mib=mem_mib, results_dir=results_dir, interactive=interactive,
                    heartbeat=heartbeat, stall_timeout=stall_timeout, progress=progress)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)   # the job disk; results go to results_dir


def _run(vm: HostVm, workdir: Path, argv: list[str], *, t0: float, timeout: float, env: dict[str, str] | None,
         console_log: Path | None, cwd: str | None, echo: TextIO | None, mem_mib: int,
         results_dir: Path | None, interactive: bool, heartbeat: float = 0.0,
         stall_timeout: float = 0.0, progress: Callable[[str], None] = log.info) -> HostVmResult:
    job_disk = workdir / "job.ext4"
    monitor = workdir / "monitor.sock"
    make_job_disk(job_disk, job_script(argv, env or {}, cwd or str(project_root()), heartbeat))
    spec = MachineSpec(
        kernel=vm.kernel.bzimage, initrd=vm.initramfs, accel="tcg", cpu="max", vcpus=1, mem_mib=mem_mib,
        cmdline=host_cmdline(tsc_khz(), [f"avm.epoch={int(time.time())}", f"avm.project={project_root()}"]),
        disks=(Disk(vm.root_disk, ROOT_SERIAL, readonly=True), Disk(job_disk, JOB_SERIAL)),
        serial="stdio,signal=off",   # Ctrl-C goes to the guest, not to QEMU
        extra=("-monitor", f"unix:{monitor},server=on,wait=off"))
    chunks: list[bytes] = []
    log_file = open(console_log, "wb") if console_log else None
    marks: dict[str, float] = {}
    tail = [b""]
    last_output = [time.monotonic()]

    def sink(data: bytes) -> None:
        last_output[0] = time.monotonic()
        chunks.append(data)
        if log_file:
            log_file.write(data)
            log_file.flush()
        if echo is not None:
            echo.write(data.decode(errors="replace"))
            echo.flush()
        if "start" not in marks:
            tail[0] = (tail[0] + data)[-4096:]
            if MARK_START.encode() in tail[0]:
                marks["start"] = time.monotonic()

    t_boot = time.monotonic()
    child = None
    timed_out = stalled = False
    freeze = ""
    wakes: list[str] = []
    try:
        with terminate_on_signals():
            child = Child(machine_argv(spec), sink, stdin=sys.stdin if interactive else None)
            rc, stalled, wakes = wait_waking(
                child, t_boot + timeout, stall_timeout, lambda: last_output[0],
                0.0 if interactive else WAKE_AFTER_S,   # a break then a typed key would be a SysRq
                lambda: _wake(monitor, progress))
            timed_out = rc is None
            if stalled:
                freeze = monitor_dump(monitor)
                progress(f"the emulated host froze; its CPU, from QEMU's monitor:\n{freeze}")
    finally:
        if child is not None:
            child.kill()
        if log_file:
            log_file.close()
    t_end = time.monotonic()
    console = b"".join(chunks).decode(errors="replace")
    stdout, marker_rc, kvm = split_console(console)
    dest = results_dir or (workdir / "results")   # without results_dir, read and dropped
    disk_rc = read_job_disk(job_disk, dest) if not timed_out else None
    job_disk.unlink(missing_ok=True)
    returncode = disk_rc if disk_rc is not None else marker_rc
    timings = {"prepare": t_boot - t0, "total": t_end - t0, "vm": t_end - t_boot}
    if "start" in marks:
        timings["boot"] = marks["start"] - t_boot
        timings["job"] = t_end - marks["start"]
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "hostvm-timings.json").write_text(json.dumps(timings))
        if freeze:
            (results_dir / "hostvm-freeze.txt").write_text(freeze)
        if wakes:
            (results_dir / "hostvm-wakes.txt").write_text("\n".join(wakes))
    return HostVmResult(returncode, console, stdout, results_dir, timed_out, stalled, kvm, timings, freeze,
                        wakes)


def _wake(monitor: Path, progress: Callable[[str], None]) -> str:
    progress(f"[hostvm] the emulated host's console has been silent for {WAKE_AFTER_S:.0f} s: "
             "sending it a serial break (docs/testing.md)")
    return monitor_dump(monitor, WAKE_QUERIES, pause=0.0)
