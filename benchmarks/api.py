"""API latency benchmark: asyncvmm's REST API on its Unix socket, with QEMU's QMP as the peer.

Every round starts each variant once, in a rotated order:

``asyncvmm``
    ``asyncvmm --api-sock``.  Measured: process start → the socket accepts a
    connection (``start_to_socket``) and → the first ``GET /`` answered
    (``start_to_first_response``); then, before boot, ``GET /`` and ``PUT
    /machine-config``; then ``PUT /boot-source``, ``PUT /machine-config``,
    ``InstanceStart`` with the test guest (``exit=halt``), and once the guest
    has halted, ``GET /`` again.
``qemu-qmp``
    QEMU microvm, paused (``-S``), with 51 QMP monitors on Unix sockets (a
    QMP socket serves one client at a time: one control connection plus one
    per concurrent client).  ``query-status`` stands where ``GET /`` does,
    before ``cont`` and after the same guest halted.  Socket accept and the
    first ``query-status`` answered (after the greeting and
    ``qmp_capabilities``, which QMP requires) are the start-up figures.
    QMP and HTTP are different protocols, so the ratios compare "a status
    request on the VMM's control socket", not equal work.
``harness-floor``
    a canned-reply HTTP server (``--serve-canned``, a plain ``selectors``
    loop in its own process) answering the same requests: what the
    client, the kernel and a minimal Python server cost together, i.e. the
    lowest latency this harness can report.  It is a *reference*, not a
    peer: the result shows it beside asyncvmm's figures with no ratio.

For both VMMs the run also records the VMM's CPU time (utime + stime from
``/proc/<pid>/stat``) at the first answer (``cpu_to_first_response``), and
its memory minus guest RAM (``vmm_rss``, ``vmm_pss``, ``vmm_private``,
``vmm_private_dirty``; ``benchmarks.smaps``) once the guest has halted,
before the post-boot phase.  Rows where the two sides do unequal work (QEMU
answers its first QMP command only after building the VM and loading the
kernel; QMP and HTTP are different protocols) are labelled in the result.

Each phase runs with 1 client (2000 requests in sequence) and 50 clients
(50 kept-alive connections, 40 requests each, all started together), after
warm-up requests that are not counted.  Latency is from just before a
request is written to the arrival of the data that completes its response,
stamped on entry to the protocol callback before anything is parsed;
requests are pre-encoded, the client is one uvloop thread with plain
``asyncio.Protocol`` callbacks and the garbage collector paused.  The
client's own CPU time per request (``client_cpu_*``) is recorded beside the
numbers.  Per round, the median and p99 (nearest rank) of each phase are
samples; ``pooled`` in the JSON has the percentiles over all rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from benchmarks import machine, report, stats
from benchmarks.launch import Launched, LaunchError, connect_unix, launch, process_cpu_ms
from benchmarks.rounds import interleaved_rounds
from benchmarks.smaps import SmapsError, read_process_memory
from benchmarks.vmms import (DONE, ApiClient, ControlError, GuestSpec, QmpClient, asyncvmm_api_argv,
                             asyncvmm_config, load_test_guest, qemu_microvm_argv)

NAME = "api"
DEFAULT_RUNS = 10
QUICK_RUNS = 3
CLIENTS = (1, 50)
QMP_MONITORS = 1 + max(CLIENTS)
MACHINE_CONFIG = {"vcpu_count": 1, "mem_size_mib": 128}
GUEST_CMDLINE = "exit=halt"
SETTLE_S = 0.5                            # idle after the guest halted, before reading memory
US = 1e3                                  # ns per us
MS = 1e6


# -- framing: when the bytes received hold a whole reply -------------------------

def http_request(method: str, path: str, body: Any = None) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    return head.encode() + b"\r\n" + payload


def http_message_end(buf: bytes | bytearray) -> int | None:
    """Length of the first complete HTTP/1.1 message in ``buf`` (Content-Length framing)."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = 0
    for line in bytes(buf[:head_end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise ControlError(f"bad Content-Length {value!r}") from None
        elif name == b"transfer-encoding":
            raise ControlError("chunked responses are not expected from these servers")
    end = head_end + 4 + length
    return end if len(buf) >= end else None


def http_status(message: bytes) -> int:
    parts = message.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ControlError(f"not an HTTP response: {message[:80]!r}")
    return int(parts[1])


def qmp_message_end(buf: bytes | bytearray) -> int | None:
    at = buf.find(b"\n")
    return None if at < 0 else at + 1


def qmp_is_reply(message: bytes) -> bool:
    """True for a command's return, False for an event (skipped); an error raises."""
    try:
        msg = json.loads(message)
    except ValueError:
        raise ControlError(f"QMP sent non-JSON {message[:200]!r}") from None
    if "return" in msg:
        return True
    if "error" in msg:
        raise ControlError(f"QMP error: {msg['error']}")
    return False


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request and how to recognise (and check) its reply."""

    name: str
    request: bytes
    message_end: Callable[[bytes | bytearray], int | None]
    is_reply: Callable[[bytes], bool]


def http_exchange(name: str, method: str, path: str, body: Any, expect: int) -> Exchange:
    def is_reply(message: bytes) -> bool:
        status = http_status(message)
        if status != expect:
            raise ControlError(f"{method} {path} -> {status}, expected {expect}: {message[-300:]!r}")
        return True
    return Exchange(name, http_request(method, path, body), http_message_end, is_reply)


def qmp_exchange(name: str, command: str) -> Exchange:
    return Exchange(name, json.dumps({"execute": command}).encode() + b"\n", qmp_message_end,
                    qmp_is_reply)


GET_ROOT = http_exchange("status", "GET", "/", None, 200)
PUT_MACHINE_CONFIG = http_exchange("put_machine_config", "PUT", "/machine-config", MACHINE_CONFIG, 204)
QUERY_STATUS = qmp_exchange("status", "query-status")


# -- the load client ---------------------------------------------------------------

class Pinger(asyncio.Protocol):
    """One kept-alive connection sending ``count`` requests back to back."""

    def __init__(self, exchange: Exchange, count: int, done: asyncio.Future,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.exchange = exchange
        self.left = count
        self.done = done
        self.clock = clock
        self.latencies: list[int] = []
        self._buf = bytearray()
        self._sent = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport              # type: ignore[assignment]

    def send(self) -> None:
        assert self.transport is not None
        self._sent = self.clock()
        self.transport.write(self.exchange.request)

    def data_received(self, data: bytes) -> None:
        t = self.clock()                          # before any parsing: the client's cost stays out
        if self.done.done():
            return                                # finished (or failed): nothing more to time
        self._buf += data
        try:
            while (end := self.exchange.message_end(self._buf)) is not None:
                message = bytes(self._buf[:end])
                del self._buf[:end]
                if not self.exchange.is_reply(message):
                    continue                       # a QMP event
                self.latencies.append(t - self._sent)
                self.left -= 1
                if self.left == 0:
                    if not self.done.done():
                        self.done.set_result(None)
                    return
                self.send()
        except (ControlError, ValueError) as err:
            if not self.done.done():
                self.done.set_exception(ControlError(str(err)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ControlError(f"connection closed with {self.left} requests left"))


@dataclasses.dataclass
class LoadResult:
    latencies_ns: list[int]               # measured requests only
    wall_ns: int                          # first request sent -> last reply, warm-up excluded
    client_cpu_ns: int                    # the client thread's CPU time, warm-up included
    requests: int                         # all requests sent, warm-up included

    @property
    def rps(self) -> float:
        return len(self.latencies_ns) * 1e9 / self.wall_ns


async def _burst(exchange: Exchange, transports: Sequence[asyncio.Transport], count: int,
                 timeout_s: float) -> list[Pinger]:
    """``count`` requests on every connection at once; returns when all are answered."""
    loop = asyncio.get_running_loop()
    pingers = []
    for t in transports:
        p = Pinger(exchange, count, loop.create_future())
        t.set_protocol(p)
        p.connection_made(t)
        pingers.append(p)
    for p in pingers:
        p.send()
    await asyncio.wait_for(asyncio.gather(*(p.done for p in pingers)), timeout_s)
    return pingers


async def run_load(exchange: Exchange, sockets: Sequence[socket.socket], per_client: int,
                   warmup: int, timeout_s: float) -> LoadResult:
    """``warmup`` then ``per_client`` measured requests on every socket, all sockets at once."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()                                  # no collector pauses inside the client
    cpu0 = time.thread_time_ns()
    try:
        for sock in sockets:
            sock.setblocking(False)
            t, _ = await loop.create_unix_connection(asyncio.Protocol, sock=sock)
            transports.append(t)
        if warmup:
            await _burst(exchange, transports, warmup, timeout_s)
        t0 = time.monotonic_ns()
        measured = await _burst(exchange, transports, per_client, timeout_s)
        wall = time.monotonic_ns() - t0
    finally:
        cpu = time.thread_time_ns() - cpu0
        for t in transports:
            t.close()
        if gc_was_enabled:
            gc.enable()
    latencies = [x for p in measured for x in p.latencies]
    return LoadResult(latencies, wall, cpu, len(sockets) * (warmup + per_client))


# -- connections -------------------------------------------------------------------

def http_connect(path: Path, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(str(path))
    return sock


def qmp_connect(path: Path, timeout_s: float) -> socket.socket:
    """A QMP connection past the greeting and ``qmp_capabilities`` (blocking, before timing)."""
    sock = http_connect(path, timeout_s)
    buf = bytearray()
    replies, sent = 0, False
    while replies < 1:
        data = sock.recv(65536)
        if not data:
            sock.close()
            raise ControlError(f"{path}: QMP closed during the handshake")
        buf += data
        while (end := qmp_message_end(buf)) is not None:
            message = bytes(buf[:end])
            del buf[:end]
            if not sent:
                if b'"QMP"' not in message:
                    raise ControlError(f"{path}: not a QMP greeting: {message[:200]!r}")
                sock.sendall(b'{"execute": "qmp_capabilities"}\n')
                sent = True
            elif qmp_is_reply(message):
                replies += 1
    return sock


# -- one phase: 1 client, then 50 ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Options:
    kernel: Path
    requests: int                 # measured requests per phase and client count
    warmup: int                   # warm-up requests per phase and client count
    timeout_s: float


def measure(runner: asyncio.Runner, phase: str, exchange: Exchange,
            open_sockets: Callable[[int], list[socket.socket]], opts: Options,
            raw: dict[str, list[int]]) -> dict[str, float]:
    """``phase`` under every client count: median, p99, throughput, client CPU per request."""
    out: dict[str, float] = {}
    for clients in CLIENTS:
        per_client = max(1, opts.requests // clients)
        warm = max(1, opts.warmup // clients)
        result = runner.run(run_load(exchange, open_sockets(clients), per_client, warm, opts.timeout_s))
        key = f"{phase}_c{clients}"
        summary = stats.summarize(result.latencies_ns)
        out[f"{key}_median"] = summary.median / US
        out[f"{key}_p99"] = summary.p99 / US
        out[f"{key}_rps"] = result.rps
        out[f"{key}_client_cpu"] = result.client_cpu_ns / result.requests / US
        raw.setdefault(key, []).extend(result.latencies_ns)
    return out


def guest(opts: Options) -> GuestSpec:
    """The test guest both VMMs boot: ``exit=halt``, the machine config's vCPUs and memory."""
    return GuestSpec(opts.kernel, GUEST_CMDLINE, mem_mib=MACHINE_CONFIG["mem_size_mib"],
                     vcpus=MACHINE_CONFIG["vcpu_count"])


class RunFailed(RuntimeError):
    """A run produced no numbers; the message says why."""


def _diagnosis(proc: Launched, log: Path | None = None) -> str:
    proc.stop()
    tail = lambda b: b[-600:].decode(errors="replace")          # noqa: E731
    text = f"(exit {proc.proc.returncode}); stdout: {tail(proc.stdout.data)!r} stderr: {tail(proc.stderr.data)!r}"
    if log is not None and log.exists():
        text += f" log: {tail(log.read_bytes())!r}"
    return text


def _wait_guest(proc: Launched, opts: Options, log: Path | None = None) -> dict[str, int]:
    """Wait for the guest to halt, let the VMM settle; its memory then (``SmapsError`` if unreadable)."""
    if not proc.stdout.wait_for(DONE, opts.timeout_s):
        raise RunFailed(f"the guest did not print {DONE.decode()!r} {_diagnosis(proc, log)}")
    time.sleep(SETTLE_S)
    return read_process_memory(proc.pid, guest(opts).region_sizes_kib).metrics()


# -- variants ---------------------------------------------------------------------------

Runner = Callable[[Options, Path, asyncio.Runner, dict], tuple[dict[str, float], list[str]]]


def run_asyncvmm(opts: Options, tmp: Path, runner: asyncio.Runner,
                 raw: dict[str, list[int]]) -> tuple[dict[str, float], list[str]]:
    sock_path, log = tmp / "api.sock", tmp / "vmm.log"
    argv = asyncvmm_api_argv(sock_path, log, boot_timer=False)
    opener = lambda n: [http_connect(sock_path, opts.timeout_s) for _ in range(n)]    # noqa: E731
    with launch(argv) as vmm:
        try:
            sock, t_ready = connect_unix(sock_path, opts.timeout_s, alive=lambda: vmm.proc.poll() is None)
            api = ApiClient(sock, opts.timeout_s)
            status, body = api.request("GET", "/")
            t_first = time.monotonic_ns()
            cpu_first = process_cpu_ms(vmm.pid)
            if status != 200:
                raise ControlError(f"GET / -> {status}: {body[:200]!r}")
            out = {"start_to_socket": (t_ready - vmm.t_start_ns) / MS,
                   "start_to_first_response": (t_first - vmm.t_start_ns) / MS,
                   "cpu_to_first_response": cpu_first}
            out |= measure(runner, "status_preboot", GET_ROOT, opener, opts, raw)
            out |= measure(runner, "put_machine_config_preboot", PUT_MACHINE_CONFIG, opener, opts, raw)
            config = asyncvmm_config(guest(opts))
            api.put("/boot-source", config["boot-source"])
            api.put("/machine-config", config["machine-config"])
            api.put("/actions", {"action_type": "InstanceStart"})
            api.close()
            out |= _wait_guest(vmm, opts, log)
            out |= measure(runner, "status_postboot", GET_ROOT, opener, opts, raw)
        except (LaunchError, ControlError, OSError, SmapsError, asyncio.TimeoutError) as err:
            raise RunFailed(f"{type(err).__name__}: {err} {_diagnosis(vmm, log)}") from err
    return out, argv


def qmp_monitor_args(paths: Sequence[Path]) -> list[str]:
    args = ["-S"]
    for i, path in enumerate(paths):
        args += ["-chardev", f"socket,id=qmp{i},path={path},server=on,wait=off",
                 "-mon", f"chardev=qmp{i},mode=control"]
    return args


def run_qemu(opts: Options, tmp: Path, runner: asyncio.Runner,
             raw: dict[str, list[int]]) -> tuple[dict[str, float], list[str]]:
    paths = [tmp / f"qmp{i}.sock" for i in range(QMP_MONITORS)]
    argv = qemu_microvm_argv(guest(opts), extra=qmp_monitor_args(paths))
    opener = lambda n: [qmp_connect(p, opts.timeout_s) for p in paths[1:1 + n]]      # noqa: E731
    with launch(argv) as vmm:
        try:
            sock, t_ready = connect_unix(paths[0], opts.timeout_s, alive=lambda: vmm.proc.poll() is None)
            control = QmpClient(sock, opts.timeout_s)
            control.execute("qmp_capabilities")
            control.execute("query-status")
            t_first = time.monotonic_ns()
            cpu_first = process_cpu_ms(vmm.pid)
            out = {"start_to_socket": (t_ready - vmm.t_start_ns) / MS,
                   "start_to_first_response": (t_first - vmm.t_start_ns) / MS,
                   "cpu_to_first_response": cpu_first}
            out |= measure(runner, "status_preboot", QUERY_STATUS, opener, opts, raw)
            control.execute("cont")
            out |= _wait_guest(vmm, opts)
            out |= measure(runner, "status_postboot", QUERY_STATUS, opener, opts, raw)
            control.close()
        except (LaunchError, ControlError, OSError, SmapsError, asyncio.TimeoutError) as err:
            raise RunFailed(f"{type(err).__name__}: {err} {_diagnosis(vmm)}") from err
    return out, argv


def run_floor(opts: Options, tmp: Path, runner: asyncio.Runner,
              raw: dict[str, list[int]]) -> tuple[dict[str, float], list[str]]:
    path = tmp / "canned.sock"
    argv = [sys.executable, "-m", "benchmarks.api", "--serve-canned", str(path)]
    opener = lambda n: [http_connect(path, opts.timeout_s) for _ in range(n)]          # noqa: E731
    with launch(argv, cwd=machine.REPO) as server:
        try:
            connect_unix(path, opts.timeout_s, alive=lambda: server.proc.poll() is None)[0].close()
            out = measure(runner, "status_preboot", GET_ROOT, opener, opts, raw)
            out |= measure(runner, "put_machine_config_preboot", PUT_MACHINE_CONFIG, opener, opts, raw)
        except (LaunchError, ControlError, OSError, asyncio.TimeoutError) as err:
            raise RunFailed(f"{type(err).__name__}: {err} {_diagnosis(server)}") from err
    return out, argv


# -- the harness floor: canned replies ---------------------------------------------------

CANNED_BODY = b'{"id":"anonymous-instance","state":"Not started","vmm_version":"1.16.1","app_name":"Firecracker"}'
CANNED_200 = (b"HTTP/1.1 200 OK\r\nServer: Firecracker API\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(CANNED_BODY)).encode() + b"\r\n\r\n" + CANNED_BODY)
CANNED_204 = b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\n\r\n"


def canned_replies(buf: bytearray) -> bytes:
    """Consume every complete request in ``buf``; the canned reply for each (GET 200, else 204)."""
    out = bytearray()
    while (end := http_message_end(buf)) is not None:
        out += CANNED_200 if buf.startswith(b"GET ") else CANNED_204
        del buf[:end]
    return bytes(out)


def serve_canned(path: Path) -> None:
    """Answer HTTP requests on ``path`` with canned replies until killed (``--serve-canned``)."""
    sel = selectors.DefaultSelector()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(128)
    server.setblocking(False)
    sel.register(server, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytearray] = {}
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is server:
                conn, _ = server.accept()
                conn.setblocking(True)            # replies are small: sendall never waits long
                sel.register(conn, selectors.EVENT_READ)
                buffers[conn] = bytearray()
                continue
            data = sock.recv(65536)               # type: ignore[union-attr]
            if not data:
                sel.unregister(sock)
                sock.close()                      # type: ignore[union-attr]
                del buffers[sock]                 # type: ignore[arg-type]
                continue
            buf = buffers[sock]                   # type: ignore[index]
            buf += data
            reply = canned_replies(buf)
            if reply:
                sock.sendall(reply)               # type: ignore[union-attr]


# -- rounds, the document, the command line ----------------------------------------------

@dataclasses.dataclass
class Variant:
    name: str
    description: str
    run: Runner
    samples: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    raw: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    failures: list[str] = dataclasses.field(default_factory=list)
    command: list[str] | None = None


def make_variants() -> list[Variant]:
    return [
        Variant("asyncvmm", "asyncvmm --api-sock: GET /, PUT /machine-config; GET / after InstanceStart",
                run_asyncvmm),
        Variant("qemu-qmp", f"qemu-system-x86_64 -M microvm -S with {QMP_MONITORS} QMP monitors: "
                "query-status before and after cont", run_qemu),
        Variant("harness-floor", "canned-reply HTTP server (python selectors loop): the harness's floor",
                run_floor),
    ]


def run_once(v: Variant, opts: Options, runner: asyncio.Runner) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"bench-api-{v.name}-") as tmpdir:
        raw: dict[str, list[int]] = {}
        try:
            metrics, argv = v.run(opts, Path(tmpdir), runner, raw)
        except (RunFailed, LaunchError, OSError) as err:
            v.failures.append(str(err))
            print(f"  {v.name}: run failed: {err}", file=sys.stderr)
            return False
        if v.command is None:
            v.command = [a.replace(tmpdir, "$TMP") for a in argv]
    for key, value in metrics.items():
        v.samples.setdefault(key, []).append(value)
    for key, values in raw.items():
        v.raw.setdefault(key, []).extend(values)
    return True


def run_rounds(variants: list[Variant], opts: Options, runs: int, warmup: int, runner: asyncio.Runner,
               log: Callable[[str], None] = print) -> list[list[float]]:
    def discard(v: Variant) -> None:
        v.samples.clear()
        v.raw.clear()
        v.failures.clear()

    def describe(vs: list[Variant]) -> str:
        key = "status_preboot_c1_median"
        return "GET / (or query-status) c1 median: " + ", ".join(
            f"{v.name} {v.samples.get(key, [float('nan')])[-1]:.0f} us" for v in vs)

    return interleaved_rounds(variants, runs, lambda v: run_once(v, opts, runner), warmup=warmup,
                              discard=discard, describe=describe, log=log)


def unit_of(metric: str) -> str:
    if metric.startswith(("start_to_", "cpu_to_")):
        return "ms"
    if metric.startswith(("vmm_", "guest_")):
        return "KiB"
    return "count" if metric.endswith("_rps") else "us"


def pooled(raw: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Percentiles over every round's latencies of each phase (us)."""
    out = {}
    for key, values in raw.items():
        s = stats.summarize(values)
        out[key] = {"n": s.n, "median_us": s.median / US, "p99_us": s.p99 / US,
                    "p999_us": stats.percentile(values, 99.9) / US, "max_us": s.max / US}
    return out


STATUS_METRICS = [f"status_{when}_c{c}_{what}" for when in ("preboot", "postboot") for c in CLIENTS
                  for what in ("median", "p99", "rps")]
MEMORY_METRICS = ["vmm_rss", "vmm_pss", "vmm_private", "vmm_private_dirty"]
FLOOR_METRICS = [f"{phase}_c{c}_{what}" for phase in ("status_preboot", "put_machine_config_preboot")
                 for c in CLIENTS for what in ("median", "p99")]
_QMP_FIRST = ("QEMU -S answers its first QMP command only after creating the VM and loading the kernel, "
              "and after the greeting and qmp_capabilities; asyncvmm's first GET / comes before it "
              "creates anything (it does on InstanceStart): QEMU did more work here")
_PROTOCOLS = ("QMP query-status (a JSON line each way) vs HTTP/1.1 GET / (headers and a JSON body): the "
              "same role, different protocols and bytes")
UNEQUAL_WORK = {("asyncvmm", "qemu-qmp"): {
    "start_to_first_response": _QMP_FIRST, "cpu_to_first_response": _QMP_FIRST,
    **{name: _PROTOCOLS for name in STATUS_METRICS}}}


def comparisons(vdocs: dict[str, Any]) -> tuple[list[dict], list[str]]:
    """asyncvmm against QEMU (ratios, unequal work labelled); the canned-reply floor is not a peer
    (see :func:`references`)."""
    pairs = [("asyncvmm", "qemu-qmp", ["start_to_socket", "start_to_first_response",
                                       "cpu_to_first_response", *STATUS_METRICS, *MEMORY_METRICS])]
    comps, notes = report.compare_pairs(vdocs, pairs, higher_is_better=lambda name: name.endswith("_rps"))
    return report.label_unequal(comps, UNEQUAL_WORK), notes


def references(vdocs: dict[str, Any]) -> list[dict]:
    """asyncvmm's latencies beside the canned-reply floor's: what this harness can measure at all."""
    if "asyncvmm" not in vdocs or "harness-floor" not in vdocs:
        return []
    out = []
    for name in FLOOR_METRICS:
        try:
            out.append(report.reference(vdocs, "asyncvmm", "harness-floor", name))
        except report.ResultError:
            continue                       # a failed phase: the variants' failures say why
    return out


NOTES = [
    "Latency ratios: below 1.0 asyncvmm is faster. *_rps ratios (marked higher_is_better in the JSON): "
    "above 1.0 asyncvmm serves more requests per second.",
    "asyncvmm binds its API socket first, then imports the HTTP stack and its VMM core before serving; "
    "requests sent meanwhile wait in the socket's backlog, which shows in start_to_first_response.",
    "QMP's query-status and Firecracker's GET / are different protocols (a JSON line vs HTTP/1.1): "
    "the ratio compares a status request on each VMM's control socket, not identical work.",
    "Latency = request written (timestamp just before the write) to the arrival of the data completing "
    "the reply (timestamp on entry to the callback, before parsing); pre-encoded requests, one uvloop "
    "client thread, GC paused. *_client_cpu is that thread's CPU time per request, warm-up included.",
    "c1: 2000 requests in sequence on one kept-alive connection; c50: 50 kept-alive connections with 40 "
    "requests each, all in flight together (the latency includes queueing behind the other 49); "
    "*_rps = replies per second of wall time. Warm-up requests are not counted.",
    "QEMU runs with 51 QMP monitors (a QMP socket serves one client at a time); its start-up figures "
    "are for that command line. Its first response follows the greeting and qmp_capabilities, which "
    "QMP requires; asyncvmm's is the first GET / answered.",
    "harness-floor is a canned-reply Python server, not a peer VMM: its latencies are shown beside "
    "asyncvmm's as a reference (the lowest this client can measure), with no ratio.",
    "cpu_to_first_response = utime + stime of /proc/<pid>/stat (all threads, 10 ms ticks) read right "
    "after the first answer. vmm_* memory = smaps of the VMM minus its guest-RAM mapping, read "
    f"{SETTLE_S} s after the guest halted, before the post-boot phase (both VMMs have then booted the "
    "same guest and served the pre-boot phase's 51 connections). vmm_private = Private_Clean + "
    "Private_Dirty (smaps_rollup) minus the guest mapping's private pages; see the boot results' notes "
    "for what sharing does to it, and vmm_private_dirty, which sharing cannot hide.",
    "Rows marked 'no' under 'equal work' compare unequal work (reasons under the table).",
    "Per-round median and p99 are the samples; the JSON's `pooled` has percentiles over all rounds.",
]


def build_document(variants: list[Variant], opts: Options, runs: int, argv: list[str],
                   load_before: list[float], loads: list[list[float]]) -> dict[str, Any]:
    vdocs: dict[str, Any] = {}
    for v in variants:
        vdocs[v.name] = {"description": v.description, "command": v.command, "failures": v.failures,
                         "metrics": {k: report.metric(s, unit_of(k)) for k, s in v.samples.items()},
                         "pooled": pooled(v.raw)}
    comps, notes = comparisons(vdocs)
    return report.new_document(
        NAME, "API latency: asyncvmm's REST API vs QEMU's QMP, on Unix sockets",
        " ".join(["python -m benchmarks.api", *argv]),
        git=machine.git_state(), machine=machine.describe(),
        load={"before": load_before, "after": machine.load_average(), "per_round_1_5_15": loads},
        settings={"runs": runs, "requests_per_phase": opts.requests, "warmup_per_phase": opts.warmup,
                  "clients": list(CLIENTS), "kernel": str(opts.kernel), "cmdline": GUEST_CMDLINE,
                  "machine_config_body": MACHINE_CONFIG},
        variants=vdocs, comparisons=comps, references=references(vdocs), notes=notes + NOTES)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.api", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, help=f"rounds (default {DEFAULT_RUNS}, {QUICK_RUNS} with --quick)")
    p.add_argument("--quick", action="store_true", help="fewer rounds and requests, no warm-up round")
    p.add_argument("--requests", type=int, default=2000, help="measured requests per phase and client count")
    p.add_argument("--warmup", type=int, default=100, help="warm-up requests per phase and client count")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per step")
    p.add_argument("--variants", help="comma-separated subset of asyncvmm,qemu-qmp,harness-floor")
    p.add_argument("--results-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only, write no results")
    p.add_argument("--serve-canned", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        p.error("--runs must be at least 1")
    if args.requests < max(CLIENTS) or args.warmup < max(CLIENTS):
        p.error(f"--requests and --warmup must be at least {max(CLIENTS)}")
    return args


def make_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def print_pooled(variants: list[Variant]) -> None:
    print("\npooled over all rounds (us): median / p99 / p99.9")
    for v in variants:
        for key, s in pooled(v.raw).items():
            print(f"  {v.name:14} {key:32} {s['median_us']:8.1f} {s['p99_us']:8.1f} {s['p999_us']:8.1f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve_canned is not None:
        serve_canned(args.serve_canned)
        return 0
    runs = args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    requests = args.requests // 4 if args.quick else args.requests
    images = load_test_guest(need_kvm=False)
    if images is None:
        return 1
    kernel = images.elf_pvh
    try:
        variants = report.select_variants(make_variants(), args.variants)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    opts = Options(kernel, max(requests, max(CLIENTS)), args.warmup, args.timeout)
    load_before = machine.load_average()
    print(f"api benchmark: {runs} rounds of {', '.join(v.name for v in variants)}; load {load_before}")
    with make_runner() as runner:
        loads = run_rounds(variants, opts, runs, 0 if args.quick else 1, runner)
    doc = build_document(variants, opts, runs, argv, load_before, loads)
    print_pooled(variants)
    return report.conclude(doc, variants, write=not args.no_write, results_dir=args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
