"""The running config of a sidecar: one immutable snapshot, swapped whole.

`Snapshot` is built from a validated `SidecarConfig` and adds what the hot
path needs precomputed (the destination table, the local app). A request
takes `sidecar.snapshot` once when its head arrives and uses that object to
the end, so a swap never changes a request half-way.
"""

from __future__ import annotations

from itertools import cycle
from math import gcd

from lepton_mesh.policy.sidecar_config import Address, Endpoint, SidecarConfig
from lepton_mesh.proxy.errors import ProxyError, Reason


class Destination:
    """A service as the balancer sees it: its healthy endpoints, in weighted rotation.

    Weighted round robin by expansion (weights reduced by their gcd). The
    traffic-management layer replaces this choice with real balancers.
    """

    __slots__ = ("_rotation", "endpoints", "name")

    def __init__(self, name: str, endpoints: tuple[Endpoint, ...]) -> None:
        self.name = name
        self.endpoints = tuple(e for e in endpoints if e.healthy)
        if self.endpoints:
            g = 0
            for e in self.endpoints:
                g = gcd(g, e.weight)
            order = [e.address for e in self.endpoints for _ in range(e.weight // g)]
            self._rotation = cycle(_interleave(order))
        else:
            self._rotation = None

    def pick(self) -> Address:
        if self._rotation is None:
            raise ProxyError(
                503, Reason.NO_HEALTHY_ENDPOINT, f"service {self.name!r} has no healthy endpoint"
            )
        return next(self._rotation)


def _interleave(order: list[Address]) -> list[Address]:
    """Spread repeated addresses out (a,a,a,b -> a,b,a,a style) so weights don't burst."""
    buckets: dict[Address, int] = {}
    for a in order:
        buckets[a] = buckets.get(a, 0) + 1
    total = len(order)
    # Smooth weighted round robin (as nginx): deterministic and evenly spread.
    current = dict.fromkeys(buckets, 0)
    out: list[Address] = []
    for _ in range(total):
        for a, w in buckets.items():
            current[a] += w
        best = max(current, key=current.__getitem__)
        current[best] -= total
        out.append(best)
    return out


class Snapshot:
    __slots__ = ("_by_authority", "cfg", "destinations", "local")

    def __init__(self, cfg: SidecarConfig) -> None:
        self.cfg = cfg
        self.destinations = {
            name: Destination(name, svc.endpoints)
            for name, svc in cfg.services.items()
            if svc.protocol == "http"
        }
        self.local = Destination(cfg.service, (Endpoint(cfg.app),))
        self._by_authority: dict[bytes, Destination] = {}

    def lookup(self, authority: bytes) -> Destination:
        """The destination an outbound request names by its authority (`intent`, `intent:8080`,
        `intent.<namespace>`, `intent.<namespace>.svc.cluster.local`)."""
        dest = self._by_authority.get(authority)
        if dest is not None:
            return dest
        host = _host_of(authority).decode("ascii", "replace")
        dest = self.destinations.get(host)
        if dest is None and "." in host:
            name, _, rest = host.partition(".")
            ns = self.cfg.namespace
            if rest in (ns, f"{ns}.svc", f"{ns}.svc.cluster.local"):
                dest = self.destinations.get(name)
        if dest is None:
            raise ProxyError(
                404, Reason.NO_ROUTE, f"no service named {host!r} is known to this sidecar"
            )
        if len(self._by_authority) < 1024:  # memo of hits only, bounded
            self._by_authority[authority] = dest
        return dest


def _host_of(authority: bytes) -> bytes:
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[1:end] if end > 0 else authority
    colon = authority.rfind(b":")
    return authority[:colon] if colon >= 0 else authority
