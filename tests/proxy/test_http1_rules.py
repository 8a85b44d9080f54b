"""Table tests of the pure HTTP/1.1 rules in lepton_mesh.proxy.http.http1.

Request heads are produced the way the sidecar produces them: raw bytes fed
to httptools, whole and one byte at a time; both feedings must forward the
identical head (a rule that depended on how bytes were split would be a
smuggling vector).
"""

from __future__ import annotations

import re
import uuid

import httptools
import orjson
import pytest

from lepton_mesh.proxy.errors import ProxyError, Reason
from lepton_mesh.proxy.http.http1 import (
    HOP_BY_HOP,
    Headers,
    chunk_frame,
    connection_tokens,
    error_response,
    last_chunk,
    new_request_id,
    new_traceparent,
    prepare_request_head,
    prepare_response_head,
    response_has_body,
    split_target,
    status_line,
    valid_traceparent,
)

RID = "rid-1"
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class _Collect:
    """The parser callbacks the sidecar's downstream protocol uses, minus the proxying."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: Headers = []
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.done = True


def parse(raw: bytes, *, bytewise: bool) -> tuple[bytes, bytes, str, Headers, bool]:
    c = _Collect()
    p = httptools.HttpRequestParser(c)
    try:
        if bytewise:
            for i in range(len(raw)):
                p.feed_data(raw[i : i + 1])
        else:
            p.feed_data(raw)
    except httptools.HttpParserUpgrade:
        pass
    assert c.done
    return p.get_method(), c.url, p.get_http_version(), c.headers, p.should_upgrade()


def forward(raw: bytes, *, bytewise: bool = False) -> tuple[bytes, object]:
    method, url, version, headers, upgrade = parse(raw, bytewise=bytewise)
    return prepare_request_head(
        method, url, version, headers, client_ip=b"10.0.0.9", upgrade=upgrade
    )


def head_lines(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    assert lines[-2:] == ["", ""], head
    return [(k.lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:-2])]


def req(*lines: str, body: bytes = b"") -> bytes:
    base = ["GET /p HTTP/1.1", "Host: svc", f"X-Request-Id: {RID}", f"traceparent: {TP}"]
    if lines and lines[0].split(" ", 1)[0] in ("GET", "POST", "HEAD"):
        base[0] = lines[0]
        lines = lines[1:]
    return ("\r\n".join(base + list(lines)) + "\r\n\r\n").encode("latin-1") + body


# (id, request, names that must not be forwarded, (name, value) pairs that must be)
REQUEST_RULES = [
    ("connection-named", req("Connection: keep-alive, X-A, x-b", "X-A: 1", "X-B: 2", "X-C: 3"), {"x-a", "x-b"}, [("x-c", "3")]),
    ("connection-twice", req("Connection: X-A", "Connection: X-B", "X-A: 1", "X-B: 2"), {"x-a", "x-b"}, []),
    ("keep-alive", req("Keep-Alive: timeout=5"), {"keep-alive"}, []),
    ("proxy-connection", req("Proxy-Connection: keep-alive"), {"proxy-connection"}, []),
    ("te", req("TE: trailers, deflate"), {"te"}, []),
    ("trailer", req("Trailer: X-Sum"), {"trailer"}, []),
    ("proxy-authorization", req("Proxy-Authorization: Basic eA=="), {"proxy-authorization"}, []),
    ("upgrade-without-connection", req("Upgrade: h2c"), {"upgrade"}, []),
    ("connection-cannot-drop-host", req("Connection: Host, Content-Length", "Content-Length: 0", body=b""), set(), [("host", "svc"), ("content-length", "0")]),
    ("connection-cannot-drop-request-id", req("Connection: X-Request-Id, traceparent"), set(), [("x-request-id", RID), ("traceparent", TP)]),
    ("end-to-end-kept", req("Authorization: Bearer t", "Cache-Control: no-cache", "Expect: 100-continue", "Content-Length: 0"), set(), [("authorization", "Bearer t"), ("cache-control", "no-cache"), ("expect", "100-continue")]),
    ("chunked-reframed", req("POST /p HTTP/1.1", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), set(), [("transfer-encoding", "chunked")]),
    ("xff-appended", req("X-Forwarded-For: 1.2.3.4"), set(), [("x-forwarded-for", "1.2.3.4, 10.0.0.9")]),
    ("xff-set", req(), set(), [("x-forwarded-for", "10.0.0.9"), ("x-forwarded-proto", "http")]),
    ("xfp-kept", req("X-Forwarded-Proto: https"), set(), [("x-forwarded-proto", "https")]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case_id", "raw", "absent", "present"), REQUEST_RULES, ids=[c[0] for c in REQUEST_RULES]
)
def test_request_head_rules(case_id, raw, absent, present) -> None:
    whole, _ = forward(raw)
    bytewise, _ = forward(raw, bytewise=True)
    assert whole == bytewise, "forwarded head depends on how the bytes were split"
    assert whole.startswith(b"GET /p HTTP/1.1\r\n") or whole.startswith(b"POST /p HTTP/1.1\r\n")
    lines = head_lines(whole)
    names = [k for k, _ in lines]
    for name in absent:
        assert name not in names, (name, lines)
    for pair in present:
        assert pair in lines, (pair, lines)
    # Whatever the case, framing headers appear at most once and never together.
    assert names.count("host") == 1
    assert not ("content-length" in names and "transfer-encoding" in names)
    conn = [v for k, v in lines if k == "connection"]
    assert all(
        t.strip().lower() in ("keep-alive", "upgrade") for v in conn for t in v.split(",")
    ), conn


# (id, request, status, reason)
REQUEST_ERRORS = [
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("no-host-11", b"GET / HTTP/1.1\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("te-http10", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("te-gzip-chunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501, Reason.UNSUPPORTED),
    ("https-absolute", b"GET https://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, Reason.UNSUPPORTED),
    ("userinfo", b"GET http://u:p@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-port-not-numeric", b"GET / HTTP/1.1\r\nHost: up:abc\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-port-too-long", b"GET / HTTP/1.1\r\nHost: up:123456\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-list", b"GET / HTTP/1.1\r\nHost: up, dead\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-userinfo", b"GET / HTTP/1.1\r\nHost: x@up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-space", b"GET / HTTP/1.1\r\nHost: up dead\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-bare-ipv6", b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-ipv6-unclosed", b"GET / HTTP/1.1\r\nHost: [::1:80\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("host-ipv6-junk-after", b"GET / HTTP/1.1\r\nHost: [::1]x\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("absolute-port-not-numeric", b"GET http://up:abc/ HTTP/1.1\r\nHost: up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("absolute-list", b"GET http://up,dead/ HTTP/1.1\r\nHost: up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("star-not-options", b"GET * HTTP/1.1\r\nHost: up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("fragment", b"GET /echo#frag HTTP/1.1\r\nHost: up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("fragment-after-query", b"GET /echo?a=1#frag HTTP/1.1\r\nHost: up\r\n\r\n", 400, Reason.BAD_REQUEST),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: up\r\n\r\n", 505, Reason.UNSUPPORTED),
    ("http-0.9-with-headers", b"GET / HTTP/0.9\r\nHost: up\r\n\r\n", 505, Reason.UNSUPPORTED),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case_id", "raw", "status", "reason"), REQUEST_ERRORS, ids=[c[0] for c in REQUEST_ERRORS]
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_request_head_errors(case_id, raw, status, reason, bytewise) -> None:
    with pytest.raises(ProxyError) as info:
        forward(raw, bytewise=bytewise)
    assert (info.value.status, info.value.reason, info.value.close) == (status, reason, True)


@pytest.mark.parametrize(
    ("raw", "authority"),
    [
        (b"OPTIONS * HTTP/1.1\r\nHost: up\r\n\r\n", b"up"),
        (
            b"GET / HTTP/1.1\r\nHost: Up.ns.svc.cluster.local:8080\r\n\r\n",
            b"up.ns.svc.cluster.local:8080",
        ),
        (b"GET / HTTP/1.1\r\nHost: 10.0.0.1:80\r\n\r\n", b"10.0.0.1:80"),
        (b"GET / HTTP/1.1\r\nHost: [fe80::1]:8080\r\n\r\n", b"[fe80::1]:8080"),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", b"[::1]"),
        (b"GET / HTTP/1.1\r\nHost: my_svc~1:\r\n\r\n", b"my_svc~1:"),
        (b"GET http://up:81/x HTTP/1.1\r\nHost: other\r\n\r\n", b"up:81"),
    ],
)
def test_valid_targets_and_hosts(raw, authority) -> None:
    _, facts = forward(raw)
    assert facts.authority == authority


def test_checked_hosts_are_remembered_within_a_bound() -> None:
    from lepton_mesh.proxy.http import http1

    raw = b"GET / HTTP/1.1\r\nHost:  Up.Example:8080 \r\n\r\n"
    for _ in range(2):  # checked, then remembered: the same answer
        head, facts = forward(raw)
        assert (facts.authority, facts.host) == (b"up.example:8080", b"Up.Example:8080")
        assert b"Up.Example:8080\r\n" in head  # forwarded as sent, less the spaces
    for i in range(http1._HOSTS_MAX + 10):
        forward(b"GET / HTTP/1.1\r\nHost: h%d\r\n\r\n" % i)
    assert len(http1._HOSTS) <= http1._HOSTS_MAX
    with pytest.raises(ProxyError):
        forward(b"GET / HTTP/1.1\r\nHost: up:abc\r\n\r\n")  # refused ones are not kept
    assert b"up:abc" not in http1._HOSTS


def test_http10_without_host_is_allowed() -> None:
    head, _ = forward(b"GET / HTTP/1.0\r\n\r\n")
    assert head.startswith(b"GET / HTTP/1.1\r\n")


def test_request_facts() -> None:
    raw = req(
        "POST /p HTTP/1.1", "Transfer-Encoding: chunked", "Expect: 100-continue", body=b"0\r\n\r\n"
    )
    _, facts = forward(raw)
    assert facts.authority == b"svc"
    assert facts.request_id == RID.encode()
    assert facts.traceparent == TP.encode()
    assert facts.chunked is True
    assert facts.expect_continue is True
    assert facts.upgrade == b""


def test_generated_ids_when_absent() -> None:
    head, facts = forward(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    lines = dict(head_lines(head))
    assert lines["x-request-id"] == facts.request_id.decode()
    assert lines["traceparent"] == facts.traceparent.decode()
    assert valid_traceparent(facts.traceparent)


def test_upgrade_request_keeps_upgrade() -> None:
    raw = b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n"
    head, facts = forward(raw)
    lines = head_lines(head)
    assert ("upgrade", "websocket") in lines
    assert ("connection", "upgrade") in lines
    assert ("sec-websocket-key", "k") in lines
    assert facts.upgrade == b"websocket"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"/a/b?c", (b"", b"/a/b?c")),
        (b"*", (b"", b"*")),
        (b"http://intent/v1/x", (b"intent", b"/v1/x")),
        (b"HTTP://Intent:8080/v1/x?q=1", (b"intent:8080", b"/v1/x?q=1")),
        (b"http://intent", (b"intent", b"/")),
        (b"http://intent?q", (b"intent", b"/?q")),
    ],
)
def test_split_target(url, expected) -> None:
    assert split_target(url) == expected


@pytest.mark.parametrize("url", [b"intent/v1", b"ftp://x/", b"http:///nohost", b"http://a@b/"])
def test_split_target_rejects(url) -> None:
    with pytest.raises(ProxyError) as info:
        split_target(url)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (TP.encode(), True),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", False),
        (b"00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01", False),
        (b"00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01", False),
        (b"", False),
    ],
)
def test_valid_traceparent(value, ok) -> None:
    assert valid_traceparent(value) is ok


def test_new_ids_are_well_formed_and_distinct() -> None:
    tps = {new_traceparent() for _ in range(100)}
    rids = {new_request_id() for _ in range(100)}
    assert len(tps) == len(rids) == 100
    for tp in tps:
        assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", tp)
        assert valid_traceparent(tp)
    for rid in rids:
        assert uuid.UUID(rid.decode()).version == 4


@pytest.mark.parametrize(
    ("values", "tokens"),
    [
        ([b"close"], {b"close"}),
        ([b"Keep-Alive, X-A ,, x-b"], {b"keep-alive", b"x-a", b"x-b"}),
        ([b"a", b"B"], {b"a", b"b"}),
        ([b""], set()),
    ],
)
def test_connection_tokens(values, tokens) -> None:
    assert connection_tokens(values) == tokens


# (id, status, upstream headers, client version, HEAD?, keep_alive, expected framing
#  (chunked, close_delimited, has_body), header names absent, header lines present)
RESPONSE_RULES = [
    ("length-11", 200, [(b"Content-Length", b"5")], "1.1", False, True, (False, False, True), {"transfer-encoding", "connection"}, [("content-length", "5")]),
    ("chunked-11", 200, [(b"Transfer-Encoding", b"chunked")], "1.1", False, True, (True, False, True), set(), [("transfer-encoding", "chunked")]),
    ("chunked-10", 200, [(b"Transfer-Encoding", b"chunked")], "1.0", False, True, (False, True, True), {"transfer-encoding"}, [("connection", "close")]),
    ("length-10-keepalive", 200, [(b"Content-Length", b"5")], "1.0", False, True, (False, False, True), set(), [("connection", "keep-alive")]),
    ("length-10-close", 200, [(b"Content-Length", b"5")], "1.0", False, False, (False, False, True), set(), [("connection", "close")]),
    ("head-keeps-length", 200, [(b"Content-Length", b"1234")], "1.1", True, True, (False, False, False), {"transfer-encoding"}, [("content-length", "1234")]),
    ("head-no-length", 200, [], "1.1", True, True, (False, False, False), {"transfer-encoding"}, []),
    ("204", 204, [], "1.1", False, True, (False, False, False), {"transfer-encoding", "content-length"}, []),
    ("304", 304, [(b"ETag", b'"x"')], "1.1", False, True, (False, False, False), {"transfer-encoding"}, [("etag", '"x"')]),
    ("hop-by-hop", 200, [(b"Content-Length", b"0"), (b"Connection", b"X-S"), (b"X-S", b"1"), (b"Keep-Alive", b"t=1"), (b"Proxy-Connection", b"k"), (b"Upgrade", b"x"), (b"Proxy-Authenticate", b"Basic"), (b"Trailer", b"X-T"), (b"X-K", b"k")], "1.1", False, True, (False, False, True), {"x-s", "keep-alive", "proxy-connection", "upgrade", "proxy-authenticate", "trailer"}, [("x-k", "k")]),
    ("connection-cannot-drop-length", 200, [(b"Content-Length", b"3"), (b"Connection", b"Content-Length")], "1.1", False, True, (False, False, True), {"transfer-encoding"}, [("content-length", "3")]),
    ("close-11", 200, [(b"Content-Length", b"0")], "1.1", False, False, (False, False, True), set(), [("connection", "close")]),
]  # fmt: skip


@pytest.mark.parametrize(
    (
        "case_id",
        "status",
        "headers",
        "version",
        "head",
        "keep_alive",
        "framing",
        "absent",
        "present",
    ),
    RESPONSE_RULES,
    ids=[c[0] for c in RESPONSE_RULES],
)
def test_response_head_rules(
    case_id, status, headers, version, head, keep_alive, framing, absent, present
) -> None:
    out, f = prepare_response_head(
        status, headers, client_version=version, head_request=head, keep_alive=keep_alive
    )
    assert out.startswith(status_line(status))
    assert (f.chunked, f.close_delimited, f.has_body) == framing
    lines = head_lines(out)
    names = [k for k, _ in lines]
    for name in absent:
        assert name not in names, (name, lines)
    for pair in present:
        assert pair in lines, (pair, lines)
    assert not ("content-length" in names and "transfer-encoding" in names)


@pytest.mark.parametrize(
    ("status", "head", "has"),
    [
        (200, False, True),
        (200, True, False),
        (204, False, False),
        (304, False, False),
        (101, False, False),
        (100, False, False),
        (404, False, True),
    ],
)
def test_response_has_body(status, head, has) -> None:
    assert response_has_body(status, head) is has


def test_chunk_frame_and_last_chunk() -> None:
    assert b"".join(chunk_frame(b"hello")) == b"5\r\nhello\r\n"
    assert b"".join(chunk_frame(b"x" * 255)) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert last_chunk(None) == b"0\r\n\r\n"
    assert last_chunk([]) == b"0\r\n\r\n"
    trailers = [
        (b"grpc-status", b"0"),
        (b"Content-Length", b"5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Host", b"x"),
        (b"X-Sum", b"abc"),
    ]
    assert last_chunk(trailers) == b"0\r\ngrpc-status: 0\r\nX-Sum: abc\r\n\r\n"


@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("head_request", [True, False])
def test_error_response_shape(keep_alive, head_request) -> None:
    err = ProxyError(404, Reason.NO_ROUTE, "no service 'x'")
    body = orjson.dumps({"error": err.detail, "reason": err.reason, "request_id": "r1"})
    raw = error_response(err, b"r1", body, keep_alive=keep_alive, head_request=head_request)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    lines = head_lines(head + b"\r\n\r\n")
    assert ("x-lepton-reason", "no_route") in lines
    assert ("x-request-id", "r1") in lines
    assert ("content-length", str(len(body))) in lines
    assert ("connection", "keep-alive" if keep_alive else "close") in lines
    assert rest == (b"" if head_request else body)


def test_hop_by_hop_set_is_rfc9110() -> None:
    assert {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
    } <= HOP_BY_HOP
