"""The sidecar's configuration model: frozen, validated value objects.

This module only declares the shape and the invariants of a running sidecar's
config. Turning YAML (or, later, a snapshot pushed by the control daemon) into
these objects is `lepton_mesh.policy.sidecar_loader`'s job; nothing here reads
files. Every object is immutable, so a whole `SidecarConfig` can be swapped in
one assignment while in-flight requests keep the one they started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from lepton_mesh.policy.endpoints import Address, Endpoint
from lepton_mesh.policy.security import SecurityPolicies
from lepton_mesh.policy.traffic import TrafficPolicies

__all__ = [
    "Address",
    "Endpoint",
]  # re-exported: the model of where services are, shared with policies

Protocol = Literal["http", "tcp"]


def _empty() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """A service this sidecar may call.

    For `protocol == "tcp"`, `listen` is the local address the sidecar opens
    for the app; bytes are piped to one of `endpoints` (L4). HTTP services are
    reached through the outbound listener and need no `listen`.
    """

    name: str
    protocol: Protocol = "http"
    endpoints: tuple[Endpoint, ...] = ()
    listen: Address | None = None


@dataclass(frozen=True, slots=True)
class Listeners:
    outbound: Address = Address("127.0.0.1", 15001)
    inbound: Address = Address("0.0.0.0", 15006)
    admin: Address = Address("127.0.0.1", 15000)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """All in seconds. 0 disables `request` (a long inference call may want that)
    and `tcp_idle`.

    `tcp_idle` is the L4 connections' idle limit (tcp services, inbound L4
    tunnels), apart from the HTTP keep-alive `idle`: database pools keep
    connections quiet for far longer than 5 minutes. 1h as Envoy's tcp_proxy.
    """

    connect: float = 1.0
    request: float = 60.0
    header_read: float = 10.0
    idle: float = 300.0
    drain: float = 20.0
    tcp_idle: float = 3600.0


@dataclass(frozen=True, slots=True)
class Limits:
    """`max_body_bytes == 0` means no limit on request bodies."""

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 0
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """Upstream keep-alive pools, one per endpoint address."""

    max_per_endpoint: int = 1024
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    """What this sidecar registers with the control daemon.

    `id` None: `<service>-<random>`, chosen once when the sidecar starts.
    `address` None: the inbound listener's host, a wildcard one (`0.0.0.0`,
    `::`) read as loopback. Both are resolved at run time, not at load, so
    loading the same file twice gives equal configs.
    """

    id: str | None = None
    address: str | None = None
    labels: Mapping[str, str] = field(default_factory=_empty)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Where the control daemon is. Present: the sidecar is fed by control; absent: static.

    `addresses` are tried in order, moving to the next on failure (never
    empty). `state_dir` holds `last-known-good.json`; None keeps nothing.
    `ca_bundle` (a path): the stream is TLS, the control daemon's certificate
    verified against these roots; None: plaintext. `token_file` (a path):
    the join token sent until the sidecar holds a certificate (else the
    `LEPTON_JOIN_TOKEN` environment variable). Both are read at run time.
    """

    addresses: tuple[Address, ...]
    state_dir: str | None = None
    ca_bundle: str | None = None
    token_file: str | None = None


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """The local app's health endpoint, checked every `interval` (`timeout` <= `interval`)."""

    path: str = "/healthz"
    interval: float = 2.0
    timeout: float = 1.0


TlsMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]
TLS_MODES: tuple[TlsMode, ...] = ("STRICT", "PERMISSIVE", "DISABLE")
TlsSource = Literal["files", "control"]
TLS_SOURCES: tuple[TlsSource, ...] = ("files", "control")


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """mTLS between sidecars (docs/security.md, "The data plane").

    `mode` is the inbound listener's, as Istio's PeerAuthentication: STRICT
    accepts mTLS only, PERMISSIVE mTLS and plaintext on one port, DISABLE
    plaintext only. Outbound, every endpoint not labelled
    `lepton.io/tls: disabled` is called over mTLS whatever the mode.
    `cert` (leaf then intermediates), `key` and `bundle` (trust roots) are
    absolute paths (the loader resolves them against the config file's
    folder); the sidecar reads them when it starts, nothing here does.
    `tcp_app`: where L4 tunnels from peer sidecars go (None: refused).

    `source` says where the certificate comes from: `files` (the three paths
    above, all required) or `control` (none of them: the sidecar makes its
    key in memory, gets its certificate and bundle over the control stream
    and rotates them; needs `control.ca_bundle`).
    """

    cert: str | None = None
    key: str | None = None
    bundle: str | None = None
    mode: TlsMode = "STRICT"
    trust_domain: str = "cluster.local"
    tcp_app: Address | None = None
    max_handshakes: int = 256
    source: TlsSource = "files"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything one sidecar needs to run. `source` names where it came from."""

    service: str
    app: Address
    namespace: str = "default"
    listeners: Listeners = field(default_factory=Listeners)
    services: Mapping[str, ServiceConfig] = field(default_factory=lambda: MappingProxyType({}))
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    pool: PoolConfig = field(default_factory=PoolConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    # Routes and destination policies, from the files under `policies:`.
    traffic: TrafficPolicies = field(default_factory=TrafficPolicies)
    # What this sidecar's inbound side enforces: the RequestAuthentication,
    # AuthorizationPolicies and RateLimit for its own `service` (from
    # `policies:`, or from control's snapshots, which replace them too).
    security: SecurityPolicies = field(default_factory=SecurityPolicies)
    # Services this sidecar calls (`("*",)`: all of them, explicitly): with
    # `control`, the only services it is sent.
    dependencies: tuple[str, ...] = ()
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    # With `control`, `services` and `traffic` above are only the starting
    # point: each snapshot from control replaces both.
    control: ControlConfig | None = None
    health_check: HealthCheckConfig | None = None
    # None: no mTLS, every connection plaintext (the default before mTLS existed).
    tls: TlsConfig | None = None
    source: str = "<memory>"
