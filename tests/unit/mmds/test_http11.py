import pytest
from hypothesis import given, strategies as st

from asyncvmm.mmds.http11 import (MAX_REQUEST_BYTES, HttpParseError, HttpRequest, HttpResponse,
                                  RequestReader, parse_request_head)


def test_parses_a_request_with_headers_case_insensitively():
    req = parse_request_head(b"GET /latest/meta-data HTTP/1.1\r\nHost: x\r\n"
                             b"X-Metadata-Token:  abc \r\nAccept: application/json\r\n\r\n")
    assert (req.method, req.target, req.version) == ("GET", "/latest/meta-data", "HTTP/1.1")
    assert req.header("x-metadata-token") == "abc"
    assert req.header("ACCEPT") == "application/json"
    assert req.header("missing") is None
    assert req.find_header("nope", "X-metadata-token") == ("X-Metadata-Token", "abc")


def test_bare_lf_line_ends_are_accepted():
    req = parse_request_head(b"GET / HTTP/1.0\nA: b\n\n")
    assert req.version == "HTTP/1.0" and req.header("a") == "b"


@pytest.mark.parametrize("head,status", [
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\n\r\n", 501),
    (b"GET / HTTP/1.1x\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 100\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
    (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"\r\n", 400),
])
def test_malformed_requests_become_errors_that_close(head, status):
    with pytest.raises(HttpParseError) as exc:
        parse_request_head(head)
    assert exc.value.status == status
    assert exc.value.response.status == status and exc.value.response.close


def test_body_announced_by_content_length_gets_firecrackers_invalid_request():
    with pytest.raises(HttpParseError) as exc:
        parse_request_head(b"GET / HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
    assert exc.value.message == "Invalid request."


def test_zero_content_length_and_identity_encoding_are_fine():
    req = parse_request_head(b"PUT /x HTTP/1.1\r\nContent-Length: 0\r\n"
                             b"Transfer-Encoding: identity\r\n\r\n")
    assert req.method == "PUT"


def test_too_many_headers():
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(65)) + b"\r\n"
    with pytest.raises(HttpParseError):
        parse_request_head(head)


@pytest.mark.parametrize("version,connection,keep", [
    ("HTTP/1.1", None, True), ("HTTP/1.1", "close", False), ("HTTP/1.1", "Keep-Alive, Close", False),
    ("HTTP/1.0", None, False), ("HTTP/1.0", "keep-alive", True),
])
def test_keep_alive_rules(version, connection, keep):
    headers = (("Connection", connection),) if connection else ()
    assert HttpRequest("GET", "/", version, headers).keep_alive is keep


def test_response_encoding():
    raw = HttpResponse.text(405, "Not allowed HTTP method.", allow=("GET", "PUT")).encode("HTTP/1.0")
    head, body = raw.split(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.0 405 Method Not Allowed"
    assert "Allow: GET, PUT" in lines and "Content-Length: 24" in lines
    assert "Connection: keep-alive" in lines and "Content-Type: text/plain" in lines
    assert body == b"Not allowed HTTP method."
    assert b"Connection: close" in HttpResponse(200, close=True).encode()


def test_reader_splits_pipelined_requests_and_waits_for_more():
    r = RequestReader()
    r.feed(b"\r\nGET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHo")
    first = r.next_request()
    assert isinstance(first, HttpRequest) and first.target == "/a"
    assert r.next_request() is None
    r.feed(b"st: x\r\n\r\n")
    second = r.next_request()
    assert isinstance(second, HttpRequest) and second.target == "/b"
    assert r.next_request() is None and r.buffered == 0


def test_reader_is_bounded_and_a_full_buffer_without_a_head_is_an_error():
    r = RequestReader()
    assert r.feed(b"x" * (MAX_REQUEST_BYTES + 100)) == MAX_REQUEST_BYTES
    assert r.free_space == 0 and r.feed(b"more") == 0
    err = r.next_request()
    assert isinstance(err, HttpParseError) and err.status == 400


@given(st.binary(max_size=600))
def test_reader_never_raises_on_arbitrary_bytes(data):
    r = RequestReader()
    r.feed(data)
    for _ in range(50):
        item = r.next_request()
        if item is None or isinstance(item, HttpParseError):
            break
        assert isinstance(item, HttpRequest)


@given(st.lists(st.sampled_from([b"GET", b" ", b"/", b"HTTP/1.1", b"\r\n", b"\n", b":", b"A",
                                 b"Content-Length", b"0", b"5", b"\x00", b"\xff", b"\t"]),
                max_size=40))
def test_parser_never_raises_anything_but_parse_errors(parts):
    try:
        parse_request_head(b"".join(parts))
    except HttpParseError:
        pass
