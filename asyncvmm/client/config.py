"""Apply a whole VM configuration through the API, in an order every VMM accepts.

The configuration has the shape of Firecracker's ``--config-file`` and of
``GET /vm/config`` (kebab-case top-level keys, lists for drives, pmem and
network interfaces), so the output of one VMM's ``GET /vm/config`` can
configure another.  Absent items may be ``null``; ``null`` fields inside an
item are left out of its request, as ``GET /vm/config`` reports unset
optional fields that way.  An unknown top-level key is refused before anything
is sent: nothing is silently skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from asyncvmm.client.api import _id

if TYPE_CHECKING:
    from asyncvmm.client.api import Client

# key -> (path, or path prefix for the list resources, the body field naming the item).
# Logger and metrics first, so that everything after is logged and counted; network
# interfaces before mmds-config, which names them.
RESOURCES: dict[str, tuple[str, str | None]] = {
    "logger": ("/logger", None),
    "metrics": ("/metrics", None),
    "machine-config": ("/machine-config", None),
    "cpu-config": ("/cpu-config", None),
    "boot-source": ("/boot-source", None),
    "drives": ("/drives/", "drive_id"),
    "pmem": ("/pmem/", "id"),
    "network-interfaces": ("/network-interfaces/", "iface_id"),
    "mmds-config": ("/mmds/config", None),
    "vsock": ("/vsock", None),
    "entropy": ("/entropy", None),
    "balloon": ("/balloon", None),
    "serial": ("/serial", None),
    "memory-hotplug": ("/hotplug/memory", None),
}


class ConfigShapeError(ValueError):
    """The configuration is not in the ``--config-file`` shape."""


def check_config(config: Mapping[str, Any]) -> None:
    unknown = sorted(set(config) - set(RESOURCES))
    if unknown:
        raise ConfigShapeError(f"unknown configuration keys {unknown}; known: {sorted(RESOURCES)}")
    for key, (_, id_field) in RESOURCES.items():
        value = config.get(key)
        if value is None:
            continue
        if id_field is None and not isinstance(value, Mapping):
            raise ConfigShapeError(f"{key!r} must be an object")
        if id_field is not None:
            if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
                raise ConfigShapeError(f"{key!r} must be a list of objects")
            missing = [item for item in value if not isinstance(item.get(id_field), str)]
            if missing:
                raise ConfigShapeError(f"every item of {key!r} needs a string {id_field!r}")


def requests_for(config: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ``PUT`` requests (path, body) that apply ``config``, in order."""
    check_config(config)
    out: list[tuple[str, dict[str, Any]]] = []
    for key, (path, id_field) in RESOURCES.items():
        value = config.get(key)
        if value is None:
            continue
        items = value if id_field is not None else [value]
        for item in items:
            target = path + _id(item[id_field]) if id_field is not None else path
            out.append((target, {k: v for k, v in item.items() if v is not None}))
    return out


async def apply_config(client: Client, config: Mapping[str, Any]) -> None:
    for path, json_body in requests_for(config):
        await client.request("PUT", path, json_body, expect=204)
