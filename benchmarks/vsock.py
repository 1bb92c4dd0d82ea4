"""Vsock benchmark: asyncvmm's virtio-vsock against QEMU microvm's vhost-vsock, same Debian guest, same run.

Both VMMs boot the linux tier's Debian guest (cloud kernel, the project's
initramfs, the ext4 rootfs with Debian's socat; see docs/images.md), 1 vCPU,
256 MiB, each with one vsock device:

``asyncvmm``
    ``asyncvmm --no-api --config-file vm.json`` with ``vsock`` (guest CID 3,
    ``uds_path``): userspace virtio-vsock on Firecracker's Unix-socket model.
    The host reaches guest port P through ``uds_path`` and ``CONNECT P``; the
    guest reaches host port P at ``<uds_path>_P``.
``qemu-microvm``
    ``-device vhost-vsock-device,guest-cid=4``: the host kernel's
    vhost_vsock does the data path; the host uses AF_VSOCK sockets.

In each guest socat serves three ports: 5001 counts what arrives and answers
the count (``SYSTEM:'wc -c'``), 5002 echoes (``EXEC:cat``).  Every round
measures each VMM, in a rotated order, from the host side:

* ``h2g_mib_s``: the host sends :data:`DEFAULT_MIB` MiB to port 5001 and
  half-closes; the time runs until the guest's byte count comes back (all
  of it delivered);
* ``g2h_mib_s``: the guest (a console command) sends as much with
  ``socat -u STDIN VSOCK-CONNECT:2:6000``; the time runs from the host's
  first received byte to the end of the stream;
* ``connect_us``: :data:`CONNECTS` connections to port 5002, each from
  the host's ``connect`` to a usable stream (asyncvmm: the ``OK`` line
  read; QEMU: ``connect`` returned), median per round;
* ``echo_rtt_us``: on each of those connections one byte to the echo
  server and back, median per round.

Where ``/dev/kvm`` is not hardware KVM (here: kvm_pvm) ``main`` re-runs this
module inside the emulated KVM host (QEMU TCG, nested SVM; its kernel has
``vhost_vsock``), exactly as ``benchmarks.net`` does: only the ratios mean
something there.  Pure helpers (metrics, comparisons) are unit-tested.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks import machine, report
from benchmarks.net import run_and_conclude, run_benchmark_nested
from benchmarks.rounds import interleaved_rounds

NAME = "vsock"
TITLE = ("Vsock: asyncvmm virtio-vsock (Unix-socket model) vs QEMU microvm vhost-vsock, same Debian guest, "
         "nested emulated host (ratios only)")
DEFAULT_RUNS, QUICK_RUNS = 5, 2
DEFAULT_MIB, QUICK_MIB = 16, 4
CONNECTS = 20
MEM_MIB = 256
MIB = 1 << 20
READY = r"asyncvmm-guest: ready \(rootfs\)"
BOOT_TIMEOUT_S = 400.0
COUNT_PORT, ECHO_PORT, HOST_PORT = 5001, 5002, 6000
CIDS = {"asyncvmm": 3, "qemu-microvm": 4}
VARIANTS = (
    ("asyncvmm", "asyncvmm --no-api --config-file with vsock {guest_cid: 3, uds_path}; host side: Unix sockets"),
    ("qemu-microvm", "QEMU microvm, -device vhost-vsock-device,guest-cid=4 (host kernel vhost); host side: AF_VSOCK"),
)
GUEST_SERVERS = (f"(socat -t 30 VSOCK-LISTEN:{COUNT_PORT},fork,reuseaddr SYSTEM:'wc -c' >/dev/null 2>&1 &); "
                 f"(socat VSOCK-LISTEN:{ECHO_PORT},fork,reuseaddr,backlog=64 EXEC:cat >/dev/null 2>&1 &)")


class RunFailed(RuntimeError):
    """A guest did not boot or a measurement did not complete."""


# -- pure helpers -------------------------------------------------------------------------

def round_metrics(h2g_bytes: int, h2g_s: float, g2h_bytes: int, g2h_s: float,
                  connects_us: Sequence[float], rtts_us: Sequence[float]) -> dict[str, float]:
    return {"h2g_mib_s": h2g_bytes / MIB / h2g_s, "g2h_mib_s": g2h_bytes / MIB / g2h_s,
            "connect_us": statistics.median(connects_us), "echo_rtt_us": statistics.median(rtts_us)}


def unit_of(name: str) -> str:
    return "MiB/s" if name.endswith("_mib_s") else "us"


COMPARED = ("h2g_mib_s", "g2h_mib_s", "connect_us", "echo_rtt_us")
SUBJECT, PEER = "asyncvmm", "qemu-microvm"


def comparisons(vdocs: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """asyncvmm / QEMU per metric; throughput ratios are marked higher_is_better."""
    return report.compare_pairs(vdocs, [(SUBJECT, PEER, COMPARED)],
                                higher_is_better=lambda name: name.endswith("_mib_s"))


NOTES = [
    "NESTED, EMULATED HOST: measured inside the emulated KVM host (QEMU TCG with nested SVM, 1 vCPU; see "
    "docs/testing.md) because this machine's /dev/kvm (kvm_pvm) cannot boot a Linux guest in useful time. "
    "Everything there runs emulated, the host side included; only the ratios mean something.",
    "Ratios: h2g_mib_s and g2h_mib_s are rates (ABOVE 1.0 asyncvmm moves more); connect_us and echo_rtt_us "
    "are latencies (below 1.0 asyncvmm is faster).",
    "The two sides differ by design: asyncvmm's host end is a Unix socket served by the VMM process "
    "(Firecracker's model, one more copy and a userspace hop), QEMU's is an AF_VSOCK socket served by the "
    "host kernel's vhost_vsock. asyncvmm's connect_us includes the CONNECT/OK exchange.",
]


# -- the host side of one variant (I/O from here on) ---------------------------------------

class HostSide:
    """How the host reaches one variant's guest."""

    def __init__(self, variant: str, uds: str | None) -> None:
        self.variant, self.uds = variant, uds

    def connect(self, port: int) -> socket.socket:
        if self.uds is None:
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.settimeout(60)
            s.connect((CIDS[self.variant], port))
            return s
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(self.uds)
        s.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                s.close()
                raise ConnectionRefusedError(f"guest port {port}: no OK")
            line += c
        return s

    def listen(self, port: int) -> socket.socket:
        if self.uds is None:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            srv.bind((socket.VMADDR_CID_ANY, port))
        else:
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            path = f"{self.uds}_{port}"
            if os.path.exists(path):
                os.unlink(path)
            srv.bind(path)
        srv.listen(4)
        srv.settimeout(120)
        return srv


@dataclasses.dataclass
class Variant:
    name: str
    description: str
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None
    guest: Any = None
    host: HostSide | None = None
    listener: socket.socket | None = None


def make_variants(names: Sequence[str] | None = None) -> list[Variant]:
    known = dict(VARIANTS)
    wanted = list(names) if names else list(known)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown variants: {', '.join(unknown)} (known: {', '.join(known)})")
    return [Variant(n, known[n]) for n in wanted]


def boot(v: Variant, images, workdir: Path) -> None:
    from tests.linux.harness import AsyncVmmLauncher, Guest, GuestError, QemuMicrovmLauncher, default_spec

    wd = workdir / v.name
    wd.mkdir(parents=True, exist_ok=True)
    uds = str(Path(tempfile.mkdtemp(prefix="bv", dir="/tmp")) / "v.sock") if v.name == "asyncvmm" else None

    class AsyncVmmVsock(AsyncVmmLauncher):
        def config(self, spec):
            return {**AsyncVmmLauncher.config(spec), "vsock": {"guest_cid": CIDS["asyncvmm"], "uds_path": uds}}

    class QemuVsock(QemuMicrovmLauncher):
        def argv(self, spec, wd_):
            return super().argv(spec, wd_) + ["-device", f"vhost-vsock-device,guest-cid={CIDS['qemu-microvm']}"]

    launcher = (AsyncVmmVsock(extra_args=["--log-path", str(wd / "vmm.log"), "--level", "Info"])
                if uds else QemuVsock())
    guest = Guest(launcher, default_spec(images, wd, mem_mib=MEM_MIB), wd)
    v.guest, v.host = guest, HostSide(v.name, uds)
    v.command = [a.replace(str(wd), "$WORKDIR") for a in guest.argv]
    try:
        guest.wait_for(READY, BOOT_TIMEOUT_S)
        guest.run(GUEST_SERVERS, 60).check()
    except GuestError as err:
        raise RunFailed(f"{v.name} did not boot: {err}") from None
    deadline = time.monotonic() + 60
    while True:                                    # until socat listens
        try:
            v.host.connect(ECHO_PORT).close()
            break
        except OSError as err:
            if time.monotonic() > deadline:
                raise RunFailed(f"{v.name}: the guest's echo server never answered: {err}") from None
            time.sleep(0.5)
    v.listener = v.host.listen(HOST_PORT)


def h2g(v: Variant, nbytes: int) -> float:
    block = bytes(range(256)) * 4096                # 1 MiB
    t0 = time.monotonic()
    with v.host.connect(COUNT_PORT) as s:
        for _ in range(nbytes // len(block)):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
    elapsed = time.monotonic() - t0
    if int(answer.split()[0]) != nbytes:
        raise RunFailed(f"{v.name}: the guest counted {answer!r}, not {nbytes}")
    return elapsed


def g2h(v: Variant, nbytes: int) -> float:
    got: dict[str, Any] = {}

    def receive() -> None:
        try:
            conn, _ = v.listener.accept()
        except OSError as err:
            got["error"] = err
            return
        with conn:
            conn.settimeout(120)
            n, t0 = 0, None
            while chunk := conn.recv(1 << 20):
                t0 = t0 or time.monotonic()
                n += len(chunk)
            got.update(n=n, s=time.monotonic() - (t0 or time.monotonic()))
    t = threading.Thread(target=receive, daemon=True)
    t.start()
    v.guest.run(f"head -c {nbytes} /dev/zero | socat -u STDIN VSOCK-CONNECT:2:{HOST_PORT}", 300).check()
    t.join(120)
    if got.get("n") != nbytes:
        raise RunFailed(f"{v.name}: the host received {got}, not {nbytes} bytes")
    return got["s"]


def connects(v: Variant) -> tuple[list[float], list[float]]:
    setup, rtt = [], []
    for _ in range(CONNECTS):
        t0 = time.monotonic_ns()
        s = v.host.connect(ECHO_PORT)
        t1 = time.monotonic_ns()
        with s:
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RunFailed(f"{v.name}: the echo server did not echo")
            t2 = time.monotonic_ns()
        setup.append((t1 - t0) / 1000)
        rtt.append((t2 - t1) / 1000)
    return setup, rtt


def measure(v: Variant, nbytes: int) -> dict[str, float] | None:
    if v.guest is None or v.guest.exited() is not None:
        return None
    try:
        h2g_s = h2g(v, nbytes)
        g2h_s = g2h(v, nbytes)
        setup, rtt = connects(v)
    except Exception as err:             # a failed round is recorded, the others go on
        v.failures.append(f"{type(err).__name__}: {err}")
        print(f"  {v.name}: measurement failed: {err}", file=sys.stderr, flush=True)
        return None
    metrics = round_metrics(nbytes, h2g_s, nbytes, g2h_s, setup, rtt)
    for key, value in metrics.items():
        v.samples.setdefault(key, []).append(value)
    return metrics


def stop(v: Variant) -> None:
    if v.listener is not None:
        v.listener.close()
        v.listener = None
    if v.guest is not None:
        try:
            v.guest.stop(timeout=60)
        finally:
            v.guest.kill()
            v.guest = None


@dataclasses.dataclass(frozen=True)
class Settings:
    runs: int
    mib: int
    variants: tuple[str, ...]

    def argv(self) -> list[str]:
        return ["--runs", str(self.runs), "--mib", str(self.mib), "--variants", ",".join(self.variants)]


def run_direct(settings: Settings, command: str) -> tuple[dict[str, Any], bool]:
    from asyncvmm_tools.hostvm import in_hostvm
    from asyncvmm_tools.images import ensure_images

    images = ensure_images(refresh=False)
    variants = make_variants(settings.variants)
    nbytes = settings.mib * MIB
    load_before = machine.load_average()
    print(f"vsock benchmark: {settings.runs} rounds of {', '.join(v.name for v in variants)}; "
          f"{settings.mib} MiB per direction, {CONNECTS} connections; load {load_before}", flush=True)

    def describe(vs: list[Variant]) -> str:
        return "; ".join(f"{v.name} h2g {v.samples.get('h2g_mib_s', [0])[-1]:.1f} g2h "
                         f"{v.samples.get('g2h_mib_s', [0])[-1]:.1f} MiB/s connect "
                         f"{v.samples.get('connect_us', [0])[-1]:.0f} us" for v in vs)

    with tempfile.TemporaryDirectory(prefix="bench-vsock-") as tmp:
        try:
            for v in variants:
                try:
                    boot(v, images, Path(tmp))
                    measure(v, MIB)                    # warm-up, discarded
                    v.samples.clear()
                    v.failures.clear()
                    print(f"{v.name}: booted, servers up", flush=True)
                except (RunFailed, OSError) as err:
                    v.failures.append(str(err))
                    print(f"{v.name}: {err}", file=sys.stderr, flush=True)
                    stop(v)
            loads = interleaved_rounds(variants, settings.runs, lambda v: measure(v, nbytes),
                                       describe=describe, log=lambda s: print(s, flush=True))
        finally:
            for v in variants:
                stop(v)
    vdocs = {v.name: {"description": v.description, "command": v.command, "failures": v.failures,
                      "metrics": {k: report.metric(s, unit_of(k)) for k, s in v.samples.items()}}
             for v in variants}
    comps, notes = comparisons(vdocs)
    nested = in_hostvm()
    doc = report.new_document(
        NAME, TITLE if nested else TITLE.replace(", nested emulated host (ratios only)", ""), command,
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        nested_emulated_host=nested,
        settings={"runs": settings.runs, "mib_per_direction": settings.mib, "connects_per_round": CONNECTS,
                  "mem_mib": MEM_MIB, "vcpus": 1, "guest_servers": GUEST_SERVERS},
        variants=vdocs, comparisons=comps, notes=notes + (NOTES if nested else NOTES[1:]))
    return doc, all(v.samples and not v.failures for v in variants)


def run_nested(settings: Settings, command: str, timeout: float | None) -> tuple[dict[str, Any] | None, bool]:
    limit = timeout or 900 + len(settings.variants) * settings.runs * (60 + settings.mib * 10)
    return run_benchmark_nested(NAME, settings.argv(), limit, command)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vsock", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} rounds of {QUICK_MIB} MiB")
    p.add_argument("--mib", type=int, help=f"MiB per direction per round (default {DEFAULT_MIB})")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(n for n, _ in VARIANTS)}")
    p.add_argument("--mode", choices=("auto", "direct", "hostvm"), default="auto")
    p.add_argument("--hostvm-timeout", type=float)
    p.add_argument("--results-dir", type=Path)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    for name in ("runs", "mib"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    names = tuple(args.variants.split(",")) if args.variants else tuple(n for n, _ in VARIANTS)
    try:
        make_variants(names)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    settings = Settings(runs=args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS),
                        mib=args.mib or (QUICK_MIB if args.quick else DEFAULT_MIB), variants=names)
    command = " ".join(["python -m benchmarks.vsock", *argv])
    return run_and_conclude(args, settings, command, run_nested, run_direct)


if __name__ == "__main__":
    sys.exit(main())
