"""Helpers for the data-plane mTLS tests: a test CA, sidecar configs with a
`tls` section, a local HTTP app that reports what it received, a keep-alive
HTTP client, and metric readers. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from lepton_mesh.identity.bundle import TrustBundle, certificates_pem
from lepton_mesh.identity.ca import CertificateAuthority, create_intermediate, create_root
from lepton_mesh.identity.csr import build_csr, generate_key, private_key_pem
from lepton_mesh.identity.spiffe import SpiffeId
from lepton_mesh.policy.sidecar_config import (
    AccessLogConfig,
    Address,
    Endpoint,
    Listeners,
    PoolConfig,
    ServiceConfig,
    SidecarConfig,
    Timeouts,
    TlsConfig,
)
from lepton_mesh.proxy.security import tls

TD = "cluster.local"
LOCAL = "127.0.0.1"
DEADLINE = 10.0
EPHEMERAL = Listeners(Address(LOCAL, 0), Address(LOCAL, 0), Address(LOCAL, 0))


def spiffe(service: str, namespace: str = "default") -> str:
    return SpiffeId(TD, namespace, service).uri


async def wait_for(
    predicate: Callable[[], bool], timeout: float = DEADLINE, what: str = ""
) -> None:
    """Poll `predicate` on the loop until true; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


# --- certificates ------------------------------------------------------------------


@dataclass(frozen=True)
class Creds:
    chain_pem: bytes
    key_pem: bytes
    serial: int


class Pki:
    """A root, an intermediate and a CertificateAuthority, as `certs init` makes."""

    def __init__(self) -> None:
        self.root = create_root(TD)
        self.intermediate = create_intermediate(self.root)
        self.bundle = TrustBundle((self.root.cert,))
        self.ca = CertificateAuthority(self.intermediate.cert, self.intermediate.key, self.bundle)

    @property
    def bundle_pem(self) -> bytes:
        return self.bundle.to_pem()

    def issue(self, service: str, **kwargs: Any) -> Creds:
        key = generate_key()
        sid = SpiffeId(TD, "default", service)
        issued = self.ca.issue(build_csr(key, sid), sid, **kwargs)
        return Creds(issued.chain_pem, private_key_pem(key), issued.serial)


def joint_bundle(*pkis: Pki) -> bytes:
    """One bundle holding every given CA's root (a root rotation's middle step)."""
    return certificates_pem(p.root.cert for p in pkis)


def write_tls(
    folder: Path,
    creds: Creds,
    bundle_pem: bytes,
    *,
    mode: str = "STRICT",
    tcp_app: Address | None = None,
    max_handshakes: int = 256,
) -> TlsConfig:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(creds.chain_pem)
    (folder / "key.pem").write_bytes(creds.key_pem)
    (folder / "bundle.pem").write_bytes(bundle_pem)
    return TlsConfig(
        cert=str(folder / "cert.pem"),
        key=str(folder / "key.pem"),
        bundle=str(folder / "bundle.pem"),
        mode=mode,  # type: ignore[arg-type]
        tcp_app=tcp_app,
        max_handshakes=max_handshakes,
    )


def client_context(creds: Creds, bundle_pem: bytes) -> ssl.SSLContext:
    """What a peer sidecar presents, for tests that call an inbound port directly."""
    return tls.client_context(creds.chain_pem, creds.key_pem, bundle_pem)


# --- sidecar configs -----------------------------------------------------------------


def sidecar_config(
    service: str,
    app: Address,
    *,
    tls_cfg: TlsConfig | None = None,
    services: Mapping[str, Sequence[Endpoint | Address]] | None = None,
    tcp: Mapping[str, Sequence[Endpoint | Address]] | None = None,
    pool: PoolConfig | None = None,
) -> SidecarConfig:
    svcs: dict[str, ServiceConfig] = {}
    for name, eps in (services or {}).items():
        svcs[name] = ServiceConfig(name, "http", _endpoints(eps))
    for name, eps in (tcp or {}).items():
        svcs[name] = ServiceConfig(name, "tcp", _endpoints(eps), listen=Address(LOCAL, 0))
    return SidecarConfig(
        service=service,
        app=app,
        listeners=EPHEMERAL,
        services=MappingProxyType(svcs),
        timeouts=Timeouts(connect=2.0, request=10.0),
        pool=pool or PoolConfig(),
        access_log=AccessLogConfig(enabled=False),
        tls=tls_cfg,
    )


def _endpoints(eps: Sequence[Endpoint | Address]) -> tuple[Endpoint, ...]:
    return tuple(e if isinstance(e, Endpoint) else Endpoint(e) for e in eps)


def plaintext(address: Address) -> Endpoint:
    """An endpoint without a sidecar: called in plaintext even with mTLS on."""
    return Endpoint(address, labels=MappingProxyType({"lepton.io/tls": "disabled"}))


# --- a local HTTP app ------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class App:
    """An HTTP/1.1 app: answers 200 with the request it saw as JSON; keep-alive."""

    server: asyncio.Server | None = None
    seen: list[Seen] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> Address:
        assert self.server is not None
        return Address(LOCAL, self.server.sockets[0].getsockname()[1])

    async def start(self) -> App:
        self.server = await asyncio.start_server(self._serve, LOCAL, 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:]]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                if length:
                    await reader.readexactly(length)
                seen = Seen(method, target, headers)  # type: ignore[arg-type]
                self.seen.append(seen)
                body = orjson.dumps({"method": method, "target": target, "headers": headers})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.writers):
            w.close()
        if self.server is not None:
            await self.server.wait_closed()


# --- an HTTP client ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name]
        assert len(values) <= 1, values
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


class HttpClient:
    """One keep-alive connection (plaintext, or TLS with `ssl`), requests in turn."""

    def __init__(self, address: Address, ssl_ctx: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.ssl = ssl_ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, host: str, target: str = "/", headers: Sequence[tuple[str, str]] = ()
    ) -> Response:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.address.host, self.address.port, ssl=self.ssl
            )
        assert self.reader is not None
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
        async with asyncio.timeout(DEADLINE):
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *rest = head[:-4].decode("latin-1").split("\r\n")
            hdrs = [tuple(x.strip() for x in ln.split(":", 1)) for ln in rest]
            length = next(int(v) for k, v in hdrs if k.lower() == "content-length")
            body = await self.reader.readexactly(length)
        resp = Response(int(status_line.split(" ")[1]), hdrs, body)  # type: ignore[arg-type]
        if (resp.get("connection") or "").lower() == "close":
            await self.close()
        return resp

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def get(address: Address, host: str, *, headers: Sequence[tuple[str, str]] = ()) -> Response:
    client = HttpClient(address)
    try:
        return await client.request(host, headers=headers)
    finally:
        await client.close()


# --- metrics --------------------------------------------------------------------------------


def metric(sidecar: Any, name: str, **labels: str) -> float:
    """The value of one sample from the sidecar's /metrics text (0 if absent)."""
    text = sidecar.metrics.render()[0].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
