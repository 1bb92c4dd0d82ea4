"""Schemathesis, driven by the swagger spec, against a live ``asyncvmm`` over its Unix socket.

Per operation a bounded number of generated requests (positive and negative)
is sent; every response must be a non-5xx, declared status with a body that
conforms to the spec, and the process must stay up.  Paths the server would
create files at (logger, metrics) are redirected into the test's directory.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, settings
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.apiclient import Process, load_spec, nullable_full_config

BASE_URL = "http://asyncvmm"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FILE_FIELDS = {"/logger": "log_path", "/metrics": "metrics_path"}

schema = schemathesis.openapi.from_dict(nullable_full_config(load_spec()))


class _UnixConnection(urllib3.connection.HTTPConnection):
    def __init__(self, unix_path: str, **kwargs: Any) -> None:
        super().__init__("localhost", **kwargs)
        self.unix_path = unix_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.unix_path)
        self.sock = sock


class _UnixPool(urllib3.connectionpool.HTTPConnectionPool):
    def __init__(self, unix_path: str) -> None:
        super().__init__("localhost")
        self.unix_path = unix_path

    def _new_conn(self) -> _UnixConnection:
        return _UnixConnection(self.unix_path)


class UnixAdapter(HTTPAdapter):
    """A requests transport that sends every request to one Unix socket."""

    def __init__(self, unix_path: str) -> None:
        super().__init__()
        self.pool = _UnixPool(unix_path)

    def get_connection_with_tls_context(self, request: Any, verify: Any, proxies: Any = None, cert: Any = None) -> Any:
        return self.pool

    def get_connection(self, url: Any, proxies: Any = None) -> Any:
        return self.pool


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, requests.Session, Path]]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    proc = Process(tmp)
    session = requests.Session()
    session.mount(BASE_URL, UnixAdapter(proc.sock))
    yield proc, session, tmp
    session.close()
    assert proc.proc.poll() is None, "asyncvmm died during the run: " + proc.output()
    proc.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_spec(case: Any, server: tuple[Process, requests.Session, Path]) -> None:
    proc, session, tmp = server
    field = FILE_FIELDS.get(case.path)
    if case.method == "PUT" and field and isinstance(case.body, dict) and isinstance(case.body.get(field), str):
        case.body[field] = str(tmp / f"out-{abs(hash(case.body[field]))}")
    response = case.call(base_url=BASE_URL, session=session, timeout=30)
    # A 204 carries no body, hence no media type; every other response must declare JSON.
    checks = [c for c in CHECKS if c is not content_type_conformance] if response.status_code == 204 else CHECKS
    case.validate_response(response, checks=checks)
    assert proc.proc.poll() is None, "asyncvmm exited: " + proc.output()
