"""The aiohttp layer: wire format, headers, payload limit, metrics; a real server on a Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import pytest

from asyncvmm.mmds.store import MmdsStore
from asyncvmm.controller import Controller
from asyncvmm.http.metrics import ApiMetrics
from asyncvmm.http import ApiSocketError, SocketInUseError, bind_api_socket
from asyncvmm.http.server import ApiServer
from tests.unit.test_controller import FakeBackend


async def request(path: str, method: str, url: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A minimal HTTP/1.1 client, so the test sees exactly what goes over the socket."""
    reader, writer = await asyncio.open_unix_connection(path)
    lines = [f"{method} {url} HTTP/1.1", "Host: localhost", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None and "Content-Length" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), hdrs, payload


@pytest.fixture
async def served(tmp_path: Any) -> Any:
    path = str(tmp_path / "api.sock")
    metrics = ApiMetrics()
    server = ApiServer(Controller(FakeBackend(), mmds=MmdsStore(limit_bytes=64)), max_payload=200, metrics=metrics)
    await server.start(path)
    yield path, metrics
    await server.stop()


async def test_success_with_data_and_headers(served: Any) -> None:
    path, metrics = served
    status, hdrs, body = await request(path, "GET", "/")
    assert status == 200 and hdrs["server"] == "Firecracker API"
    assert hdrs["content-type"].startswith("application/json")
    assert json.loads(body)["state"] == "Not started"
    assert metrics.by_method["GET"].instance_info_count == 1


async def test_no_content_has_no_body(served: Any) -> None:
    status, hdrs, body = await request(served[0], "PUT", "/mmds", b'{"a": 1}')
    assert (status, body) == (204, b"")
    assert hdrs["server"] == "Firecracker API"


async def test_errors_are_400_with_fault_message(served: Any) -> None:
    path, metrics = served
    status, _, body = await request(path, "PATCH", "/boot-source", b"{}")
    assert status == 400
    assert json.loads(body) == {"fault_message": "Invalid request method and/or path: PATCH boot-source."}
    status, _, body = await request(path, "PUT", "/drives/x", b'{"drive_id": "x"}')
    assert status == 400 and json.loads(body)["fault_message"].endswith("missing field `is_root_device`.")
    assert metrics.by_method["PUT"].drive_fails == 1


async def test_empty_put_and_get_with_body(served: Any) -> None:
    path, _ = served
    assert json.loads((await request(path, "PUT", "/actions", b""))[2])["fault_message"] == "Empty PUT request."
    assert json.loads((await request(path, "GET", "/", b"{}"))[2])["fault_message"] == (
        "GET request cannot have a body."
    )


async def test_payload_limit_is_refused_from_content_length(served: Any) -> None:
    path, _ = served
    status, _, body = await request(path, "PUT", "/mmds", b"", headers={"Content-Length": "100000"})
    assert status == 400 and "larger than the limit of 200" in json.loads(body)["fault_message"]
    status, _, _ = await request(path, "PUT", "/mmds", b'{"a": "' + b"x" * 300 + b'"}')
    assert status == 400


async def test_mmds_limit_is_413(served: Any) -> None:
    status, _, body = await request(served[0], "PUT", "/mmds", b'{"a": "' + b"x" * 100 + b'"}')
    assert status == 413 and "doesn't fit" in json.loads(body)["fault_message"]


async def test_deprecation_header(served: Any) -> None:
    status, hdrs, _ = await request(served[0], "PUT", "/machine-config",
                                    b'{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "None"}')
    assert status == 204 and hdrs["deprecation"] == "true"


async def test_hot_plug_and_unplug_over_http(tmp_path: Any) -> None:
    """PUT after boot plugs, DELETE unplugs: the HTTP layer routes both to the controller."""
    kernel, disk = tmp_path / "vmlinux", tmp_path / "disk"
    kernel.write_bytes(b"\x7fELF")
    disk.write_bytes(bytes(512))
    backend = FakeBackend()
    path = str(tmp_path / "api.sock")
    server = ApiServer(Controller(backend, pci_enabled=True))
    await server.start(path)
    try:
        status, _, body = await request(path, "DELETE", "/drives/block0")
        assert (status, json.loads(body)) == (400, {"fault_message": (
            "The requested operation is not supported before starting the microVM.")})
        for method, url, payload in (("PUT", "/boot-source", {"kernel_image_path": str(kernel)}),
                                     ("PUT", "/actions", {"action_type": "InstanceStart"}),
                                     ("PUT", "/drives/block0", {"drive_id": "block0", "is_root_device": False,
                                                                "path_on_host": str(disk)})):
            assert (await request(path, method, url, json.dumps(payload).encode()))[0] == 204
        assert backend.calls[-1][0] == "hotplug_drive"
        drives = json.loads((await request(path, "GET", "/vm/config"))[2])["drives"]
        assert [d["drive_id"] for d in drives] == ["block0"]
        status, _, body = await request(path, "DELETE", "/drives/block0", b"{}")
        assert (status, json.loads(body)["fault_message"]) == (400, "Empty Delete request.")
        status, hdrs, body = await request(path, "DELETE", "/drives/block0")
        assert (status, body, hdrs["server"]) == (204, b"", "Firecracker API")
        assert backend.calls[-1] == ("unplug_device", ("drive", "block0"))
        status, _, body = await request(path, "DELETE", "/drives/block0")
        assert (status, json.loads(body)["fault_message"]) == (400, "Device not found")
    finally:
        await server.stop()


async def test_existing_socket_path_is_refused(tmp_path: Any) -> None:
    path = str(tmp_path / "busy.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)  # bound, nobody listening: Firecracker refuses this too
    server = ApiServer(Controller(FakeBackend()))
    with pytest.raises(SocketInUseError, match="Failed to open the API socket at: .*busy.sock"):
        await server.start(path)
    stale.close()
    assert os.path.exists(path)


@pytest.mark.parametrize("name,reason", [
    ("missing/api.sock", "No such file or directory (os error 2) (no directory {dir})."),
    ("x" * 120 + ".sock", "AF_UNIX path too long."),
])
def test_unbindable_socket_paths_are_named(tmp_path: Any, name: str, reason: str) -> None:
    path = tmp_path / name
    with pytest.raises(ApiSocketError) as err:
        bind_api_socket(str(path))
    assert str(err.value) == f"Failed to open the API socket at: {path}. " + reason.format(dir=path.parent)


async def test_a_handler_bug_costs_one_request_not_the_server(tmp_path: Any) -> None:
    class Broken(Controller):
        async def handle(self, action: Any) -> Any:
            raise KeyError("boom")

    path = str(tmp_path / "api.sock")
    server = ApiServer(Broken(FakeBackend()))
    await server.start(path)
    try:
        status, hdrs, body = await request(path, "GET", "/")
        assert status == 400 and "Internal error" in json.loads(body)["fault_message"]
        assert hdrs["server"] == "Firecracker API"
    finally:
        await server.stop()
