"""The API server's metric groups, named and shaped like Firecracker's.

``api_server`` holds the process start-up stores; ``get_api_requests``,
``put_api_requests`` and ``patch_api_requests`` count requests per resource
(``<resource>_count``) and failed ones (``<resource>_fails``);
``deprecated_api`` counts uses of deprecated fields.  No I/O here.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from asyncvmm.metrics import MetricGroup, MetricsRegistry

# Path resource -> the counter prefix Firecracker uses for it.
RESOURCE_COUNTERS = {
    "": "instance_info", "version": "vmm_version", "machine-config": "machine_cfg",
    "mmds": "mmds", "hotplug": "hotplug_memory", "actions": "actions",
    "boot-source": "boot_source", "drives": "drive", "logger": "logger", "cpu-config": "cpu_cfg",
    "metrics": "metrics", "network-interfaces": "network", "vsock": "vsock", "pmem": "pmem",
    "serial": "serial", "balloon": "balloon", "entropy": "entropy", "snapshot": "snapshot",
    "vm": "vm",
}


@dataclasses.dataclass
class ApiServerMetrics(MetricGroup):
    STORE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"process_startup_time_us", "process_startup_time_cpu_us"}
    )
    process_startup_time_us: int = 0
    process_startup_time_cpu_us: int = 0
    sync_response_fails: int = 0
    sync_vmm_send_timeout_count: int = 0


@dataclasses.dataclass
class GetRequestsMetrics(MetricGroup):
    instance_info_count: int = 0
    machine_cfg_count: int = 0
    mmds_count: int = 0
    vmm_version_count: int = 0
    hotplug_memory_count: int = 0
    balloon_count: int = 0
    vm_count: int = 0


@dataclasses.dataclass
class PutRequestsMetrics(MetricGroup):
    actions_count: int = 0
    actions_fails: int = 0
    boot_source_count: int = 0
    boot_source_fails: int = 0
    drive_count: int = 0
    drive_fails: int = 0
    logger_count: int = 0
    logger_fails: int = 0
    machine_cfg_count: int = 0
    machine_cfg_fails: int = 0
    cpu_cfg_count: int = 0
    cpu_cfg_fails: int = 0
    metrics_count: int = 0
    metrics_fails: int = 0
    network_count: int = 0
    network_fails: int = 0
    mmds_count: int = 0
    mmds_fails: int = 0
    vsock_count: int = 0
    vsock_fails: int = 0
    pmem_count: int = 0
    pmem_fails: int = 0
    serial_count: int = 0
    serial_fails: int = 0
    hotplug_memory_count: int = 0
    hotplug_memory_fails: int = 0
    balloon_count: int = 0
    balloon_fails: int = 0
    entropy_count: int = 0
    entropy_fails: int = 0
    snapshot_count: int = 0
    snapshot_fails: int = 0


@dataclasses.dataclass
class PatchRequestsMetrics(MetricGroup):
    drive_count: int = 0
    drive_fails: int = 0
    network_count: int = 0
    network_fails: int = 0
    machine_cfg_count: int = 0
    machine_cfg_fails: int = 0
    mmds_count: int = 0
    mmds_fails: int = 0
    hotplug_memory_count: int = 0
    hotplug_memory_fails: int = 0
    balloon_count: int = 0
    balloon_fails: int = 0
    pmem_count: int = 0
    pmem_fails: int = 0
    vm_count: int = 0
    vm_fails: int = 0


@dataclasses.dataclass
class DeprecatedApiMetrics(MetricGroup):
    deprecated_http_api_calls: int = 0
    deprecated_cmd_line_api_calls: int = 0


class ApiMetrics:
    """The API server's groups, registered under Firecracker's names."""

    def __init__(self) -> None:
        self.api_server = ApiServerMetrics()
        self.deprecated_api = DeprecatedApiMetrics()
        self.by_method: dict[str, MetricGroup] = {
            "GET": GetRequestsMetrics(),
            "PUT": PutRequestsMetrics(),
            "PATCH": PatchRequestsMetrics(),
        }

    def register(self, registry: MetricsRegistry) -> None:
        registry.register("api_server", self.api_server)
        registry.register("get_api_requests", self.by_method["GET"])
        registry.register("put_api_requests", self.by_method["PUT"])
        registry.register("patch_api_requests", self.by_method["PATCH"])
        registry.register("deprecated_api", self.deprecated_api)

    def count(self, method: str, resource: str, failed: bool) -> None:
        group = self.by_method.get(method)
        prefix = RESOURCE_COUNTERS.get(resource)
        if group is None or prefix is None:
            return
        for suffix, applies in (("_count", True), ("_fails", failed)):
            name = prefix + suffix
            if applies and hasattr(group, name):
                setattr(group, name, getattr(group, name) + 1)
