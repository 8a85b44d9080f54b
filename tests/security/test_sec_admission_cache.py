"""The inbound guard's admission cache, end to end: a repeated request replays the
admitted outcome (same claim headers, normalized path and decision, counted every
time), but never past its token's expiry, never across a change in a header a rule
reads, never around the rate limit, and never for a token taken out of a cookie."""

from __future__ import annotations

import time
from typing import Any

import orjson
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
from lepton_mesh.proxy.security import inbound_policy
from lepton_mesh.proxy.security.inbound_policy import InboundState
from lepton_mesh.proxy.snapshot import Snapshot

RSA = rsa_key()
KEYS = orjson.dumps(jwks(public_jwk(RSA, "k1"))).decode()
PROVIDER = provider(jwks=KEYS, claims_to_headers=(ClaimToHeader("sub", "x-user-id"),))

TENANT_ONLY = AuthorizationPolicy(
    "api",
    "default",
    "intent",
    "ALLOW",
    (
        AuthorizationRule(
            "acme-users",
            sources=(Source(principals=(f"{ISSUER}/*",)),),
            operations=(Operation(methods=frozenset({"GET"}), paths=("/v1/*",)),),
            conditions=(
                Condition("request.headers[x-tenant]", "header", "x-tenant", values=("acme",)),
            ),
        ),
    ),
    False,
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def on_clocks(sc: Any, wall: Clock, mono: Clock | None = None) -> None:
    """Run the sidecar's inbound policy on clocks the test moves (a new snapshot)."""
    state = InboundState(wall=wall, mono=mono or time.monotonic)
    sc.snapshot = Snapshot(sc.snapshot.cfg, sc.states, state)
    sc.metrics.set_security_source(state)


def samples(sc: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(sc.metrics.render()[0].decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def bearer(token: str, tenant: str = "acme") -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}"), ("x-tenant", tenant)]


async def test_a_repeated_request_replays_its_admission_and_counts_each_time(secured, app: EchoApp):
    sc = await secured(
        SecurityPolicies(authentication=authentication(PROVIDER), authorization=(TENANT_ONLY,))
    )
    c = await Client.connect(sc.addresses["inbound"])
    token = mint(RSA)
    forged = [*bearer(token), ("x-user-id", "mallory")]
    for _ in range(3):
        r = await c.request("GET", "/v1//items/./42", forged)
        assert r.status == 200, r.body
        assert echoed(r, "x-user-id") == ["alice"]  # the claim, never the client's copy
        assert r.json()["target"] == "/v1/items/42"  # normalized on every replay
        rec = sc.log.of(r)
        assert rec["principal"] == f"{ISSUER}/alice"
        assert rec["authz"]["rule"] == "acme-users"
    assert sc.snapshot.guard.cached_admissions == 1
    decisions = samples(sc, "lepton_authz_decisions_total")
    assert decisions[(("decision", "allow"), ("policy", "api"), ("rule", "acme-users"))] == 3
    jwt_ok = samples(sc, "lepton_jwt_authentications_total")
    assert jwt_ok[(("provider", "corp"), ("result", "ok"))] == 3
    await c.close()


async def test_a_header_a_rule_reads_is_part_of_the_key(secured, app: EchoApp):
    sc = await secured(
        SecurityPolicies(authentication=authentication(PROVIDER), authorization=(TENANT_ONLY,))
    )
    c = await Client.connect(sc.addresses["inbound"])
    token = mint(RSA)
    assert (await c.request("GET", "/v1/items", bearer(token))).status == 200
    r = await c.request("GET", "/v1/items", bearer(token, tenant="globex"))
    assert r.status == 403 and r.get("x-lepton-reason") == "rbac_denied"
    assert (await c.request("GET", "/v1/items", bearer(token))).status == 200
    # Another token is another key: its own verification and decision.
    other = mint(RSA, claims(sub="bob"))
    r = await c.request("GET", "/v1/items", bearer(other))
    assert r.status == 200 and echoed(r, "x-user-id") == ["bob"]
    assert app.requests == 3
    await c.close()


async def test_a_cached_admission_ends_when_its_token_expires(secured, app: EchoApp):
    sc = await secured(
        SecurityPolicies(authentication=authentication(PROVIDER), authorization=(TENANT_ONLY,))
    )
    now = time.time()
    wall = Clock(now)
    on_clocks(sc, wall)
    c = await Client.connect(sc.addresses["inbound"])
    token = mint(RSA, claims(iat=int(now), exp=int(now) + 120))
    assert (await c.request("GET", "/v1/items", bearer(token))).status == 200
    assert (await c.request("GET", "/v1/items", bearer(token))).status == 200
    wall.now = now + 120 + PROVIDER.clock_skew + 1  # past exp and the leeway
    r = await c.request("GET", "/v1/items", bearer(token))
    assert r.status == 401 and r.get("x-lepton-reason") == "jwt_invalid"
    assert sc.log.of(r)["jwt_cause"] == "expired"
    assert app.requests == 2
    await c.close()


async def test_the_rate_limit_still_counts_every_replayed_request(secured, app: EchoApp):
    limit = RateLimit(
        "limits",
        "default",
        "intent",
        (RateLimitRule("per-ip", requests_per_second=1, burst=3, key=RateKey("client_ip")),),
    )
    sc = await secured(
        SecurityPolicies(
            authentication=authentication(PROVIDER),
            authorization=(TENANT_ONLY,),
            rate_limit=limit,
        )
    )
    mono = Clock(1000.0)
    on_clocks(sc, Clock(time.time()), mono)
    c = await Client.connect(sc.addresses["inbound"])
    headers = bearer(mint(RSA))
    for _ in range(3):
        assert (await c.request("GET", "/v1/items", headers)).status == 200
    r = await c.request("GET", "/v1/items", headers)
    assert r.status == 429 and r.get("retry-after") == "1"
    assert sc.log.of(r)["rate_limit"] == "per-ip"
    mono.now += 1.0  # one token back
    r = await c.request("GET", "/v1/items", headers)
    assert r.status == 200
    rec = sc.log.of(r)
    # The refusal did not leak into the admission the later request replayed.
    assert "rate_limit" not in rec and "detail" not in rec
    assert rec["authz"]["rule"] == "acme-users"
    assert app.requests == 4
    await c.close()


async def test_a_token_taken_out_of_a_cookie_is_not_cached(secured, app: EchoApp):
    p = provider(
        jwks=KEYS,
        from_headers=(),
        from_cookies=("session",),
        forward_original_token=False,
        claims_to_headers=(ClaimToHeader("sub", "x-user-id"),),
    )
    sc = await secured(SecurityPolicies(authentication=authentication(p)))
    c = await Client.connect(sc.addresses["inbound"])
    cookie = [("cookie", f"theme=dark; session={mint(RSA)}")]
    for _ in range(2):
        r = await c.request("GET", "/v1/items", cookie)
        assert r.status == 200
        assert echoed(r, "cookie") == ["theme=dark"]
        assert echoed(r, "x-user-id") == ["alice"]
    assert sc.snapshot.guard.cached_admissions == 0
    await c.close()


async def test_a_token_taken_out_of_the_query_is_removed_on_every_replay(secured, app: EchoApp):
    p = provider(
        jwks=KEYS,
        from_headers=(),
        from_params=("access_token",),
        forward_original_token=False,
        claims_to_headers=(ClaimToHeader("sub", "x-user-id"),),
    )
    sc = await secured(SecurityPolicies(authentication=authentication(p)))
    c = await Client.connect(sc.addresses["inbound"])
    for _ in range(3):
        r = await c.request("GET", f"/v1/items?access_token={mint(RSA)}&page=2")
        assert r.status == 200
        assert r.json()["target"] == "/v1/items?page=2"
        assert echoed(r, "x-user-id") == ["alice"]
    await c.close()


async def test_the_cache_is_bounded(secured, app: EchoApp, monkeypatch):
    monkeypatch.setattr(inbound_policy, "ADMISSIONS_MAX", 3)
    sc = await secured(
        SecurityPolicies(authentication=authentication(PROVIDER), authorization=(TENANT_ONLY,))
    )
    c = await Client.connect(sc.addresses["inbound"])
    headers = bearer(mint(RSA))
    for i in range(3):
        assert (await c.request("GET", f"/v1/items-{i}", headers)).status == 200
    assert sc.snapshot.guard.cached_admissions == 3
    assert (await c.request("GET", "/v1/items-3", headers)).status == 200
    assert sc.snapshot.guard.cached_admissions == 1  # full: cleared, then this one
    await c.close()
