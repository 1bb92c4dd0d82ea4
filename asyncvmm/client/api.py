"""A thin typed client for Firecracker's v1.16.1 REST API over its Unix socket.

One method per operation of ``spec/firecracker-api-v1.16.1.yaml``, named after
its ``operationId`` in snake case (``putGuestDriveByID`` ->
:meth:`Client.put_guest_drive_by_id`), with the schema's fields as keyword
arguments; ``None`` leaves a field out of the body.  Nested objects
(``rate_limiter``, ``cpuid_modifiers``, ...) are plain dicts in the spec's shape.

Responses, per API-BEHAVIOUR.md: 204 -> ``None``; 200 -> the parsed JSON body;
anything else (400 and 413 carry ``{"fault_message": ...}``) -> :class:`ApiError`.
A status the operation does not declare is an error too, so a VMM that strays
from the contract is noticed.  A response carrying ``Deprecation: true`` raises a
:class:`DeprecationWarning`.  The client speaks only the public API, so it drives
asyncvmm and a real ``firecracker`` alike.

aiohttp is imported when the first request is made, not with this module.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import warnings
from typing import TYPE_CHECKING, Any, TypedDict

from asyncvmm.client.errors import ApiConnectionError, ApiError, ApiTimeoutError

if TYPE_CHECKING:
    import aiohttp

DEFAULT_TIMEOUT_S = 30.0
_NO_BODY = object()


class TokenBucket(TypedDict, total=False):
    size: int            # required
    refill_time: int     # required, milliseconds
    one_time_burst: int


class RateLimiter(TypedDict, total=False):
    bandwidth: TokenBucket
    ops: TokenBucket


class ApiDeprecationWarning(DeprecationWarning):
    """The VMM marked a request as using a deprecated field (``Deprecation: true``)."""


def body(**fields: Any) -> dict[str, Any]:
    """A JSON body from keyword arguments: ``None`` is left out, paths become strings."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v
            for k, v in fields.items() if v is not None}


def _id(resource_id: str) -> str:
    # Quoted, not checked: a bad id must reach the VMM, whose 400 names the problem.
    return urllib.parse.quote(resource_id, safe="")


class Client:
    """``async with Client("/tmp/fc.sock") as api: info = await api.describe_instance()``"""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.socket_path = os.fspath(socket_path)
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def request(self, method: str, path: str, json_body: Any = _NO_BODY, *,
                      expect: int | None = None) -> Any:
        """Send one request; ``expect`` is the operation's success status (204 or 200), or
        ``None`` to accept either.  The escape hatch for requests the typed methods cannot
        make (raw paths, bodies the spec forbids)."""
        import aiohttp

        session = self._open()
        data = None if json_body is _NO_BODY else json.dumps(json_body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with session.request(method, "http://localhost" + path, data=data,
                                       headers=headers) as resp:
                status, payload = resp.status, await resp.read()
                deprecated = resp.headers.get("Deprecation", "").lower() == "true"
        except TimeoutError as err:
            raise ApiTimeoutError(method, path, self.timeout) from err
        except aiohttp.ClientError as err:
            raise ApiConnectionError(method, path, err) from err
        if deprecated:
            warnings.warn(f"{method} {path} used a deprecated field", ApiDeprecationWarning, stacklevel=3)
        return _decode(method, path, status, payload, expect)

    async def _put(self, path: str, json_body: Any) -> None:
        return await self.request("PUT", path, json_body, expect=204)

    async def _patch(self, path: str, json_body: Any = _NO_BODY) -> None:
        return await self.request("PATCH", path, json_body, expect=204)

    async def _get(self, path: str) -> Any:
        return await self.request("GET", path, expect=200)

    # -- instance ------------------------------------------------------------------

    async def describe_instance(self) -> dict[str, Any]:
        """``GET /``: ``{"app_name", "id", "state", "vmm_version"}``."""
        return await self._get("/")

    async def get_firecracker_version(self) -> dict[str, Any]:
        return await self._get("/version")

    async def get_export_vm_config(self) -> dict[str, Any]:
        """``GET /vm/config``: the whole configuration, in the ``--config-file`` shape."""
        return await self._get("/vm/config")

    async def create_sync_action(self, action_type: str) -> None:
        """``PUT /actions``: ``InstanceStart``, ``FlushMetrics`` or ``SendCtrlAltDel``."""
        await self._put("/actions", {"action_type": action_type})

    async def patch_vm(self, state: str) -> None:
        """``PATCH /vm``: ``Paused`` or ``Resumed``."""
        await self._patch("/vm", {"state": state})

    async def start_instance(self) -> None:
        await self.create_sync_action("InstanceStart")

    async def flush_metrics(self) -> None:
        await self.create_sync_action("FlushMetrics")

    async def send_ctrl_alt_del(self) -> None:
        await self.create_sync_action("SendCtrlAltDel")

    async def pause(self) -> None:
        await self.patch_vm("Paused")

    async def resume(self) -> None:
        await self.patch_vm("Resumed")

    # -- boot and machine ------------------------------------------------------------

    async def put_guest_boot_source(self, *, kernel_image_path: str | os.PathLike[str],
                                    boot_args: str | None = None,
                                    initrd_path: str | os.PathLike[str] | None = None) -> None:
        await self._put("/boot-source", body(kernel_image_path=kernel_image_path, boot_args=boot_args,
                                             initrd_path=initrd_path))

    async def get_machine_configuration(self) -> dict[str, Any]:
        return await self._get("/machine-config")

    async def put_machine_configuration(self, *, vcpu_count: int, mem_size_mib: int, smt: bool | None = None,
                                        track_dirty_pages: bool | None = None, huge_pages: str | None = None,
                                        cpu_template: str | None = None) -> None:
        """``PUT /machine-config`` replaces everything: fields left out go back to defaults."""
        await self._put("/machine-config", body(vcpu_count=vcpu_count, mem_size_mib=mem_size_mib, smt=smt,
                                                track_dirty_pages=track_dirty_pages, huge_pages=huge_pages,
                                                cpu_template=cpu_template))

    async def patch_machine_configuration(self, *, vcpu_count: int | None = None,
                                          mem_size_mib: int | None = None, smt: bool | None = None,
                                          track_dirty_pages: bool | None = None, huge_pages: str | None = None,
                                          cpu_template: str | None = None) -> None:
        await self._patch("/machine-config", body(vcpu_count=vcpu_count, mem_size_mib=mem_size_mib, smt=smt,
                                                  track_dirty_pages=track_dirty_pages, huge_pages=huge_pages,
                                                  cpu_template=cpu_template))

    async def put_cpu_configuration(self, *, kvm_capabilities: list[str] | None = None,
                                    cpuid_modifiers: list[dict[str, Any]] | None = None,
                                    msr_modifiers: list[dict[str, Any]] | None = None,
                                    reg_modifiers: list[dict[str, Any]] | None = None,
                                    vcpu_features: list[dict[str, Any]] | None = None) -> None:
        await self._put("/cpu-config", body(kvm_capabilities=kvm_capabilities, cpuid_modifiers=cpuid_modifiers,
                                            msr_modifiers=msr_modifiers, reg_modifiers=reg_modifiers,
                                            vcpu_features=vcpu_features))

    # -- devices ---------------------------------------------------------------------

    async def put_guest_drive_by_id(self, drive_id: str, *, is_root_device: bool,
                                    path_on_host: str | os.PathLike[str] | None = None,
                                    is_read_only: bool | None = None, partuuid: str | None = None,
                                    cache_type: str | None = None, io_engine: str | None = None,
                                    rate_limiter: RateLimiter | None = None,
                                    socket: str | os.PathLike[str] | None = None) -> None:
        await self._put(f"/drives/{_id(drive_id)}", body(
            drive_id=drive_id, is_root_device=is_root_device, path_on_host=path_on_host,
            is_read_only=is_read_only, partuuid=partuuid, cache_type=cache_type, io_engine=io_engine,
            rate_limiter=rate_limiter, socket=socket))

    async def patch_guest_drive_by_id(self, drive_id: str, *, path_on_host: str | os.PathLike[str] | None = None,
                                      rate_limiter: RateLimiter | None = None) -> None:
        await self._patch(f"/drives/{_id(drive_id)}", body(drive_id=drive_id, path_on_host=path_on_host,
                                                           rate_limiter=rate_limiter))

    async def put_guest_pmem_by_id(self, id: str, *, path_on_host: str | os.PathLike[str],
                                   root_device: bool | None = None, read_only: bool | None = None,
                                   rate_limiter: RateLimiter | None = None) -> None:
        await self._put(f"/pmem/{_id(id)}", body(id=id, path_on_host=path_on_host, root_device=root_device,
                                                 read_only=read_only, rate_limiter=rate_limiter))

    async def patch_guest_pmem_by_id(self, id: str, *, rate_limiter: RateLimiter | None = None) -> None:
        await self._patch(f"/pmem/{_id(id)}", body(id=id, rate_limiter=rate_limiter))

    async def put_guest_network_interface_by_id(self, iface_id: str, *, host_dev_name: str,
                                                guest_mac: str | None = None, mtu: int | None = None,
                                                rx_rate_limiter: RateLimiter | None = None,
                                                tx_rate_limiter: RateLimiter | None = None) -> None:
        await self._put(f"/network-interfaces/{_id(iface_id)}", body(
            iface_id=iface_id, host_dev_name=host_dev_name, guest_mac=guest_mac, mtu=mtu,
            rx_rate_limiter=rx_rate_limiter, tx_rate_limiter=tx_rate_limiter))

    async def patch_guest_network_interface_by_id(self, iface_id: str, *,
                                                  rx_rate_limiter: RateLimiter | None = None,
                                                  tx_rate_limiter: RateLimiter | None = None) -> None:
        await self._patch(f"/network-interfaces/{_id(iface_id)}", body(
            iface_id=iface_id, rx_rate_limiter=rx_rate_limiter, tx_rate_limiter=tx_rate_limiter))

    async def put_guest_vsock(self, *, guest_cid: int, uds_path: str | os.PathLike[str],
                              vsock_id: str | None = None) -> None:
        """``vsock_id`` is deprecated in the spec (the response then says ``Deprecation: true``)."""
        await self._put("/vsock", body(guest_cid=guest_cid, uds_path=uds_path, vsock_id=vsock_id))

    async def put_entropy_device(self, *, rate_limiter: RateLimiter | None = None) -> None:
        await self._put("/entropy", body(rate_limiter=rate_limiter))

    async def put_serial_device(self, *, serial_out_path: str | os.PathLike[str] | None = None,
                                rate_limiter: TokenBucket | None = None) -> None:
        await self._put("/serial", body(serial_out_path=serial_out_path, rate_limiter=rate_limiter))

    # -- balloon ---------------------------------------------------------------------

    async def describe_balloon_config(self) -> dict[str, Any]:
        return await self._get("/balloon")

    async def put_balloon(self, *, amount_mib: int, deflate_on_oom: bool,
                          stats_polling_interval_s: int | None = None, free_page_hinting: bool | None = None,
                          free_page_reporting: bool | None = None) -> None:
        await self._put("/balloon", body(amount_mib=amount_mib, deflate_on_oom=deflate_on_oom,
                                         stats_polling_interval_s=stats_polling_interval_s,
                                         free_page_hinting=free_page_hinting,
                                         free_page_reporting=free_page_reporting))

    async def patch_balloon(self, *, amount_mib: int) -> None:
        await self._patch("/balloon", {"amount_mib": amount_mib})

    async def describe_balloon_stats(self) -> dict[str, Any]:
        return await self._get("/balloon/statistics")

    async def patch_balloon_stats_interval(self, *, stats_polling_interval_s: int) -> None:
        await self._patch("/balloon/statistics", {"stats_polling_interval_s": stats_polling_interval_s})

    async def start_balloon_hinting(self, *, acknowledge_on_stop: bool | None = None) -> None:
        """The body is optional in the spec: sent only when a field is given."""
        fields = body(acknowledge_on_stop=acknowledge_on_stop)
        await self._patch("/balloon/hinting/start", *([fields] if fields else []))

    async def describe_balloon_hinting(self) -> dict[str, Any]:
        return await self._get("/balloon/hinting/status")

    async def stop_balloon_hinting(self) -> None:
        await self._patch("/balloon/hinting/stop")

    # -- memory hotplug --------------------------------------------------------------

    async def put_memory_hotplug(self, *, total_size_mib: int | None = None, slot_size_mib: int | None = None,
                                 block_size_mib: int | None = None) -> None:
        await self._put("/hotplug/memory", body(total_size_mib=total_size_mib, slot_size_mib=slot_size_mib,
                                                block_size_mib=block_size_mib))

    async def patch_memory_hotplug(self, *, requested_size_mib: int | None = None) -> None:
        await self._patch("/hotplug/memory", body(requested_size_mib=requested_size_mib))

    async def get_memory_hotplug(self) -> dict[str, Any]:
        return await self._get("/hotplug/memory")

    # -- logger and metrics ----------------------------------------------------------

    async def put_logger(self, *, log_path: str | os.PathLike[str] | None = None, level: str | None = None,
                         show_level: bool | None = None, show_log_origin: bool | None = None,
                         module: str | None = None) -> None:
        await self._put("/logger", body(log_path=log_path, level=level, show_level=show_level,
                                        show_log_origin=show_log_origin, module=module))

    async def put_metrics(self, *, metrics_path: str | os.PathLike[str]) -> None:
        await self._put("/metrics", body(metrics_path=metrics_path))

    # -- MMDS ------------------------------------------------------------------------

    async def put_mmds(self, contents: dict[str, Any]) -> None:
        """Replace the whole MMDS data store."""
        await self._put("/mmds", contents)

    async def patch_mmds(self, contents: dict[str, Any]) -> None:
        """Merge into the MMDS data store (JSON merge patch)."""
        await self._patch("/mmds", contents)

    async def get_mmds(self) -> Any:
        return await self._get("/mmds")

    async def put_mmds_config(self, *, network_interfaces: list[str], version: str | None = None,
                              ipv4_address: str | None = None, imds_compat: bool | None = None) -> None:
        await self._put("/mmds/config", body(network_interfaces=network_interfaces, version=version,
                                             ipv4_address=ipv4_address, imds_compat=imds_compat))

    # -- snapshots -------------------------------------------------------------------

    async def create_snapshot(self, *, mem_file_path: str | os.PathLike[str],
                              snapshot_path: str | os.PathLike[str], snapshot_type: str | None = None) -> None:
        await self._put("/snapshot/create", body(mem_file_path=mem_file_path, snapshot_path=snapshot_path,
                                                 snapshot_type=snapshot_type))

    async def load_snapshot(self, *, snapshot_path: str | os.PathLike[str],
                            mem_backend: dict[str, Any] | None = None,
                            mem_file_path: str | os.PathLike[str] | None = None,
                            track_dirty_pages: bool | None = None, enable_diff_snapshots: bool | None = None,
                            resume_vm: bool | None = None, network_overrides: list[dict[str, Any]] | None = None,
                            vsock_override: dict[str, Any] | None = None,
                            clock_realtime: bool | None = None) -> None:
        await self._put("/snapshot/load", body(
            snapshot_path=snapshot_path, mem_backend=mem_backend, mem_file_path=mem_file_path,
            track_dirty_pages=track_dirty_pages, enable_diff_snapshots=enable_diff_snapshots,
            resume_vm=resume_vm, network_overrides=network_overrides, vsock_override=vsock_override,
            clock_realtime=clock_realtime))


def _decode(method: str, path: str, status: int, payload: bytes, expect: int | None) -> Any:
    """One response -> ``None``, the parsed body, or :class:`ApiError`."""
    text = payload.decode("utf-8", errors="replace")
    ok = (204, 200) if expect is None else (expect,)
    if status in ok:
        if status == 204:
            if payload:
                raise ApiError(status, f"a 204 response carried a body: {text[:200]}", method, path)
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise ApiError(status, f"the 200 response is not JSON: {text[:200]}", method, path) from None
    fault = text
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("fault_message"), str):
        fault = parsed["fault_message"]
    elif 200 <= status < 300:
        fault = f"expected {expect}, got {status}: {text[:200]}"
    raise ApiError(status, fault, method, path)
