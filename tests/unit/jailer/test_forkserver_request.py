"""A jailed launch through the fork server: the request carries the jailer's flags."""

from __future__ import annotations

import pytest

from asyncvmm.forkserver import protocol
from asyncvmm.jailer.env import JailerError
from asyncvmm.jailer.jail import jail_this_process


def test_the_jail_field_round_trips_and_is_checked():
    jail = ["--id", "vm", "--exec-file", "/x/asyncvmm", "--uid", "1", "--gid", "1"]
    data = protocol.make_request(["--id", "vm"], "/", {}, {}, 0o22, jail=jail)
    assert protocol.parse_request(data)["jail"] == jail
    assert protocol.parse_request(protocol.make_request(["--id", "vm"], "/", {}, {}, 0o22))["jail"] is None
    bad = data.replace(b'"--uid"', b'17')
    with pytest.raises(protocol.ProtocolError, match="a jailer argument"):
        protocol.parse_request(bad)


def test_a_fork_server_child_refuses_a_new_pid_namespace(tmp_path):
    exec_file = tmp_path / "asyncvmm"
    exec_file.write_text("")
    with pytest.raises(JailerError, match="--new-pid-ns is not supported through the fork server"):
        jail_this_process(["--id", "vm", "--exec-file", str(exec_file), "--uid", "1", "--gid", "1",
                           "--chroot-base-dir", str(tmp_path), "--new-pid-ns"])
    assert not (tmp_path / "asyncvmm" / "vm").exists()
