"""The ``asyncvmm`` command: Firecracker's flags, API socket, ``--config-file`` boot, exit codes.

Exit codes (Firecracker's): 0 ok, 1 generic error, 2 unexpected error,
152 bad configuration (config file, metadata, log level), 153 bad arguments;
after boot the code is the one the VMM reports through ``on_exit`` (guest
reset 0).  Heavy imports (aiohttp, uvloop, the VMM core) happen only after
the arguments are known good, so ``--help``/``--version`` stay instant.
The API socket is bound before them (clients can connect at once), but it
is served only once the VMM core is imported: a process whose core cannot
be imported logs why and exits 2 instead of coming up half-working.
``--enable-pci`` puts every virtio device on a PCI bus (no ``pci=off`` on
the kernel command line) and lets devices be hot-plugged after boot
(docs/api.md).  ``--snapshot-version`` and ``--describe-snapshot`` print
snapshot format versions (docs/snapshots.md).
Seccomp filters (docs/seccomp.md) are installed by default;
``--seccomp-filter FILE`` takes Firecracker's JSON filter format (compiled
here), ``--no-seccomp`` installs none.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from typing import Any

from asyncvmm import FIRECRACKER_API_VERSION, __version__
from asyncvmm.exitcodes import ExitCode

# Taken at import, the earliest point Python code runs: start-up time is measured from here
# unless the jailer passes --start-time-us / --start-time-cpu-us.
_START_US = time.monotonic_ns() // 1000
_START_CPU_US = time.process_time_ns() // 1000

EXIT_OK = ExitCode.OK
EXIT_GENERIC = ExitCode.GENERIC_ERROR
EXIT_UNEXPECTED = ExitCode.UNEXPECTED_ERROR
EXIT_BAD_CONFIGURATION = ExitCode.BAD_CONFIGURATION
EXIT_ARG_PARSING = ExitCode.ARG_PARSING

DEFAULT_API_SOCK = "/run/firecracker.socket"
DEFAULT_INSTANCE_ID = "anonymous-instance"
HTTP_MAX_PAYLOAD_SIZE = 51200
_INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")


class ArgumentsError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ArgumentsError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncvmm", add_help=False, allow_abbrev=False)
    a = p.add_argument
    a("--api-sock", default=DEFAULT_API_SOCK, help="Path to unix domain socket used by the API.")
    a("--id", default=DEFAULT_INSTANCE_ID, help="MicroVM unique identifier.")
    seccomp = p.add_mutually_exclusive_group()
    seccomp.add_argument("--seccomp-filter",
                         help="Path to a custom seccomp filter: Firecracker's JSON filter format "
                              "(categories vmm and vcpu), compiled by asyncvmm.")
    seccomp.add_argument("--no-seccomp", action="store_true", help="Start without seccomp filtering.")
    a("--start-time-us", type=int, help="Process start time (monotonic clock, microseconds).")
    a("--start-time-cpu-us", type=int, help="Process start CPU time (microseconds).")
    a("--parent-cpu-time-us", type=int, help="Parent process CPU time (microseconds).")
    a("--config-file", help="Path to a file that contains the microVM configuration in JSON format.")
    a("--metadata", help="Path to a file that contains metadata in JSON format to add to the mmds.")
    a("--no-api", action="store_true", help="Start without an API socket (requires --config-file).")
    a("--log-path", help="Path to a fifo or a file used for configuring the logger on startup.")
    a("--level", help="Set the logger level (Error, Warning, Info, Debug, Trace, Off).")
    a("--module", help="Set the logger module filter.")
    a("--show-level", action="store_true", help="Whether or not to output the level in the logs.")
    a("--show-log-origin", action="store_true", help="Include the file path and line number of each log.")
    a("--metrics-path", help="Path to a fifo or a file used for configuring the metrics on startup.")
    a("--boot-timer", action="store_true", help="Log the time from InstanceStart to the guest's boot-done write.")
    a("--version", action="store_true", help="Print the binary version number.")
    a("--snapshot-version", action="store_true", help="Print the supported snapshot data format version.")
    a("--describe-snapshot", help="Print the data format version of the provided snapshot state file.")
    a("--http-api-max-payload-size", type=int, default=HTTP_MAX_PAYLOAD_SIZE,
      help="Http API request payload max size, in bytes.")
    a("--mmds-size-limit", type=int, help="Mmds data store limit, in bytes (default: the payload size).")
    a("--enable-pci", action="store_true",
      help="Enable PCIe support: virtio devices on a PCI bus, hot-plug after boot.")
    a("--help", "-h", action="store_true", help="Print this help.")
    return p


def _normalize(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept Firecracker-style single-dash long flags (``-api-sock``) as ``--api-sock``."""
    longs = {s for action in parser._actions for s in action.option_strings if s.startswith("--")}
    return ["-" + arg if "-" + arg.split("=", 1)[0] in longs else arg for arg in argv]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(_normalize(argv, parser))
    if args.no_api and not args.config_file:
        raise ArgumentsError("Argument 'no-api' requires the following arguments: 'config-file'")
    for name in ("http_api_max_payload_size", "mmds_size_limit"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ArgumentsError(f"'{name.replace('_', '-')}' must be a positive number of bytes")
    if not _INSTANCE_ID_RE.fullmatch(args.id):
        raise ArgumentsError(
            f"Invalid instance ID: {args.id!r}: up to 64 alphanumeric characters or '-'"
        )
    return args


def version_text() -> str:
    return f"Firecracker v{FIRECRACKER_API_VERSION}\nasyncvmm v{__version__}\n"


def _snapshot_version(path: str | None) -> int:
    """``--snapshot-version`` (the format this build writes) or ``--describe-snapshot PATH``."""
    from asyncvmm.snapshot.format import FORMAT_VERSION, SnapshotFormatError, file_version, read_bounded

    if path is None:
        print(f"v{FORMAT_VERSION}.0.0")
        return EXIT_OK
    try:
        version = file_version(read_bounded(path))
    except SnapshotFormatError as err:
        print(f"Error: --describe-snapshot: {err}", file=sys.stderr)
        return EXIT_GENERIC
    print(f"v{version}.0.0")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("ASYNCVMM_FORKSERVER"):  # a thin launcher instead: docs/forkserver.md
        from asyncvmm.forkserver import launcher
        path = launcher.server_path()
        if path is not None:
            return launcher.main(argv, path)
    try:
        args = parse_args(argv)
    except ArgumentsError as err:
        print(f"Arguments parsing error: {err} \n\nFor more information try --help.", file=sys.stderr)
        return EXIT_ARG_PARSING
    if args.help:
        print(version_text())
        print(build_parser().format_help())
        return EXIT_OK
    if args.version:
        print(version_text())
        return EXIT_OK
    if args.snapshot_version or args.describe_snapshot is not None:
        return _snapshot_version(args.describe_snapshot)
    # Bind first, before the heavy imports: clients polling for the socket can connect at
    # once (their requests queue until the server runs).  A failure is logged once the
    # logger exists, as Firecracker does.
    api_sock: Any = None
    bind_error: OSError | None = None
    if not args.no_api:
        from asyncvmm.http import bind_api_socket

        try:
            api_sock = bind_api_socket(args.api_sock)
        except OSError as err:
            bind_error = err
    try:
        return run(args, api_sock, bind_error)
    finally:
        if api_sock is not None:  # ours: remove it so the path can be reused
            api_sock.close()
            try:
                os.unlink(args.api_sock)
            except OSError:
                pass


def run(args: argparse.Namespace, api_sock: Any = None, bind_error: OSError | None = None) -> int:
    """Configure logging and metrics, then serve the API and/or boot the config file."""
    import asyncio

    from asyncvmm.config import LoggerConfig
    from asyncvmm.controller import os_error_text
    from asyncvmm.logger import Logger, LoggerMetrics
    from asyncvmm.metrics import MetricsRegistry
    from asyncvmm.metrics_writer import MetricsWriter

    logger_metrics = LoggerMetrics()
    logger = Logger(args.id, metrics=logger_metrics)
    try:
        logger.apply(LoggerConfig(log_path=args.log_path, level=args.level, module=args.module,
                                  show_level=args.show_level or None,
                                  show_log_origin=args.show_log_origin or None))
    except ValueError:
        print(f"Error: Invalid value for logger level: {args.level}.Possible values: "
              "[Error, Warning, Info, Debug]", file=sys.stderr)
        return EXIT_BAD_CONFIGURATION
    except OSError as err:
        print(f"Error: Could not initialize logger: {err}", file=sys.stderr)
        return EXIT_GENERIC
    log = logging.getLogger(__name__)
    log.info("Running Firecracker v%s (asyncvmm v%s)", FIRECRACKER_API_VERSION, __version__)
    try:  # the VMM core, before anything is served: without it the process must not come up
        import asyncvmm.vmm  # noqa: F401
    except Exception:
        log.error("The VMM core (asyncvmm.vmm) cannot be imported; exiting before serving "
                  "the API.", exc_info=True)
        return EXIT_UNEXPECTED
    seccomp = _seccomp_filters(args, log)
    if seccomp is False:
        return EXIT_GENERIC          # Firecracker's code for a seccomp filter it cannot use

    registry = MetricsRegistry()
    registry.register("logger", logger_metrics)
    writer = MetricsWriter(registry, logger_metrics=logger_metrics)
    if args.metrics_path is not None:
        try:
            writer.init(args.metrics_path)
        except OSError as err:
            log.error("Could not initialize metrics: %s", err)
            return EXIT_GENERIC
    texts: dict[str, str] = {}
    for flag, what in (("config_file", "configuration file"), ("metadata", "metadata file")):
        path = getattr(args, flag)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as f:
                    texts[flag] = f.read()
            except OSError as err:
                log.error("Unable to open or read from the %s %s: %s", what, path, os_error_text(err))
                return EXIT_BAD_CONFIGURATION
            except UnicodeDecodeError as err:
                log.error("The %s %s is not UTF-8 text: %s", what, path, err)
                return EXIT_BAD_CONFIGURATION
    if bind_error is not None:
        log.error("%s", bind_error)
        return EXIT_GENERIC
    session = _Session(args, logger, registry, writer, texts, api_sock, seccomp)
    try:
        import uvloop
    except ImportError:
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    try:
        return runner(session.run())
    except Exception:
        log.exception("Firecracker exiting with an unexpected error")
        return EXIT_UNEXPECTED


def _seccomp_filters(args: argparse.Namespace, log: logging.Logger) -> Any:
    """The thread filters to install at boot: None for --no-seccomp, False when the file is unusable."""
    if args.no_seccomp:
        log.info("Starting without seccomp filters (--no-seccomp)")
        return None
    from asyncvmm.seccomp import PolicyError, ThreadFilters

    if args.seccomp_filter is None:
        return ThreadFilters.default()
    try:
        return ThreadFilters.from_file(args.seccomp_filter)
    except OSError as err:
        log.error("Seccomp error: cannot read the filter file %s: %s", args.seccomp_filter, err.strerror)
    except PolicyError as err:
        log.error("Seccomp error: invalid filter file %s", err)
    return False


class _Session:
    """One process lifetime: the controller, its backend, the API server."""

    def __init__(self, args: argparse.Namespace, logger: Any, registry: Any, writer: Any,
                 texts: dict[str, str], api_sock: Any, seccomp: Any = None) -> None:
        self.args, self.logger, self.registry, self.writer, self.texts = args, logger, registry, writer, texts
        self.api_sock = api_sock
        self.seccomp = seccomp
        self.log = logging.getLogger(__name__)

    def _report_startup(self, api_metrics: Any) -> None:
        start_us = self.args.start_time_us if self.args.start_time_us is not None else _START_US
        api_metrics.api_server.process_startup_time_us = time.monotonic_ns() // 1000 - start_us
        cpu_start = self.args.start_time_cpu_us if self.args.start_time_cpu_us is not None else _START_CPU_US
        cpu_us = time.process_time_ns() // 1000 - cpu_start + (self.args.parent_cpu_time_us or 0)
        api_metrics.api_server.process_startup_time_cpu_us = cpu_us
        self.log.info("Process start-up took %d us (%d CPU us).",
                      api_metrics.api_server.process_startup_time_us, cpu_us)

    def _handle_stop_signals(self, loop: Any, vmm: Any) -> None:
        """SIGTERM and SIGINT stop the vCPUs (if any), restore the terminal and exit with 0."""
        import signal

        def stop(name: str) -> None:
            self.log.info("Received %s; shutting down", name)
            vmm.exit(EXIT_OK, f"received {name}")

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop, sig.name)

    async def run(self) -> int:
        import asyncio

        from asyncvmm.config import ConfigError, VmConfig, decode
        from asyncvmm.mmds.store import MmdsStore, MmdsStoreError
        from asyncvmm.controller import Action, ActionKind, Controller, ControllerError, LatenciesMetrics
        from asyncvmm.http.metrics import ApiMetrics
        from asyncvmm.vmm import Vmm  # imported by run(), before serving

        loop = asyncio.get_running_loop()
        exit_code: asyncio.Future[int] = loop.create_future()

        def on_exit(code: int) -> None:
            if not exit_code.done():
                exit_code.set_result(code)

        args = self.args
        mmds = MmdsStore(limit_bytes=args.mmds_size_limit or args.http_api_max_payload_size)
        if "metadata" in self.texts:
            try:
                mmds.put(decode(self.texts["metadata"].encode(), dict[str, Any]))
            except ConfigError as err:
                self.log.error("MMDS error: metadata provided not valid json: %s: %s", args.metadata, err)
                return EXIT_BAD_CONFIGURATION
            except MmdsStoreError as err:
                self.log.error("Populating MMDS from file failed: %s", err)
                return EXIT_GENERIC
            self.log.info("Successfully added metadata to mmds from file")
        # The guest must read the very store the API writes.
        vmm = Vmm(loop, instance_id=args.id, boot_timer=args.boot_timer, metrics=self.registry,
                  on_exit=on_exit, mmds_store=mmds, seccomp=self.seccomp, enable_pci=args.enable_pci)
        latencies = LatenciesMetrics()
        self.registry.register("latencies_us", latencies)
        controller = Controller(vmm, instance_id=args.id, mmds=mmds, latencies=latencies,
                                metrics=self.writer, configure_logger=self.logger.apply,
                                pci_enabled=args.enable_pci)
        api_metrics = ApiMetrics()
        api_metrics.register(self.registry)
        server = None
        if self.api_sock is not None:
            from asyncvmm.http.server import ApiServer

            server = ApiServer(controller, max_payload=args.http_api_max_payload_size, metrics=api_metrics)
            await server.start(args.api_sock, self.api_sock)
        self._report_startup(api_metrics)
        self._handle_stop_signals(loop, vmm)
        try:
            if "config_file" in self.texts:
                try:
                    cfg = decode(self.texts["config_file"].encode(), VmConfig)
                    await controller.configure(cfg)
                    await controller.handle(Action(ActionKind.START_MICRO_VM))
                except (ConfigError, ControllerError) as err:
                    self.log.error("Configuration for VMM from one single json failed: %s: %s",
                                   args.config_file, err)
                    return EXIT_BAD_CONFIGURATION
                self.log.info("Successfully started microvm that was configured from one single json")
            code = await exit_code
            self.log.info("Firecracker exiting with code %d", code)
            return code
        finally:
            if server is not None:
                await server.stop()
            self.writer.close()


if __name__ == "__main__":
    sys.exit(main())
