"""The ExternalService kind: static endpoints for services outside the mesh."""

from __future__ import annotations

import json
import textwrap

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.sidecar_config import Address, Endpoint
from lepton_mesh.policy.traffic import ExternalService
from lepton_mesh.policy.traffic_loader import traffic_from_documents, traffic_to_manifests
from lepton_mesh.policy.yaml_source import Document, load_documents


def external(spec: str, name: str = "payments") -> str:
    head = f"apiVersion: lepton-mesh/v1\nkind: ExternalService\nmetadata: {{name: {name}}}\nspec:\n"
    return head + textwrap.indent(textwrap.dedent(spec), "  ")


def load(text: str):
    return traffic_from_documents(load_documents(text, "ext.yaml"))


def test_endpoints_use_the_sidecar_endpoint_syntax() -> None:
    got = load(
        external("""\
        service: payments
        endpoints:
          - api.payments.example:443
          - {address: "[2001:db8::1]:8443", weight: 3, labels: {zone: b}, healthy: false}
        """)
    )
    assert dict(got.external) == {
        "payments": ExternalService(
            name="payments",
            namespace="default",
            service="payments",
            endpoints=(
                Endpoint(Address("api.payments.example", 443)),
                Endpoint(Address("2001:db8::1", 8443), 3, {"zone": "b"}, healthy=False),
            ),
            protocol="http",
            source="ext.yaml:1",
        )
    }


BAD = [
    ("no-endpoints", "service: db\n", [(4, "spec.endpoints", "required field is missing")]),
    (
        "empty-endpoints",
        "service: db\nendpoints: []\n",
        [(6, "spec.endpoints", "an empty list: an external service needs at least one endpoint")],
    ),
    (
        "bad-protocol",
        "service: db\nprotocol: udp\nendpoints: [db.example:5432]\n",
        [(6, "spec.protocol", "expected 'http' or 'tcp', found string 'udp'")],
    ),
    (
        "bad-address",
        "service: db\nendpoints: [db.example]\n",
        [(6, "spec.endpoints[0]", "invalid address 'db.example': missing ':port'")],
    ),
    (
        "duplicate-address",
        "service: db\nendpoints: [db.example:1, db.example:1]\n",
        [(6, "spec.endpoints[1]", "duplicate endpoint db.example:1 (also at [0])")],
    ),
    (
        "unknown-field",
        "service: db\nendpoints: [db.example:1]\nport: 5\n",
        [(7, "spec.port", "unknown field 'port'; expected one of: service, protocol, endpoints")],
    ),
    (
        "no-service",
        "endpoints: [db.example:1]\n",
        [(4, "spec.service", "required field is missing")],
    ),
]


@pytest.mark.parametrize(("spec", "want"), [(s, w) for _, s, w in BAD], ids=[i for i, _, _ in BAD])
def test_invalid_external_services(spec: str, want: list[tuple[int, str, str]]) -> None:
    with pytest.raises(ConfigError) as info:
        load(external(spec))
    assert [(p.line, p.path, p.message) for p in info.value.problems] == want


def test_one_external_service_per_service() -> None:
    text = external("service: db\nendpoints: [a:1]\n", "db-a") + "---\n"
    text += external("service: db\nendpoints: [b:1]\n", "db-b")
    with pytest.raises(ConfigError) as info:
        load(text)
    (problem,) = info.value.problems
    assert (problem.line, problem.path) == (12, "spec.service")
    assert problem.message.startswith(
        "ExternalService 'db-b' is a second ExternalService for service 'db': "
        "ExternalService 'db-a' (ext.yaml:1) already covers it"
    )


def test_manifests_round_trip_through_json() -> None:
    policies = load(
        external("""\
        service: db
        protocol: tcp
        endpoints: [{address: "db.example:5432", weight: 2, labels: {zone: a}}, "db2.example:5432"]
        """)
    )
    manifests = json.loads(json.dumps(traffic_to_manifests(policies)))
    assert manifests == [
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "ExternalService",
            "metadata": {"name": "payments", "namespace": "default"},
            "spec": {
                "service": "db",
                "protocol": "tcp",
                "endpoints": [
                    {"address": "db.example:5432", "weight": 2, "labels": {"zone": "a"}},
                    {"address": "db2.example:5432", "weight": 1, "labels": {}},
                ],
            },
        }
    ]
    again = traffic_from_documents([Document("json", m, {}) for m in manifests])
    assert again.external["db"].endpoints == policies.external["db"].endpoints
