"""The fork server's messages: what a request may hold, byte-for-byte round trips, refusals."""

from __future__ import annotations

import json

import pytest

from asyncvmm.forkserver import protocol
from asyncvmm.forkserver.protocol import ProtocolError, make_request, parse_reply, parse_request


def _request(**over):
    fields = {"version": 1, "argv": ["--api-sock", "/tmp/a.sock"], "cwd": "/", "env": {"A": "1"},
              "rlimits": {"NOFILE": [1024, 4096]}, "umask": 0o22}
    fields.update(over)
    return json.dumps(fields).encode()


def test_a_request_round_trips_with_undecodable_bytes():
    odd = b"/tmp/\xff\xfe.sock".decode("utf-8", "surrogateescape")
    data = make_request(["--api-sock", odd], "/", {"K": odd}, {"NOFILE": (1024, -1)}, 0o077)
    req = parse_request(data)
    assert req["argv"] == ["--api-sock", odd]
    assert req["argv"][1].encode("utf-8", "surrogateescape") == b"/tmp/\xff\xfe.sock"
    assert req["env"] == {"K": odd} and req["rlimits"] == {"NOFILE": (1024, -1)} and req["umask"] == 0o077


@pytest.mark.parametrize("data, why", [
    (b"\x00\x01garbage", "not a JSON message"),
    (b"[1, 2]", "JSON object"),
    (b'{"version": 1', "not a JSON message"),
    (b"[" * 100_000, "nested too deeply"),
    (_request(version=2), "unsupported protocol version"),
    (_request(extra=1), "unknown request fields: extra"),
    (_request(argv="--api-sock"), "argv must be a list"),
    (_request(argv=["a\0b"]), "NUL"),
    (_request(argv=[1]), "an argument must be a string"),
    (_request(cwd="relative"), "absolute"),
    (_request(env={"A=B": "x"}), "bad environment variable name"),
    (_request(env={"A": 1}), "environment variable A must be a string"),
    (_request(rlimits={"BOGUS": [1, 1]}), "unknown rlimit"),
    (_request(rlimits={"NOFILE": [1]}), "[soft, hard]"),
    (_request(rlimits={"NOFILE": [-2, 1]}), "integer in"),
    (_request(rlimits={"NOFILE": [True, 1]}), "integer in"),
    (_request(umask=0o1000), "umask"),
    (b'{"version": 1, "pad": "' + b"x" * protocol.MAX_MESSAGE + b'"}', "byte limit"),
])
def test_bad_requests_name_what_is_wrong(data, why):
    with pytest.raises(ProtocolError, match=None) as err:
        parse_request(data)
    assert why in str(err.value)


def test_oversized_messages_are_refused_when_encoding():
    with pytest.raises(ProtocolError, match="byte limit"):
        make_request(["x" * protocol.MAX_MESSAGE], "/", {}, {}, 0)


@pytest.mark.parametrize("message, expected", [
    ({"pid": 42}, ("pid", 42)), ({"exit": 0}, ("exit", 0)), ({"exit": 255}, ("exit", 255)),
    ({"signal": 9}, ("signal", 9)), ({"error": "no"}, ("error", "no")),
])
def test_replies(message, expected):
    assert parse_reply(protocol.encode(message)) == expected


@pytest.mark.parametrize("message", [{"exit": 256}, {"exit": -1}, {"signal": 0}, {"pid": 0}, {"what": 1},
                                     {"exit": 1, "pid": 2}, {"error": 5}, {"exit": "0"}])
def test_bad_replies(message):
    with pytest.raises(ProtocolError):
        parse_reply(json.dumps(message).encode())


def test_the_waiter_parses_replies_as_the_protocol_does():
    # waiter.py runs without asyncvmm on its path, so it carries its own small reply parser.
    import importlib.util
    from pathlib import Path

    import asyncvmm.forkserver as pkg
    spec = importlib.util.spec_from_file_location("waiter", Path(pkg.__file__).with_name("waiter.py"))
    waiter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(waiter)
    for message in ({"pid": 42}, {"exit": 3}, {"signal": 15}, {"error": 'a "quoted" \\ text'}):
        data = protocol.encode(message)
        assert waiter._reply(data) == parse_reply(data)
    for bad in (b"garbage", b'{"exit" 1}', b'{"exit":x}'):
        with pytest.raises(ValueError):
            waiter._reply(bad)
