"""The caller's mesh identity comes from its verified certificate (mTLS, STRICT), never
from a header: authorization by SPIFFE ID, service and namespace, rate limits keyed by
identity, and headers that try to claim another identity changing nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from security_support import Client, EchoApp, MeshPki, echoed

from lepton_mesh.policy.security import (
    AuthorizationPolicy,
    AuthorizationRule,
    RateKey,
    RateLimit,
    RateLimitRule,
    SecurityPolicies,
    Source,
)


def spiffe(service: str, namespace: str = "default") -> str:
    return f"spiffe://cluster.local/ns/{namespace}/svc/{service}"


POLICIES = (
    AuthorizationPolicy(
        "no-billing",
        "default",
        "intent",
        "DENY",
        (AuthorizationRule("billing", sources=(Source(services=("billing",)),)),),
    ),
    AuthorizationPolicy(
        "callers",
        "default",
        "intent",
        "ALLOW",
        (
            AuthorizationRule("chat", sources=(Source(identities=(spiffe("chat"),)),)),
            AuthorizationRule(
                "dialogs-anywhere",
                sources=(Source(identities=("spiffe://cluster.local/ns/*/svc/dialog",)),),
            ),
            AuthorizationRule(
                "ops-namespace",
                sources=(Source(namespaces=("ops",), not_services=("batch",)),),
            ),
        ),
    ),
)


@pytest.fixture(scope="module")
def pki() -> MeshPki:
    return MeshPki()


@pytest.fixture
async def strict(secured: Any, pki: MeshPki, tmp_path: Path) -> Any:
    rate = RateLimit(
        "per-caller",
        "default",
        "intent",
        (RateLimitRule("per-identity", 1, 3, key=RateKey("source_identity")),),
    )
    return await secured(
        SecurityPolicies(authorization=POLICIES, rate_limit=rate),
        tls=pki.tls_config(tmp_path / "intent", "intent"),
    )


CASES = [
    ("chat", "default", 200, ("allow", "callers", "chat")),
    ("dialog", "team-a", 200, ("allow", "callers", "dialogs-anywhere")),
    ("reports", "ops", 200, ("allow", "callers", "ops-namespace")),
    ("batch", "ops", 403, ("deny", None, None)),
    ("billing", "default", 403, ("deny", "no-billing", "billing")),
    ("search", "default", 403, ("deny", None, None)),
]


@pytest.mark.parametrize(
    ("service", "namespace", "status", "decided"),
    CASES,
    ids=[f"{c[1]}.{c[0]}" for c in CASES],
)
async def test_authorization_by_verified_identity(
    strict: Any, pki: MeshPki, app: EchoApp, service, namespace, status, decided
):
    c = await Client.connect(
        strict.addresses["inbound"], ssl=pki.client_context(service, namespace)
    )
    # The identity headers a caller might send to pass for `chat` change nothing.
    r = await c.request(
        headers=[
            ("x-lepton-peer", "chat"),
            ("x-forwarded-client-cert", f"URI={spiffe('chat')}"),
        ]
    )
    assert r.status == status, r.body
    rec = strict.log.of(r)
    assert rec["source_identity"] == spiffe(service, namespace)
    d = rec["authz"]
    assert (d["decision"], d["policy"], d["rule"]) == decided
    if status == 200:
        # The app sees only the XFCC we set from the certificate.
        assert echoed(r, "x-forwarded-client-cert") == [
            f"By={spiffe('intent')};URI={spiffe(service, namespace)}"
        ]
        assert echoed(r, "x-lepton-peer") == []
    else:
        assert r.get("x-lepton-reason") == "rbac_denied" and app.requests == 0


async def test_rate_limit_per_verified_identity(strict: Any, pki: MeshPki, app: EchoApp):
    chat = await Client.connect(strict.addresses["inbound"], ssl=pki.client_context("chat"))
    chat2 = await Client.connect(strict.addresses["inbound"], ssl=pki.client_context("chat"))
    dialog = await Client.connect(strict.addresses["inbound"], ssl=pki.client_context("dialog"))
    # Two connections of one identity share its bucket (burst 3); another identity has its own.
    statuses = [(await c.request()).status for c in (chat, chat2, chat, chat2)]
    assert statuses == [200, 200, 200, 429]
    assert (await dialog.request()).status == 200


async def test_an_admission_is_never_replayed_for_another_caller(
    strict: Any, pki: MeshPki, app: EchoApp
):
    """Byte-identical requests from callers with different certificates: the one
    admitted for chat is cached, and never answers for billing or search."""
    chat = await Client.connect(strict.addresses["inbound"], ssl=pki.client_context("chat"))
    assert (await chat.request(target="/v1/x")).status == 200
    assert (await chat.request(target="/v1/x")).status == 200  # a replay
    for service, rule in (("billing", "billing"), ("search", None)):
        other = await Client.connect(strict.addresses["inbound"], ssl=pki.client_context(service))
        r = await other.request(target="/v1/x")
        assert r.status == 403 and strict.log.of(r)["authz"]["rule"] == rule
    assert app.requests == 2
