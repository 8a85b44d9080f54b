"""JWT authentication end to end: a real sidecar in front of an echo app, tokens
signed by keys the test generates, the JWKS served by a local HTTP server that
rotates its keys. Every refusal is checked for status, reason, WWW-Authenticate,
its access-log cause, its metric, and that nothing reached the app."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from security_support import (
    ISSUER,
    Client,
    EchoApp,
    JwksServer,
    authentication,
    b64,
    claims,
    ec_key,
    echoed,
    hmac_token,
    jwks,
    mint,
    provider,
    public_jwk,
    public_pem,
    raw_token,
    rsa_key,
    wait_for,
)

from lepton_mesh.policy.security import (
    AuthorizationPolicy,
    AuthorizationRule,
    ClaimToHeader,
    SecurityPolicies,
    Source,
    TokenHeader,
)
from lepton_mesh.proxy.security.authn import JwtCause

RSA = rsa_key()
OTHER = rsa_key("other")
INVALID = 'Bearer error="invalid_token"'


def metric(sc: Any, name: str, **labels: str) -> float:
    text = sc.metrics.render()[0].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def start(secured: Any, jwks_server: JwksServer, **kw: Any) -> tuple[Any, Client]:
    jwks_server.document = jwks(public_jwk(RSA, "k1"), public_jwk(ec_key(), "e1"))
    p = provider(jwks_uri=jwks_server.uri, **kw)
    sc = await secured(SecurityPolicies(authentication=authentication(p)))
    return sc, await Client.connect(sc.addresses["inbound"])


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_a_valid_token_reaches_the_app_with_its_claims_and_no_forged_copies(
    secured, jwks_server, app: EchoApp
):
    sc, c = await start(
        secured,
        jwks_server,
        claims_to_headers=(
            ClaimToHeader("sub", "x-user-id"),
            ClaimToHeader("groups", "x-user-groups"),
        ),
    )
    token = mint(RSA, claims(groups=["dev", "ops"]))
    forged = [("X-User-Id", "root"), ("x-user-groups", "admins"), ("x-user-id", "root2")]
    r = await c.request(headers=bearer(token) + forged)
    assert r.status == 200
    assert echoed(r, "x-user-id") == ["alice"]
    assert echoed(r, "x-user-groups") == ["dev,ops"]
    assert echoed(r, "authorization") == [f"Bearer {token}"]  # forwarded by default
    rec = sc.log.of(r)
    assert rec["principal"] == f"{ISSUER}/alice" and rec["jwt_provider"] == "corp"
    assert rec["jwt_cause"] is None
    # Without a token the forged headers are still stripped.
    r = await c.request(headers=forged)
    assert r.status == 200 and echoed(r, "x-user-id") == [] and echoed(r, "x-user-groups") == []
    assert metric(sc, "lepton_jwt_authentications_total", provider="corp", result="ok") == 1
    await c.close()


def _swap(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


# (name, token builder, cause), with real time: the sidecar's clock is the wall clock.
E2E_ATTACKS: list[tuple[str, Callable[[], str], str]] = [
    (
        "alg-none",
        lambda: raw_token({"alg": "none", "kid": "k1"}, claims()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    (
        "hs256-with-rsa-public-key",
        lambda: hmac_token(public_pem(RSA), claims()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    ("expired", lambda: mint(RSA, claims(exp=int(time.time()) - 120)), JwtCause.EXPIRED),
    (
        "nbf-in-the-future",
        lambda: mint(RSA, claims(nbf=int(time.time()) + 600)),
        JwtCause.NOT_YET_VALID,
    ),
    ("wrong-issuer", lambda: mint(RSA, claims(iss="https://evil.test")), JwtCause.WRONG_ISSUER),
    ("wrong-audience", lambda: mint(RSA, claims(aud="billing-api")), JwtCause.WRONG_AUDIENCE),
    ("bad-signature", lambda: mint(OTHER, claims()), JwtCause.BAD_SIGNATURE),
    (
        "tampered-payload",
        lambda: _swap(mint(RSA, claims()), 1, b64(orjson.dumps(claims(sub="root")))),
        JwtCause.BAD_SIGNATURE,
    ),
    ("malformed-segments", lambda: "abc.def", JwtCause.MALFORMED),
    ("garbage-header", lambda: _swap(mint(RSA, claims()), 0, "%%%"), JwtCause.MALFORMED),
    ("oversized", lambda: mint(RSA, claims(pad="x" * 9000)), JwtCause.OVERSIZED),
]


@pytest.mark.parametrize(
    ("build", "cause"), [a[1:] for a in E2E_ATTACKS], ids=[a[0] for a in E2E_ATTACKS]
)
async def test_attack_corpus_gets_401_and_never_reaches_the_app(
    secured, jwks_server, app: EchoApp, build: Callable[[], str], cause: str
):
    sc, c = await start(secured, jwks_server)
    r = await c.request(headers=bearer(build()))
    assert r.status == 401, r.body
    assert r.get("x-lepton-reason") == "jwt_invalid"
    assert r.get("www-authenticate") == INVALID
    assert r.json()["reason"] == "jwt_invalid" and cause in r.json()["error"]
    assert r.get("connection") == "keep-alive"  # a refusal does not cost the connection
    rec = sc.log.of(r)
    assert rec["status"] == 401 and rec["reason"] == "jwt_invalid" and rec["jwt_cause"] == cause
    assert app.requests == 0
    provider_label = rec["jwt_provider"] or "-"  # "-": the token named no provider's issuer
    assert (
        metric(sc, "lepton_jwt_authentications_total", provider=provider_label, result=cause) == 1
    )
    # The connection still serves the next request.
    r = await c.request(headers=bearer(mint(RSA)))
    assert r.status == 200
    await c.close()


async def test_a_missing_token_passes_unless_required(secured, jwks_server, app: EchoApp):
    sc, c = await start(secured, jwks_server)
    r = await c.request(headers=[("authorization", "Basic dXNlcjpwdw==")])
    assert r.status == 200
    rec = sc.log.of(r)
    assert "principal" not in rec and "jwt_cause" not in rec and rec["status"] == 200
    await c.close()

    sc, c = await start(secured, jwks_server, required=True)
    r = await c.request()
    assert r.status == 401 and r.get("x-lepton-reason") == "jwt_missing"
    assert r.get("www-authenticate") == "Bearer"
    assert sc.log.of(r)["jwt_cause"] == "missing"
    r = await c.request(headers=[("authorization", "Bearer")])  # present and empty: invalid
    assert r.status == 401 and r.get("www-authenticate") == INVALID
    assert await c.request(headers=bearer(mint(RSA))) is not None
    await c.close()


async def test_two_authorization_headers_are_refused(secured, jwks_server, app: EchoApp):
    """Verifying one token while the app reads the other would be a bypass."""
    sc, c = await start(secured, jwks_server)
    good = mint(RSA)
    forged = mint(RSA, claims(sub="root"))[:-4] + "AAAA"
    r = await c.request(headers=bearer(good) + bearer(forged))
    assert r.status == 401 and app.requests == 0
    assert sc.log.of(r)["jwt_cause"] == "malformed"
    await c.close()


async def test_a_good_token_cannot_escort_a_forged_one_in_another_place(
    secured, jwks_server, app: EchoApp
):
    """A verified header token next to a forged query-parameter or cookie token would
    let the forged one reach an app that reads that place: refused as ambiguous."""
    sc, c = await start(
        secured,
        jwks_server,
        from_headers=(TokenHeader("authorization", "Bearer "),),
        from_params=("access_token",),
        from_cookies=("session",),
    )
    good = mint(RSA)
    forged = mint(RSA, claims(sub="root"))[:-4] + "AAAA"
    for target, headers in [
        (f"/p?access_token={forged}", bearer(good)),
        ("/p", [*bearer(good), ("cookie", f"session={forged}")]),
        (f"/p?access_token={forged}", [("cookie", f"session={good}")]),
    ]:
        r = await c.request(target=target, headers=headers)
        assert r.status == 401 and r.get("www-authenticate") == INVALID
        assert sc.log.of(r)["jwt_cause"] == "malformed"
    assert app.requests == 0
    await c.close()


async def test_the_original_token_can_be_removed_wherever_it_was(
    secured, jwks_server, app: EchoApp
):
    _, c = await start(
        secured,
        jwks_server,
        forward_original_token=False,
        from_headers=(TokenHeader("authorization", "Bearer "),),
        from_params=("access_token",),
        from_cookies=("session",),
    )
    token = mint(RSA)
    r = await c.request(headers=[*bearer(token), ("x-other", "kept")])
    assert r.status == 200 and echoed(r, "authorization") == [] and echoed(r, "x-other") == ["kept"]
    r = await c.request(target=f"/p?a=1&access_token={token}&b=2")
    assert r.status == 200 and r.json()["target"] == "/p?a=1&b=2"
    r = await c.request(headers=[("cookie", f"theme=dark; session={token}; lang=en")])
    assert r.status == 200 and echoed(r, "cookie") == ["theme=dark; lang=en"]
    await c.close()


async def test_client_sent_identity_headers_never_reach_the_app_nor_authorize(
    secured, app: EchoApp
):
    """Without mTLS the caller is unknown: x-lepton-peer and XFCC sent by a client are
    dropped, and an ALLOW rule for service `chat` does not let such a client in."""
    policy = AuthorizationPolicy(
        "only-chat",
        "default",
        "intent",
        "ALLOW",
        (AuthorizationRule("chat", sources=(Source(services=("chat",)),)),),
    )
    sc = await secured(SecurityPolicies(authorization=(policy,)))
    c = await Client.connect(sc.addresses["inbound"])
    spoof = [
        ("x-lepton-peer", "chat"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://cluster.local/ns/default/svc/intent;"
            "URI=spiffe://cluster.local/ns/default/svc/chat",
        ),
    ]
    r = await c.request(headers=spoof)
    assert r.status == 403 and r.get("x-lepton-reason") == "rbac_denied"
    rec = sc.log.of(r)
    assert rec["source_identity"] is None
    assert rec["authz"]["cause"] == "no_allow_match" and app.requests == 0

    open_policy = AuthorizationPolicy(
        "anyone", "default", "intent", "ALLOW", (AuthorizationRule("all"),)
    )
    sc = await secured(SecurityPolicies(authorization=(open_policy,)))
    c2 = await Client.connect(sc.addresses["inbound"])
    r = await c2.request(headers=spoof)
    assert r.status == 200
    assert echoed(r, "x-lepton-peer") == [] and echoed(r, "x-forwarded-client-cert") == []
    await c.close()
    await c2.close()


async def test_key_rotation_at_the_issuer(secured, jwks_server: JwksServer, app: EchoApp):
    sc, c = await start(secured, jwks_server)
    old = mint(RSA, kid="k1")
    assert (await c.request(headers=bearer(old))).status == 200
    hits = jwks_server.hits

    # The issuer rotates: k2 in, k1 out. A token with the new kid triggers one refresh.
    new_key = rsa_key("rotated")
    jwks_server.document = jwks(public_jwk(new_key, "k2"))
    r = await c.request(headers=bearer(mint(new_key, kid="k2")))
    assert r.status == 200 and jwks_server.hits == hits + 1
    # The rotated-out key stops verifying at once, cached or not.
    r = await c.request(headers=bearer(old))
    assert r.status == 401
    assert sc.log.of(r)["jwt_cause"] == "unknown_key"
    assert jwks_server.hits == hits + 1, "no second refresh within the minimum period"
    await c.close()


async def test_unknown_kids_trigger_one_refresh_per_period(
    secured, jwks_server: JwksServer, app: EchoApp
):
    sc, c = await start(secured, jwks_server)
    assert (await c.request(headers=bearer(mint(RSA)))).status == 200
    hits = jwks_server.hits
    for i in range(20):
        r = await c.request(headers=bearer(mint(RSA, kid=f"made-up-{i}")))
        assert r.status == 401 and r.get("www-authenticate") == INVALID
    assert jwks_server.hits == hits + 1
    assert (
        metric(sc, "lepton_jwt_authentications_total", provider="corp", result="unknown_key") == 20
    )
    await c.close()


async def test_a_failing_jwks_keeps_the_last_good_keys(
    secured, jwks_server: JwksServer, app: EchoApp
):
    sc, c = await start(secured, jwks_server, jwks_refresh=0.05)
    token = mint(RSA)
    assert (await c.request(headers=bearer(token))).status == 200
    jwks_server.mode = "error"
    source = sc.snapshot.guard.authn.providers[0].keys

    async def poke() -> bool:
        r = await c.request(headers=bearer(mint(RSA, claims(sub=f"u{time.monotonic()}"))))
        assert r.status == 200
        return source.failures > 0

    deadline = time.monotonic() + 5
    while not await poke():
        assert time.monotonic() < deadline, "no refresh failed"
    described = sc.snapshot.inbound_state.describe()
    prov = described["authentication"]["providers"]["corp"]
    assert prov["last_error"].endswith("answered 500") and prov["kids"] == ["k1", "e1"]
    await c.close()


async def test_jwks_down_from_the_start(secured, jwks_server: JwksServer, app: EchoApp):
    jwks_server.mode = "error"
    p = provider(jwks_uri=jwks_server.uri)
    sc = await secured(SecurityPolicies(authentication=authentication(p)))
    c = await Client.connect(sc.addresses["inbound"])
    r = await c.request(headers=bearer(mint(RSA)))
    assert r.status == 401
    assert sc.log.of(r)["jwt_cause"] == "unknown_key"
    hits = jwks_server.hits
    for _ in range(5):  # a source that is down is not fetched once per request
        assert (await c.request(headers=bearer(mint(RSA)))).status == 401
    assert jwks_server.hits == hits
    # Once the JWKS is back, an unknown kid may refresh again only after the period;
    # the regular retry after a failure brings the keys back without it.
    jwks_server.mode = "ok"
    jwks_server.document = jwks(public_jwk(RSA, "k1"))
    source = sc.snapshot.guard.authn.providers[0].keys
    source.attempted_at -= 10  # as if RETRY_AFTER_FAILURE had passed
    source.maybe_refresh(source.clock())
    await wait_for(lambda: source.loaded, what="keys loaded")
    assert (await c.request(headers=bearer(mint(RSA)))).status == 200
    await c.close()


async def test_requests_wait_for_the_first_jwks_fetch(
    secured, jwks_server: JwksServer, app: EchoApp
):
    jwks_server.mode = "hang"
    jwks_server.document = jwks(public_jwk(RSA, "k1"))
    p = provider(jwks_uri=jwks_server.uri, jwks_timeout=0.3)
    sc = await secured(SecurityPolicies(authentication=authentication(p)))
    c = await Client.connect(sc.addresses["inbound"])
    start_t = time.monotonic()
    r = await c.request(headers=bearer(mint(RSA)))
    waited = time.monotonic() - start_t
    # Waited for the fetch (bounded by its timeout), then refused: no keys.
    assert r.status == 401 and 0.2 < waited < 3
    await c.close()
