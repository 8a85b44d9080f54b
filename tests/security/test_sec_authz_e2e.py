"""Authorization end to end, table-driven: each request through a real sidecar gets an
exact status and reason, and the access log and `lepton_authz_decisions_total` name
the policy and rule that decided. Dry-run policies are logged and counted, never
enforced."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from security_support import (
    ISSUER,
    Client,
    EchoApp,
    authentication,
    claims,
    echoed,
    jwks,
    mint,
    provider,
    public_jwk,
    rsa_key,
)

from lepton_mesh.policy.security import (
    AuthorizationPolicy,
    AuthorizationRule,
    ClaimToHeader,
    Condition,
    Operation,
    RateKey,
    RateLimit,
    RateLimitRule,
    SecurityPolicies,
    Source,
)

RSA = rsa_key()
KEYS = jwks(public_jwk(RSA, "k1"))


def rule(name: str, **kw: Any) -> AuthorizationRule:
    return AuthorizationRule(name, **kw)


def op(methods: tuple[str, ...] = (), paths: tuple[str, ...] = ()) -> Operation:
    return Operation(methods=frozenset(methods), paths=paths)


def policy(name: str, action: str, *rules: AuthorizationRule, dry_run: bool = False):
    return AuthorizationPolicy(name, "default", "intent", action, rules, dry_run)  # type: ignore[arg-type]


POLICIES = (
    policy("block-admin", "DENY", rule("no-admin", operations=(op(paths=("/admin/*",)),))),
    policy(
        "api",
        "ALLOW",
        rule("readers", operations=(op(("GET",), ("/v1/*",)),)),
        rule(
            "writers",
            sources=(Source(principals=(f"{ISSUER}/alice",)),),
            operations=(op(("POST",), ("/v1/*",)),),
        ),
        rule(
            "tenant",
            operations=(op(paths=("/t/*",)),),
            conditions=(
                Condition("request.headers[x-tenant]", "header", "x-tenant", values=("acme",)),
            ),
        ),
        rule(
            "admins-claim",
            operations=(op(paths=("/ops/**",)),),
            conditions=(
                Condition(
                    "request.auth.claims[groups]",
                    "claim",
                    claim_path=("groups",),
                    values=("admins",),
                ),
            ),
        ),
        rule(
            "nested-claim",
            operations=(op(paths=("/team/*",)),),
            conditions=(
                Condition(
                    "request.auth.claims[org.team]",
                    "claim",
                    claim_path=("org.team",),
                    values=("ml",),
                ),
            ),
        ),
    ),
    policy("watch", "AUDIT", rule("posts", operations=(op(("POST",)),))),
)


def token(**over: Any) -> list[tuple[str, str]]:
    return [("authorization", "Bearer " + mint(RSA, claims(**over)))]


# (id, method, path, headers, status, reason, (decision, policy, rule) or None, audit)
CASES = [
    ("get-v1-anyone", "GET", "/v1/models", [], 200, None, ("allow", "api", "readers"), []),
    (
        "post-v1-alice",
        "POST",
        "/v1/classify",
        token(),
        200,
        None,
        ("allow", "api", "writers"),
        ["watch/posts"],
    ),
    (
        "post-v1-bob",
        "POST",
        "/v1/classify",
        token(sub="bob"),
        403,
        "rbac_denied",
        ("deny", None, None),
        ["watch/posts"],
    ),
    (
        "post-v1-no-token",
        "POST",
        "/v1/classify",
        [],
        401,
        "jwt_missing",
        ("deny", None, None),
        ["watch/posts"],
    ),
    (
        "deny-first",
        "GET",
        "/admin/users",
        token(),
        403,
        "rbac_denied",
        ("deny", "block-admin", "no-admin"),
        [],
    ),
    (
        "deny-dot-segments",
        "GET",
        "/v1/../admin/users",
        token(),
        403,
        "rbac_denied",
        ("deny", "block-admin", "no-admin"),
        [],
    ),
    (
        "deny-double-slash",
        "GET",
        "//admin/users",
        token(),
        403,
        "rbac_denied",
        ("deny", "block-admin", "no-admin"),
        [],
    ),
    (
        "deny-escaped",
        "GET",
        "/%61dmin/users",
        token(),
        403,
        "rbac_denied",
        ("deny", "block-admin", "no-admin"),
        [],
    ),
    ("escaped-slash", "GET", "/admin%2Fusers", token(), 400, "bad_request", None, []),
    ("dot-params", "GET", "/v1/..;/admin/users", token(), 400, "bad_request", None, []),
    (
        "tenant-header",
        "GET",
        "/t/1",
        [("x-tenant", "acme")],
        200,
        None,
        ("allow", "api", "tenant"),
        [],
    ),
    (
        "tenant-wrong",
        "GET",
        "/t/1",
        [("x-tenant", "other")],
        401,
        "jwt_missing",
        ("deny", None, None),
        [],
    ),
    (
        "tenant-wrong-with-token",
        "GET",
        "/t/1",
        [("x-tenant", "other"), *token()],
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
    (
        # Repeated, a header is its values comma-joined (Envoy's and RFC 9110's reading):
        # judging the first while the app reads the last would let `other` in as `acme`.
        "tenant-repeated",
        "GET",
        "/t/1",
        [("x-tenant", "acme"), ("x-tenant", "other"), *token()],
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
    (
        "tenant-joined",
        "GET",
        "/t/1",
        [("x-tenant", "acme,other"), *token()],
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
    (
        "claim-list",
        "GET",
        "/ops/a/b",
        token(groups=["dev", "admins"]),
        200,
        None,
        ("allow", "api", "admins-claim"),
        [],
    ),
    (
        "claim-list-miss",
        "GET",
        "/ops/a",
        token(groups=["dev"]),
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
    (
        "claim-nested",
        "GET",
        "/team/x",
        token(org={"team": "ml"}),
        200,
        None,
        ("allow", "api", "nested-claim"),
        [],
    ),
    (
        "claim-nested-miss",
        "GET",
        "/team/x",
        token(org={"team": "web"}),
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
    (
        "method-mismatch",
        "DELETE",
        "/v1/models",
        token(),
        403,
        "rbac_denied",
        ("deny", None, None),
        [],
    ),
]


def samples(sc: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = sc.metrics.render()[0].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
async def api(secured, app: EchoApp) -> Any:
    p = provider(jwks=orjson.dumps(KEYS).decode())
    sc = await secured(SecurityPolicies(authentication=authentication(p), authorization=POLICIES))
    client = await Client.connect(sc.addresses["inbound"])
    yield sc, client
    await client.close()


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "reason", "decided", "audit"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
async def test_authorization_table(
    api, app: EchoApp, method, path, headers, status, reason, decided, audit
):
    sc, c = api
    r = await c.request(method, path, headers)
    assert r.status == status, r.body
    assert r.get("x-lepton-reason") == reason
    if status == 401:
        assert r.get("www-authenticate") == "Bearer"
    assert app.requests == (1 if status == 200 else 0)
    rec = sc.log.of(r)
    if decided is None:
        assert "authz" not in rec
        return
    d = rec["authz"]
    assert (d["decision"], d["policy"], d["rule"]) == decided
    assert d.get("audit", []) == audit
    counted = samples(sc, "lepton_authz_decisions_total")
    decision, pol, rul = decided
    key = (("decision", decision), ("policy", pol or "-"), ("rule", rul or "-"))
    assert counted == {
        key: 1.0,
        **{
            (("decision", "audit"), ("policy", a.split("/")[0]), ("rule", a.split("/")[1])): 1.0
            for a in audit
        },
    }
    if status == 403:
        assert (d["rule"] or "access denied") in r.json()["error"]


async def test_the_app_gets_the_normalized_path(api, app: EchoApp):
    _, c = api
    r = await c.request("GET", "/v1//x/./%79?q=%2F")
    assert r.status == 200 and r.json()["target"] == "/v1/x/y?q=%2F"


async def test_dry_run_logs_and_counts_but_never_denies(secured, app: EchoApp):
    trial = policy(
        "lockdown",
        "DENY",
        rule("no-posts", operations=(op(("POST",)),)),
        dry_run=True,
    )
    allow_trial = policy(
        "only-get", "ALLOW", rule("gets", operations=(op(("GET",)),)), dry_run=True
    )
    sc = await secured(SecurityPolicies(authorization=(trial, allow_trial)))
    c = await Client.connect(sc.addresses["inbound"])
    r = await c.request("POST", "/v1/x")
    assert r.status == 200 and app.requests == 1
    d = sc.log.of(r)["authz"]
    assert d["decision"] == "allow" and d["cause"] == "no_policy"
    assert d["dry_run"] == {"decision": "deny", "policy": "lockdown", "rule": "no-posts"}
    r = await c.request("GET", "/v1/x")
    assert r.status == 200
    assert sc.log.of(r)["authz"]["dry_run"] == {
        "decision": "allow",
        "policy": "only-get",
        "rule": "gets",
    }
    r = await c.request("PUT", "/v1/x", body=b"x")
    assert r.status == 200
    assert sc.log.of(r)["authz"]["dry_run"] == {"decision": "deny", "policy": None, "rule": None}
    assert samples(sc, "lepton_authz_decisions_total") == {
        (("decision", "allow"), ("policy", "-"), ("rule", "-")): 3.0,
        (("decision", "dry_run_deny"), ("policy", "lockdown"), ("rule", "no-posts")): 1.0,
        (("decision", "dry_run_allow"), ("policy", "only-get"), ("rule", "gets")): 1.0,
        (("decision", "dry_run_deny"), ("policy", "-"), ("rule", "-")): 1.0,
    }
    await c.close()


async def test_allow_nothing_is_default_deny(secured, app: EchoApp):
    sc = await secured(SecurityPolicies(authorization=(policy("allow-nothing", "ALLOW"),)))
    c = await Client.connect(sc.addresses["inbound"])
    r = await c.request()
    assert r.status == 403 and r.get("x-lepton-reason") == "rbac_denied" and app.requests == 0
    assert sc.log.of(r)["detail"] == "no ALLOW rule matched"
    await c.close()


async def test_config_describes_the_running_policy(api):
    sc, c = api
    await c.request("GET", "/v1/x", token())
    described = sc.snapshot.inbound_state.describe()
    assert described["enabled"] is True
    authn = described["authentication"]
    assert authn["providers"]["corp"]["kids"] == ["k1"]
    assert authn["token_cache"]["entries"] == 1
    assert [p["name"] for p in described["authorization"]["policies"]] == [
        "block-admin",
        "api",
        "watch",
    ]
    assert described["authorization"]["uses_request_auth"] is True
    r = await c.request("GET", "/v1/x", [("x-user-id", "x")])
    assert r.status == 200 and echoed(r, "x-user-id") == ["x"]  # not a claim header here


async def test_policies_read_a_claim_header_as_the_app_gets_it(secured, app: EchoApp):
    """`x-user-id` set from the token's `sub` (the client's copy removed): a DENY on it
    denies that user, and a rate limit keyed on it has one bucket per user."""
    p = provider(
        jwks=orjson.dumps(KEYS).decode(), claims_to_headers=(ClaimToHeader("sub", "x-user-id"),)
    )
    block = policy(
        "block-mallory",
        "DENY",
        rule(
            "mallory",
            conditions=(
                Condition("request.headers[x-user-id]", "header", "x-user-id", values=("mallory",)),
            ),
        ),
    )
    per_user = RateLimit(
        "per-user",
        "default",
        "intent",
        (RateLimitRule("per-user", 0.001, 1, RateKey("header", "x-user-id")),),
    )
    sc = await secured(
        SecurityPolicies(
            authentication=authentication(p), authorization=(block,), rate_limit=per_user
        )
    )
    c = await Client.connect(sc.addresses["inbound"])
    r = await c.request(headers=token(sub="mallory"))
    assert r.status == 403 and sc.log.of(r)["authz"]["rule"] == "mallory"
    r = await c.request(headers=token(sub="alice"))
    assert r.status == 200 and echoed(r, "x-user-id") == ["alice"]
    r = await c.request(headers=token(sub="bob"))  # bob's own bucket
    assert r.status == 200 and echoed(r, "x-user-id") == ["bob"]
    r = await c.request(headers=token(sub="alice"))
    assert r.status == 429 and r.get("retry-after") is not None
    # A client's own x-user-id is neither forwarded nor judged: no token, no value.
    r = await c.request(headers=[("x-user-id", "carol")])
    assert r.status == 200 and echoed(r, "x-user-id") == []
    await c.close()
