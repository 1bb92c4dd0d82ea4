"""The Uffd backend's userfaultfd (asyncvmm.snapshot.uffd) on this host's kernel, no KVM:
/dev/userfaultfd first and userfaultfd(2) as the fallback, UFFD_FEATURE_EVENT_REMOVE asked for
(and refused by name when missing), and the test handler (tests/kvm/uffd_handler.py) serving
zeros where a remove event said the pages went."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import stat
import tempfile
import types

import pytest

from asyncvmm.snapshot import uffd
from tests.conftest import require

NOBODY = 65534


def _fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":", 1) for line in f if ":" in line)


def test_the_userfaultfd_is_nonblocking_cloexec_and_enabled_with_event_remove():
    require(os.path.exists(uffd.USERFAULTFD_DEVICE) or os.geteuid() == 0,
            "needs /dev/userfaultfd or root for userfaultfd(2)")
    fd = uffd.create_userfaultfd()
    try:
        info = _fdinfo(fd)
        # "API:\t<api>:<features>:<ioctls>", the features the descriptor was enabled with
        api, features, _ = info["API"].strip().split(":")
        assert int(api, 16) == uffd.UFFD_API
        assert int(features, 16) & uffd.UFFD_FEATURE_EVENT_REMOVE
        flags = int(info["flags"].strip(), 8)
        assert flags & os.O_NONBLOCK and flags & os.O_CLOEXEC
    finally:
        os.close(fd)


def test_a_device_that_is_missing_or_does_not_know_the_ioctl_falls_back_to_the_call(tmp_path):
    require(os.geteuid() == 0, "needs root (userfaultfd(2) without vm.unprivileged_userfaultfd)")
    for device in (str(tmp_path / "absent"), "/dev/null"):     # ENOENT, ENOTTY
        os.close(uffd.create_userfaultfd(device=device))


def test_other_device_errors_are_reported_not_passed_over(tmp_path):
    with pytest.raises(uffd.UffdError, match=rf"cannot open {tmp_path}: Is a directory"):
        uffd.create_userfaultfd(device=str(tmp_path))


def test_a_kernel_without_a_feature_is_refused_naming_it():
    require(os.path.exists(uffd.USERFAULTFD_DEVICE) or os.geteuid() == 0,
            "needs /dev/userfaultfd or root for userfaultfd(2)")
    with pytest.raises(uffd.UffdError, match="the host kernel's userfaultfd lacks 0x4000000000000000"):
        uffd.create_userfaultfd(features=uffd.UFFD_FEATURE_EVENT_REMOVE | 1 << 62)


def _as_nobody(device: str) -> dict:
    """create_userfaultfd(device=...) in a child running as nobody: its fd's features, or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                      # the child: no return from here
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                fd = uffd.create_userfaultfd(device=device)
                result = {"features": _fdinfo(fd)["API"].strip().split(":")[1]}
            except uffd.UffdError as e:
                result = {"error": str(e)}
            os.write(w, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_an_unprivileged_vmm_gets_its_userfaultfd_from_a_device_it_may_open():
    """As asyncvmm-jailer arranges: a /dev/userfaultfd node owned by the VMM's uid works where
    userfaultfd(2) is refused (vm.unprivileged_userfaultfd=0, no CAP_SYS_PTRACE)."""
    require(os.geteuid() == 0, "needs root (mknod, setuid)")
    require(os.path.exists(uffd.USERFAULTFD_DEVICE), "the kernel has no /dev/userfaultfd (Linux 6.1+)")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        require(f.read().strip() == "0", "vm.unprivileged_userfaultfd=1 lets the call work anyway")
    rdev = os.stat(uffd.USERFAULTFD_DEVICE).st_rdev
    with tempfile.TemporaryDirectory() as jail:
        os.chmod(jail, 0o711)
        node = os.path.join(jail, "userfaultfd")
        os.mknod(node, stat.S_IFCHR | 0o600, rdev)
        os.chown(node, NOBODY, NOBODY)
        through_device = _as_nobody(node)
        without_device = _as_nobody(os.path.join(jail, "absent"))
    assert int(through_device["features"], 16) & uffd.UFFD_FEATURE_EVENT_REMOVE, through_device
    assert "userfaultfd(2): Operation not permitted" in without_device["error"], without_device


def test_the_handler_serves_zeros_where_a_remove_event_said_the_pages_went(tmp_path):
    """register_and_send to tests/kvm/uffd_handler.py; MADV_DONTNEED on faulted-in pages reaches
    the handler as UFFD_EVENT_REMOVE, and their next faults read zeros, not the memory file."""
    from tests.kvm.uffd_handler import PageFaultHandler
    require(os.path.exists(uffd.USERFAULTFD_DEVICE) or os.geteuid() == 0,
            "needs /dev/userfaultfd or root for userfaultfd(2)")
    page, pages = uffd.PAGE_SIZE, 4
    mem_file = tmp_path / "mem"
    mem_file.write_bytes(b"".join(bytes([0x11 * (i + 1)]) * page for i in range(pages)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    base = libc.mmap(None, pages * page, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert base not in (None, ctypes.c_void_p(-1).value)
    handler = PageFaultHandler(str(tmp_path / "uffd.sock"), str(mem_file))
    handler.start()
    fd = None
    try:
        region = types.SimpleNamespace(host_addr=base, size=pages * page, page_size=page)
        fd = uffd.register_and_send(types.SimpleNamespace(regions=[region]), [0], str(tmp_path / "uffd.sock"))

        def read(i: int) -> bytes:
            # ctypes.memmove releases the GIL while the fault waits for the handler thread
            buf = ctypes.create_string_buffer(page)
            ctypes.memmove(buf, base + i * page, page)
            return buf.raw

        assert [read(i)[0] for i in range(2)] == [0x11, 0x22]
        # pages 1 (present) and 2 (never touched) go back, as the balloon gives them back
        assert libc.madvise(base + page, 2 * page, mmap.MADV_DONTNEED) == 0, ctypes.get_errno()
        assert read(1) == bytes(page) and read(2) == bytes(page)
        assert read(3) == bytes([0x44]) * page and read(0)[0] == 0x11
    finally:
        handler.stop()
        if fd is not None:
            os.close(fd)
        libc.munmap(base, pages * page)
    assert handler.error is None, handler.error
    assert handler.removes == [(base + page, base + 3 * page)]
    assert (handler.faults, handler.zero_faults) == (5, 2)
