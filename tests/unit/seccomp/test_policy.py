"""Firecracker's JSON filter format, as --seccomp-filter reads it."""

from __future__ import annotations

import json

import pytest

from asyncvmm.seccomp import PolicyError, ThreadFilters
from asyncvmm.seccomp.bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_TRAP, compile_filter, run
from asyncvmm.seccomp.policy import parse_policy
from asyncvmm.seccomp.syscalls import SYSCALLS


def _doc(vmm_filter=None, **extra):
    base = {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]}
    doc = {"vmm": vmm_filter or base, "vcpu": base}
    doc.update(extra)
    return json.dumps(doc)


def test_a_firecracker_style_document_compiles():
    f = {"default_action": {"errno": 1}, "filter_action": "allow", "filter": [
        {"syscall": "read", "comment": "all reads"},
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672,
                                       "comment": "KVM_RUN"}]},
        {"syscall": "mmap", "args": [{"index": 3, "type": "dword", "op": {"masked_eq": 1}, "val": 0}]}]}
    filters = parse_policy(_doc(f))
    p = compile_filter(filters["vmm"])
    assert run(p, SYSCALLS["read"]) == SECCOMP_RET_ALLOW
    assert run(p, SYSCALLS["ioctl"], (4, 44672)) == SECCOMP_RET_ALLOW
    assert run(p, SYSCALLS["ioctl"], (4, 44673)) == SECCOMP_RET_ERRNO | 1
    assert run(p, SYSCALLS["mmap"], (0, 1, 3, 0x21)) == SECCOMP_RET_ERRNO | 1
    assert run(compile_filter(filters["vcpu"]), SYSCALLS["write"]) == SECCOMP_RET_TRAP


@pytest.mark.parametrize("text, message", [
    ("{", "not a JSON document"),
    ("[]", "expected an object mapping thread categories"),
    (_doc(api={"default_action": "trap", "filter_action": "allow", "filter": []}), "category 'api'"),
    (_doc(extra={"default_action": "trap", "filter_action": "allow", "filter": []}), "unknown thread category extra"),
    (json.dumps({"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []}}),
     "missing thread category vcpu"),
    (_doc({"default_action": "explode", "filter_action": "allow", "filter": []}), "vmm.default_action: unknown action"),
    (_doc({"default_action": "trap", "filter": []}), "vmm: missing filter_action"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [], "x": 1}), "vmm: unknown field x"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "frobnicate"}]}),
     "vmm.filter\\[0\\]: unknown x86_64 system call 'frobnicate'"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 9, "type": "dword", "op": "eq", "val": 1}]}]}),
     "vmm.filter\\[0\\].args\\[0\\]: argument index 9"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "word", "op": "eq", "val": 1}]}]}),
     "type must be dword or qword"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 1 << 40}]}]}),
     "does not fit a dword"),
    (_doc({"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "ioctl", "args": []}]}),
     "non-empty list"),
])
def test_unusable_documents_are_refused_with_where_and_why(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_from_file_names_the_file(tmp_path):
    path = tmp_path / "filter.bpf"
    path.write_bytes(b"\x20\x00\x00\x00\x04\x00\x00\x00")   # a compiled filter, as Firecracker's takes
    with pytest.raises(PolicyError, match=f"{path}: not a JSON document"):
        ThreadFilters.from_file(str(path))
    with pytest.raises(FileNotFoundError):
        ThreadFilters.from_file(str(tmp_path / "missing.json"))


def test_default_filters_compile_for_both_categories():
    filters = ThreadFilters.default()
    assert set(filters.programs) == {"vmm", "vcpu"}
    for program in filters.programs.values():
        assert run(program, SYSCALLS["execve"]) == SECCOMP_RET_TRAP
        assert run(program, SYSCALLS["ptrace"]) == SECCOMP_RET_TRAP
