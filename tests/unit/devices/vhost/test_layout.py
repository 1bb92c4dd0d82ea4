"""The vhost ctypes mirrors and ioctl numbers agree with <linux/vhost.h>, compiled by gcc.

No /dev/vhost-net is needed: only the headers (linux-libc-dev).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

from asyncvmm.devices.vhost import ioctls, structs as s
from tests.conftest import require

STRUCTS = ["vhost_vring_state", "vhost_vring_file", "vhost_vring_addr", "vhost_memory_region",
           "vhost_memory"]
OFFSETS = [(name, field) for name in STRUCTS for field, *_ in getattr(s, name)._fields_]
IOCTLS = [name for name in dir(ioctls) if name.startswith("VHOST_") and name != "VHOST_VIRTIO"]
CONSTANTS = ["VHOST_FILE_UNBIND", "VHOST_VRING_F_LOG", "VHOST_F_LOG_ALL", "VHOST_NET_F_VIRTIO_NET_HDR"]


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory) -> dict[str, int]:
    require(shutil.which("gcc") is not None, "gcc is needed to read the kernel headers")
    d = tmp_path_factory.mktemp("vhosth")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vhost.h>", "int main(void) {"]
    for name in STRUCTS:
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
    for st, field in OFFSETS:
        lines.append(f'printf("offsetof {st}.{field} %zu\\n", offsetof(struct {st}, {field}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("value {name} %ld\\n", (long)({name}));')
    lines += ["return 0;", "}"]
    src = d / "probe.c"
    src.write_text("\n".join(lines))
    exe = d / "probe"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {" ".join(l.split()[:2]): int(l.split()[2]) for l in out.splitlines()}


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_sizes(kernel_values, name):
    assert ctypes.sizeof(getattr(s, name)) == kernel_values[f"sizeof {name}"]


@pytest.mark.parametrize("st,field", OFFSETS)
def test_field_offsets(kernel_values, st, field):
    assert getattr(getattr(s, st), field).offset == kernel_values[f"offsetof {st}.{field}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_numbers(kernel_values, name):
    assert getattr(ioctls, name) == kernel_values[f"value {name}"]


@pytest.mark.parametrize("name", CONSTANTS)
def test_constants(kernel_values, name):
    assert getattr(s, name) == kernel_values[f"value {name}"]


def test_the_memory_table_is_the_header_then_its_regions():
    regions = [s.vhost_memory_region(0, 0x1000, 0x7F00_0000_0000),
               s.vhost_memory_region(0x1_0000_0000, 2 << 20, 0x7F10_0000_0000)]
    mem = s.vhost_memory_with(regions)
    assert ctypes.sizeof(mem) == ctypes.sizeof(s.vhost_memory) + 2 * ctypes.sizeof(s.vhost_memory_region)
    raw = bytes(mem)
    assert int.from_bytes(raw[:4], "little") == 2
    assert raw[8:8 + 32] == bytes(regions[0]) and raw[40:72] == bytes(regions[1])


def test_runtime_ioctls_cover_activation_and_reset():
    assert {ioctls.VHOST_SET_MEM_TABLE, ioctls.VHOST_NET_SET_BACKEND, ioctls.VHOST_GET_VRING_BASE,
            ioctls.VHOST_SET_VRING_CALL} <= set(ioctls.RUNTIME_IOCTLS)
    assert ioctls.VHOST_RESET_OWNER not in ioctls.RUNTIME_IOCTLS
