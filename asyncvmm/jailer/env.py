"""The jailer's command line, checked completely before anything is created.

Firecracker 1.16's jailer flags and messages (docs/jailer.md).  :func:`parse`
turns argv into a :class:`JailEnv` or raises :class:`JailerError` with
Firecracker's text; it reads the filesystem (the exec file, the chroot base,
the network namespace, the cgroup hierarchy) but changes nothing, so a bad
invocation leaves no directory, cgroup or device node behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

from . import cgroups

DEFAULT_CHROOT_BASE = "/srv/jailer"
ID_MAX_LEN = 64
_ID_CHAR = re.compile(r"[A-Za-z0-9-]")
RLIMITS = {"fsize", "no-file"}
# Firecracker's jailer bounds the open files to this when --resource-limit does not name no-file.
DEFAULT_NO_FILE = 2048


class JailerError(Exception):
    """A failure, with Firecracker's message; the jailer exits 1."""


class ArgumentsError(JailerError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ArgumentsError(message)


@dataclasses.dataclass
class JailEnv:
    id: str
    exec_file: Path               # canonical
    chroot_dir: Path              # <base>/<exec file name>/<id>/root
    uid: int
    gid: int
    netns: str | None
    daemonize: bool
    new_pid_ns: bool
    cgroups: list[cgroups.CgroupSetting]
    cgroup_version: int
    parent_cgroup: str
    resource_limits: dict[str, int]
    extra_args: list[str]

    @property
    def exec_name(self) -> str:
        return self.exec_file.name


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="asyncvmm-jailer", add_help=False, allow_abbrev=False)
    a = p.add_argument
    a("--id", help="Jail ID.")
    a("--exec-file", help="File path to exec into.")
    a("--uid", help="The user identifier the jailer switches to after exec.")
    a("--gid", help="The group identifier the jailer switches to after exec.")
    a("--chroot-base-dir", default=DEFAULT_CHROOT_BASE, help="The base folder where chroot jails are located.")
    a("--netns", help="Path to the network namespace this microVM should join.")
    a("--daemonize", action="store_true",
      help="Daemonize the jailer before exec: setsid() and standard I/O to /dev/null.")
    a("--new-pid-ns", action="store_true", help="Exec into a new PID namespace.")
    a("--cgroup", action="append", default=[],
      help="Cgroup and value to be set by the jailer: <cgroup_file>=<value> (e.g. cpu.shares=10); repeatable.")
    a("--resource-limit", action="append", default=[],
      help="Resource limit: <resource>=<value>, resource fsize or no-file; repeatable.")
    a("--cgroup-version", default="1", help="Select the cgroup version used by the jailer (1 or 2).")
    a("--parent-cgroup", help="Parent cgroup in which the cgroup of this microvm will be placed.")
    a("--version", action="store_true", help="Print the binary version number.")
    a("--help", "-h", action="store_true", help="Print this help.")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Jailer arguments, and the VMM's (everything after ``--``)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def validate_id(value: str) -> None:
    if not 1 <= len(value) <= ID_MAX_LEN:
        raise JailerError(f"Invalid instance ID: Invalid len ({len(value)});  the length must be between "
                          f"1 and {ID_MAX_LEN}")
    for i, ch in enumerate(value):
        if not _ID_CHAR.fullmatch(ch):
            raise JailerError(f"Invalid instance ID: Invalid char ({ch}) at position {i}")


def _canonical(path: str) -> Path:
    try:
        return Path(path).resolve(strict=True)
    except OSError as e:
        raise JailerError(f"Failed to canonicalize path {path}: {os.strerror(e.errno)} (os error {e.errno})") \
            from None


def _id_number(value: str, what: str) -> int:
    if not value.isdigit() or int(value) >= 2 ** 32:
        raise JailerError(f"Invalid {what}: {value}")
    return int(value)


def parse(argv: list[str], cgroup_root: Path | None = None) -> JailEnv:
    """``cgroup_root``: where the hierarchies are mounted (tests give a fake tree)."""
    ours, extra = split_argv(argv)
    args = build_parser().parse_args(ours)
    for name in ("id", "exec_file", "uid", "gid"):
        if getattr(args, name) is None:
            raise ArgumentsError(f"Argument '{name.replace('_', '-')}' required, but not found.")
    validate_id(args.id)
    exec_file = _canonical(args.exec_file)
    if not exec_file.is_file():
        raise JailerError(f"{exec_file} is not a file")
    base = _canonical(args.chroot_base_dir)
    if not base.is_dir():
        raise JailerError(f"{base} is not a directory")
    chroot_dir = base / exec_file.name / args.id / "root"
    uid = _id_number(args.uid, "uid")
    gid = _id_number(args.gid, "gid")
    parent = args.parent_cgroup if args.parent_cgroup is not None else exec_file.name
    if Path(parent).is_absolute() or any(c in (".", "..") for c in parent.split("/")):
        raise JailerError("Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'")
    if args.cgroup_version not in ("1", "2"):
        raise JailerError(f"{args.cgroup_version} is an invalid cgroup version specifier")
    version = int(args.cgroup_version)
    settings = [cgroups.parse_setting(spec) for spec in args.cgroup]
    if settings:
        cgroups.check_available(settings, version, cgroup_root)
    limits: dict[str, int] = {}
    for spec in args.resource_limit:
        name, sep, value = spec.partition("=")
        if not sep:
            raise JailerError(f"Invalid format for resources limits: {spec}")
        if not value.isdigit():
            raise JailerError(f"Invalid limit value for resource: {value}: invalid digit found in string")
        if name not in RLIMITS:
            raise JailerError(f"Invalid resource argument: {name}")
        limits[name] = int(value)
    limits.setdefault("no-file", DEFAULT_NO_FILE)
    if args.netns is not None and not os.path.exists(args.netns):
        raise JailerError(f"Failed to open file {args.netns}: No such file or directory (os error 2)")
    if chroot_dir.exists():
        # Firecracker reuses it; asyncvmm refuses: a jail left by another VM is not a fresh one.
        raise JailerError(f"Failed to create directory {chroot_dir}: File exists (os error 17)")
    return JailEnv(id=args.id, exec_file=exec_file, chroot_dir=chroot_dir, uid=uid, gid=gid,
                   netns=args.netns, daemonize=args.daemonize, new_pid_ns=args.new_pid_ns,
                   cgroups=settings, cgroup_version=version, parent_cgroup=parent,
                   resource_limits=limits, extra_args=extra)
