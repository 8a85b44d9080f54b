"""Where services are: addresses and endpoints, shared by the sidecar config and policies.

Frozen value objects (no I/O). The sidecar config lists the endpoints of the
services a sidecar calls; an ExternalService policy lists them for services
outside the mesh; the control daemon sends them in snapshots.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# An endpoint labelled lepton.io/tls=disabled has no sidecar in front of it
# (an external service, a plaintext-only instance): callers speak plaintext to
# it even when they use mTLS everywhere else. Shared by the control daemon
# (which labels ExternalService endpoints) and the sidecar (which obeys).
PLAINTEXT_LABEL = "lepton.io/tls"
PLAINTEXT_VALUE = "disabled"


def empty_labels() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Address:
    """A host and port. `host` is an IP literal or a DNS name, never empty."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance of a service, as the caller's sidecar reaches it.

    `labels` carry `version`, `zone`, `region` and anything a subset selects on.
    `healthy` is what the registry reports; outlier detection is tracked apart.
    """

    address: Address
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=empty_labels)
    healthy: bool = True

    @property
    def zone(self) -> str | None:
        return self.labels.get("zone")

    @property
    def region(self) -> str | None:
        return self.labels.get("region")
