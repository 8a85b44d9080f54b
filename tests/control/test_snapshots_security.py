"""Request-security kinds in snapshots: only the protected service's sidecars get them
(pure, no etcd), and what they get loads into the sidecar's `security`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from lepton_mesh.control.snapshots import MeshIndex, Scope, build_snapshot
from lepton_mesh.policy.manifest_set import resulting_set
from lepton_mesh.policy.security import SecurityPolicies
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping
from lepton_mesh.policy.traffic_loader import collect_policies
from lepton_mesh.policy.yaml_source import load_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh" / "security.yaml"


def key(ident: tuple[str, str, str]) -> str:
    kind, ns, name = ident
    return f"/lepton/v1/policies/{kind}/{ns}/{name}"


def stored_items() -> dict[str, bytes]:
    """The example as the policy store keeps it, plus a chat AuthorizationPolicy."""
    stored = resulting_set({}, load_file(EXAMPLE))
    items = {key(ident): orjson.dumps(m) for ident, m in stored.items()}
    chat = {
        "apiVersion": "lepton-mesh/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "chat-open", "namespace": "default"},
        "spec": {"service": "chat", "action": "DENY", "rules": [{"to": [{"paths": ["/x"]}]}]},
    }
    items[key(("AuthorizationPolicy", "default", "chat-open"))] = orjson.dumps(chat)
    return items


def kinds_and_names(snapshot: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["kind"], m["metadata"]["name"]) for m in snapshot["policies"]]


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        (
            Scope.of("intent", "default", []),
            [
                ("AuthorizationPolicy", "intent-admin"),
                ("AuthorizationPolicy", "intent-callers"),
                ("RateLimit", "intent"),
                ("RequestAuthentication", "intent"),
            ],
        ),
        # A caller of intent never sees intent's security, only its own.
        (Scope.of("chat", "default", ["intent"]), [("AuthorizationPolicy", "chat-open")]),
        (Scope.of("chat", "default", ["*"]), [("AuthorizationPolicy", "chat-open")]),
        (Scope.of("intent", "other", []), []),
        (Scope.of("dialog", "default", []), []),
    ],
)
def test_security_goes_to_the_protected_service_only(
    scope: Scope, expected: list[tuple[str, str]]
) -> None:
    assert kinds_and_names(build_snapshot(stored_items(), scope)) == expected


def test_a_security_change_touches_the_protected_service() -> None:
    items = stored_items()
    index = MeshIndex.from_items(items)
    ident = key(("RateLimit", "default", "intent"))
    assert index.apply([(ident, None)]) == {("default", "intent")}
    _, used = index.snapshot(Scope.of("intent", "default", []))
    assert "intent" in used  # so the push server rebuilds intent's group on such a change


def test_what_a_sidecar_is_sent_loads_into_its_security() -> None:
    snapshot = build_snapshot(stored_items(), Scope.of("intent", "default", []))
    cfg = sidecar_config_from_mapping(
        {"service": "intent", "app": "127.0.0.1:8080", "policies": snapshot["policies"]},
        "snapshot",
    )
    problems: list[Any] = []
    _, expected = collect_policies([(d, ()) for d in load_file(EXAMPLE)], problems)
    assert problems == []

    def content(sec: SecurityPolicies) -> tuple[Any, ...]:
        return (
            sec.authentication and sec.authentication.providers,
            [(p.name, p.action, p.rules, p.dry_run) for p in sec.authorization],
            sec.rate_limit and sec.rate_limit.limits,
        )

    assert content(cfg.security) == content(expected[("default", "intent")])
