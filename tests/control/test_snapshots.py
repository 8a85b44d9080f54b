"""Scoped snapshot content: exact expected dicts for each case (pure, no etcd)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from lepton_mesh.control import snapshots
from lepton_mesh.control.snapshots import MeshIndex, Scope, build_snapshot, content_digest
from lepton_mesh.policy.endpoint_fields import parse_endpoints
from lepton_mesh.policy.errors import Problem
from lepton_mesh.policy.fields import Checker


def inst_key(ns: str, svc: str, iid: str) -> str:
    return f"/lepton/v1/instances/{ns}/{svc}/{iid}"


def instance(
    svc: str,
    iid: str,
    port: int,
    *,
    ns: str = "default",
    host: str = "10.0.0.1",
    proto: str = "http",
    labels: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[str, bytes]:
    value = {
        "id": iid,
        "service": svc,
        "namespace": ns,
        "address": host,
        "ports": {proto: port},
        "labels": labels or {},
        "weight": 1,
        "healthy": True,
        "draining": False,
        "node_id": iid,
        "registered_at": 1.0,
    } | extra
    return inst_key(ns, svc, iid), orjson.dumps(value)


def manifest(kind: str, name: str, spec: dict[str, Any], ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def policy(m: dict[str, Any]) -> tuple[str, bytes]:
    key = f"/lepton/v1/policies/{m['kind']}/{m['metadata']['namespace']}/{m['metadata']['name']}"
    return key, orjson.dumps(m)


def ep(
    address: str, *, healthy: bool = True, weight: int = 1, labels: dict[str, str] | None = None
):
    return {"address": address, "weight": weight, "labels": labels or {}, "healthy": healthy}


ROUTE_DIALOG = manifest(
    "Route",
    "dialog-canary",
    {
        "destination": "dialog",
        "rules": [
            {
                "backends": [
                    {"service": "dialog", "subset": "v1", "weight": 90},
                    {"service": "dialog-next", "weight": 10},
                ],
                "mirror": {"service": "shadow", "percent": 5},
            }
        ],
    },
)
DP_DIALOG = manifest(
    "DestinationPolicy",
    "dialog",
    {"service": "dialog", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]},
)
DP_NEXT = manifest("DestinationPolicy", "dialog-next", {"service": "dialog-next"})
DP_BILLING = manifest("DestinationPolicy", "billing", {"service": "billing"})
ROUTE_BILLING = manifest("Route", "billing", {"destination": "billing", "rules": [{}]})
EXT_DB = manifest(
    "ExternalService",
    "db",
    {
        "service": "db",
        "protocol": "tcp",
        "endpoints": [{"address": "db.example.com:5432", "labels": {"zone": "a"}, "weight": 3}],
    },
)

ITEMS: dict[str, bytes] = dict(
    [
        instance("intent", "intent-1", 15106),
        instance("intent", "intent-2", 15206, host="10.0.0.2", healthy=False),
        instance("dialog", "dialog-1", 15107, labels={"version": "v1"}),
        instance(
            "dialog", "dialog-2", 15207, host="10.0.0.2", labels={"version": "v2"}, draining=True
        ),
        instance("dialog-next", "next-1", 15307, host="::1"),
        instance("billing", "billing-1", 15108),
        instance("intent", "other-1", 15999, ns="other"),
        instance("cache", "cache-1", 6379, proto="tcp"),
        policy(ROUTE_DIALOG),
        policy(DP_DIALOG),
        policy(DP_NEXT),
        policy(DP_BILLING),
        policy(ROUTE_BILLING),
        policy(EXT_DB),
        policy(manifest("Route", "intent", {"destination": "intent", "rules": [{}]}, ns="other")),
        ("/lepton/v1/sidecars/chat-1", b'{"node_id": "chat-1"}'),
        ("/lepton/v1/history/000000000001", b'{"revision": 1}'),
        ("/lepton/v1/instances/default/broken/x", b"not json"),
    ]
)

INTENT = {
    "protocol": "http",
    "endpoints": [ep("10.0.0.1:15106"), ep("10.0.0.2:15206", healthy=False)],
}
DIALOG = {
    "protocol": "http",
    "endpoints": [
        ep("10.0.0.1:15107", labels={"version": "v1"}),
        ep("10.0.0.2:15207", healthy=False, labels={"version": "v2"}),
    ],
}
NEXT = {"protocol": "http", "endpoints": [ep("[::1]:15307")]}
SHADOW: dict[str, Any] = {"protocol": "http", "endpoints": []}
# External endpoints have no sidecar in front: the control daemon marks them plaintext.
DB = {
    "protocol": "tcp",
    "endpoints": [
        ep("db.example.com:5432", weight=3, labels={"lepton.io/tls": "disabled", "zone": "a"})
    ],
}
CACHE = {"protocol": "tcp", "endpoints": [ep("10.0.0.1:6379")]}
BILLING = {"protocol": "http", "endpoints": [ep("10.0.0.1:15108")]}

CASES = [
    pytest.param(Scope.of("chat", "default", []), {"services": {}, "policies": []}, id="no-deps"),
    pytest.param(
        Scope.of("chat", "default", ["intent"]),
        {"services": {"intent": INTENT}, "policies": []},
        id="one-dep-unhealthy-marked",
    ),
    pytest.param(
        Scope.of("chat", "default", ["dialog", "intent", "dialog"]),
        {
            "services": {
                "dialog": DIALOG,
                "dialog-next": NEXT,
                "intent": INTENT,
                "shadow": SHADOW,
            },
            # a backend's DestinationPolicy goes too (its subsets), its Route does not
            "policies": [DP_DIALOG, DP_NEXT, ROUTE_DIALOG],
        },
        id="route-backends-and-mirror",
    ),
    pytest.param(
        Scope.of("chat", "default", ["db", "cache", "nothing"]),
        {
            "services": {
                "cache": CACHE,
                "db": DB,
                "nothing": {"protocol": "http", "endpoints": []},
            },
            "policies": [],
        },
        id="external-tcp-unknown",
    ),
    pytest.param(
        Scope.of("chat", "other", ["intent"]),
        {
            "services": {"intent": {"protocol": "http", "endpoints": [ep("10.0.0.1:15999")]}},
            "policies": [
                manifest("Route", "intent", {"destination": "intent", "rules": [{}]}, ns="other")
            ],
        },
        id="namespace-strict",
    ),
    pytest.param(
        Scope.of("billing", "default", ["*", "intent"]),
        {
            "services": {
                "billing": BILLING,
                "cache": CACHE,
                "db": DB,
                "dialog": DIALOG,
                "dialog-next": NEXT,
                "intent": INTENT,
                "shadow": SHADOW,
            },
            "policies": [DP_BILLING, DP_DIALOG, DP_NEXT, ROUTE_BILLING, ROUTE_DIALOG],
        },
        id="star-opt-in",
    ),
]


@pytest.mark.parametrize(("scope", "expected"), CASES)
def test_snapshot_content(scope: Scope, expected: dict[str, Any]) -> None:
    assert build_snapshot(ITEMS, scope) == expected


def test_own_service_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = dict(snapshots.SCOPE_RULES) | {"AuthorizationPolicy": ("service", "self")}
    monkeypatch.setattr(snapshots, "SCOPE_RULES", rules)
    authz = manifest("AuthorizationPolicy", "chat", {"service": "chat"})
    items = dict(
        [policy(authz), policy(manifest("AuthorizationPolicy", "x", {"service": "intent"}))]
    )
    assert build_snapshot(items, Scope.of("chat", "default", [])) == {
        "services": {},
        "policies": [authz],
    }


def test_unknown_kind_goes_to_nobody() -> None:
    items = dict([policy(manifest("Gizmo", "g", {"service": "intent"}))])
    assert build_snapshot(items, Scope.of("chat", "default", ["*"])) == {
        "services": {},
        "policies": [],
    }


def test_scope_normalizes_dependencies() -> None:
    assert Scope.of("a", "default", ["b", "c", "b"]) == Scope("a", "default", ("b", "c"))
    assert Scope.of("a", "default", ["b", "*"]).dependencies == ("*",)


def test_built_from_names_every_service_it_reads() -> None:
    _, used = MeshIndex.from_items(ITEMS).snapshot(Scope.of("chat", "default", ["dialog"]))
    assert used == {"chat", "dialog", "dialog-next", "shadow"}


def test_incremental_index_equals_rebuild() -> None:
    """Replaying changes one by one ends where a full read of the result does."""
    index = MeshIndex.from_items(ITEMS)
    items = dict(ITEMS)
    moved = manifest("Route", "dialog-canary", {"destination": "intent", "rules": [{}]})
    changes: list[tuple[str, bytes | None]] = [
        policy(moved),  # a Route that changes its destination
        instance("intent", "intent-2", 15206, host="10.0.0.2"),  # health back
        (inst_key("default", "dialog", "dialog-1"), None),
        (inst_key("default", "absent", "x"), None),  # deleting what is not there
        instance("dialog", "dialog-9", 15907),
        policy(manifest("DestinationPolicy", "billing", {"service": "bill2"})),
    ]
    touched = index.apply(changes)
    for key, value in changes:
        if value is None:
            items.pop(key, None)
        else:
            items[key] = value
    assert touched == {
        ("default", "dialog"),
        ("default", "intent"),
        ("default", "billing"),
        ("default", "bill2"),
    }
    fresh = MeshIndex.from_items(items)
    for scope in [Scope.of("chat", ns, ["*"]) for ns in ("default", "other")]:
        assert index.snapshot(scope) == fresh.snapshot(scope)
    assert index.instances() == fresh.instances()


def test_index_drops_empty_namespaces() -> None:
    index = MeshIndex.from_items(dict([instance("a", "a-1", 1, ns="gone")]))
    assert index.namespaces() == ["gone"]
    index.apply([(inst_key("gone", "a", "a-1"), None)])
    assert index.namespaces() == []


def test_digest_ignores_key_order_and_sees_changes() -> None:
    a = {"services": {"x": {"protocol": "http", "endpoints": []}, "y": SHADOW}, "policies": []}
    b = {"policies": [], "services": {"y": SHADOW, "x": {"endpoints": [], "protocol": "http"}}}
    assert content_digest(a) == content_digest(b)
    c = {"services": {"x": {"protocol": "tcp", "endpoints": []}, "y": SHADOW}, "policies": []}
    assert content_digest(a) != content_digest(c)


def _loads_as_a_caller_would(content: dict[str, Any]) -> list[str]:
    """Problems a sidecar finds in a snapshot's services (it NACKs on any)."""
    problems: list[Problem] = []
    c = Checker("snapshot", {}, problems)
    for name, svc in content["services"].items():
        parse_endpoints(c, svc["endpoints"], ("services", name, "endpoints"))
    return [str(p) for p in problems]


def test_one_bad_instance_record_does_not_poison_the_snapshot(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Records a caller would refuse (e.g. written by an older daemon) are skipped, logged."""
    good = instance("intent", "intent-1", 15106)
    bad = [
        instance("intent", "bad-addr", 15107, host="not an address!!/x:y"),
        instance("intent", "long-addr", 15108, host="a" * 100_000),
        instance("intent", "bad-weight", 15109, weight=20_000),
        instance("intent", "bad-label", 15110, labels={"v": "x" * 1000}),
        instance("intent", "wildcard", 15111, host="0.0.0.0"),
    ]
    # Two registrations claiming one address: sent once (a caller refuses duplicates).
    twin = instance("intent", "intent-1-twin", 15106, healthy=False)
    items = dict([good, twin, *bad])
    with caplog.at_level("WARNING", logger="lepton_mesh.control.snapshots"):
        content = build_snapshot(items, Scope.of("chat", "default", ["intent"]))
    assert content["services"]["intent"]["endpoints"] == [ep("10.0.0.1:15106")]
    assert _loads_as_a_caller_would(content) == []
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == len(bad)
    assert all(len(line) < 1000 for line in skipped)  # no 100 kB log line
