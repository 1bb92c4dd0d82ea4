"""Test helpers: run ``asyncvmm`` as a subprocess and talk HTTP/1.1 to its Unix socket,
validating every response against the swagger spec with jsonschema."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from benchmarks.launch import stop_process

# The contract, kept in the repository so that the tests do not depend on the checkout's location.
SPEC_PATH = Path(__file__).resolve().parents[2] / "spec" / "firecracker-api-v1.16.1.yaml"


def spec_path() -> Path:
    return SPEC_PATH


def load_spec() -> dict[str, Any]:
    with open(spec_path(), encoding="utf-8") as f:
        return yaml.safe_load(f)


def nullable_full_config(spec: dict[str, Any]) -> dict[str, Any]:
    """API-BEHAVIOUR.md requires absent items of GET /vm/config as ``null``, which swagger 2.0
    cannot express; allow exactly that, nothing else."""
    spec = json.loads(json.dumps(spec))
    props = spec["definitions"]["FullVmConfiguration"]["properties"]
    for name, schema in props.items():
        props[name] = {"anyOf": [schema, {"type": "null"}]}
    return spec


def asyncvmm_command() -> list[str]:
    script = Path(sys.executable).with_name("asyncvmm")
    if script.exists():
        return [str(script)]
    found = shutil.which("asyncvmm")
    return [found] if found else [sys.executable, "-m", "asyncvmm.cli"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def fault(self) -> str:
        return self.json()["fault_message"]


class Process:
    """One ``asyncvmm`` process with its API socket."""

    def __init__(self, tmp: Path, *extra: str, wait: bool = True) -> None:
        self.sock = str(tmp / "api.sock")
        self.log_path = tmp / "stdout.log"
        self._out = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*asyncvmm_command(), "--api-sock", self.sock, *extra],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 20.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"asyncvmm exited with {self.proc.returncode}: {self.output()}")
            if os.path.exists(self.sock):
                try:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(self.sock)
                    return time.monotonic() - self.started
                except OSError:
                    pass
            time.sleep(0.005)
        raise RuntimeError("API socket never became ready: " + self.output())

    def output(self) -> str:
        self._out.flush()
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn = UnixHTTPConnection(self.sock)
        hdrs = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        conn.close()
        return out

    def stop(self) -> int:
        code = stop_process(self.proc, 10)
        self._out.close()
        return code


class SpecValidator:
    """Checks a response against the operation's response schema in the swagger file."""

    def __init__(self) -> None:
        self.spec = nullable_full_config(load_spec())

    def operation(self, method: str, path: str) -> dict[str, Any] | None:
        for template, ops in self.spec["paths"].items():
            t_parts, p_parts = template.strip("/").split("/"), path.split("?")[0].strip("/").split("/")
            if len(t_parts) == len(p_parts) and all(
                t.startswith("{") or t == p for t, p in zip(t_parts, p_parts)
            ):
                return ops.get(method.lower())
        return None

    def check(self, method: str, path: str, resp: Response) -> None:
        assert resp.headers.get("server") == "Firecracker API", resp.headers
        if resp.status == 204:
            assert resp.body == b"", "204 must not carry a body"
            return
        assert resp.headers.get("content-type", "").startswith("application/json")
        op = self.operation(method, path)
        if op is None:
            assert resp.status == 400 and "fault_message" in resp.json()
            return
        responses = op["responses"]
        declared = responses.get(resp.status) or responses.get(str(resp.status)) or responses.get("default")
        assert declared is not None, f"{method} {path}: undeclared status {resp.status}"
        schema = declared.get("schema")
        if schema is not None:
            jsonschema.validate(resp.json(), {**schema, "definitions": self.spec["definitions"]},
                                cls=jsonschema.Draft4Validator)
