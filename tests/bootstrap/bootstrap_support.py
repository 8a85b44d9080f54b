"""Helpers for the bootstrap tests: the operator's CA and token key, a raw
meshproto peer over TLS (the control daemon's view of a sidecar), and a
sidecar stand-in whose data-plane identity records what is installed.

Nothing here sleeps to wait for state: `eventually` polls a condition with
a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lepton_mesh import meshproto as mp
from lepton_mesh.control.auth import TokenIssuer
from lepton_mesh.identity.bundle import TrustBundle, load_certificates
from lepton_mesh.identity.store import CaFiles
from lepton_mesh.policy.sidecar_config import Address, SidecarConfig
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping
from lepton_mesh.proxy import tls
from lepton_mesh.proxy.control_client import ControlClient, ControlTiming
from tests.support.etcd import eventually

__all__ = ["FAST", "FakeSidecar", "Pki", "TlsPeer", "eventually"]

LOCAL = "127.0.0.1"
# Clocks shrunk so that every timer-driven path runs within a test's budget.
FAST = ControlTiming(
    backoff_base=0.02,
    backoff_max=0.2,
    connect_timeout=2.0,
    ping_interval=0.2,
    silence_timeout=2.0,
    lkg_wait=0.3,
)


@dataclass
class Pki:
    """The CA directory and token key an operator made with the CLI."""

    ca: CaFiles
    token_key: Path
    issuer: TokenIssuer
    tmp: Path

    def token(
        self,
        service: str,
        namespace: str = "default",
        *,
        role: str = "join",
        ttl: float = 3600.0,
        now: float | None = None,
    ) -> str:
        return self.issuer.create(
            subject=f"{namespace}/{service}",
            role=role,  # type: ignore[arg-type]
            ttl=ttl,
            service=service if role == "join" else None,
            namespace=namespace if role == "join" else None,
            now=now,
        )

    def token_file(self, service: str, namespace: str = "default", **kw: Any) -> Path:
        path = self.tmp / f"{namespace}.{service}.token"
        path.write_text(self.token(service, namespace, **kw) + "\n")
        return path

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle.read_bytes()

    def bootstrap_context(self, bundle_pem: bytes | None = None) -> ssl.SSLContext:
        """What a sidecar without a certificate dials control with."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=(bundle_pem or self.bundle_pem).decode())
        return ctx


def key_secrets(key_pem: bytes) -> list[bytes]:
    """Forms a private key's bytes could leak in: PEM, DER, the raw scalar (and its hex)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
    body = b"".join(key_pem.strip().splitlines()[1:-1])  # the base64 without its armor
    return [key_pem, body, der, scalar, scalar.hex().encode()]


def contains_any(haystack: bytes, needles: list[bytes]) -> bool:
    return any(n in haystack for n in needles)


class TlsPeer:
    """A sidecar as the control daemon sees it: meshproto over a real TLS socket."""

    opened: list[TlsPeer] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = mp.FrameDecoder()
        self.received: list[mp.Message] = []

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> TlsPeer:
        reader, writer = await asyncio.open_connection(LOCAL, port, ssl=ctx)
        peer = cls(reader, writer)
        cls.opened.append(peer)
        return peer

    @property
    def server_identity(self) -> str | None:
        return tls.peer_identity(self.writer.get_extra_info("ssl_object"))

    def send(self, msg: mp.Message) -> None:
        self.writer.write(mp.encode(msg))

    async def recv(self, timeout: float = 5.0) -> mp.Message | None:
        """The next message; None once control closed the stream."""
        async with asyncio.timeout(timeout):
            while True:
                msg = self.decoder.next_message()
                if msg is not None:
                    self.received.append(msg)
                    return msg
                try:
                    data = await self.reader.read(65536)
                except (ConnectionError, ssl.SSLError):
                    return None
                if not data:
                    return None
                self.decoder.feed(data)

    async def until(self, kind: type, timeout: float = 5.0) -> Any:
        """Read until a message of `kind` (an `Error` or a close fails the wait)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if isinstance(msg, kind):
                    return msg
                assert msg is not None, f"stream closed while waiting for {kind.__name__}"
                assert not isinstance(msg, mp.Error), msg

    async def refusal(self) -> mp.Error:
        """The `error` control ends the stream with, then the close."""
        while True:
            msg = await self.recv()
            assert msg is not None, "closed without an error frame"
            if isinstance(msg, mp.Error):
                assert await self.recv() is None, "the stream stayed open after the error"
                return msg

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


def hello(
    service: str, token: str | None, *, namespace: str = "default", node: str = ""
) -> mp.Hello:
    return mp.Hello(
        node_id=node or f"{service}-1",
        service=service,
        namespace=namespace,
        instance=mp.Instance(LOCAL, {"http": 15006}),
        token=token,
    )


# --- the sidecar side ----------------------------------------------------------------


@dataclass
class RecordingIdentity:
    """Stands in for `proxy.mtls.MeshIdentity`: checks what `reload` gets as a
    TLS stack would (the chain verifies against the bundle; the key loads into
    a server context with it) and records it."""

    installs: list[tuple[bytes, bytes, bytes]] = field(default_factory=list)
    refuse: Callable[[bytes], bool] = lambda chain: False

    def reload(self, cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
        if self.refuse(cert_chain_pem):
            raise ValueError("refused by the test")
        TrustBundle.from_pem(bundle_pem).verify(load_certificates(cert_chain_pem))
        tls.server_context(cert_chain_pem, key_pem, bundle_pem)
        self.installs.append((cert_chain_pem, key_pem, bundle_pem))

    @property
    def leaf(self) -> x509.Certificate:
        return load_certificates(self.installs[-1][0])[0]

    @property
    def serial(self) -> int | None:
        return self.leaf.serial_number if self.installs else None


class FakeSidecar:
    """The hooks `ControlClient` needs, with a recording data-plane identity."""

    def __init__(self) -> None:
        self.ready = False
        self.draining = False
        self.addresses: dict[str, Address] = {"inbound": Address(LOCAL, 15006)}
        self.identity = RecordingIdentity()
        self.configs: list[SidecarConfig] = []

    def swap_config(self, cfg: SidecarConfig) -> None:
        self.configs.append(cfg)


def client_config(
    control_port: int,
    pki: Pki,
    service: str,
    *,
    namespace: str = "default",
    token_file: Path | None = None,
    ca_bundle: Path | None = None,
    state_dir: Path | None = None,
    **extra: Any,
) -> SidecarConfig:
    control: dict[str, Any] = {
        "addresses": [f"{LOCAL}:{control_port}"],
        "ca_bundle": str(ca_bundle or pki.ca.bundle),
    }
    if token_file is not None:
        control["token_file"] = str(token_file)
    if state_dir is not None:
        control["state_dir"] = str(state_dir)
    data = {
        "service": service,
        "namespace": namespace,
        "app": f"{LOCAL}:1",
        "listeners": {"outbound": f"{LOCAL}:0", "inbound": f"{LOCAL}:0", "admin": f"{LOCAL}:0"},
        "tls": {"source": "control"},
        "control": control,
        **extra,
    }
    return sidecar_config_from_mapping(data, f"{service}.yaml")


async def start_client(cfg: SidecarConfig, sidecar: FakeSidecar | None = None) -> ControlClient:
    client = ControlClient(sidecar or FakeSidecar(), cfg, timing=FAST)
    client.start()
    return client


async def until_certified(client: ControlClient, timeout: float = 5.0) -> float:
    """Wait for the first certificate; seconds it took from the client's start."""
    started = time.monotonic()
    assert client.identity is not None
    await eventually(
        lambda: client.identity.has_certificate,  # type: ignore[union-attr]
        timeout,
        f"a certificate ({client.last_error or client.identity.last_error})",  # type: ignore[union-attr]
    )
    return time.monotonic() - started
