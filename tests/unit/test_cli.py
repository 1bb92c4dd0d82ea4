"""CLI flags and exit codes, the logger's line format, the metrics writer."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from typing import Any

import pytest

from asyncvmm import cli
from asyncvmm.config import LoggerConfig
from asyncvmm.logger import Logger, format_timestamp, parse_level
from asyncvmm.metrics import MetricsRegistry
from asyncvmm.metrics_writer import MetricsWriter
from asyncvmm.http.metrics import ApiMetrics


def test_defaults_are_firecrackers() -> None:
    args = cli.parse_args([])
    assert args.api_sock == "/run/firecracker.socket"
    assert args.id == "anonymous-instance"
    assert args.http_api_max_payload_size == 51200
    assert args.mmds_size_limit is None and not args.no_api and not args.boot_timer


def test_single_dash_long_flags() -> None:
    args = cli.parse_args(["-api-sock", "/tmp/x.sock", "-id", "vm-1", "--boot-timer"])
    assert (args.api_sock, args.id, args.boot_timer) == ("/tmp/x.sock", "vm-1", True)


@pytest.mark.parametrize("argv", [
    ["--no-api"],
    ["--bogus"],
    ["--seccomp-filter", "f", "--no-seccomp"],
    ["--id", "bad id!"],
    ["--id", "x" * 65],
    ["--http-api-max-payload-size", "zero"],
    ["--mmds-size-limit", "0"],
    ["--seccomp-level", "2"],  # removed from Firecracker before 1.16: unknown, as there
])
def test_bad_arguments_exit_153(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == cli.EXIT_ARG_PARSING
    assert "Arguments parsing error" in capsys.readouterr().err


def test_version_and_help(capsys: Any) -> None:
    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Firecracker v1.16.1" and out[1].startswith("asyncvmm v")
    assert cli.main(["--help"]) == 0
    assert "--api-sock" in capsys.readouterr().out


def test_bad_log_level_exits_152(tmp_path: Any, capsys: Any) -> None:
    assert cli.main(["--level", "Loud", "--api-sock", str(tmp_path / "s")]) == cli.EXIT_BAD_CONFIGURATION


def test_unreadable_config_file_exits_152(tmp_path: Any) -> None:
    argv = ["--api-sock", str(tmp_path / "s"), "--config-file", str(tmp_path / "missing.json"), "--no-api"]
    assert cli.main(argv) == cli.EXIT_BAD_CONFIGURATION


def test_log_levels() -> None:
    assert parse_level("warning") == logging.WARNING and parse_level("TRACE") < logging.DEBUG
    with pytest.raises(ValueError):
        parse_level("chatty")


def test_timestamp_is_rfc3339_with_nanoseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}", format_timestamp(1_700_000_000.5))


def test_log_line_format(tmp_path: Any) -> None:
    stream = io.StringIO()
    logger = Logger("vm-7", stream=stream)
    logging.getLogger("asyncvmm.test").info("hello %s", "world")
    logger.apply(LoggerConfig(show_level=True, show_log_origin=True))
    logging.getLogger("asyncvmm.test").warning("careful")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\S+ \[vm-7:main\] hello world", lines[0])
    assert re.fullmatch(r"\S+ \[vm-7:main:WARN:.*test_cli\.py:\d+\] careful", lines[1])
    log_path = tmp_path / "fc.log"
    logger.apply(LoggerConfig(log_path=str(log_path), level="Error"))
    logging.getLogger("asyncvmm.test").warning("dropped")
    logging.getLogger("asyncvmm.test").error("kept")
    assert "kept" in log_path.read_text() and "dropped" not in log_path.read_text()
    with pytest.raises(OSError):
        logger.apply(LoggerConfig(log_path=str(tmp_path / "no" / "dir")))
    logger.apply(LoggerConfig(log_path=os.devnull, level="Info"))


def test_metrics_writer_lines_are_deltas(tmp_path: Any) -> None:
    registry = MetricsRegistry()
    api = ApiMetrics()
    api.register(registry)
    writer = MetricsWriter(registry, clock_ms=lambda: 1234)
    assert writer.flush() is False  # no destination yet: nothing written, nothing consumed
    path = tmp_path / "metrics.json"
    writer.init(str(path))
    with pytest.raises(RuntimeError, match="Reinitialization of metrics not allowed."):
        writer.init(str(path))
    api.count("PUT", "drives", failed=True)
    api.api_server.process_startup_time_us = 500
    writer.flush()
    writer.flush()
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["utc_timestamp_ms"] == 1234
    assert first["put_api_requests"]["drive_count"] == 1 and first["put_api_requests"]["drive_fails"] == 1
    assert second["put_api_requests"]["drive_count"] == 0
    assert second["api_server"]["process_startup_time_us"] == 500  # a store, not a counter
    writer.close()


def test_metrics_writer_drops_lines_to_a_full_fifo(tmp_path: Any) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = MetricsWriter(MetricsRegistry(), clock_ms=lambda: 0)
    writer.init(str(fifo))  # no reader: must not block
    for _ in range(5000):
        writer.flush()
    assert writer.logger_metrics.missed_metrics_count > 0
    writer.close()


# -- --enable-pci reaches the VMM and the controller ------------------------------------------


@pytest.mark.parametrize("argv,pci", [([], False), (["--enable-pci"], True), (["-enable-pci"], True)])
def test_enable_pci_is_passed_to_the_vmm_and_the_controller(argv: list[str], pci: bool, tmp_path: Any,
                                                            monkeypatch: Any) -> None:
    import asyncvmm.controller
    import asyncvmm.vmm

    seen: dict[str, Any] = {}

    class Vmm:
        def __init__(self, loop: Any, *, on_exit: Any, enable_pci: bool, **_: Any) -> None:
            seen["vmm"] = enable_pci
            loop.call_soon(on_exit, 0)          # nothing to run: the process ends at once

        def exit(self, code: int, why: str) -> None:
            pass

    class Controller(asyncvmm.controller.Controller):
        def __init__(self, backend: Any, **kwargs: Any) -> None:
            super().__init__(backend, **kwargs)
            seen["controller"] = self.pci_enabled

    monkeypatch.setattr(asyncvmm.vmm, "Vmm", Vmm)
    monkeypatch.setattr(asyncvmm.controller, "Controller", Controller)
    assert cli.parse_args(argv).enable_pci is pci
    code = cli.main(["--api-sock", str(tmp_path / "s"), "--no-seccomp", "--log-path", str(tmp_path / "log"),
                     *argv])
    assert code == cli.EXIT_OK
    assert seen == {"vmm": pci, "controller": pci}


def test_snapshot_version_flags(tmp_path: Any, capsys: Any) -> None:
    from asyncvmm.snapshot.format import FORMAT_VERSION, MAGIC
    assert cli.main(["--snapshot-version"]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == f"v{FORMAT_VERSION}.0.0"
    state = tmp_path / "vm.snap"
    state.write_bytes(MAGIC + (7).to_bytes(4, "little") + bytes(12))
    assert cli.main(["--describe-snapshot", str(state)]) == cli.EXIT_OK
    assert capsys.readouterr().out.strip() == "v7.0.0"
    state.write_bytes(b"not a snapshot at all....")
    assert cli.main(["--describe-snapshot", str(state)]) == cli.EXIT_GENERIC
    assert "not an asyncvmm snapshot state file" in capsys.readouterr().err


def test_no_seccomp_is_accepted() -> None:
    assert cli.parse_args(["--no-seccomp"]).no_seccomp


def test_seccomp_filter_is_built_and_an_unusable_file_exits_1(tmp_path: Any) -> None:
    """--seccomp-filter takes Firecracker's JSON filter format (docs/seccomp.md); anything else
    exits 1, as Firecracker does for a filter it cannot use (152 is its code for a bad config file)."""
    assert cli.parse_args(["--seccomp-filter", "f.json"]).seccomp_filter == "f.json"
    bad = tmp_path / "filter.json"
    bad.write_text('{"vmm": {}, "vcpu": {}}')
    log = tmp_path / "log"
    code = cli.main(["--log-path", str(log), "--no-api", "--config-file", "/nonexistent",
                     "--seccomp-filter", str(bad)])
    assert code == cli.EXIT_GENERIC
    assert f"Seccomp error: invalid filter file {bad}: vmm: missing default_action" in log.read_text()
    code = cli.main(["--log-path", str(log), "--seccomp-filter", str(tmp_path / "missing.json"),
                     "--api-sock", str(tmp_path / "s")])
    assert code == cli.EXIT_GENERIC
    assert "Seccomp error: cannot read the filter file" in log.read_text()
    assert not (tmp_path / "s").exists()


def run_logged(tmp_path: Any, *argv: str) -> tuple[int, str]:
    log = tmp_path / "vmm.log"
    log.write_text("")
    code = cli.main(["--log-path", str(log), "--no-seccomp", *argv])
    return code, log.read_text()


def test_api_socket_in_a_missing_directory_names_the_path(tmp_path: Any) -> None:
    sock = tmp_path / "no-such-dir" / "api.sock"
    code, log = run_logged(tmp_path, "--api-sock", str(sock))
    assert code == cli.EXIT_GENERIC
    assert (f"Failed to open the API socket at: {sock}. No such file or directory (os error 2) "
            f"(no directory {sock.parent}).") in log
    assert "[Errno" not in log


@pytest.mark.timeout(60)  # before the fix the process served forever
def test_a_broken_vmm_core_exits_before_serving(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setitem(__import__("sys").modules, "asyncvmm.vmm", None)  # "import asyncvmm.vmm" fails
    sock = tmp_path / "api.sock"
    code, log = run_logged(tmp_path, "--api-sock", str(sock))
    assert code == cli.EXIT_UNEXPECTED
    assert "The VMM core (asyncvmm.vmm) cannot be imported; exiting before serving the API." in log
    assert "Traceback" in log and "import of asyncvmm.vmm halted" in log  # the cause
    assert "Listening on API socket" not in log and not sock.exists()


@pytest.mark.parametrize("text,reason", [
    ('{"drives": [{"drive_id": "d", "path_on_host": "/nonexistent", "is_root_device": false}]}',
     "Drive config error: Unable to create the virtio block device: Virtio backend error: "
     "Error manipulating the backing file: No such file or directory (os error 2) /nonexistent"),
    ('{\n  "boot-source": }', "invalid character at line 2 column 18"),
    ('{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "vcpu_count": 2}}', "duplicate field `vcpu_count`"),
])
def test_config_file_errors_name_the_file_and_the_reason(tmp_path: Any, text: str, reason: str) -> None:
    cfg = tmp_path / "vm.json"
    cfg.write_text(text)
    code, log = run_logged(tmp_path, "--no-api", "--config-file", str(cfg))
    assert code == cli.EXIT_BAD_CONFIGURATION
    assert f"Configuration for VMM from one single json failed: {cfg}: {reason}" in log


def test_unreadable_config_file_names_it(tmp_path: Any) -> None:
    missing = tmp_path / "missing.json"
    code, log = run_logged(tmp_path, "--no-api", "--config-file", str(missing))
    assert code == cli.EXIT_BAD_CONFIGURATION
    assert f"Unable to open or read from the configuration file {missing}: No such file or directory (os error 2)" in log
    assert "file file" not in log
