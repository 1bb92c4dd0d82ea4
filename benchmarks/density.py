"""Density benchmark: N microVMs launched as fast as the host allows, all alive at once.

Variants (each started exactly as its users start it, API on):

``forkserver``
    ``asyncvmm --api-sock ...`` with ``ASYNCVMM_FORKSERVER`` set: the thin
    launcher hands the request to a fork server started before the run
    (docs/forkserver.md); its memory is counted once, not per microVM.
``direct``
    the same fork server, spawned through ``asyncvmm.forkserver.client.spawn``
    by the benchmark itself: no launcher process, the benchmark holds each
    microVM's connection (what an orchestrator written in Python would do).
``cold``
    ``asyncvmm --api-sock ...``, a fresh Python process per microVM.
``qemu``
    QEMU ``microvm`` with ``-S -qmp`` (vmms.qemu_microvm_argv), the same guest.

Each microVM runs the kvm-tier test guest (1 vCPU, 128 MiB, ``boottimer=1
exit=halt``: it writes the boot timer, prints, and halts, staying alive).
All N launches are issued back to back from one asyncio loop; every microVM
then goes through its own API as a client would: asyncvmm ``PUT
/boot-source``, ``PUT /machine-config``, ``PUT /actions InstanceStart``;
QEMU ``qmp_capabilities`` and ``cont``.  Per microVM, from the instant just
before its process is spawned:

``start_to_api``
    the first API answer (asyncvmm ``GET /``; QEMU ``qmp_capabilities``,
    which QEMU answers after creating the VM and loading the kernel: unequal
    work, labelled).  A connection to the listening socket is made as soon as
    the socket file exists; requests queue until the server answers.
``start_to_boottimer``
    the console line ``testguest: boottimer written`` arriving on its stdout.

Once every microVM has booted (or failed), after a settle: every one is
asked again (``GET /`` must say ``Running``; QMP ``query-status`` must say
``running``), and each VMM's memory is read from ``/proc/<pid>/smaps``
minus its guest RAM (``benchmarks.smaps``): ``vmm_pss`` and ``vmm_private``.
Through the fork server the VMM is the forked child, and the launcher that
stands for it is measured apart (``launcher_pss``/``launcher_private``);
``total_pss`` is their sum, what one more microVM costs.  Host memory used
is ``MemAvailable`` before the launches minus at N (guest pages, page
tables, KVM and launchers included), per microVM.

The launch rate is N / (last boot-timer line - first spawn) / CPUs: microVM
creations per second per core, as Firecracker states its figure.

The cold-start steps (``--cold-start-runs``, interleaved): one ``asyncvmm
--api-sock`` at a time, time and CPU (``cpu_to_api``, the started process's
utime + stime) from spawn to the first ``GET /`` answer, for each step of
the start-up diet: ``start-no-bytecode`` (nothing byte-compiled:
``PYTHONDONTWRITEBYTECODE`` and an empty ``PYTHONPYCACHEPREFIX``),
``start-editable-install`` (the venv's script, byte-compiled, as installed
here), ``start-regular-install`` (the same without the editable-install
finder that ``site`` runs at every start) and ``start-forkserver-launcher``
(through the fork server: the launcher's CPU).  Their comparisons are
asyncvmm against itself, one step against the one before.

A run stops launching when ``MemAvailable`` falls below ``--memory-floor-mib``
(and says so); ``--cap variant=N`` skips larger N for a variant (cold and
QEMU N=1000 take minutes of both cores on this machine).  The document says
what was run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncvmm.forkserver.client import ForkedVmm, SpawnError, spawn
from benchmarks import machine, report
from benchmarks.launch import stop_process
from benchmarks.smaps import SmapsError, read_process_memory
from benchmarks.vmms import BOOTTIMER_WRITTEN, GuestSpec, asyncvmm_executable, load_test_guest, qemu_microvm_argv

MS = 1_000_000
CMDLINE = "boottimer=1 exit=halt"
VARIANTS = ("forkserver", "direct", "cold", "qemu")
DEFAULT_CAPS = {"cold": 100, "qemu": 100}
FORKSERVER_ENV = "ASYNCVMM_FORKSERVER"
QEMU_UNEQUAL = ("QEMU answers qmp_capabilities after creating the VM and loading the kernel (-S); "
                "asyncvmm answers GET / before either (it loads the kernel on InstanceStart)")


@dataclasses.dataclass
class Vm:
    index: int
    sock: Path
    log: Path
    t_spawn: int = 0
    t_api: int | None = None
    t_boottimer: int | None = None
    proc: asyncio.subprocess.Process | None = None
    vmm_pid: int | None = None
    error: str | None = None
    alive_at_n: bool = False


# -- tiny async clients ---------------------------------------------------------


async def http(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        writer.write(head.encode() + b"Connection: close\r\n\r\n" + payload)
        await writer.drain()
        status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        data = await reader.readexactly(length) if length else b""
        return int(status_line.split()[1]), data
    finally:
        writer.close()


async def qmp(sock: Path, *commands: str) -> list[tuple[Any, int]]:
    """Run ``commands`` on one QMP connection; each answer with the instant it arrived."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        greeting = json.loads(await reader.readline())
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        answers = []
        for command in commands:
            writer.write(json.dumps({"execute": command}).encode() + b"\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    raise RuntimeError(f"QMP closed during {command}")
                msg = json.loads(line)
                if "error" in msg:
                    raise RuntimeError(f"QMP {command}: {msg['error']}")
                if "return" in msg:
                    answers.append((msg["return"], time.monotonic_ns()))
                    break
        return answers
    finally:
        writer.close()


async def wait_for_path(path: Path, proc: asyncio.subprocess.Process, deadline: float) -> None:
    delay = 0.001
    while not path.exists():
        if proc.returncode is not None:
            raise RuntimeError(f"exited with {proc.returncode} before its socket appeared")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no socket {path.name}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def first_contact(call: Any, deadline: float) -> Any:
    """``call()`` retried while the socket file exists but is not listening yet (bind before listen)."""
    while True:
        try:
            return await asyncio.wait_for(call(), max(0.1, deadline - time.monotonic()))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.002)


async def watch_console(stream: asyncio.StreamReader, marker: bytes, found: asyncio.Future) -> None:
    """Set ``found`` to the arrival time of ``marker`` (None at EOF without it); drain to EOF so
    the pipe never fills."""
    seen = b""
    while chunk := await stream.read(65536):
        if not found.done():
            seen = (seen + chunk)[-4096:]
            if marker in seen:
                found.set_result(time.monotonic_ns())
    if not found.done():
        found.set_result(None)


# -- one microVM ----------------------------------------------------------------


class DirectProc:
    """A :class:`ForkedVmm` with the few ``asyncio.subprocess.Process`` members used here."""

    def __init__(self, vmm: ForkedVmm) -> None:
        self.vmm, self.pid, self.returncode = vmm, vmm.pid, None

    def send_signal(self, sig: int) -> None:
        self.vmm.send_signal(sig)

    def kill(self) -> None:
        self.vmm.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        try:
            self.returncode = await self.vmm.wait_async()
        except SpawnError:
            self.returncode = -1
        return self.returncode


class Run:
    """One variant at one N."""

    def __init__(self, variant: str, n: int, guest: GuestSpec, workdir: Path, opts: argparse.Namespace,
                 zygote_sock: Path | None) -> None:
        self.variant, self.n, self.guest, self.opts = variant, n, guest, opts
        self.dir = workdir / f"{variant}-{n}"
        self.dir.mkdir(parents=True)
        self.zygote_sock = zygote_sock
        self.vms = [Vm(i, self.dir / f"vm{i}.sock", self.dir / f"vm{i}.log") for i in range(n)]
        self.stopped_early: str | None = None
        self.consoles: dict[int, asyncio.Task] = {}

    def argv(self, vm: Vm) -> list[str]:
        if self.variant == "qemu":
            return qemu_microvm_argv(self.guest, qmp_sock=vm.sock)
        return [asyncvmm_executable(), "--api-sock", str(vm.sock), "--log-path", str(vm.log),
                "--level", "Warning", "--id", f"density-{vm.index}"]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != FORKSERVER_ENV}
        if self.variant == "forkserver":
            env[FORKSERVER_ENV] = str(self.zygote_sock)
        return env

    async def start(self, vm: Vm) -> asyncio.StreamReader:
        """Spawn ``vm``'s process (``vm.t_spawn`` just before); its stdout (the console) as a stream."""
        if self.variant != "direct":
            vm.t_spawn = time.monotonic_ns()
            vm.proc = await asyncio.create_subprocess_exec(
                *self.argv(vm), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=self.env(), cwd=self.dir, start_new_session=True)
            return vm.proc.stdout
        r, w = os.pipe()
        null = os.open(os.devnull, os.O_RDWR)
        try:
            vm.t_spawn = time.monotonic_ns()
            vm.proc = DirectProc(spawn(str(self.zygote_sock), self.argv(vm)[1:], stdin=null, stdout=w,
                                       stderr=null, cwd=str(self.dir), env=self.env()))
        finally:
            os.close(w), os.close(null)
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                           os.fdopen(r, "rb", 0))
        return reader

    async def one(self, vm: Vm) -> None:
        deadline = time.monotonic() + self.opts.timeout
        vm.log.touch()
        try:
            stdout = await self.start(vm)
        except (OSError, SpawnError) as err:
            vm.error = f"{type(err).__name__}: {err}"
            return
        console: asyncio.Future = asyncio.get_running_loop().create_future()
        self.consoles[vm.index] = asyncio.create_task(watch_console(stdout, BOOTTIMER_WRITTEN, console))
        try:
            await wait_for_path(vm.sock, vm.proc, deadline)
            if self.variant == "qemu":
                answers = await first_contact(lambda: qmp(vm.sock, "qmp_capabilities", "cont"), deadline)
                vm.t_api = answers[0][1]
            else:
                status, _ = await first_contact(lambda: http(vm.sock, "GET", "/"), deadline)
                if status != 200:
                    raise RuntimeError(f"GET / answered {status}")
                vm.t_api = time.monotonic_ns()
                for path, body in (("/boot-source", {"kernel_image_path": str(self.guest.kernel),
                                                     "boot_args": self.guest.cmdline}),
                                   ("/machine-config", {"vcpu_count": self.guest.vcpus,
                                                        "mem_size_mib": self.guest.mem_mib}),
                                   ("/actions", {"action_type": "InstanceStart"})):
                    status, data = await asyncio.wait_for(http(vm.sock, "PUT", path, body), self.opts.timeout)
                    if status != 204:
                        raise RuntimeError(f"PUT {path} answered {status}: {data[:200]!r}")
            remaining = max(0.1, deadline - time.monotonic())
            vm.t_boottimer = await asyncio.wait_for(asyncio.shield(console), remaining)
            if vm.t_boottimer is None:
                raise RuntimeError("the console closed before the boot-timer line")
        except (OSError, RuntimeError, asyncio.TimeoutError, ValueError) as err:
            vm.error = f"{type(err).__name__}: {err}{self.last_words(vm)}"

    def last_words(self, vm: Vm) -> str:
        """The process's exit status and its log's last line, for a failure message."""
        code = getattr(vm.proc, "returncode", None)
        try:
            lines = vm.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return (f" (exit status {code})" if code is not None else "") + (f"; log: {lines[-1]}" if lines else "")

    async def launch_all(self) -> None:
        tasks = []
        for vm in self.vms:
            if vm.index % 10 == 0 and mem_available_kib() < self.opts.memory_floor_mib * 1024:
                self.stopped_early = (f"stopped launching at {vm.index} microVMs: MemAvailable fell below "
                                      f"{self.opts.memory_floor_mib} MiB")
                break
            tasks.append(asyncio.create_task(self.one(vm)))
            await asyncio.sleep(0)               # let earlier ones make progress; no pacing beyond that
        self.launched = self.vms[:len(tasks)]
        await asyncio.gather(*tasks)

    async def check_alive(self) -> None:
        async def check(vm: Vm) -> None:
            try:
                if self.variant == "qemu":
                    answers = await asyncio.wait_for(qmp(vm.sock, "qmp_capabilities", "query-status"), 30)
                    status = answers[-1][0] if isinstance(answers[-1][0], dict) else {}
                    vm.alive_at_n = status.get("status") == "running"
                else:
                    code, data = await asyncio.wait_for(http(vm.sock, "GET", "/"), 30)
                    vm.alive_at_n = code == 200 and json.loads(data).get("state") == "Running"
            except (OSError, RuntimeError, asyncio.TimeoutError, ValueError):
                vm.alive_at_n = False
        ok = [vm for vm in self.launched if vm.error is None]
        for i in range(0, len(ok), 100):         # bounded concurrency: 100 connections at a time
            await asyncio.gather(*(check(vm) for vm in ok[i:i + 100]))

    def find_vmm_pids(self, zygote_pid: int | None) -> None:
        if self.variant != "forkserver":
            for vm in self.launched:
                vm.vmm_pid = vm.proc.pid if vm.proc else None
            return
        by_log = {str(vm.log): vm for vm in self.launched}
        for child in children_of(zygote_pid):
            try:
                for fd in os.listdir(f"/proc/{child}/fd"):
                    target = os.readlink(f"/proc/{child}/fd/{fd}")
                    if target in by_log:
                        by_log[target].vmm_pid = child
                        break
            except OSError:
                continue

    async def stop_all(self) -> None:
        for vm in self.launched:
            if vm.proc is not None and vm.proc.returncode is None:
                try:
                    vm.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

        async def reap(vm: Vm) -> None:
            try:
                await asyncio.wait_for(vm.proc.wait(), 60)
            except asyncio.TimeoutError:
                vm.proc.kill()
                await vm.proc.wait()
        await asyncio.gather(*(reap(vm) for vm in self.launched if vm.proc is not None))
        for task in self.consoles.values():
            task.cancel()


def children_of(pid: int | None) -> list[int]:
    if pid is None:
        return []
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def mem_available_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rollup_kib(pid: int) -> tuple[int, int]:
    """(Pss, Private_Clean + Private_Dirty) of a whole process, kB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


# -- one variant at one N, measured ----------------------------------------------


async def measure(run: Run, zygote_pid: int | None) -> dict[str, Any]:
    avail_before = mem_available_kib()
    load_before = machine.load_average()
    t_first = time.monotonic_ns()
    await run.launch_all()
    t_done = time.monotonic_ns()
    await asyncio.sleep(run.opts.settle)
    await run.check_alive()
    run.find_vmm_pids(zygote_pid)
    avail_at_n = mem_available_kib()
    mem: dict[str, list[float]] = {k: [] for k in ("vmm_pss", "vmm_private", "launcher_pss",
                                                   "launcher_private", "total_pss")}
    notes: list[str] = []
    for vm in run.launched:
        if vm.error is not None or vm.vmm_pid is None:
            continue
        try:
            m = read_process_memory(vm.vmm_pid, run.guest.region_sizes_kib)
        except (OSError, SmapsError) as err:
            notes.append(f"vm{vm.index}: memory not read: {err}")
            continue
        mem["vmm_pss"].append(m.vmm_pss_kib)
        mem["vmm_private"].append(m.vmm_private_kib)
        total = m.vmm_pss_kib
        if run.variant == "forkserver" and vm.proc is not None:
            try:
                pss, private = rollup_kib(vm.proc.pid)
            except OSError:
                continue
            mem["launcher_pss"].append(pss)
            mem["launcher_private"].append(private)
            total += pss
        mem["total_pss"].append(total)
    load_at_n = machine.load_average()
    await run.stop_all()
    ok = [vm for vm in run.launched if vm.error is None]
    booted = [vm for vm in ok if vm.t_boottimer is not None]
    samples: dict[str, tuple[list[float], str]] = {
        "start_to_api": ([(vm.t_api - vm.t_spawn) / MS for vm in ok if vm.t_api], "ms"),
        "start_to_boottimer": ([(vm.t_boottimer - vm.t_spawn) / MS for vm in booted], "ms"),
        **{name: (values, "KiB") for name, values in mem.items()},
    }
    metrics = {name: report.metric(values, unit) for name, (values, unit) in samples.items() if values}
    last_boot = max((vm.t_boottimer for vm in booted), default=None)
    wall_s = (last_boot - t_first) / 1e9 if last_boot else None
    cpus = os.cpu_count() or 1
    density = {
        "n_requested": run.n, "n_launched": len(run.launched), "n_answered": sum(vm.t_api is not None for vm in ok),
        "n_guest_ran": len(booted), "n_alive_at_n": sum(vm.alive_at_n for vm in run.launched),
        "launch_wall_s": wall_s, "launch_issue_s": (t_done - t_first) / 1e9,
        "launches_per_s_per_core": (len(booted) / wall_s / cpus) if wall_s else None,
        "host_mem_used_kib": avail_before - avail_at_n,
        "host_mem_per_vm_kib": (avail_before - avail_at_n) / max(1, len(run.launched)),
        "load_before": load_before, "load_at_n": load_at_n, "stopped_early": run.stopped_early,
    }
    failures = [f"vm{vm.index}: {vm.error}" for vm in run.launched if vm.error][:50]
    return {"metrics": metrics, "density": density, "failures": failures, "notes": notes[:20]}


class Zygote:
    """The fork server for the ``forkserver`` variant, started before and stopped after its runs."""

    def __init__(self, workdir: Path) -> None:
        self.sock = workdir / "zygote.sock"
        self.err = workdir / "zygote.err"
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "asyncvmm.forkserver", "--socket", str(self.sock)],
                                         stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith(b"ready"):
            raise RuntimeError(f"the fork server did not start: {line!r}")
        self.pss_kib, self.private_kib = rollup_kib(self.proc.pid)

    def died(self) -> str | None:
        """Why the fork server is gone (its exit status and last words), or None while it runs."""
        if self.proc.poll() is None:
            return None
        tail = self.err.read_text(errors="replace")[-2000:]
        return f"the fork server exited with {self.proc.returncode}: {tail}"

    def stop(self) -> None:
        stop_process(self.proc, 10)


# -- the cold-start steps ---------------------------------------------------------


def cold_start_configs(zygote_sock: Path | None) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """How ``asyncvmm --api-sock`` can start, each step of the diet apart (env None: no byte-code)."""
    script = asyncvmm_executable()
    site = next(p for p in sys.path if p.endswith("site-packages"))
    repo = str(Path(__file__).resolve().parents[1])
    base = {k: v for k, v in os.environ.items() if k != FORKSERVER_ENV}
    configs: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "start-no-bytecode": ([script], None),
        "start-editable-install": ([script], base),
        # What a regular (non-editable) install starts like: no editable-finder hook in site.
        "start-regular-install": ([sys.executable, "-s", "-S", "-c",
                                   f"import sys; sys.path[:0] = [{repo!r}, {site!r}]; "
                                   "from asyncvmm.cli import main; sys.exit(main())"], base),
    }
    if zygote_sock is not None:
        configs["start-forkserver-launcher"] = ([script], dict(base, **{FORKSERVER_ENV: str(zygote_sock)}))
    return configs


def process_cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def one_cold_start(argv: list[str], env: dict[str, str], sock: Path) -> tuple[float, float]:
    """(ms to the first API answer, CPU ms the started process used by then)."""
    import socket as socket_module
    t0 = time.monotonic_ns()
    proc = subprocess.Popen([*argv, "--api-sock", str(sock), "--level", "Warning"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            s = socket_module.socket(socket_module.AF_UNIX)
            try:
                s.connect(str(sock))
                break
            except OSError:
                s.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} never served its API")
                time.sleep(0.001)
        with s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            s.settimeout(60)
            if not s.recv(4096).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("GET / did not answer 200")
        return (time.monotonic_ns() - t0) / MS, process_cpu_ms(proc.pid)
    finally:
        proc.terminate()
        proc.wait()


def measure_cold_start(runs: int, zygote_sock: Path | None, workdir: Path) -> dict[str, Any]:
    """Each start-up configuration ``runs`` times, interleaved: time and CPU to the first answer."""
    configs = cold_start_configs(zygote_sock)
    samples: dict[str, dict[str, list[float]]] = {n: {"start_to_api": [], "cpu_to_api": []} for n in configs}
    failures: dict[str, list[str]] = {n: [] for n in configs}
    for i in range(runs):
        for name, (argv, env) in configs.items():
            if env is None:           # no byte-code: nothing written, nothing read from a cache
                env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                           PYTHONPYCACHEPREFIX=str(workdir / f"empty-cache-{i}"))
                env.pop(FORKSERVER_ENV, None)
            try:
                wall, cpu = one_cold_start(argv, env, workdir / f"cold-{name}-{i}.sock")
            except (OSError, RuntimeError) as err:
                failures[name].append(str(err))
                continue
            samples[name]["start_to_api"].append(wall)
            samples[name]["cpu_to_api"].append(cpu)
    return {name: {"metrics": {m: report.metric(v, "ms") for m, v in ms.items() if v},
                   "failures": failures[name]} for name, ms in samples.items()}


def raise_nofile() -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_caps(spec: str) -> dict[str, int]:
    caps = dict(DEFAULT_CAPS)
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name not in VARIANTS or not value.isdigit():
            raise ValueError(f"bad --cap item {item!r}: variant=N with a variant of {', '.join(VARIANTS)}")
        caps[name] = int(value)
    return caps


def describe_density(name: str, d: dict[str, Any]) -> str:
    rate = d["launches_per_s_per_core"]
    text = (f"`{name}`: {d['n_launched']}/{d['n_requested']} launched, {d['n_answered']} answered, "
            f"{d['n_guest_ran']} guests ran, {d['n_alive_at_n']} alive and answering at N; "
            f"launch rate {rate:.1f} microVMs/s/core" if rate else f"`{name}`: no guest ran")
    if rate:
        text += (f" ({d['launch_wall_s']:.2f} s to the last boot-timer line); host memory used at N "
                 f"{d['host_mem_used_kib'] / 1024:.0f} MiB ({d['host_mem_per_vm_kib'] / 1024:.1f} MiB per microVM); "
                 f"load {d['load_before'][0]:.2f} before, {d['load_at_n'][0]:.2f} at N")
    if d["stopped_early"]:
        text += f"; {d['stopped_early']}"
    return text + "."


async def main_async(opts: argparse.Namespace, guest: GuestSpec, workdir: Path) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    notes: list[str] = []
    caps = parse_caps(opts.cap)
    zygote = Zygote(workdir) if {"forkserver", "direct"} & set(opts.variants) else None
    try:
        if zygote is not None:
            notes.append(f"Fork server (once for all microVMs): {zygote.pss_kib / 1024:.1f} MiB PSS, "
                         f"{zygote.private_kib / 1024:.1f} MiB private after warm-up.")
        if opts.cold_start_runs:
            print("density: cold-start steps ...", file=sys.stderr, flush=True)
            variants.update(measure_cold_start(opts.cold_start_runs, zygote.sock if zygote else None, workdir))
        for n in opts.n:
            for variant in opts.variants:
                name = f"{variant}-{n}"
                if n > caps.get(variant, n):
                    notes.append(f"`{name}` not run: over its cap ({caps[variant]}; --cap).")
                    continue
                if zygote is not None and (why := zygote.died()) is not None:
                    raise RuntimeError(why)
                print(f"density: {name} ...", file=sys.stderr, flush=True)
                run = Run(variant, n, guest, workdir, opts, zygote.sock if zygote else None)
                result = await measure(run, zygote.proc.pid if zygote else None)
                variants[name] = result
                notes.append(describe_density(name, result["density"]))
                print("density:", notes[-1], file=sys.stderr, flush=True)
    finally:
        if zygote is not None:
            zygote.stop()
    return {"variants": variants, "notes": notes}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.density", description=__doc__.split("\n")[0])
    p.add_argument("--n", default="10,100,1000", help="comma-separated microVM counts (default 10,100,1000)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--cap", default="", help="per-variant N caps, e.g. cold=100,qemu=100 (the default caps)")
    p.add_argument("--mem-mib", type=int, default=128, help="guest RAM per microVM (default 128)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-microVM deadline, seconds")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between the last boot and the checks")
    p.add_argument("--memory-floor-mib", type=int, default=2048,
                   help="stop launching when MemAvailable falls below this (default 2048)")
    p.add_argument("--cold-start-runs", type=int, default=5,
                   help="runs of each start-up configuration (byte-code, install kind, launcher); 0: skip")
    p.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    opts.n = [int(x) for x in opts.n.split(",")]
    opts.variants = [v for v in VARIANTS if v in opts.variants.split(",")]
    images = load_test_guest()
    if images is None:
        return 1
    raise_nofile()
    guest = GuestSpec(images.elf_pvh, CMDLINE, mem_mib=opts.mem_mib)
    doc = report.new_document("density", "Density: N microVMs launched at once",
                              "python -m benchmarks.density " + " ".join(argv),
                              machine=machine.describe(), git=machine.git_state(),
                              guest={"kernel": guest.kernel.name, "cmdline": CMDLINE, "mem_mib": guest.mem_mib,
                                     "vcpus": guest.vcpus})
    load_before = machine.load_average()
    with tempfile.TemporaryDirectory(prefix="asyncvmm-density-") as tmp:
        result = asyncio.run(main_async(opts, guest, Path(tmp)))
    doc["load"] = {"before": load_before, "after": machine.load_average()}
    doc["variants"] = result["variants"]
    pairs = []
    for n in opts.n:
        for subject in ("forkserver", "direct", "cold"):
            pairs.append((f"{subject}-{n}", f"qemu-{n}", ("start_to_api", "start_to_boottimer", "total_pss")))
        pairs.append((f"forkserver-{n}", f"cold-{n}", ("start_to_api", "start_to_boottimer", "total_pss")))
    pairs += [("start-editable-install", "start-no-bytecode", ("start_to_api", "cpu_to_api")),
              ("start-regular-install", "start-editable-install", ("start_to_api", "cpu_to_api")),
              ("start-forkserver-launcher", "start-editable-install", ("start_to_api", "cpu_to_api"))]
    comparisons, notes = report.compare_pairs(doc["variants"], pairs, lambda name: False)
    reasons = {(f"{s}-{n}", f"qemu-{n}"): {"start_to_api": QEMU_UNEQUAL} for n in opts.n
               for s in ("forkserver", "direct", "cold")}
    doc["comparisons"] = report.label_unequal(comparisons, reasons)
    doc["notes"] = result["notes"] + notes + [
        "start-* variants: one asyncvmm started at a time (no load from the others), each step of the "
        "start-up diet against the one before it: a ratio below 1 is that step's saving.",
        "total_pss: the VMM's PSS minus its guest RAM, plus (fork server) its launcher's PSS; "
        "QEMU's vmm_pss is the same measure of its one process."]
    for name, variant in doc["variants"].items():
        if "density" in variant:
            print(name, json.dumps(variant["density"]))
        else:
            print(name)
        for metric_name, m in variant["metrics"].items():
            print(f"  {metric_name}: median {report.fmt(m['median'], m['unit'])}, p99 {report.fmt(m['p99'], m['unit'])}")
        for failure in variant["failures"][:5]:
            print(f"  {name} failure: {failure}")
    print(report.format_comparisons(doc["comparisons"]))
    if not opts.no_write:
        print("wrote", report.write_result(doc))
    return 0 if doc["variants"] else 1


if __name__ == "__main__":
    sys.exit(main())
