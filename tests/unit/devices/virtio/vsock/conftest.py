"""A vsock device behind a real transport, its Unix sockets in a temporary directory."""

from __future__ import annotations

import asyncio
import socket

import pytest

from asyncvmm.devices.virtio.vsock import Vsock
from tests.unit.devices.virtio.conftest import make_rig
from tests.unit.devices.virtio.vsock.helpers import GUEST_CID, Guest


class VsockRig:
    def __init__(self, tmp_path, dev, rig, guest):
        self.tmp_path, self.dev, self.rig, self.guest = tmp_path, dev, rig, guest
        self.uds = dev.uds_path
        self.listeners: list[socket.socket] = []

    def listen(self, port: int) -> socket.socket:
        """A host program listening for guest connections to ``port``."""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(f"{self.uds}_{port}")
        srv.listen(64)
        srv.setblocking(False)
        self.listeners.append(srv)
        return srv

    async def host_connect(self, line: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.uds)
        if line:
            await asyncio.get_running_loop().sock_sendall(sock, line)
        return sock


@pytest.fixture
async def vsock(tmp_path):
    dev = Vsock(GUEST_CID, str(tmp_path / "v.sock"), asyncio.get_running_loop())
    rig = make_rig(dev)
    rxq, txq, evq = await rig.driver.init()
    guest = Guest(rig, rxq, txq, evq)
    vr = VsockRig(tmp_path, dev, rig, guest)
    yield vr
    for srv in vr.listeners:
        srv.close()
    dev.close()
    rig.close()
