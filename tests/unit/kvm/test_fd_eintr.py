"""KVM ioctls other than KVM_RUN are asked again when a signal interrupted them (EINTR)."""

import ctypes
import errno

import pytest

from asyncvmm.kvm import fd as kvmfd


class FlakyLibc:
    def __init__(self, failures: int, err: int = errno.EINTR) -> None:
        self.failures, self.err, self.calls = failures, err, 0

    def ioctl(self, fd, request, ptr):
        self.calls += 1
        if self.calls <= self.failures:
            ctypes.set_errno(self.err)
            return -1
        return 7


def test_an_interrupted_ioctl_is_asked_again(monkeypatch):
    libc = FlakyLibc(3)
    monkeypatch.setattr(kvmfd, "_libc", libc)
    assert kvmfd._ioctl(3, "KVM_CREATE_VM", 0xAE01, 0) == 7 and libc.calls == 4


def test_other_errors_and_endless_interruptions_are_errors(monkeypatch):
    monkeypatch.setattr(kvmfd, "_libc", FlakyLibc(1, errno.ENOMEM))
    with pytest.raises(kvmfd.KvmError) as e:
        kvmfd._ioctl(3, "KVM_CREATE_VM", 0xAE01, 0)
    assert e.value.errno == errno.ENOMEM
    monkeypatch.setattr(kvmfd, "_libc", FlakyLibc(10_000))
    with pytest.raises(kvmfd.KvmError) as e:
        kvmfd._ioctl(3, "KVM_CREATE_VM", 0xAE01, 0)
    assert e.value.errno == errno.EINTR
