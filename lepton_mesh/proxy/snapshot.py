"""The running config of a sidecar: one immutable snapshot, swapped whole.

`Snapshot` is built from a validated `SidecarConfig` and adds what the hot
path needs precomputed: per destination service its `ServiceTarget`
(logical: route, policy) and per backend its `Cluster` (concrete:
endpoints, balancer). A request takes `sidecar.snapshot` once when its head
arrives and uses that object to the end, so a swap never changes a request
half-way. State that must outlive swaps (endpoint load and ejections,
breaker counters, retry budgets) lives in `ServiceStates`, owned by the
sidecar and passed in; the inbound side's security state (JWKS keys,
rate-limit buckets, decision counters) likewise in `InboundState`.

`guard` is the inbound request security (proxy/security/inbound_policy.py) compiled
for this config, None when the service has no security policies: then the
inbound path pays nothing for it, and the outbound path never does.
"""

from __future__ import annotations

from dataclasses import replace

from lepton_mesh.policy.sidecar_config import Endpoint, SidecarConfig
from lepton_mesh.policy.traffic import DestinationPolicy, RetryPolicy, default_destination_policy
from lepton_mesh.proxy.errors import ProxyError, Reason
from lepton_mesh.proxy.outbound.clusters import Cluster, ServiceStates, subset_endpoints
from lepton_mesh.proxy.outbound.routing import ServiceTarget
from lepton_mesh.proxy.security.inbound_policy import InboundGuard, InboundState

# The inbound side forwards to the local app: no retries (the caller's
# sidecar owns retry decisions), the sidecar's own request timeout.
_NO_RETRY = RetryPolicy(attempts=1)


class Snapshot:
    __slots__ = (
        "_by_authority",
        "cfg",
        "clusters",
        "guard",
        "inbound_state",
        "local",
        "local_cluster",
        "targets",
    )

    def __init__(
        self, cfg: SidecarConfig, states: ServiceStates, inbound: InboundState | None = None
    ) -> None:
        self.cfg = cfg
        traffic = cfg.traffic
        self.targets: dict[str, ServiceTarget] = {}
        # Locality-aware balancing prefers endpoints in our own zone (instance label).
        zone = cfg.instance.labels.get("zone")
        self.clusters: dict[tuple[str, str | None], Cluster] = {}
        for name, svc in cfg.services.items():
            if svc.protocol != "http":
                continue
            policy = traffic.destinations.get(name) or self._default_policy(name)
            state, endpoints = states.sync(name, policy, svc.endpoints)
            self.clusters[(name, None)] = Cluster(name, None, state, endpoints, policy, zone)
            for subset in policy.subsets:
                eps = subset_endpoints(endpoints, subset)
                self.clusters[(name, subset.name)] = Cluster(
                    name, subset.name, state, eps, policy, zone
                )
            self.targets[name] = ServiceTarget(name, policy, traffic.routes.get(name))
        local_policy = replace(self._default_policy(cfg.service), retry=_NO_RETRY, outlier=None)
        local_name = f"{cfg.service} (local app)"
        state, endpoints = states.sync(local_name, local_policy, (Endpoint(cfg.app),))
        self.local_cluster = Cluster(cfg.service, None, state, endpoints, local_policy, None)
        self.local = ServiceTarget(cfg.service, local_policy, None)
        states.retire([*self.targets, local_name])
        self._by_authority: dict[bytes, ServiceTarget] = {}
        # Without a state from the sidecar, this snapshot keeps its own (it is
        # then not carried over to the next one: keys refetched, buckets full).
        self.inbound_state = inbound if inbound is not None else InboundState()
        self.guard = InboundGuard.build(cfg, self.inbound_state)

    def _default_policy(self, service: str) -> DestinationPolicy:
        # Without a DestinationPolicy, the sidecar's own request timeout applies.
        return replace(
            default_destination_policy(service, self.cfg.namespace),
            timeout=self.cfg.timeouts.request,
        )

    def cluster(self, service: str, subset: str | None) -> Cluster:
        cluster = self.clusters.get((service, subset))
        if cluster is None:  # validation prevents it; a config pushed half-way must not crash us
            raise ProxyError(
                503, Reason.NO_HEALTHY_ENDPOINT, f"no backend {service}/{subset} in config"
            )
        return cluster

    def lookup(self, authority: bytes) -> ServiceTarget:
        """The destination an outbound request names by its authority (`intent`, `intent:8080`,
        `intent.<namespace>`, `intent.<namespace>.svc.cluster.local`)."""
        target = self._by_authority.get(authority)
        if target is not None:
            return target
        host = _host_of(authority).decode("ascii", "replace")
        target = self.targets.get(host)
        if target is None and "." in host:
            name, _, rest = host.partition(".")
            ns = self.cfg.namespace
            if rest in (ns, f"{ns}.svc", f"{ns}.svc.cluster.local"):
                target = self.targets.get(name)
        if target is None:
            raise ProxyError(
                404, Reason.NO_ROUTE, f"no service named {host!r} is known to this sidecar"
            )
        if len(self._by_authority) < 1024:  # memo of hits only, bounded
            self._by_authority[authority] = target
        return target


def _host_of(authority: bytes) -> bytes:
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[1:end] if end > 0 else authority
    colon = authority.rfind(b":")
    return authority[:colon] if colon >= 0 else authority
