"""Requests in, controller actions out: one pure ``parse_<verb>_<resource>`` per endpoint.

Contract: ``parse_request(method, path, body)`` takes the HTTP method, the
URL path and the raw body (``None`` when there is none) and returns a
:class:`ParsedRequest` or raises :class:`RequestError` with Firecracker's
exact ``fault_message``.  No I/O and no state: the VM's phase is the
controller's business.  Routing follows Firecracker: the first path segment
names the resource, ``GET``/``DELETE`` with a body and ``PUT``/``PATCH``
without one are refused before routing, and anything unknown is ``Invalid
request method and/or path: <METHOD> <resource>.``  ``DELETE`` (hot-unplug)
routes only ``/drives/{id}``, ``/network-interfaces/{id}`` and ``/pmem/{id}``;
Firecracker's swagger file does not list it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from asyncvmm import config as c
from asyncvmm.controller import Action, ActionKind, DeviceKind, VirtioDeviceId

K = ActionKind


class RequestError(Exception):
    """A request that cannot become an action; always a 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclasses.dataclass(frozen=True)
class ParsedRequest:
    action: Action
    deprecation: str | None = None


def _decode(body: bytes, type_: Any) -> Any:
    try:
        return c.decode(body, type_)
    except c.ConfigError as err:
        raise RequestError(
            f"An error occurred when deserializing the json body of a request: {err.message}."
        ) from None


def _mmds_document(body: bytes) -> dict[str, Any]:
    """MMDS bodies are ``MmdsContentsObject``: a JSON object.  Firecracker would store any JSON
    value, but a non-object could then never be read back within the spec, so it is refused."""
    doc = _decode(body, Any)
    if not isinstance(doc, dict):
        kind = "null" if doc is None else type(doc).__name__
        raise RequestError(
            "An error occurred when deserializing the json body of a request: "
            f"invalid type: {kind}, expected a JSON object."
        )
    return doc


def _id(token: str | None) -> str:
    try:
        return c.check_id(token or "")
    except c.ConfigError as err:
        raise RequestError(err.message) from None


def _same_id(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise RequestError("The id from the path does not match the id from the body!")


def _sync(kind: ActionKind, payload: Any = None, deprecation: str | None = None) -> ParsedRequest:
    return ParsedRequest(Action(kind, payload), deprecation)


def invalid_path(method: str, resource: str) -> RequestError:
    return RequestError(f"Invalid request method and/or path: {method} {resource}.")


# -- GET ---------------------------------------------------------------------------


def parse_get_instance_info(tokens: list[str]) -> ParsedRequest:
    return _sync(K.GET_INSTANCE_INFO)


def parse_get_version(tokens: list[str]) -> ParsedRequest:
    return _sync(K.GET_VMM_VERSION)


def parse_get_machine_config(tokens: list[str]) -> ParsedRequest:
    return _sync(K.GET_MACHINE_CONFIG)


def parse_get_mmds(tokens: list[str]) -> ParsedRequest:
    return _sync(K.GET_MMDS)


def parse_get_vm(tokens: list[str]) -> ParsedRequest:
    if tokens[1:2] == ["config"]:
        return _sync(K.GET_FULL_VM_CONFIG)
    raise invalid_path("GET", "vm")


def parse_get_hotplug(tokens: list[str]) -> ParsedRequest:
    if tokens[1:2] == ["memory"]:
        return _sync(K.GET_MEMORY_HOTPLUG_STATUS)
    raise invalid_path("GET", "hotplug")


def parse_get_balloon(tokens: list[str]) -> ParsedRequest:
    sub = tokens[1] if len(tokens) > 1 else None
    if sub is None:
        return _sync(K.GET_BALLOON_CONFIG)
    if sub == "statistics":
        return _sync(K.GET_BALLOON_STATS)
    if sub == "hinting":
        leaf = tokens[2] if len(tokens) > 2 else ""
        if leaf == "status":
            return _sync(K.GET_FREE_PAGE_HINTING_STATUS)
        raise RequestError(f"Unrecognized GET request path `/hinting/{leaf}`.")
    raise RequestError(f"Unrecognized GET request path `{sub}`.")


# -- PUT ---------------------------------------------------------------------------


def parse_put_actions(tokens: list[str], body: bytes) -> ParsedRequest:
    info = _decode(body, c.InstanceActionConfig)
    kinds = {
        "FlushMetrics": K.FLUSH_METRICS,
        "InstanceStart": K.START_MICRO_VM,
        "SendCtrlAltDel": K.SEND_CTRL_ALT_DEL,
    }
    return _sync(kinds[info.action_type])


def parse_put_balloon(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.SET_BALLOON_DEVICE, _decode(body, c.BalloonConfig))


def parse_put_boot_source(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.CONFIGURE_BOOT_SOURCE, _decode(body, c.BootSourceConfig))


def parse_put_cpu_config(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.PUT_CPU_CONFIGURATION, _decode(body, c.CpuConfig))


def parse_put_drives(tokens: list[str], body: bytes) -> ParsedRequest:
    drive_id = _id(tokens[1] if len(tokens) > 1 else None)
    drive = _decode(body, c.DriveConfig)
    _same_id(drive_id, drive.drive_id)
    return _sync(K.INSERT_BLOCK_DEVICE, drive)


def parse_put_pmem(tokens: list[str], body: bytes) -> ParsedRequest:
    pmem_id = _id(tokens[1] if len(tokens) > 1 else None)
    pmem = _decode(body, c.PmemConfig)
    _same_id(pmem_id, pmem.id)
    return _sync(K.INSERT_PMEM_DEVICE, pmem)


def parse_put_logger(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.CONFIGURE_LOGGER, _decode(body, c.LoggerConfig))


def parse_put_serial(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.CONFIGURE_SERIAL, _decode(body, c.SerialConfig))


def parse_put_machine_config(tokens: list[str], body: bytes) -> ParsedRequest:
    put = _decode(body, c.MachineConfigPut)
    deprecation = "PUT /machine-config: cpu_template field is deprecated." if put.cpu_template else None
    return _sync(K.UPDATE_MACHINE_CONFIGURATION, put.to_config(), deprecation)


def parse_put_metrics(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.CONFIGURE_METRICS, _decode(body, c.MetricsConfig))


def parse_put_mmds(tokens: list[str], body: bytes) -> ParsedRequest:
    sub = tokens[1] if len(tokens) > 1 else None
    if sub is None:
        return _sync(K.PUT_MMDS, _mmds_document(body))
    if sub == "config":
        return _sync(K.SET_MMDS_CONFIGURATION, _decode(body, c.MmdsConfig))
    raise RequestError(f"Unrecognized PUT request path `{sub}`.")


def parse_put_network_interfaces(tokens: list[str], body: bytes) -> ParsedRequest:
    iface_id = _id(tokens[1] if len(tokens) > 1 else None)
    iface = _decode(body, c.NetworkInterfaceConfig)
    _same_id(iface_id, iface.iface_id)
    return _sync(K.INSERT_NETWORK_DEVICE, iface)


def parse_put_snapshot(tokens: list[str], body: bytes) -> ParsedRequest:
    sub = tokens[1] if len(tokens) > 1 else None
    if sub is None:
        raise RequestError("Missing snapshot operation type.")
    if sub == "create":
        return _sync(K.CREATE_SNAPSHOT, _decode(body, c.SnapshotCreateConfig))
    if sub == "load":
        params = _decode(body, c.SnapshotLoadConfig)
        notes = []
        if params.mem_file_path is not None:
            notes.append("PUT /snapshot/load: mem_file_path field is deprecated.")
        if params.enable_diff_snapshots is not None:
            notes.append("PUT /snapshot/load: enable_diff_snapshots field is deprecated.")
        return _sync(K.LOAD_SNAPSHOT, params, " ".join(notes) or None)
    raise invalid_path("PUT", f"/snapshot/{sub}")


def parse_put_vsock(tokens: list[str], body: bytes) -> ParsedRequest:
    vsock = _decode(body, c.VsockConfig)
    deprecation = "PUT /vsock: vsock_id field is deprecated." if vsock.vsock_id is not None else None
    return _sync(K.SET_VSOCK_DEVICE, vsock, deprecation)


def parse_put_entropy(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.SET_ENTROPY_DEVICE, _decode(body, c.EntropyConfig))


def parse_put_hotplug(tokens: list[str], body: bytes) -> ParsedRequest:
    if tokens[1:2] != ["memory"]:
        raise invalid_path("PUT", "hotplug")
    return _sync(K.SET_MEMORY_HOTPLUG_DEVICE, _decode(body, c.MemoryHotplugConfig))


# -- PATCH -------------------------------------------------------------------------


def parse_patch_balloon(tokens: list[str], body: bytes | None) -> ParsedRequest:
    sub = tokens[1] if len(tokens) > 1 else None
    if sub == "hinting":
        leaf = tokens[2] if len(tokens) > 2 else ""
        if leaf == "start":
            cmd = _decode(body, c.BalloonStartCmdConfig) if body else c.BalloonStartCmdConfig()
            return _sync(K.START_FREE_PAGE_HINTING, cmd)
        if leaf == "stop":
            return _sync(K.STOP_FREE_PAGE_HINTING)
        raise RequestError(f"Unrecognized PATCH request path `/hinting/{leaf}`.")
    if body is None:
        raise RequestError("Empty PATCH request.")
    if sub == "statistics":
        return _sync(K.UPDATE_BALLOON_STATISTICS, _decode(body, c.BalloonStatsUpdateConfig))
    return _sync(K.UPDATE_BALLOON, _decode(body, c.BalloonUpdateConfig))


def parse_patch_drives(tokens: list[str], body: bytes) -> ParsedRequest:
    drive_id = _id(tokens[1] if len(tokens) > 1 else None)
    update = _decode(body, c.DriveUpdateConfig)
    _same_id(drive_id, update.drive_id)
    return _sync(K.UPDATE_BLOCK_DEVICE, update)


def parse_patch_pmem(tokens: list[str], body: bytes) -> ParsedRequest:
    pmem_id = _id(tokens[1] if len(tokens) > 1 else None)
    update = _decode(body, c.PmemUpdateConfig)
    _same_id(pmem_id, update.id)
    return _sync(K.UPDATE_PMEM_DEVICE, update)


def parse_patch_machine_config(tokens: list[str], body: bytes) -> ParsedRequest:
    update = _decode(body, c.MachineConfigUpdate)
    if update.is_empty():
        raise RequestError("Empty PATCH request.")
    deprecation = "PATCH /machine-config: cpu_template field is deprecated." if update.cpu_template else None
    return _sync(K.UPDATE_MACHINE_CONFIGURATION, update, deprecation)


def parse_patch_mmds(tokens: list[str], body: bytes) -> ParsedRequest:
    return _sync(K.PATCH_MMDS, _mmds_document(body))


def parse_patch_network_interfaces(tokens: list[str], body: bytes) -> ParsedRequest:
    iface_id = _id(tokens[1] if len(tokens) > 1 else None)
    update = _decode(body, c.NetworkInterfaceUpdateConfig)
    _same_id(iface_id, update.iface_id)
    return _sync(K.UPDATE_NETWORK_INTERFACE, update)


def parse_patch_vm(tokens: list[str], body: bytes) -> ParsedRequest:
    vm = _decode(body, c.VmStateConfig)
    return _sync(K.PAUSE if vm.state == "Paused" else K.RESUME)


def parse_patch_hotplug(tokens: list[str], body: bytes) -> ParsedRequest:
    if tokens[1:2] != ["memory"]:
        raise invalid_path("PATCH", "hotplug")
    return _sync(K.UPDATE_MEMORY_HOTPLUG_SIZE, _decode(body, c.MemoryHotplugSizeUpdateConfig))


# -- DELETE (PCI hot-unplug) -------------------------------------------------------------


def _unplug(kind: DeviceKind, tokens: list[str]) -> ParsedRequest:
    return _sync(K.HOT_UNPLUG_DEVICE, VirtioDeviceId(kind, _id(tokens[1] if len(tokens) > 1 else None)))


def parse_delete_drives(tokens: list[str]) -> ParsedRequest:
    return _unplug("drive", tokens)


def parse_delete_network_interfaces(tokens: list[str]) -> ParsedRequest:
    return _unplug("net", tokens)


def parse_delete_pmem(tokens: list[str]) -> ParsedRequest:
    return _unplug("pmem", tokens)


# -- routing -----------------------------------------------------------------------

GET_ROUTES: dict[str, Callable[[list[str]], ParsedRequest]] = {
    "": parse_get_instance_info,
    "balloon": parse_get_balloon,
    "version": parse_get_version,
    "vm": parse_get_vm,
    "machine-config": parse_get_machine_config,
    "mmds": parse_get_mmds,
    "hotplug": parse_get_hotplug,
}
PUT_ROUTES: dict[str, Callable[[list[str], bytes], ParsedRequest]] = {
    "actions": parse_put_actions,
    "balloon": parse_put_balloon,
    "boot-source": parse_put_boot_source,
    "cpu-config": parse_put_cpu_config,
    "drives": parse_put_drives,
    "pmem": parse_put_pmem,
    "logger": parse_put_logger,
    "serial": parse_put_serial,
    "machine-config": parse_put_machine_config,
    "metrics": parse_put_metrics,
    "mmds": parse_put_mmds,
    "network-interfaces": parse_put_network_interfaces,
    "snapshot": parse_put_snapshot,
    "vsock": parse_put_vsock,
    "entropy": parse_put_entropy,
    "hotplug": parse_put_hotplug,
}
PATCH_ROUTES: dict[str, Callable[[list[str], bytes], ParsedRequest]] = {
    "drives": parse_patch_drives,
    "pmem": parse_patch_pmem,
    "machine-config": parse_patch_machine_config,
    "mmds": parse_patch_mmds,
    "network-interfaces": parse_patch_network_interfaces,
    "vm": parse_patch_vm,
    "hotplug": parse_patch_hotplug,
}
DELETE_ROUTES: dict[str, Callable[[list[str]], ParsedRequest]] = {
    "drives": parse_delete_drives,
    "network-interfaces": parse_delete_network_interfaces,
    "pmem": parse_delete_pmem,
}


def split_path(path: str) -> list[str]:
    """``/drives/root`` -> ``["drives", "root"]``; ``/`` -> ``[""]``; a trailing ``/`` is ignored."""
    tokens = path.lstrip("/").split("/")
    if len(tokens) > 1 and tokens[-1] == "":
        tokens.pop()
    return tokens


def parse_request(method: str, path: str, body: bytes | None) -> ParsedRequest:
    """Route one request; ``body`` is ``None`` when the request has none."""
    tokens = split_path(path)
    resource = tokens[0]
    if method == "GET":
        if body is not None:
            raise RequestError("GET request cannot have a body.")
        if resource in GET_ROUTES:
            return GET_ROUTES[resource](tokens)
    elif method == "PUT":
        if body is None:
            raise RequestError("Empty PUT request.")
        if resource in PUT_ROUTES:
            return PUT_ROUTES[resource](tokens, body)
    elif method == "PATCH":
        if resource == "balloon":
            return parse_patch_balloon(tokens, body)
        if body is None:
            raise RequestError("Empty PATCH request.")
        if resource in PATCH_ROUTES:
            return PATCH_ROUTES[resource](tokens, body)
    elif method == "DELETE":
        if body is not None:          # Firecracker's words for a DELETE that has a body
            raise RequestError("Empty Delete request.")
        if resource in DELETE_ROUTES:
            return DELETE_ROUTES[resource](tokens)
    raise invalid_path(method, resource)
