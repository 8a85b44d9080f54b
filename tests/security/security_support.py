"""Helpers for the inbound-security tests: keys and tokens, a JWKS server, an app that
echoes what reached it, a sidecar with security policies, and a small HTTP client.

Everything talks over real sockets on 127.0.0.1. Tokens are signed by keys the
tests generate (cryptography) with PyJWT, or built by hand for the attacks
PyJWT refuses to produce (`alg: none`, HS256 keyed with a public key).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from lepton_mesh.policy.security import (
    JwtProvider,
    RequestAuthentication,
    SecurityPolicies,
)
from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Listeners,
    SidecarConfig,
)

LOCAL = "127.0.0.1"
DEADLINE = 5.0
ISSUER = "https://idp.test"
AUDIENCE = "intent-api"

# Key generation is the slow part of these tests: one RSA key per module run.
_RSA: dict[str, rsa.RSAPrivateKey] = {}


def rsa_key(name: str = "main") -> rsa.RSAPrivateKey:
    key = _RSA.get(name)
    if key is None:
        key = _RSA[name] = rsa.generate_private_key(65537, 2048)
    return key


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(key: Any, kid: str | None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    jwk.update(extra)
    return jwk


def jwks(*keys: dict[str, Any]) -> dict[str, Any]:
    return {"keys": list(keys)}


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 3600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def mint(
    key: Any, payload: dict[str, Any] | None = None, *, alg: str = "RS256", kid: str | None = "k1"
) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(
        payload if payload is not None else claims(), key, algorithm=alg, headers=headers
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}.{b64(signature)}"


def hmac_token(secret: bytes, payload: dict[str, Any], kid: str | None = "k1") -> str:
    """HS256 keyed with `secret`: with a public key's PEM as the secret, the
    algorithm-confusion attack."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def provider(**kw: Any) -> JwtProvider:
    base: dict[str, Any] = {
        "name": "corp",
        "issuer": ISSUER,
        "audiences": (AUDIENCE,),
        "algorithms": ("RS256", "ES256"),
    }
    base.update(kw)
    return JwtProvider(**base)


def authentication(*providers: JwtProvider) -> RequestAuthentication:
    return RequestAuthentication("authn", "default", "intent", tuple(providers))


async def wait_for(
    predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = ""
) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------
# HTTP on both sides


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        n = name.lower()
        values = [v for k, v in self.headers if k.lower() == n]
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


async def _read_message(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    return lines[0], headers, body


def request_bytes(
    method: str, target: str, headers: Iterable[tuple[str, str]] = (), body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: intent"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Client:
    """One keep-alive connection to the sidecar's inbound listener (TLS with `ssl`).

    Every client opened is closed by the sidecar fixture's teardown too, so a
    failing test does not leave a transport to the loop's close."""

    opened: ClassVar[list[Client]] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        Client.opened.append(self)

    @classmethod
    async def connect(cls, addr: Address, ssl: Any = None) -> Client:
        reader, writer = await asyncio.open_connection(addr.host, addr.port, limit=1 << 20, ssl=ssl)
        return cls(reader, writer)

    @classmethod
    async def close_all(cls) -> None:
        while cls.opened:
            await cls.opened.pop().close()

    async def request(
        self,
        method: str = "GET",
        target: str = "/",
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> Response:
        self.writer.write(request_bytes(method, target, headers, body))
        start, hdrs, data = await asyncio.wait_for(_read_message(self.reader), DEADLINE)
        return Response(int(start.split(" ", 2)[1]), hdrs, data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class EchoApp:
    """The app behind the sidecar: answers 200 with what it received, as JSON
    `{"method", "target", "headers": [[name, value], ...]}`."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.requests = 0

    @property
    def address(self) -> Address:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def start(self) -> EchoApp:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    start, headers, _ = await _read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                method, target, _ = start.split(" ", 2)
                body = orjson.dumps({"method": method, "target": target, "headers": headers})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def echoed_headers(resp: Response) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in resp.json()["headers"]]


def echoed(resp: Response, name: str) -> list[str]:
    return [v for k, v in echoed_headers(resp) if k == name]


@dataclass
class JwksServer:
    """Serves `document` at /jwks.json; `mode` "ok" | "error" (500) | "hang"."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    mode: str = "ok"
    hits: int = 0
    server: asyncio.Server | None = None
    _hung: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def uri(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://{LOCAL}:{port}/jwks.json"

    async def start(self) -> JwksServer:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.hits += 1
        if self.mode == "hang":
            self._hung.append(writer)
            return
        if self.mode == "error":
            body, status = b"oops", b"500 Internal Server Error"
        else:
            body, status = orjson.dumps(self.document), b"200 OK"
        writer.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, len(body), body)
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        for w in self._hung:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class LogCapture:
    """Stands in for the sidecar's access log: keeps the records."""

    def __init__(self) -> None:
        self.enabled = True
        self.records: list[dict[str, Any]] = []

    def log(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def defer(self, render: Callable[[Any], dict[str, Any]], item: Any, size: int) -> None:
        self.records.append(render(item))  # the real log builds it later; the record is the same

    def close(self) -> None:
        pass

    def of(self, resp: Response) -> dict[str, Any]:
        """The record of the request `resp` answered (its id, or the one the app saw)."""
        rid = resp.get("x-request-id")
        if rid is None:
            rid = echoed(resp, "x-request-id")[0]
        return self.by_request_id(rid)

    def by_request_id(self, rid: str) -> dict[str, Any]:
        found = [r for r in self.records if r.get("request_id") == rid]
        assert len(found) == 1, f"{len(found)} access-log records for {rid}"
        return found[0]


def sidecar_config(app: Address, security: SecurityPolicies, **kw: Any) -> SidecarConfig:
    return SidecarConfig(
        service="intent",
        app=app,
        listeners=Listeners(
            outbound=Address(LOCAL, 0), inbound=Address(LOCAL, 0), admin=Address(LOCAL, 0)
        ),
        access_log=AccessLogConfig(enabled=True),
        security=security,
        **kw,
    )


# --------------------------------------------------------------------------
# mTLS: the caller's verified identity


class MeshPki:
    """A root, an intermediate and a CA issuing workload certificates (as `certs init`)."""

    def __init__(self) -> None:
        from lepton_mesh.identity.bundle import TrustBundle
        from lepton_mesh.identity.ca import (
            CertificateAuthority,
            create_intermediate,
            create_root,
        )

        self.root = create_root("cluster.local")
        self.intermediate = create_intermediate(self.root)
        self.bundle = TrustBundle((self.root.cert,))
        self.ca = CertificateAuthority(self.intermediate.cert, self.intermediate.key, self.bundle)

    def issue(self, service: str, namespace: str = "default") -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) of a workload certificate for `service`."""
        from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
        from lepton_mesh.identity.spiffe import SpiffeId

        key = generate_key()
        sid = SpiffeId("cluster.local", namespace, service)
        issued = self.ca.issue(build_csr(key, sid), sid)
        return issued.chain_pem, private_key_pem(key)

    def tls_config(self, folder: Any, service: str) -> Any:
        from lepton_mesh.policy.sidecar_config import TlsConfig

        chain, key = self.issue(service)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cert.pem").write_bytes(chain)
        (folder / "key.pem").write_bytes(key)
        (folder / "bundle.pem").write_bytes(self.bundle.to_pem())
        return TlsConfig(
            cert=str(folder / "cert.pem"),
            key=str(folder / "key.pem"),
            bundle=str(folder / "bundle.pem"),
        )

    def client_context(self, service: str, namespace: str = "default") -> Any:
        """What a peer sidecar of `service` presents when it calls the inbound port."""
        from lepton_mesh.proxy.security import tls

        chain, key = self.issue(service, namespace)
        return tls.client_context(chain, key, self.bundle.to_pem())
