"""What the MMDS answers to a guest's HTTP request (Firecracker's semantics).

Methods: ``GET`` reads the data store, ``PUT /latest/api/token`` issues a
session token (both versions issue tokens); ``HEAD``, ``POST``, ``PATCH`` and
``DELETE`` get ``405`` with ``Allow: GET, PUT``; any other method gets
``501``.

Tokens: a GET may carry ``X-metadata-token`` or ``X-aws-ec2-metadata-token``.
V1 serves it either way, counting ``rx_no_token`` / ``rx_invalid_token``;
V2 answers ``401`` without a valid one.  A token PUT must carry
``X-metadata-token-ttl-seconds`` or ``X-aws-ec2-metadata-token-ttl-seconds``
(1..21600) and must not carry ``X-Forwarded-For`` (a token request relayed by
a proxy in the guest is refused); the response echoes the TTL header.
Header names match case-insensitively.

Paths: the request target's path (an absolute-form ``http://host/path`` is
reduced to ``/path``; a query is dropped), with ``//`` runs collapsed, is a
JSON pointer into the store; one trailing ``/`` is ignored.

Formats: ``Accept: application/json`` gets compact JSON with sorted keys
(unless the config sets ``imds_compat``); anything else gets the IMDS text
format: an object lists its keys sorted, one per line, objects with a
trailing ``/``; a string is returned as is; any other value is ``501``.

No I/O here.
"""

from __future__ import annotations

import enum
import json
import logging
from typing import Any

from asyncvmm.mmds.http11 import HttpRequest, HttpResponse
from asyncvmm.mmds.metrics import MmdsMetrics
from asyncvmm.mmds.store import MmdsNotFoundError, MmdsStore
from asyncvmm.mmds.token import TokenAuthority, TokenTtlError

log = logging.getLogger(__name__)

PATH_TO_TOKEN = "/latest/api/token"

X_METADATA_TOKEN = "X-metadata-token"
X_AWS_EC2_METADATA_TOKEN = "X-aws-ec2-metadata-token"
X_METADATA_TOKEN_TTL_SECONDS = "X-metadata-token-ttl-seconds"
X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS = "X-aws-ec2-metadata-token-ttl-seconds"
X_FORWARDED_FOR = "X-Forwarded-For"

ALLOWED_METHODS = ("GET", "PUT")
# The methods Firecracker's HTTP parser knows; the rest are "not implemented".
KNOWN_METHODS = frozenset({"GET", "PUT", "HEAD", "POST", "PATCH", "DELETE"})

MSG_INVALID_URI = "Invalid URI."
MSG_METHOD_NOT_ALLOWED = "Not allowed HTTP method."
MSG_UNSUPPORTED_METHOD = "Invalid HTTP Method: Unsupported HTTP method."
MSG_INVALID_TOKEN = "MMDS token not valid."
MSG_NO_TOKEN = ("No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` "
                "header to specify the session token.")
MSG_NO_TTL = ("Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
              "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.")
MSG_UNSUPPORTED_VALUE = "Cannot retrieve value. The value has an unsupported type."

_U32_MAX = 0xFFFF_FFFF


class MmdsVersion(enum.Enum):
    V1 = "V1"
    V2 = "V2"


class UnsupportedValueTypeError(Exception):
    """The value has no IMDS text form (numbers, booleans, null, arrays)."""


def render_imds(value: Any) -> str:
    if isinstance(value, dict):
        return "\n".join(k + "/" if isinstance(value[k], dict) else k for k in sorted(value))
    if isinstance(value, str):
        return value
    raise UnsupportedValueTypeError()


def render_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def request_path(target: str) -> str | None:
    """The absolute path of a request target, or None if it has none."""
    if target.startswith("/"):
        path = target
    elif target[:7].lower() == "http://":
        rest = target[7:]
        slash = rest.find("/")
        if slash < 0 or not rest[:slash]:
            return None
        path = rest[slash:]
    else:
        return None
    path = path.split("#", 1)[0].split("?", 1)[0]
    return path or None


def json_pointer(path: str) -> str:
    """Collapse ``//`` runs and drop one trailing ``/``: the store pointer."""
    while "//" in path:
        path = path.replace("//", "/")
    return path[:-1] if path.endswith("/") else path


class MmdsHttpHandler:
    """Maps :class:`HttpRequest` to :class:`HttpResponse` for one VM's MMDS."""

    def __init__(self, store: MmdsStore, tokens: TokenAuthority, *,
                 version: MmdsVersion = MmdsVersion.V1, imds_compat: bool = False,
                 metrics: MmdsMetrics | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.version = version
        self.imds_compat = imds_compat
        self.metrics = metrics if metrics is not None else MmdsMetrics()

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.handle(request)

    def handle(self, request: HttpRequest) -> HttpResponse:
        path = request_path(request.target)
        if path is None:
            return HttpResponse.text(400, MSG_INVALID_URI)
        if request.method == "GET":
            return self._get(request, path)
        if request.method == "PUT":
            return self._put(request, path)
        if request.method in KNOWN_METHODS:
            return HttpResponse.text(405, MSG_METHOD_NOT_ALLOWED, allow=ALLOWED_METHODS)
        return HttpResponse.text(501, MSG_UNSUPPORTED_METHOD)

    # -- GET ----------------------------------------------------------------

    def _token_refusal(self, request: HttpRequest) -> HttpResponse | None:
        found = request.find_header(X_METADATA_TOKEN, X_AWS_EC2_METADATA_TOKEN)
        if found is None:
            self.metrics.rx_no_token += 1
            refusal = HttpResponse.text(401, MSG_NO_TOKEN)
        elif not self.tokens.is_valid(found[1]):
            self.metrics.rx_invalid_token += 1
            refusal = HttpResponse.text(401, MSG_INVALID_TOKEN)
        else:
            return None
        # V1 only counts; the request is served (Firecracker keeps V1 workloads working).
        return refusal if self.version is MmdsVersion.V2 else None

    def _get(self, request: HttpRequest, path: str) -> HttpResponse:
        refusal = self._token_refusal(request)
        if refusal is not None:
            return refusal
        as_json = not self.imds_compat and (request.header("Accept") or "").strip() == "application/json"
        try:
            value = self.store.lookup(json_pointer(path))
            if as_json:
                return HttpResponse.text(200, render_json(value), content_type="application/json")
            return HttpResponse.text(200, render_imds(value))
        except MmdsNotFoundError:
            return HttpResponse.text(404, f"Resource not found: {path}.")
        except UnsupportedValueTypeError:
            return HttpResponse.text(501, MSG_UNSUPPORTED_VALUE)

    # -- PUT ----------------------------------------------------------------

    def _put(self, request: HttpRequest, path: str) -> HttpResponse:
        forwarded = request.find_header(X_FORWARDED_FOR)
        if forwarded is not None:
            return HttpResponse.text(
                400, f"Invalid header. Reason: Unsupported header name. Key: {forwarded[0]}")
        if json_pointer(path) != PATH_TO_TOKEN:
            return HttpResponse.text(404, f"Resource not found: {path}.")
        found = request.find_header(X_METADATA_TOKEN_TTL_SECONDS,
                                    X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS)
        if found is None:
            return HttpResponse.text(400, MSG_NO_TTL)
        key, raw = found
        if len(raw) > 10 or not raw.isascii() or not raw.isdigit() or int(raw) > _U32_MAX:
            return HttpResponse.text(
                400, f"Invalid header. Reason: Invalid value. Key:{key}; Value:{raw}")
        try:
            token = self.tokens.generate(int(raw))
        except TokenTtlError as err:
            return HttpResponse.text(400, str(err))
        # The TTL is echoed under the header name the guest used, as EC2 and Firecracker do.
        return HttpResponse.text(200, token, headers=((key, str(int(raw))),))
