"""The MMDS seen from a Debian guest (issue 6, acceptance point 3: metadata with V1 and V2).

The guest reaches 169.254.169.254 through ``eth0`` (a tap in a test-made
namespace, as in test_net.py; the MMDS frames never reach it).  Two clients:
busybox ``wget`` (GET with extra headers) for what an ordinary client does,
and raw HTTP/1.1 through ``socat`` for what wget cannot do (``PUT``, reading
error statuses and response headers).  The metadata comes from
``--metadata`` (V1) and from ``PUT``/``PATCH /mmds`` on the API socket
(both); both the IMDS text form and JSON (``Accept: application/json``) are
checked, and one value larger than a TCP segment.
"""

from __future__ import annotations

import hashlib
import json
import secrets

import pytest

from tests.linux.api import ApiLauncher, api, host_network, wait_for_api
from tests.linux.harness import VmSpec, default_spec

BOOT_TIMEOUT = 240
READY = r"asyncvmm-guest: ready \(rootfs\)"
MMDS = "169.254.169.254"

# mmds METHOD PATH [HEADER]...: one raw request; the response with CRs removed.  shut-none keeps
# socat from half-closing after the request (no ordinary HTTP client does); it ends when the MMDS
# closes the connection, as `Connection: close` asks.
RAW_HTTP = r"""mmds() { m=$1; p=$2; shift 2
  { printf '%s %s HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n' "$m" "$p"
    for h in "$@"; do printf '%s\r\n' "$h"; done; printf '\r\n'; } |
  socat -t 30 - TCP:169.254.169.254:80,shut-none | tr -d '\r'; }
"""


def metadata(tag: str) -> dict:
    return {"latest": {"meta-data": {"ami-id": f"ami-{tag}", "instance-id": f"i-{tag}",
                                     "placement": {"availability-zone": "eu-west-1a"}},
                       "user-data": "u" * 5000 + tag}}   # several TCP segments


class Response:
    def __init__(self, raw: str) -> None:
        head, _, self.body = raw.partition("\n\n")
        lines = head.strip().splitlines()
        assert lines and lines[0].startswith("HTTP/1.1 "), raw
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}


def raw(guest, method: str, path: str, *headers: str) -> Response:
    quoted = " ".join("'" + h.replace("'", "'\\''") + "'" for h in headers)
    return Response(guest.run(f"{RAW_HTTP}mmds {method} {path} {quoted}").check().output)


def wget(guest, path: str, *headers: str, pipe: str = "") -> str:
    opts = " ".join(f"--header '{h}'" for h in headers)
    return guest.run(f"wget -q -O - {opts} http://{MMDS}{path}{pipe}").check().output


def imds_listing(obj: dict) -> list[str]:
    return sorted(k + "/" if isinstance(v, dict) else k for k, v in obj.items())


@pytest.fixture
def net():
    with host_network() as n:
        yield n


def mmds_guest(guests, guest_images, tmp_path, net, version: str, extra_args: list[str]):
    sock = tmp_path / "api.sock"
    spec = default_spec(guest_images, tmp_path, extra_args=net.boot_args)
    spec = VmSpec(**{**spec.__dict__, "network_interfaces": [net.interface()],
                     "mmds_config": {"network_interfaces": ["eth0"], "version": version}})
    guest = guests.start(ApiLauncher(sock, extra_args=extra_args, netns=net.ns), spec)
    guest.wait_for(READY, BOOT_TIMEOUT)
    wait_for_api(sock, guest)
    guest.run(f"ip route add {MMDS} dev eth0").check()
    return guest, sock


def assert_serves(guest, meta: dict, *headers: str) -> None:
    """The IMDS text and JSON forms of ``meta`` as wget fetches them."""
    md = meta["latest"]["meta-data"]
    assert wget(guest, "/latest/meta-data/", *headers).split() == imds_listing(md)
    assert wget(guest, "/latest/meta-data/ami-id", *headers).strip() == md["ami-id"]
    assert wget(guest, "/latest/meta-data/placement/availability-zone", *headers).strip() == "eu-west-1a"
    as_json = wget(guest, "/latest/meta-data", "Accept: application/json", *headers)
    assert json.loads(as_json) == md
    assert json.loads(wget(guest, "/latest/meta-data/ami-id", "Accept: application/json", *headers)) == md["ami-id"]
    # Compared by digest: 5 KB through the serial console would only slow the test down.
    out = wget(guest, "/latest/user-data", *headers, pipe=" | md5sum")
    assert out.split()[0] == hashlib.md5(meta["latest"]["user-data"].encode()).hexdigest()


def test_mmds_v1_serves_metadata_from_the_flag_and_from_the_api(guests, guest_images, tmp_path, net):
    first, second = metadata(secrets.token_hex(4)), metadata(secrets.token_hex(4))
    meta_file = tmp_path / "metadata.json"
    meta_file.write_text(json.dumps(first))
    guest, sock = mmds_guest(guests, guest_images, tmp_path, net, "V1", ["--metadata", str(meta_file)])

    assert_serves(guest, first)                     # --metadata, no token: V1 needs none
    status, body = api(sock, "PUT", "/mmds", second)
    assert status == 204, body
    assert_serves(guest, second)
    patch = {"latest": {"meta-data": {"ami-id": "ami-patched", "instance-id": None}}}
    status, body = api(sock, "PATCH", "/mmds", patch)
    assert status == 204, body
    assert wget(guest, "/latest/meta-data/").split() == ["ami-id", "placement/"]
    assert wget(guest, "/latest/meta-data/ami-id").strip() == "ami-patched"
    missing = raw(guest, "GET", "/latest/meta-data/instance-id")
    assert missing.status == 404, missing.body
    # V1 also hands out tokens and accepts them.
    token = raw(guest, "PUT", "/latest/api/token", "X-metadata-token-ttl-seconds: 60")
    assert token.status == 200 and token.body.strip(), token.body
    assert wget(guest, "/latest/meta-data/ami-id", f"X-metadata-token: {token.body.strip()}").strip() == "ami-patched"
    assert guest.stop() == 0, guest.tail()


def test_mmds_v2_needs_a_session_token(guests, guest_images, tmp_path, net):
    meta = metadata(secrets.token_hex(4))
    guest, sock = mmds_guest(guests, guest_images, tmp_path, net, "V2", [])
    status, body = api(sock, "PUT", "/mmds", meta)
    assert status == 204, body

    no_token = raw(guest, "GET", "/latest/meta-data/ami-id")
    assert no_token.status == 401, no_token.body
    proxied = raw(guest, "PUT", "/latest/api/token", "X-metadata-token-ttl-seconds: 60",
                  "X-Forwarded-For: 10.0.0.1")
    assert proxied.status == 400, proxied.body
    issued = raw(guest, "PUT", "/latest/api/token", "X-metadata-token-ttl-seconds: 60")
    assert issued.status == 200, issued.body
    assert issued.headers.get("x-metadata-token-ttl-seconds") == "60", issued.headers
    token = issued.body.strip()
    assert token

    assert_serves(guest, meta, f"X-metadata-token: {token}")
    with_token = raw(guest, "GET", "/latest/meta-data/ami-id", f"X-metadata-token: {token}")
    assert with_token.status == 200 and with_token.body.strip() == meta["latest"]["meta-data"]["ami-id"]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    bad = raw(guest, "GET", "/latest/meta-data/ami-id", f"X-metadata-token: {forged}")
    assert bad.status == 401, bad.body
    assert guest.stop() == 0, guest.tail()
