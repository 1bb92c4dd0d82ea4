"""The front end against a fake back end over a real socketpair: negotiation, fds, failures."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from asyncvmm.devices.irq import EventFd
from asyncvmm.devices.vhost_user import protocol as p
from asyncvmm.devices.vhost_user.frontend import Frontend, VhostUserError
from asyncvmm.devices.vhost_user.protocol import Request
from tests.fakes.vhost_user_backend import FakeBackend

PROTO = 1 << p.VHOST_USER_F_PROTOCOL_FEATURES
CONFIG = 1 << p.VHOST_USER_PROTOCOL_F_CONFIG
REPLY_ACK = 1 << p.VHOST_USER_PROTOCOL_F_REPLY_ACK


@pytest.fixture
def pair():
    made = []

    def make(backend: FakeBackend, timeout: float = 2.0) -> Frontend:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        backend.serve_socket(b)
        fe = Frontend(a, "test", timeout=timeout)
        made.append((fe, backend))
        return fe

    yield make
    for fe, backend in made:
        fe.close()
        backend.join()
        backend.close()


def test_negotiation_takes_the_common_features_and_protocol_features(pair):
    backend = FakeBackend(features=0b1011 | PROTO | 1 << 32, protocol_features=CONFIG | REPLY_ACK | 1 << 1)
    fe = pair(backend)
    features, protocol = fe.negotiate(0b0110 | PROTO | 1 << 32, CONFIG | REPLY_ACK)
    assert features == 0b0010 | PROTO | 1 << 32
    assert protocol == CONFIG | REPLY_ACK
    assert fe.reply_ack
    fe.set_features(features)          # acked: the fake answers NEED_REPLY messages
    assert backend.requests() == [Request.VHOST_USER_SET_OWNER, Request.VHOST_USER_GET_FEATURES,
                                  Request.VHOST_USER_GET_PROTOCOL_FEATURES,
                                  Request.VHOST_USER_SET_PROTOCOL_FEATURES, Request.VHOST_USER_SET_FEATURES]
    set_proto = backend.last(Request.VHOST_USER_SET_PROTOCOL_FEATURES)
    assert struct.unpack("<Q", set_proto.payload)[0] == CONFIG | REPLY_ACK
    assert not set_proto.flags & p.VHOST_USER_NEED_REPLY_MASK      # sent before REPLY_ACK holds
    assert backend.last(Request.VHOST_USER_SET_FEATURES).flags == p.VHOST_USER_VERSION | p.VHOST_USER_NEED_REPLY_MASK


def test_without_protocol_features_none_are_asked_for(pair):
    backend = FakeBackend(features=0b1)
    fe = pair(backend)
    assert fe.negotiate(0b1 | PROTO, CONFIG) == (0b1, 0)
    assert Request.VHOST_USER_GET_PROTOCOL_FEATURES not in backend.requests()
    assert not fe.reply_ack


def test_mem_table_and_vring_fds_travel_as_scm_rights(pair, tmp_path):
    backend = FakeBackend()
    fe = pair(backend)
    memfd = os.memfd_create("t")
    kick, call = EventFd(), EventFd()
    try:
        regions = [p.MemoryRegion(0, 4096, 0x7000_0000, 0)]
        fe.set_mem_table(regions, [memfd])
        fe.set_vring_kick(0, kick.fd)
        fe.set_vring_call(0, call.fd)
        fe.get_vring_base(0)               # an answered request: everything before it arrived
        mt = backend.last(Request.VHOST_USER_SET_MEM_TABLE)
        assert mt.payload == p.memory_table(regions) and len(mt.fds) == 1
        assert os.fstat(mt.fds[0]).st_ino == os.fstat(memfd).st_ino
        got_kick = backend.last(Request.VHOST_USER_SET_VRING_KICK)
        assert got_kick.payload == p.vring_fd(0, has_fd=True)
        os.eventfd_write(got_kick.fds[0], 1)            # the back end's fd is our eventfd
        assert kick.read() == 1
        os.eventfd_write(backend.last(Request.VHOST_USER_SET_VRING_CALL).fds[0], 3)
        assert call.read() == 3
    finally:
        os.close(memfd)
        kick.close()
        call.close()


def test_config_and_vring_base_answers(pair):
    backend = FakeBackend(config=bytes(range(60)))
    backend.vring_base = 17
    fe = pair(backend)
    assert fe.get_config(0, 60) == bytes(range(60))
    assert fe.get_vring_base(0) == 17


def test_a_refused_ack_names_the_step(pair):
    backend = FakeBackend(features=PROTO, protocol_features=REPLY_ACK)
    backend.refuse = Request.VHOST_USER_SET_MEM_TABLE
    fe = pair(backend)
    fe.negotiate(PROTO, REPLY_ACK)
    memfd = os.memfd_create("t")
    try:
        with pytest.raises(VhostUserError, match=r"^Set mem table failed: the back end refused it \(status 1\)"):
            fe.set_mem_table([p.MemoryRegion(0, 4096, 0x1000, 0)], [memfd])
    finally:
        os.close(memfd)


def test_a_back_end_that_hangs_up_is_an_error_not_a_hang(pair):
    backend = FakeBackend(features=PROTO)
    backend.close_after = Request.VHOST_USER_SET_OWNER
    fe = pair(backend)
    with pytest.raises(VhostUserError, match="^Get features failed: "):
        fe.negotiate(PROTO, 0)


def test_garbage_instead_of_an_answer(pair):
    backend = FakeBackend()
    backend.garbage_for = Request.VHOST_USER_GET_FEATURES
    fe = pair(backend)
    with pytest.raises(VhostUserError, match="^Get features failed: a message of version 3"):
        fe.get_features()


def test_an_answer_to_something_else(pair):
    backend = FakeBackend()
    fe = pair(backend)
    # A back end that answers GET_FEATURES with a GET_PROTOCOL_FEATURES answer.
    backend._answer = lambda msg: backend._reply(Request.VHOST_USER_GET_PROTOCOL_FEATURES, bytes(8))
    with pytest.raises(VhostUserError, match="answer to request 15 while waiting for the answer to "
                                             "VHOST_USER_GET_FEATURES"):
        fe.get_features()


def test_a_silent_back_end_times_out(pair):
    backend = FakeBackend()
    backend._answer = lambda msg: None
    fe = pair(backend, timeout=0.2)
    with pytest.raises(VhostUserError, match=r"^Get features failed: no answer from the back end within 0.2 s"):
        fe.get_features()


def test_connect_to_nothing_says_so_as_firecracker_does(tmp_path):
    with pytest.raises(VhostUserError) as e:
        Frontend.connect(str(tmp_path / "nothing.sock"))
    assert str(e.value) == "Failed to connect to UDS Unix stream: No such file or directory (os error 2)"
