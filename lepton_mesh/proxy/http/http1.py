"""HTTP/1.1 message rules for a proxy: pure functions over parsed heads.

httptools (llhttp in strict mode) does the byte-level parsing and already
rejects the classic smuggling shapes: Content-Length with Transfer-Encoding,
duplicate Content-Length, bad chunk sizes and extensions, obs-fold, bare CR/LF
and NUL in headers, invalid methods and targets. This module adds the rules a
parser cannot know (RFC 9110/9112 for intermediaries) and renders the heads we
forward. Nothing here touches a socket, so every rule is table-tested.

Invariants of what we forward:
- Hop-by-hop headers (RFC 9110 section 7.6.1) never cross the proxy: Connection and every
  header it names, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
  Upgrade (except on an upgrade request), Proxy-Authorization, Proxy-Authenticate.
- Framing is ours: the forwarded message carries either its original
  Content-Length, or `transfer-encoding: chunked` that we produce ourselves.
- Header names are forwarded as received; comparisons use lowercase.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from random import Random

from lepton_mesh.proxy.errors import ProxyError, Reason, bad_request

# Ids come from a generator of our own, seeded by the OS: whoever seeds the
# process-global `random` (tests, libraries) must not make request ids repeat.
_ids = Random()
getrandbits = _ids.getrandbits

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# Methods whose requests are safe to send again if a reused upstream
# connection turns out to be dead before any response byte (RFC 9110 section 9.2.2).
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


STATUS_LINES: dict[int, bytes] = {s.value: _status_line(s.value) for s in HTTPStatus}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    return line if line is not None else _status_line(code)


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """The lowercase tokens of all Connection header values."""
    tokens: set[bytes] = set()
    for v in values:
        for t in v.split(b","):
            t = t.strip().lower()
            if t:
                tokens.add(t)
    return tokens


def new_request_id() -> bytes:
    """A random UUID4-shaped id (as Envoy's); version and variant nibbles set by position."""
    h = b"%032x" % getrandbits(128)
    return b"%s-%s-4%s-a%s-%s" % (h[:8], h[8:12], h[13:16], h[17:20], h[20:])


def new_traceparent() -> bytes:
    """A W3C traceparent for a request that arrived without one (sampled)."""
    return b"00-%032x-%016x-01" % (getrandbits(128) or 1, getrandbits(64) or 1)


def valid_traceparent(value: bytes) -> bool:
    """Version 00 shape check (W3C Trace Context section 3.2); all-zero ids are invalid."""
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return False
    try:
        int(value[:2], 16)
        trace = int(value[3:35], 16)
        parent = int(value[36:52], 16)
        int(value[53:55], 16)
    except ValueError:
        return False
    return trace != 0 and parent != 0 and value[:2] != b"ff"


@dataclass(slots=True)
class RequestFacts:
    """A validated request head: what the proxy decides on, and what it forwards.

    `kept` holds the end-to-end headers in arrival order as (lowercase name,
    name, value), with hop-by-hop headers and the ones we re-render (Host,
    X-Forwarded-For, framing) already taken out.
    """

    method: bytes
    target: bytes  # origin-form: path and query
    authority: bytes  # lowercase host[:port] the client addressed
    host: bytes  # the Host value we forward
    kept: list[tuple[bytes, bytes, bytes]]
    request_id: bytes
    request_id_added: bool
    traceparent: bytes
    traceparent_added: bool
    forwarded_for: bytes  # the X-Forwarded-For value we forward
    forwarded_proto_set: bool
    chunked: bool  # the request body is chunked (we re-chunk it)
    content_length: int  # -1 when absent
    expect_continue: bool
    upgrade: bytes  # the Upgrade header value on an upgrade request, else b""
    peer: bytes = (
        b""  # the calling workload, as its sidecar named it (x-lepton-peer); never forwarded
    )

    @property
    def path(self) -> bytes:
        q = self.target.find(b"?")
        return self.target if q < 0 else self.target[:q]

    @property
    def has_body(self) -> bool:
        return self.chunked or self.content_length > 0


def split_target(url: bytes) -> tuple[bytes, bytes]:
    """(authority, origin-form target) of a request target.

    Absolute-form (`http://intent:8080/v1/x?q`) gives the authority and
    `/v1/x?q`; origin-form gives (b"", url); asterisk-form `*` gives (b"", b"*").
    Only http is proxied: an `https://` absolute target would mean the client
    expects us to originate TLS to it. A fragment is never part of a request
    target (RFC 9112 section 3.2): llhttp accepts one, we refuse it.
    """
    if b"#" in url:
        raise bad_request("a fragment (#) is not part of a request target")
    if url[:1] == b"/":
        return b"", url
    if url == b"*":
        return b"", url
    lower = url[:8].lower()
    if lower.startswith(b"http://"):
        rest = url[7:]
    elif lower.startswith(b"https://"):
        raise ProxyError(
            400,
            Reason.UNSUPPORTED,
            "https absolute-form targets need CONNECT; use http:// to the mesh",
            close=True,
        )
    else:
        raise bad_request("request target is neither origin-form nor absolute http:// form")
    slash = rest.find(b"/")
    query = rest.find(b"?")
    end = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority = rest[:end]
    if b"@" in authority:
        raise bad_request("userinfo in request target is not allowed")
    if not authority:
        raise bad_request("absolute-form target without a host")
    if not valid_authority(authority):
        raise bad_request("request target's authority is not a host[:port]")
    path = rest[end:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority.lower(), path


# What a host may be made of (RFC 3986 section 3.2.2): a reg-name's unreserved
# characters and pct-encoding; sub-delims (`,` `;` `!` ...) are allowed by the
# grammar but in a Host value mean a list or an attack, never a DNS name.
_REG_NAME = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%"
_IP_LITERAL = b"0123456789abcdefABCDEF:.vV"


def valid_authority(authority: bytes) -> bool:
    """Whether `authority` is `host[:port]` (RFC 9112 section 3.2: an invalid Host is a 400).

    A reg-name or IPv4 address, or an IP literal in brackets; the port, if
    any, digits. No userinfo, no lists, no spaces. Two C-level scans."""
    if authority[:1] == b"[":
        end = authority.find(b"]")
        if end < 0 or authority[1:end].translate(None, _IP_LITERAL):
            return False
        rest = authority[end + 1 :]
        return not rest or (rest[:1] == b":" and _valid_port(rest[1:]))
    colon = authority.find(b":")
    if colon < 0:
        return not authority.translate(None, _REG_NAME)
    return not authority[:colon].translate(None, _REG_NAME) and _valid_port(authority[colon + 1 :])


def _valid_port(port: bytes) -> bool:
    return not port or (port.isdigit() and len(port) <= 5)  # RFC 3986: port = *DIGIT


# Host values already checked: raw value -> (value to forward, lowercase authority).
# Most connections send one Host again and again; this saves the checks and the
# copies. Bounded: cleared when full, so distinct Hosts cost the check again.
_HOSTS: dict[bytes, tuple[bytes, bytes]] = {}
_HOSTS_MAX = 512


def _check_host(value: bytes) -> tuple[bytes, bytes]:
    host = value.strip()
    if host and not valid_authority(host):
        raise bad_request("Host header is not a host[:port]")
    known = (host, host.lower())
    if len(value) <= 300:  # a DNS name is at most 253 bytes: longer ones are not kept
        if len(_HOSTS) >= _HOSTS_MAX:
            _HOSTS.clear()
        _HOSTS[value] = known
    return known


def inspect_request(
    method: bytes,
    url: bytes,
    version: str,
    headers: Headers,
    *,
    client_ip: bytes,
    upgrade: bool,
) -> RequestFacts:
    """Validate a parsed request head and extract what the proxy needs.

    Raises ProxyError (400/501/505) for what llhttp accepts but a proxy must not
    pass on. One pass over the headers; rendering is `render_request_head`.
    """
    if version != "1.1" and version != "1.0":
        # llhttp reads `HTTP/2.0` and `HTTP/0.9` request lines; we would forward
        # them as HTTP/1.1, so they are refused as nginx does.
        raise ProxyError(
            505,
            Reason.UNSUPPORTED,
            f"HTTP/{version} is not supported: send HTTP/1.1 (or 1.0) to the mesh",
            close=True,
        )
    target_authority, target = split_target(url)
    if target == b"*" and method != b"OPTIONS":
        raise bad_request("the target * is only for OPTIONS")
    host: bytes | None = None
    conn_values: list[bytes] = []
    te: bytes | None = None
    content_length = -1
    request_id = b""
    traceparent = b""
    xff = b""
    has_xfp = False
    expect_continue = False
    upgrade_value = b""
    peer = b""
    kept: list[tuple[bytes, bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in _REQUEST_SPECIAL:
            if lname == b"host":
                if host is not None:
                    raise bad_request("more than one Host header")
                host = value
                continue
            if lname == b"connection":
                conn_values.append(value)
                continue
            if lname == b"transfer-encoding":
                te = value if te is None else te + b"," + value
                continue
            if lname == b"upgrade":
                upgrade_value = value
                continue
            if lname == b"content-length":
                content_length = int(value)  # llhttp validated digits and uniqueness
            elif lname == b"x-request-id":
                request_id = value
            elif lname == b"traceparent":
                if not valid_traceparent(value):
                    continue  # replaced below; a broken one is not propagated
                traceparent = value
            elif lname == b"x-forwarded-for":
                xff = value if not xff else xff + b", " + value
                continue
            elif lname == b"x-forwarded-proto":
                has_xfp = True
            elif lname == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
            elif lname == PEER_HEADER:
                peer = value
                continue
            else:  # the other hop-by-hop names
                continue
        kept.append((lname, name, value))

    chunked = False
    if te is not None:
        if version == "1.0":
            # RFC 9112 section 6.1: faulty framing; we refuse rather than guess.
            raise bad_request("Transfer-Encoding in an HTTP/1.0 request")
        if te.strip().lower() != b"chunked":
            raise ProxyError(
                501, Reason.UNSUPPORTED, "only Transfer-Encoding: chunked is supported", close=True
            )
        chunked = True

    if host is None:
        if version != "1.0" and not target_authority:
            raise bad_request("missing Host header")
        host = host_authority = target_authority
    else:
        known = _HOSTS.get(host)
        if known is None:
            known = _check_host(host)
        host, host_authority = known
    authority = target_authority or host_authority
    if not authority and version != "1.0":
        raise bad_request("empty Host header")

    if conn_values:
        dropped = connection_tokens(conn_values) - _PROTECTED
        if dropped:
            kept = [h for h in kept if h[0] not in dropped]
    request_id_added = not request_id
    if request_id_added:
        request_id = new_request_id()
    traceparent_added = not traceparent
    if traceparent_added:
        traceparent = new_traceparent()
    return RequestFacts(
        method=method,
        target=target,
        authority=authority,
        # Absolute-form: the target's authority replaces Host (RFC 9112 section 3.2.2).
        host=target_authority or host,
        kept=kept,
        request_id=request_id,
        request_id_added=request_id_added,
        traceparent=traceparent,
        traceparent_added=traceparent_added,
        forwarded_for=(xff + b", " + client_ip) if xff else client_ip,
        forwarded_proto_set=has_xfp,
        chunked=chunked,
        content_length=content_length,
        expect_continue=expect_continue,
        upgrade=upgrade_value if upgrade and upgrade_value else b"",
        peer=peer,
    )


def render_request_head(
    facts: RequestFacts,
    *,
    set_headers: tuple[tuple[bytes, bytes], ...] = (),
    add_headers: tuple[tuple[bytes, bytes], ...] = (),
    remove: frozenset[bytes] = frozenset(),
    host: bytes | None = None,
    extra: bytes = b"",
    scheme: bytes = b"http",
) -> bytes:
    """The HTTP/1.1 request head we send upstream.

    Route header operations apply here: `remove` and the names in
    `set_headers` drop received headers (lowercase names), then `set_headers`
    and `add_headers` are appended. `host` overrides Host (mirrors use
    `<host>-shadow`); `extra` is pre-rendered lines we add (`x-lepton-*`).
    """
    out: list[bytes] = [facts.method, b" ", facts.target, b" HTTP/1.1\r\n"]
    if facts.request_id_added:
        out += (b"x-request-id: ", facts.request_id, b"\r\n")
    if facts.traceparent_added:
        out += (b"traceparent: ", facts.traceparent, b"\r\n")
    out += (b"Host: ", host or facts.host, b"\r\n")
    if set_headers:
        remove = remove | {n for n, _ in set_headers}
    if remove:
        for lname, name, value in facts.kept:
            if lname not in remove:
                out += (name, b": ", value, b"\r\n")
    else:
        for _, name, value in facts.kept:
            out += (name, b": ", value, b"\r\n")
    for name, value in set_headers:
        out += (name, b": ", value, b"\r\n")
    for name, value in add_headers:
        out += (name, b": ", value, b"\r\n")
    out += (b"x-forwarded-for: ", facts.forwarded_for, b"\r\n")
    if not facts.forwarded_proto_set:
        out += (b"x-forwarded-proto: ", scheme, b"\r\n")
    if extra:
        out.append(extra)
    if facts.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if facts.upgrade:
        out += (b"connection: upgrade\r\nupgrade: ", facts.upgrade, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def prepare_request_head(
    method: bytes,
    url: bytes,
    version: str,
    headers: Headers,
    *,
    client_ip: bytes,
    upgrade: bool,
    scheme: bytes = b"http",
) -> tuple[bytes, RequestFacts]:
    """`inspect_request` then `render_request_head` with no route header operations."""
    facts = inspect_request(method, url, version, headers, client_ip=client_ip, upgrade=upgrade)
    return render_request_head(facts, scheme=scheme), facts


# Which workload sent a request, as the caller's sidecar says; taken off every
# request we receive (an app cannot set it) and set by the outbound side.
# Unverified until mTLS identities replace it.
PEER_HEADER = b"x-lepton-peer"

_REQUEST_SPECIAL = HOP_BY_HOP | {
    PEER_HEADER,
    b"host",
    b"content-length",
    b"x-request-id",
    b"traceparent",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"expect",
}
# Connection may not name these away: framing and identity are decided by us.
_PROTECTED = frozenset(
    {b"host", b"content-length", b"x-request-id", b"traceparent", b"x-forwarded-for"}
)


@dataclass(slots=True)
class ResponseFraming:
    """How a response is forwarded to the client."""

    chunked: bool  # we chunk the body ourselves
    close_delimited: bool  # the body ends when we close (HTTP/1.0 client, no length)
    has_body: bool


def response_has_body(status: int, head_request: bool) -> bool:
    return not (head_request or status in (204, 304) or 100 <= status < 200)


def prepare_response_head(
    status: int,
    headers: Headers,
    *,
    client_version: str,
    head_request: bool,
    keep_alive: bool,
    upgrade: bool = False,
    extra: bytes = b"",
    remove: frozenset[bytes] = frozenset(),
) -> tuple[bytes, ResponseFraming]:
    """Render the response head we send to the client.

    `keep_alive` is whether the client connection stays open after this
    response; a close-delimited body forces it off. `upgrade` forwards a 101's
    Upgrade header and `connection: upgrade`. `extra` is pre-rendered header
    lines we add (our own `x-lepton-*`, a route's response headers); `remove`
    drops received headers by lowercase name.
    """
    out: list[bytes] = [status_line(status)]
    conn_values: list[bytes] = []
    kept: list[tuple[bytes, bytes, bytes]] = []
    has_length = False
    upgrade_value = b""
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                conn_values.append(value)
            elif lname == b"upgrade":
                upgrade_value = value
            continue
        if lname == b"content-length":
            if status < 200 or status == 204:
                continue  # never on 1xx or 204 (RFC 9110 section 8.6); kept on 304
            has_length = True
        kept.append((lname, name, value))
    dropped = connection_tokens(conn_values) - _PROTECTED if conn_values else ()
    if remove:
        dropped = set(dropped) | remove
    for lname, name, value in kept:
        if dropped and lname in dropped:
            continue
        out += (name, b": ", value, b"\r\n")
    if extra:
        out.append(extra)
    has_body = response_has_body(status, head_request)
    chunked = False
    close_delimited = False
    if upgrade:
        out += (b"connection: upgrade\r\nupgrade: ", upgrade_value, b"\r\n")
    elif 100 <= status < 200:
        pass
    else:
        if has_body and not has_length:
            if client_version == "1.1":
                chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                close_delimited = True
                keep_alive = False
        if not keep_alive:
            out.append(b"connection: close\r\n")
        elif client_version == "1.0":
            out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out), ResponseFraming(chunked, close_delimited, has_body)


def chunk_frame(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The three buffers of one chunk, for transport.writelines (no copy of data)."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def last_chunk(trailers: Headers | None) -> bytes:
    if not trailers:
        return b"0\r\n\r\n"
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() in _FORBIDDEN_TRAILERS:
            continue  # RFC 9110 section 6.5.1: framing and routing fields never in trailers
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


_FORBIDDEN_TRAILERS = HOP_BY_HOP | {b"content-length", b"host", b"content-type", b"authorization"}


def error_response(
    err: ProxyError,
    request_id: bytes,
    body: bytes,
    *,
    keep_alive: bool,
    head_request: bool = False,
    extra: bytes = b"",
) -> bytes:
    """A complete response the proxy originates (never a bare status)."""
    parts = [
        status_line(err.status),
        b"content-type: application/json\r\n",
        b"x-lepton-reason: ",
        err.reason.encode(),
        b"\r\n",
        b"x-request-id: ",
        request_id,
        b"\r\n",
        b"content-length: %d\r\n" % len(body),
        extra,
    ]
    parts.append(b"connection: keep-alive\r\n\r\n" if keep_alive else b"connection: close\r\n\r\n")
    if not head_request:
        parts.append(body)
    return b"".join(parts)
