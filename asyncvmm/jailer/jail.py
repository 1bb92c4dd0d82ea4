"""The jailer's privileged steps, in order (docs/jailer.md); runs as root, ends in exec.

1. cgroups made and the jailer moved in; resource limits set;
2. the network namespace joined (pyroute2);
3. ``<base>/<exec name>/<id>/root`` made and the exec file copied in;
4. a new mount namespace: ``/`` made a slave, the chroot bind-mounted onto
   itself, the Python runtime bind-mounted **read-only** at the same paths
   (so the copied launcher's ``#!`` line and every import resolve inside),
   ``/dev/kvm``, ``/dev/net/tun``, ``/dev/userfaultfd`` made with ``mknod``
   and given to the uid, ``/``, ``/dev``, ``/dev/net``, ``/run`` made 0700
   and given to the uid; ``pivot_root`` into it, the old root detached;
5. optionally a new PID namespace (the jailer forks; the child, pid 1 there,
   goes on; the parent writes ``/<exec name>.pid`` and exits 0);
6. optionally daemonized (``setsid``, standard I/O on ``/dev/null``);
7. supplementary groups dropped, gid then uid set;
8. ``execve("/<exec name>", ["--id", id, start times..., args after --])``
   with an empty environment.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import NoReturn

from . import cgroups
from .env import JailEnv, JailerError

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 0x2
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
SYS_PIVOT_ROOT = 155
FOLDER_PERMISSIONS = 0o700
OLD_ROOT = "old_root"

# (path in the jail, major, minor) of the devices the VMM opens; userfaultfd's minor is dynamic.
DEVICES = (("/dev/kvm", 10, 232), ("/dev/net/tun", 10, 200))
USERFAULTFD = "/dev/userfaultfd"

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise JailerError(f"{what}: {os.strerror(e)} (os error {e})")


def _mount(src: str | None, target: str, flags: int, what: str) -> None:
    _check(_libc.mount(src.encode() if src else None, target.encode(), None, flags, None), what)


def runtime_paths() -> list[Path]:
    """What the Python VMM needs to start inside the jail, each bound read-only at its own path:
    the interpreter's prefix, the virtual environment, the asyncvmm package, and /usr (libc and
    the shared libraries the interpreter and the extension modules link against)."""
    import asyncvmm

    paths = [Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(asyncvmm.__file__).parent.resolve(),
             Path("/usr")]
    out: list[Path] = []
    for p in paths:  # nested paths (a venv inside the prefix) need no mount of their own
        if not any(p == q or q in p.parents for q in out):
            out = [q for q in out if p not in q.parents] + [p]
    return out


def _rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        which = resource.RLIMIT_FSIZE if name == "fsize" else resource.RLIMIT_NOFILE
        try:
            resource.setrlimit(which, (value, value))
        except (OSError, ValueError) as e:
            raise JailerError(f"Failed to set limit for resource: {e}") from None


def _join_netns(path: str) -> None:
    from pyroute2 import netns

    try:
        netns.setns(path, flags=0)
    except OSError as e:
        raise JailerError(f"Failed to join network namespace: netns: {e.strerror} (os error {e.errno})") from None


def _make_chroot(env: JailEnv) -> None:
    try:
        env.chroot_dir.parent.mkdir(parents=True, exist_ok=True)
        env.chroot_dir.mkdir()
    except OSError as e:
        raise JailerError(f"Failed to create directory {env.chroot_dir}: {e.strerror} (os error {e.errno})") from None
    target = env.chroot_dir / env.exec_name
    try:
        shutil.copy2(env.exec_file, target)
    except OSError as e:
        raise JailerError(f"Failed to copy {env.exec_file} to {target}: {e.strerror} (os error {e.errno})") from None


def _bind_read_only(src: Path, root: Path) -> None:
    target = root / src.relative_to("/")
    target.mkdir(parents=True, exist_ok=True)
    _mount(str(src), str(target), MS_BIND, f"Failed to bind mount {src}")
    _mount(None, str(target), MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV,
           f"Failed to remount {src} read-only")


def _mknod_owned(path: str, major: int, minor: int, uid: int, gid: int) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | stat.S_IRUSR | stat.S_IWUSR, os.makedev(major, minor))
        os.chown(path, uid, gid)
    except OSError as e:
        raise JailerError(f"Failed to create {path} via mknod inside the jail: {e.strerror} "
                          f"(os error {e.errno})") from None


def _userfaultfd_numbers() -> tuple[int, int] | None:
    try:
        rdev = os.stat(USERFAULTFD).st_rdev
        return os.major(rdev), os.minor(rdev)
    except OSError:
        pass
    try:
        major, minor = Path("/sys/devices/virtual/misc/userfaultfd/dev").read_text().split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None       # a kernel without it: the VMM never asks for it either


def _enter_jail(env: JailEnv) -> None:
    root = str(env.chroot_dir)
    uffd = _userfaultfd_numbers()
    _check(_libc.unshare(CLONE_NEWNS), "Failed to unshare into new mount namespace")
    _mount(None, "/", MS_SLAVE | MS_REC, "Failed to change the propagation type to slave")
    _mount(root, root, MS_BIND | MS_REC, "Failed to bind mount the jail root directory")
    for path in runtime_paths():
        _bind_read_only(path, env.chroot_dir)
    for top in ("lib", "lib64", "bin"):   # merged-/usr hosts: the same symlinks into the bound /usr
        host = Path("/") / top
        if host.is_symlink():
            os.symlink(os.readlink(host), env.chroot_dir / top)
    try:
        os.chdir(root)
    except OSError as e:
        raise JailerError(f"Failed to chdir into chroot directory: {e}") from None
    for folder in ("dev", "dev/net", "run"):
        os.makedirs(folder, exist_ok=True)
    for path, major, minor in DEVICES:
        _mknod_owned("." + path, major, minor, env.uid, env.gid)
    if uffd is not None:
        _mknod_owned("." + USERFAULTFD, *uffd, env.uid, env.gid)
    for folder in (".", "dev", "dev/net", "run"):
        try:
            os.chmod(folder, FOLDER_PERMISSIONS)
            os.chown(folder, env.uid, env.gid)
        except OSError as e:
            raise JailerError(f"Failed to change owner for {folder}: {e}") from None
    try:
        os.mkdir(OLD_ROOT)
    except OSError as e:
        raise JailerError(f"Failed to create the jail root directory before pivoting root: {e}") from None
    _check(_libc.syscall(SYS_PIVOT_ROOT, b".", OLD_ROOT.encode()), "Failed to pivot root")
    os.chdir("/")
    _check(_libc.umount2(b"/" + OLD_ROOT.encode(), MNT_DETACH), "Failed to unmount the old jail root")
    try:
        os.rmdir("/" + OLD_ROOT)
    except OSError as e:
        raise JailerError(f"Failed to remove old jail root directory: {e}") from None


def _close_inherited_fds() -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.close(fd)
            except OSError:
                pass


def _drop_privileges(env: JailEnv) -> None:
    os.setgroups([])
    os.setgid(env.gid)
    os.setuid(env.uid)


def _build_jail(env: JailEnv) -> int | None:
    """The steps both paths share, in Firecracker's order: cgroups, rlimits, netns, the chroot,
    the mount namespace and ``pivot_root``.  Returns ``/dev/null`` opened for ``--daemonize``
    (opened first: there is none inside the jail)."""
    dev_null = os.open("/dev/null", os.O_RDWR) if env.daemonize else None
    cgroups.place(env.cgroups, env.cgroup_version, env.parent_cgroup, env.id, os.getpid())
    _rlimits(env.resource_limits)
    if env.netns is not None:
        _join_netns(env.netns)
    _make_chroot(env)
    _enter_jail(env)
    return dev_null


def _stdio_to(dev_null: int) -> None:
    for fd in (0, 1, 2):
        os.dup2(dev_null, fd)
    os.close(dev_null)


def jail_this_process(jailer_argv: list[str]) -> None:
    """A fork-server child jails itself, then runs the VMM in place (no exec: docs/jailer.md).

    The same checks and steps as :func:`run` up to the exec; the child is already in its own
    session.  ``--new-pid-ns`` is refused: ``unshare(CLONE_NEWPID)`` moves only later children,
    never the calling process, and this process is the VMM.
    """
    from .env import parse

    env = parse(jailer_argv)
    if env.new_pid_ns:
        raise JailerError("--new-pid-ns is not supported through the fork server: the forked "
                          "child is the VMM and cannot enter a PID namespace itself")
    dev_null = _build_jail(env)
    if dev_null is not None:
        _stdio_to(dev_null)
    # The launcher's environment came with the request; nothing of it goes into the jail (the
    # exec path gives the VMM an empty environment too, as Firecracker's jailer does).
    os.environ.clear()
    _drop_privileges(env)


def run(env: JailEnv, start_us: int, start_cpu_us: int) -> NoReturn:
    dev_null = _build_jail(env)
    parent_cpu_us = 0      # exec keeps this process: its CPU time so far counts from start_cpu_us
    if env.new_pid_ns:
        _check(_libc.unshare(CLONE_NEWPID), "Failed cloning into a new child process")
        jailer_cpu_us = time.process_time_ns() // 1000 - start_cpu_us
        child = os.fork()
        if child != 0:
            pid_file = f"/{env.exec_name}.pid"
            with open(pid_file, "x") as f:
                f.write(str(child))
            os._exit(0)
        start_cpu_us, parent_cpu_us = 0, jailer_cpu_us   # a new process: its CPU clock starts at 0
    if dev_null is not None:
        os.setsid()
        _stdio_to(dev_null)
    _drop_privileges(env)
    argv = [f"/{env.exec_name}", "--id", env.id, "--start-time-us", str(start_us),
            "--start-time-cpu-us", str(start_cpu_us), "--parent-cpu-time-us", str(parent_cpu_us),
            *env.extra_args]
    try:
        os.execve(argv[0], argv, {})
    except OSError as e:
        raise JailerError(f"Failed to exec into Firecracker: {e}") from None
    raise AssertionError("unreachable")
