import json

import pytest

from asyncvmm.mmds.http11 import HttpRequest
from asyncvmm.mmds.http_handler import (MSG_INVALID_TOKEN, MSG_NO_TOKEN, MSG_NO_TTL,
                                        MSG_UNSUPPORTED_VALUE, MmdsHttpHandler, MmdsVersion,
                                        json_pointer, request_path)
from asyncvmm.mmds.metrics import MmdsMetrics
from asyncvmm.mmds.store import MmdsStore
from asyncvmm.mmds.token import TokenAuthority
from tests.unit.mmds.guest import FakeClock

DATA = {
    "latest": {
        "meta-data": {
            "ami-id": "ami-12345678",
            "reservation-id": "r-fea54097",
            "local-hostname": "ip-10-251-50-12.ec2.internal",
            "public-hostname": "ec2-203-0-113-25.compute-1.amazonaws.com",
            "dummy_obj": {"res_key": "res_value"},
            "dummy_array": ["arr_val1", "arr_val2"],
            "dummy_empty": "",
        },
        "Limits": {"CPU": 512, "Memory": 512},
        "Usage": {"CPU": 12.12},
    }
}


def make(version=MmdsVersion.V1, imds_compat=False, data=DATA):
    clock = FakeClock()
    store = MmdsStore()
    if data is not None:
        store.put(data)
    metrics = MmdsMetrics()
    handler = MmdsHttpHandler(store, TokenAuthority(clock), version=version,
                              imds_compat=imds_compat, metrics=metrics)
    return handler, clock, metrics


def req(method, target, *headers, version="HTTP/1.1"):
    return HttpRequest(method, target, version, tuple(headers))


def test_v1_get_lists_keys_sorted_with_slash_for_objects():
    h, _, metrics = make()
    resp = h(req("GET", "/latest/meta-data/"))
    assert resp.status == 200 and resp.content_type == "text/plain"
    assert resp.body.decode() == ("ami-id\ndummy_array\ndummy_empty\ndummy_obj/\n"
                                  "local-hostname\npublic-hostname\nreservation-id")
    assert h(req("GET", "/latest")).body == b"Limits/\nUsage/\nmeta-data/"
    assert metrics.rx_no_token == 2 and metrics.rx_invalid_token == 0


@pytest.mark.parametrize("path,body", [
    ("/latest/meta-data/ami-id", b"ami-12345678"),
    ("/latest/meta-data/ami-id/", b"ami-12345678"),
    ("//latest///meta-data//ami-id", b"ami-12345678"),
    ("/latest/meta-data/dummy_array/0", b"arr_val1"),
    ("/latest/meta-data/dummy_empty", b""),
    ("http://169.254.169.254/latest/meta-data/ami-id", b"ami-12345678"),
    ("/latest/meta-data/ami-id?query=ignored", b"ami-12345678"),
])
def test_imds_string_leaves(path, body):
    h, _, _ = make()
    resp = h(req("GET", path))
    assert (resp.status, resp.body) == (200, body)


@pytest.mark.parametrize("path", ["/latest/Limits/CPU", "/latest/Usage/CPU",
                                  "/latest/meta-data/dummy_array"])
def test_imds_non_string_leaves_are_not_implemented(path):
    h, _, _ = make()
    resp = h(req("GET", path))
    assert (resp.status, resp.body.decode()) == (501, MSG_UNSUPPORTED_VALUE)


def test_json_format_with_accept_header():
    h, _, _ = make()
    accept = ("Accept", "application/json")
    resp = h(req("GET", "/latest/meta-data", accept))
    assert resp.content_type == "application/json"
    assert json.loads(resp.body) == DATA["latest"]["meta-data"]
    assert resp.body.startswith(b'{"ami-id":"ami-12345678","dummy_array":')  # compact, sorted
    assert h(req("GET", "/latest/Limits/CPU", accept)).body == b"512"
    assert h(req("GET", "/latest/Usage/CPU", accept)).body == b"12.12"
    assert h(req("GET", "/latest/meta-data/ami-id", accept)).body == b'"ami-12345678"'
    # Anything but exactly application/json is the IMDS format, as in Firecracker.
    assert h(req("GET", "/latest/meta-data/ami-id", ("Accept", "*/*"))).body == b"ami-12345678"


def test_imds_compat_ignores_accept():
    h, _, _ = make(imds_compat=True)
    resp = h(req("GET", "/", ("Accept", "application/json")))
    assert (resp.status, resp.body, resp.content_type) == (200, b"latest/", "text/plain")


def test_empty_store_is_null_for_the_guest():
    h, _, _ = make(data=None)
    assert h(req("GET", "/", ("Accept", "application/json"))).body == b"null"
    assert h(req("GET", "/")).status == 501
    assert h(req("GET", "/latest")).status == 404


def test_not_found_message_names_the_path():
    h, _, _ = make()
    resp = h(req("GET", "/invalid"))
    assert (resp.status, resp.body) == (404, b"Resource not found: /invalid.")


@pytest.mark.parametrize("target", ["http://", "*", "latest", "http:///x", "?x"])
def test_targets_without_a_path_are_invalid_uris(target):
    h, _, _ = make()
    resp = h(req("GET", target))
    assert (resp.status, resp.body) == (400, b"Invalid URI.")


@pytest.mark.parametrize("method", ["POST", "PATCH", "DELETE", "HEAD"])
def test_other_known_methods_are_not_allowed(method):
    for version in MmdsVersion:
        h, _, _ = make(version)
        resp = h(req(method, "/"))
        assert resp.status == 405 and resp.allow == ("GET", "PUT")
        assert resp.body == b"Not allowed HTTP method."


def test_unknown_methods_are_not_implemented():
    h, _, _ = make()
    resp = h(req("OPTIONS", "/"))
    assert (resp.status, resp.body) == (501, b"Invalid HTTP Method: Unsupported HTTP method.")


def test_v2_requires_a_token():
    h, _, metrics = make(MmdsVersion.V2)
    resp = h(req("GET", "/latest/meta-data/ami-id"))
    assert (resp.status, resp.body.decode()) == (401, MSG_NO_TOKEN)
    assert metrics.rx_no_token == 1
    resp = h(req("GET", "/latest/meta-data/ami-id", ("X-metadata-token", "foo")))
    assert (resp.status, resp.body.decode()) == (401, MSG_INVALID_TOKEN)
    assert metrics.rx_invalid_token == 1


@pytest.mark.parametrize("ttl_header,token_header", [
    ("X-metadata-token-ttl-seconds", "X-metadata-token"),
    ("x-aws-ec2-metadata-token-ttl-seconds", "X-AWS-EC2-METADATA-TOKEN"),
])
def test_v2_token_flow_and_expiry(ttl_header, token_header):
    h, clock, metrics = make(MmdsVersion.V2)
    put = h(req("PUT", "/latest/api/token", (ttl_header, "01")))
    assert put.status == 200 and put.content_type == "text/plain"
    assert put.headers == ((ttl_header, "1"),)
    token = put.body.decode()
    ok = h(req("GET", "/latest/meta-data/ami-id", (token_header, token)))
    assert (ok.status, ok.body) == (200, b"ami-12345678")
    clock.advance(1)
    expired = h(req("GET", "/latest/meta-data/ami-id", (token_header, token)))
    assert (expired.status, expired.body.decode()) == (401, MSG_INVALID_TOKEN)
    assert (metrics.rx_no_token, metrics.rx_invalid_token) == (0, 1)


def test_v1_serves_with_or_without_a_valid_token_but_counts():
    h, _, metrics = make(MmdsVersion.V1)
    assert h(req("GET", "/latest/meta-data/ami-id", ("X-metadata-token", "bogus"))).status == 200
    assert (metrics.rx_no_token, metrics.rx_invalid_token) == (0, 1)
    token = h(req("PUT", "/latest/api/token", ("X-metadata-token-ttl-seconds", "60"))).body.decode()
    assert h(req("GET", "/latest/meta-data/ami-id", ("X-metadata-token", token))).status == 200
    assert (metrics.rx_no_token, metrics.rx_invalid_token) == (0, 1)


@pytest.mark.parametrize("headers,status,body", [
    ((), 400, MSG_NO_TTL),
    ((("X-metadata-token-ttl-seconds", "0"),), 400,
     "Invalid time to live value provided for token: 0. Please provide a value between 1 and 21600."),
    ((("X-metadata-token-ttl-seconds", "21601"),), 400,
     "Invalid time to live value provided for token: 21601. Please provide a value between 1 and 21600."),
    ((("X-metadata-token-ttl-seconds", "abc"),), 400,
     "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:abc"),
    ((("X-metadata-token-ttl-seconds", "99999999999"),), 400,
     "Invalid header. Reason: Invalid value. Key:X-metadata-token-ttl-seconds; Value:99999999999"),
    ((("X-metadata-token-ttl-seconds", "60"), ("X-Forwarded-For", "foo")), 400,
     "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For"),
])
def test_token_request_errors(headers, status, body):
    for version in MmdsVersion:
        h, _, _ = make(version)
        resp = h(req("PUT", "/latest/api/token", *headers))
        assert (resp.status, resp.body.decode()) == (status, body)


def test_token_request_elsewhere_is_not_found_and_forwarded_for_is_checked_first():
    h, _, _ = make(MmdsVersion.V2)
    resp = h(req("PUT", "/latest/api/toke", ("X-metadata-token-ttl-seconds", "60")))
    assert (resp.status, resp.body) == (404, b"Resource not found: /latest/api/toke.")
    resp = h(req("PUT", "/", ("x-forwarded-for", "1.2.3.4")))
    assert resp.status == 400 and resp.body.endswith(b"Key: x-forwarded-for")


def test_path_helpers():
    assert request_path("http://h/a?b#c") == "/a"
    assert request_path("HTTP://h/a") == "/a"
    assert request_path("/") == "/"
    assert json_pointer("/") == ""
    assert json_pointer("////a//b//") == "/a/b"
