"""Cgroups for a jailed VMM, version 1 or 2, as Firecracker's jailer makes them.

A setting ``<controller>.<property>=<value>`` (``cpu.shares=10``,
``memory.max=512M``) goes into ``<hierarchy>/<parent cgroup>/<id>/<file>``
and the jailer writes its own pid there (``tasks`` in v1, ``cgroup.procs``
in v2) before it execs the VMM, which so starts inside.  v1 finds each
controller's hierarchy among the ``cgroup`` mounts; v2 uses the
``cgroup2`` mount and enables the controller (``+name`` in
``cgroup.subtree_control``) at every level down to the new cgroup.
:func:`check_available` runs with the other checks, before anything is made.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

PROC_MOUNTS = "/proc/mounts"


@dataclasses.dataclass(frozen=True)
class CgroupSetting:
    file: str          # cpu.shares
    value: str

    @property
    def controller(self) -> str:
        return self.file.split(".", 1)[0]


def _error(text: str) -> Exception:
    from .env import JailerError   # one error type for the whole jailer
    return JailerError(text)


def parse_setting(spec: str) -> CgroupSetting:
    name, sep, value = spec.partition("=")
    if not sep or not value or "=" in value or "." not in name or "/" in name or name.startswith("."):
        raise _error(f"Invalid format for cgroups: {spec}")
    return CgroupSetting(name, value)


def _mounts(mounts_text: str | None) -> list[tuple[str, str, list[str]]]:
    text = mounts_text if mounts_text is not None else Path(PROC_MOUNTS).read_text()
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            out.append((fields[1], fields[2], fields[3].split(",")))
    return out


def hierarchy(controller: str, version: int, mounts_text: str | None = None) -> Path:
    """Where ``controller``'s hierarchy is mounted; JailerError if it is not available."""
    for mount_point, fstype, options in _mounts(mounts_text):
        if version == 1 and fstype == "cgroup" and controller in options:
            return Path(mount_point)
        if version == 2 and fstype == "cgroup2":
            available = (Path(mount_point) / "cgroup.controllers").read_text().split()
            if controller in available:
                return Path(mount_point)
            raise _error(f"Controller {controller} is unavailable")
    if version == 2:
        raise _error("Hierarchy not found: cgroup2")
    raise _error(f"Controller {controller} is unavailable")


def check_available(settings: list[CgroupSetting], version: int, mounts_root: Path | None = None) -> None:
    mounts_text = (mounts_root / "mounts").read_text() if mounts_root is not None else None
    for s in settings:
        hierarchy(s.controller, version, mounts_text)


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except OSError as e:
        raise _error(f"Failed to write to {path}: {e.strerror} (os error {e.errno})") from None


def place(settings: list[CgroupSetting], version: int, parent: str, jail_id: str, pid: int) -> list[Path]:
    """Create the cgroups, write the settings, move ``pid`` in; returns the cgroups made."""
    made: list[Path] = []
    for s in settings:
        root = hierarchy(s.controller, version)
        path = root / parent / jail_id
        if path not in made:
            if version == 2:  # the controller must be enabled at every level above the new cgroup
                level = root
                for part in [*Path(parent).parts]:
                    _write(level / "cgroup.subtree_control", f"+{s.controller}")
                    level = level / part
                    level.mkdir(exist_ok=True)
                _write(level / "cgroup.subtree_control", f"+{s.controller}")
            elif s.controller == "cpuset":
                _inherit_cpuset(root, Path(parent) / jail_id)
            path.mkdir(parents=True, exist_ok=True)
            made.append(path)
        elif version == 2:
            _write(path.parent / "cgroup.subtree_control", f"+{s.controller}")
        _write(path / s.file, s.value)
    for path in made:
        _write(path / ("cgroup.procs" if version == 2 else "tasks"), str(pid))
    return made


def _inherit_cpuset(root: Path, parent: Path) -> None:
    """A v1 cpuset cgroup takes no task until cpus and mems are set: copy them down, as Firecracker does."""
    level = root
    for part in parent.parts:
        child = level / part
        child.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if not (child / name).read_text().strip():
                _write(child / name, (level / name).read_text().strip())
        level = child
