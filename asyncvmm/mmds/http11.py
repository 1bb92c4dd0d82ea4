"""HTTP/1.1 request framing and response encoding for the MMDS (sans-I/O).

Primer.  A request is a request line (``METHOD SP target SP HTTP/1.x``),
header lines (``name: value``) and an empty line; RFC 9112 lets a server
accept a bare LF as a line end, and we do.  The MMDS has no use for request
bodies, so, like Firecracker, a request that announces one
(``Content-Length`` > 0 or any ``Transfer-Encoding`` but ``identity``) is
answered ``400 Invalid request.`` and the connection is closed: the server
never waits for body bytes that a lying ``Content-Length`` promised, so it
cannot hang, and it never has to guess where the next request starts.

Limits: the request head is at most :data:`MAX_REQUEST_BYTES` bytes (the
:class:`RequestReader` buffer is exactly that big, and the TCP layer
advertises only its free space as receive window), and at most
:data:`MAX_HEADERS` header lines.  Every malformed request becomes an
:class:`HttpParseError` carrying the response to send; nothing raises
further.

Persistence (RFC 9112 section 9.3): HTTP/1.1 keeps the connection open unless
``Connection: close``; HTTP/1.0 closes it unless ``Connection: keep-alive``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REQUEST_BYTES = 4096
MAX_HEADERS = 64

SUPPORTED_VERSIONS = ("HTTP/1.0", "HTTP/1.1")

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 501: "Not Implemented",
}

# RFC 9110 section 5.6.2: token characters.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]\Z")
# Control characters other than HTAB may not appear in a field value.
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TARGET_CHAR = re.compile(r"[\x00-\x20\x7f]")
_HEAD_END = re.compile(rb"\n\r?\n")

INVALID_REQUEST = "Invalid request."


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The value of the first header called ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def find_header(self, *names: str) -> tuple[str, str] | None:
        """The first ``(name, value)`` whose name is one of ``names``."""
        wanted = {n.lower() for n in names}
        for key, value in self.headers:
            if key.lower() in wanted:
                return key, value
        return None

    @property
    def keep_alive(self) -> bool:
        options = {t.strip().lower() for t in (self.header("Connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in options
        return "close" not in options


@dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain"
    allow: tuple[str, ...] = ()
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, message: str, **kwargs: object) -> "HttpResponse":
        return cls(status, message.encode("utf-8"), **kwargs)  # type: ignore[arg-type]

    def encode(self, version: str = "HTTP/1.1") -> bytes:
        lines = [
            f"{version} {self.status} {REASONS.get(self.status, '')}",
            "Server: Firecracker API",
            f"Connection: {'close' if self.close else 'keep-alive'}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
        ]
        if self.allow:
            lines.append(f"Allow: {', '.join(self.allow)}")
        lines += [f"{name}: {value}" for name, value in self.headers]
        # latin-1: a header name echoed from the request is bytes as received.
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


class HttpParseError(Exception):
    """A request that cannot be served; ``response`` says why and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.response = HttpResponse.text(status, message, close=True)


def _invalid_value(key: str, value: str) -> HttpParseError:
    return HttpParseError(400, f"Invalid header. Reason: Invalid value. Key:{key}; Value:{value}")


def _parse_request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpParseError(400, INVALID_REQUEST)
    method, target, version = parts
    if not _TOKEN.match(method) or _BAD_TARGET_CHAR.search(target):
        raise HttpParseError(400, INVALID_REQUEST)
    if version not in SUPPORTED_VERSIONS:
        if _VERSION.match(version):
            raise HttpParseError(501, "Invalid HTTP Version: Unsupported HTTP version.")
        raise HttpParseError(400, INVALID_REQUEST)
    return method, target, version


def _parse_header_line(line: str) -> tuple[str, str]:
    if line[:1] in (" ", "\t"):
        # Obsolete line folding (RFC 9112 section 5.2): refuse, never unfold.
        raise HttpParseError(400, INVALID_REQUEST)
    name, sep, value = line.partition(":")
    if not sep:
        raise HttpParseError(400, f"Invalid header. Reason: Header is incorrectly formatted. Key: {name}")
    if not _TOKEN.match(name):
        raise HttpParseError(400, INVALID_REQUEST)
    value = value.strip(" \t")
    if _BAD_VALUE_CHAR.search(value):
        raise HttpParseError(400, INVALID_REQUEST)
    return name, value


def _check_no_body(headers: list[tuple[str, str]]) -> None:
    lengths = [v for k, v in headers if k.lower() == "content-length"]
    if len(lengths) > 1:
        raise HttpParseError(400, INVALID_REQUEST)
    if lengths:
        if not lengths[0].isascii() or not lengths[0].isdigit():
            raise _invalid_value("Content-Length", lengths[0])
        if int(lengths[0]) > 0:
            raise HttpParseError(400, INVALID_REQUEST)
    for k, v in headers:
        if k.lower() == "transfer-encoding" and v.lower() != "identity":
            raise HttpParseError(400, INVALID_REQUEST)


def parse_request_head(head: bytes) -> HttpRequest:
    """Parse one request head (up to and including the empty line)."""
    # latin-1 maps bytes 1:1 to code points, so nothing fails to decode and
    # the character checks above see every byte.
    lines = head.decode("latin-1").split("\n")
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise HttpParseError(400, INVALID_REQUEST)
    method, target, version = _parse_request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpParseError(400, INVALID_REQUEST)
    headers = [_parse_header_line(ln) for ln in lines[1:]]
    _check_no_body(headers)
    return HttpRequest(method, target, version, tuple(headers))


class RequestReader:
    """A bounded per-connection buffer that yields complete request heads."""

    def __init__(self, limit: int = MAX_REQUEST_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()

    @property
    def free_space(self) -> int:
        return self._limit - len(self._buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> int:
        """Buffer what fits of ``data``; returns how many bytes were taken."""
        taken = data[:self.free_space]
        self._buf += taken
        return len(taken)

    def next_request(self) -> HttpRequest | HttpParseError | None:
        """The next complete request, the error it makes, or None for "need more"."""
        # A request may be preceded by empty lines (RFC 9112 section 2.2).
        while self._buf[:1] == b"\n" or self._buf[:2] == b"\r\n":
            del self._buf[:1 if self._buf[:1] == b"\n" else 2]
        m = _HEAD_END.search(self._buf)
        if m is None:
            if self.free_space == 0:
                return HttpParseError(400, INVALID_REQUEST)
            return None
        head = bytes(self._buf[:m.end()])
        del self._buf[:m.end()]
        try:
            return parse_request_head(head)
        except HttpParseError as err:
            return err
