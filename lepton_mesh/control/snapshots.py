"""What each sidecar is sent: scoped snapshot content, built from the cache.

Pure code, no I/O. The input is the control daemon's mirror of
`/lepton/v1/` (key -> JSON bytes, as `WatchCache.items` holds it); the output
for one sidecar is the `services` and `policies` of its `snapshot` message
(docs/control-plane.md), as plain JSON data.

Scoping is strict (a sidecar's memory must not grow with the mesh): a sidecar
of service S in namespace N with dependencies D receives, all in N only,

- `services`: every name in D (`*`: every service known in N), plus every
  service that a Route for one of them names as a backend or mirror (the
  sidecar refuses a Route whose backends it does not know), each with its
  registered instances and `ExternalService` endpoints; a name with neither
  is still sent, with no endpoints, so calls to it fail as "no healthy
  endpoint" rather than "unknown service";
- `policies`: the Routes whose destination is in D, the DestinationPolicies
  of every service sent (a backend's subsets live there), and the policies
  that concern S itself (`SELF` kinds, from the request-security work on).
  Nothing else: `ExternalService` manifests become endpoints, not policies.

`MeshIndex` keeps the cache parsed, updated event by event, so that a new
revision costs work in proportion to what changed, and `affected()` tells
which scopes a change can concern. Outputs are deterministic (sorted), so
equal content hashes equal and the push server can skip unchanged pushes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from lepton_mesh.policy.endpoint_fields import parse_endpoint
from lepton_mesh.policy.endpoints import PLAINTEXT_LABEL, PLAINTEXT_VALUE
from lepton_mesh.policy.errors import ConfigError, Problem
from lepton_mesh.policy.fields import Checker
from lepton_mesh.policy.sidecar_loader import check_instance_address

__all__ = [
    "ALL",
    "INSTANCES_PREFIX",
    "POLICIES_PREFIX",
    "SCOPE_RULES",
    "MeshIndex",
    "Scope",
    "build_snapshot",
    "content_digest",
    "endpoint_address",
    "instance_problem",
]

log = logging.getLogger(__name__)

INSTANCES_PREFIX = "/lepton/v1/instances/"
POLICIES_PREFIX = "/lepton/v1/policies/"
ALL = "*"

# How a policy kind is scoped: which spec field names its service, and who gets it.
#   "callers":   sidecars that call that service (Route, DestinationPolicy);
#   "endpoints": turned into that service's endpoints (ExternalService);
#   "self":      the sidecars of that service (request security: its inbound side enforces it).
# A kind not listed here is sent to nobody.
Audience = Literal["callers", "endpoints", "self"]
SCOPE_RULES: Mapping[str, tuple[str, Audience]] = {
    "Route": ("destination", "callers"),
    "DestinationPolicy": ("service", "callers"),
    "ExternalService": ("service", "endpoints"),
    # JWT providers, authorization rules and rate limits concern only the
    # service they protect: its callers never see them.
    "RequestAuthentication": ("service", "self"),
    "AuthorizationPolicy": ("service", "self"),
    "RateLimit": ("service", "self"),
}


@dataclass(frozen=True, slots=True)
class Scope:
    """What a sidecar's snapshot depends on; sidecars with equal scopes get equal snapshots.

    `dependencies` is sorted and without duplicates; `("*",)` means every
    service in the namespace. Build it with `Scope.of`.
    """

    service: str
    namespace: str
    dependencies: tuple[str, ...]

    @classmethod
    def of(cls, service: str, namespace: str, dependencies: Iterable[str]) -> Scope:
        deps = set(dependencies)
        return cls(service, namespace, (ALL,) if ALL in deps else tuple(sorted(deps)))

    @property
    def everything(self) -> bool:
        return self.dependencies == (ALL,)


def endpoint_address(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals in brackets (as the sidecar config writes addresses)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# What one instance may carry: it is copied into the snapshot of every caller.
MAX_PORTS = 8
MAX_LABELS = 64
MAX_LABEL_TEXT = 253  # a label's name, and its value
_PORT_NAME = re.compile(r"[a-z][-a-z0-9]{0,14}")


def instance_problem(address: Any, ports: Any, labels: Any, weight: Any) -> str:
    """What is wrong with an instance as callers would be sent it, or "".

    The rules are the sidecar's own (`instance.address` as its config checks
    it; each endpoint as a snapshot's `services` are loaded), so what passes
    here no caller rejects; plus bounds on size, since every caller gets a copy.
    """
    if isinstance(address, str) and len(address) > MAX_LABEL_TEXT:
        return f"instance.address: at most {MAX_LABEL_TEXT} characters, found {len(address)}"
    try:
        host = check_instance_address(address, "instance.address")
    except ConfigError as e:
        return "; ".join(p.message for p in e.problems)
    if not isinstance(ports, Mapping) or not ports:
        return "instance.ports: expected a non-empty mapping of port name to number"
    if len(ports) > MAX_PORTS:
        return f"instance.ports: at most {MAX_PORTS} ports, found {len(ports)}"
    if not isinstance(labels, Mapping):
        return "instance.labels: expected a mapping of label to value"
    if len(labels) > MAX_LABELS:
        return f"instance.labels: at most {MAX_LABELS} labels, found {len(labels)}"
    for key, value in labels.items():
        for what, text in (("name", key), ("value", value)):
            if isinstance(text, str) and (len(text) > MAX_LABEL_TEXT or not text.isprintable()):
                return (
                    f"instance.labels: a label {what} must be printable and at most "
                    f"{MAX_LABEL_TEXT} characters, found {text[:40]!r}"
                )
        if not key:
            return "instance.labels: a label name is empty"
    for name, port in ports.items():
        if not isinstance(name, str) or not _PORT_NAME.fullmatch(name):
            return f"instance.ports: port name {name!r}: lowercase letters, digits and '-', 1-15"
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return f"instance.ports.{name}: expected a port number 1-65535, found {port!r}"
        problems: list[Problem] = []
        endpoint = {
            "address": endpoint_address(host, port),
            "weight": weight,
            "labels": dict(labels),
        }
        if parse_endpoint(Checker("instance", {}, problems), endpoint, ()) is None or problems:
            return "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
    return ""


def content_digest(content: Mapping[str, Any]) -> bytes:
    """A digest of snapshot content that is equal exactly when the content is."""
    return hashlib.blake2b(
        orjson.dumps(content, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).digest()


# --- the parsed cache ---------------------------------------------------------


@dataclass(slots=True)
class _Namespace:
    """One namespace's objects, each kept by etcd key (two keys may name one service)."""

    instances: dict[str, dict[str, dict[str, Any]]] = field(
        default_factory=dict
    )  # svc -> key -> inst
    policies: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(
        default_factory=dict
    )  # kind -> target service -> key -> manifest

    def empty(self) -> bool:
        return not self.instances and not self.policies


# Where a key's object sits in the index: (namespace, kind or "" for an instance, service).
_Place = tuple[str, str, str]


class MeshIndex:
    """The instances and policies of the cache, parsed and indexed by namespace and service.

    Invariant: after `reset(items)` and then `apply(events)` for every later
    revision, the index equals `MeshIndex.from_items(current items)`.
    Values that are not valid JSON objects of the expected shape are skipped
    (and logged): one bad key must not stop every sidecar's config. So are
    instances that a caller would reject (`instance_problem`: e.g. written by
    an older daemon that did not check hellos as strictly): a snapshot with
    them would be rejected whole, by every caller.
    """

    __slots__ = ("_log_skipped", "_namespaces", "_places")

    def __init__(self, *, log_skipped: bool = True) -> None:
        self._namespaces: dict[str, _Namespace] = {}
        self._places: dict[str, _Place] = {}
        self._log_skipped = log_skipped

    @classmethod
    def from_items(cls, items: Mapping[str, bytes], *, log_skipped: bool = True) -> MeshIndex:
        index = cls(log_skipped=log_skipped)
        index.reset(items)
        return index

    def reset(self, items: Mapping[str, bytes]) -> set[tuple[str, str]]:
        """Rebuild from a full key -> value mapping. Returns every (namespace, service) seen."""
        old = {(ns, svc) for ns, _, svc in self._places.values()}
        self._namespaces.clear()
        self._places.clear()
        touched: set[tuple[str, str]] = set()
        for key, value in items.items():
            place = self._put(key, value)
            if place is not None:
                touched.add((place[0], place[2]))
        return touched | old

    def apply(self, events: Iterable[tuple[str, bytes | None]]) -> set[tuple[str, str]]:
        """Apply (key, value or None for a delete) changes; returns the (namespace, service) pairs
        whose objects changed, before or after the change (a Route that changed its
        destination touches both)."""
        touched: set[tuple[str, str]] = set()
        for key, value in events:
            old = self._remove(key)
            if old is not None:
                touched.add((old[0], old[2]))
            if value is not None:
                new = self._put(key, value)
                if new is not None:
                    touched.add((new[0], new[2]))
        return touched

    # --- queries ---

    def namespaces(self) -> list[str]:
        return sorted(self._namespaces)

    def instances(
        self, namespace: str | None = None, service: str | None = None
    ) -> list[dict[str, Any]]:
        """Registered instances, sorted by (namespace, service, id)."""
        out: list[dict[str, Any]] = []
        for ns_name in [namespace] if namespace is not None else sorted(self._namespaces):
            ns = self._namespaces.get(ns_name)
            if ns is None:
                continue
            for svc in [service] if service is not None else sorted(ns.instances):
                for key in sorted(ns.instances.get(svc, {})):
                    out.append(ns.instances[svc][key])
        return out

    def service_names(self, namespace: str) -> set[str]:
        """Every service known in `namespace`: registered or external."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            return set()
        return set(ns.instances) | set(ns.policies.get("ExternalService", {}))

    def service_endpoints(self, namespace: str, service: str) -> list[dict[str, Any]]:
        """One service's endpoints as a caller is sent them."""
        ns = self._namespaces.get(namespace) or _Namespace()
        return _service(ns, service, unique=False)["endpoints"]

    def snapshot(self, scope: Scope) -> tuple[dict[str, Any], frozenset[str]]:
        """The snapshot content for `scope`, and the services it was built from
        (a change to any other service of the namespace cannot change it)."""
        ns = self._namespaces.get(scope.namespace) or _Namespace()
        deps = self.service_names(scope.namespace) if scope.everything else set(scope.dependencies)
        routes = _manifests(ns, "Route", deps)
        sent = deps | {svc for route in routes for svc in _route_services(route)}
        policies = routes + _manifests(ns, "DestinationPolicy", sent)
        for kind, (_, audience) in SCOPE_RULES.items():
            if audience == "self":
                policies += _manifests(ns, kind, {scope.service})
        policies.sort(key=_manifest_order)
        services = {svc: _service(ns, svc) for svc in sorted(sent)}
        return {"services": services, "policies": policies}, frozenset(sent | {scope.service})

    # --- index maintenance ---

    def _put(self, key: str, value: bytes) -> _Place | None:
        place = _place_of(key)
        if place is None:
            return None
        try:
            obj = orjson.loads(value)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            self._skip(key, "not a JSON object")
            return None
        ns_name, kind, svc = place
        if not kind:
            problem = instance_problem(
                obj.get("address"), obj.get("ports"), obj.get("labels", {}), obj.get("weight", 1)
            )
            if problem:
                self._skip(key, problem)
                return None
        if kind:  # a policy: the key names its kind, namespace and name; the spec its service
            rule = SCOPE_RULES.get(kind)
            spec = obj.get("spec")
            target = spec.get(rule[0]) if rule is not None and isinstance(spec, dict) else None
            if not isinstance(target, str):
                return None  # a kind no sidecar gets, or a manifest without its service
            svc = target
        ns = self._namespaces.setdefault(ns_name, _Namespace())
        if kind:
            ns.policies.setdefault(kind, {}).setdefault(svc, {})[key] = obj
        else:
            ns.instances.setdefault(svc, {})[key] = obj
        place = (ns_name, kind, svc)
        self._places[key] = place
        return place

    def _skip(self, key: str, why: str) -> None:
        if self._log_skipped:
            log.warning("skipping %s: %s", key, why)

    def _remove(self, key: str) -> _Place | None:
        place = self._places.pop(key, None)
        if place is None:
            return None
        ns_name, kind, svc = place
        ns = self._namespaces[ns_name]
        by_svc = ns.policies[kind] if kind else ns.instances
        del by_svc[svc][key]
        if not by_svc[svc]:
            del by_svc[svc]
            if kind and not by_svc:
                del ns.policies[kind]
        if ns.empty():
            del self._namespaces[ns_name]
        return place


def _place_of(key: str) -> _Place | None:
    """Instance keys are `.../instances/<ns>/<svc>/<id>`, policy keys `.../policies/<kind>/<ns>/<name>`."""
    if key.startswith(INSTANCES_PREFIX):
        parts = key[len(INSTANCES_PREFIX) :].split("/")
        return (parts[0], "", parts[1]) if len(parts) == 3 and all(parts) else None
    if key.startswith(POLICIES_PREFIX):
        parts = key[len(POLICIES_PREFIX) :].split("/")
        return (parts[1], parts[0], "") if len(parts) == 3 and all(parts) else None
    return None


def _manifests(ns: _Namespace, kind: str, services: set[str]) -> list[dict[str, Any]]:
    by_svc = ns.policies.get(kind, {})
    return [m for svc in services & by_svc.keys() for m in by_svc[svc].values()]


def _manifest_order(m: dict[str, Any]) -> tuple[str, str]:
    meta = m.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return (str(m.get("kind")), str(name))


def _route_services(route: Mapping[str, Any]) -> set[str]:
    """Every service a Route's rules send to or mirror to (malformed parts are ignored:
    the policy store validated them, and the sidecar validates again)."""
    out: set[str] = set()
    rules = route["spec"].get("rules")
    for rule in rules if isinstance(rules, list) else ():
        if not isinstance(rule, dict):
            continue
        backends = rule.get("backends")
        targets = list(backends) if isinstance(backends, list) else []
        targets.append(rule.get("mirror"))
        for target in targets:
            if isinstance(target, dict) and isinstance(target.get("service"), str):
                out.add(target["service"])
    return out


def _service(ns: _Namespace, name: str, *, unique: bool = True) -> dict[str, Any]:
    """One service's entry: registered instances, then static external endpoints
    (with `unique`, each address once, as callers are sent them)."""
    instances = ns.instances.get(name, {}).values()
    externals = list(ns.policies.get("ExternalService", {}).get(name, {}).values())
    protocol = _protocol(instances, externals)
    endpoints = [ep for inst in instances if (ep := _instance_endpoint(inst, protocol)) is not None]
    for manifest in externals:
        endpoints.extend(_external_endpoints(manifest))
    if not unique:
        return {"protocol": protocol, "endpoints": sorted(endpoints, key=lambda ep: ep["address"])}
    # One address once: callers refuse a service that lists an endpoint twice
    # (two registrations claiming one address, or one also declared external).
    by_address: dict[str, dict[str, Any]] = {}
    for ep in sorted(endpoints, key=lambda ep: not ep["healthy"]):  # a healthy one wins
        by_address.setdefault(ep["address"], ep)
    return {"protocol": protocol, "endpoints": [by_address[a] for a in sorted(by_address)]}


def _protocol(instances: Iterable[dict[str, Any]], externals: list[dict[str, Any]]) -> str:
    """An external declaration says; else http if any instance serves http, tcp if only tcp."""
    for manifest in externals:
        proto = manifest["spec"].get("protocol")
        if proto in ("http", "tcp"):
            return str(proto)
    ports = [inst.get("ports") for inst in instances]
    has = {p for ps in ports if isinstance(ps, dict) for p in ps}
    return "tcp" if "tcp" in has and "http" not in has else "http"


def _instance_endpoint(inst: dict[str, Any], protocol: str) -> dict[str, Any] | None:
    ports = inst.get("ports")
    port = ports.get(protocol) if isinstance(ports, dict) else None
    host = inst.get("address")
    if not isinstance(port, int) or not isinstance(host, str) or not host:
        return None
    return {
        "address": endpoint_address(host, port),
        "weight": _weight(inst.get("weight")),
        "labels": _labels(inst.get("labels")),
        # Unhealthy or draining: callers stop balancing to it before its lease goes.
        "healthy": inst.get("healthy", True) is True and inst.get("draining", False) is not True,
    }


def _external_endpoints(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    eps = manifest["spec"].get("endpoints")
    out: list[dict[str, Any]] = []
    for ep in eps if isinstance(eps, list) else ():
        if isinstance(ep, str):
            ep = {"address": ep}
        if isinstance(ep, dict) and isinstance(ep.get("address"), str):
            out.append(
                {
                    "address": ep["address"],
                    "weight": _weight(ep.get("weight")),
                    # No sidecar in front of an external service: callers speak plaintext.
                    "labels": {PLAINTEXT_LABEL: PLAINTEXT_VALUE, **_labels(ep.get("labels"))},
                    "healthy": ep.get("healthy", True) is True,
                }
            )
    return out


def _weight(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def build_snapshot(items: Mapping[str, bytes], scope: Scope) -> dict[str, Any]:
    """The snapshot content (`services`, `policies`) for one sidecar, from cache items."""
    return MeshIndex.from_items(items).snapshot(scope)[0]
