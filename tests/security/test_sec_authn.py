"""JWT verification without a network: the attack corpus with exact causes, token
locations, the cache (bounded, hashed, never past exp, dropped on key change),
and what a cached token costs against a fresh verification."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from security_support import (
    AUDIENCE,
    ISSUER,
    b64,
    claims,
    ec_key,
    ed_key,
    hmac_token,
    jwks,
    mint,
    provider,
    public_jwk,
    public_pem,
    raw_token,
    rsa_key,
)

from lepton_mesh.policy.security import ClaimToHeader, JwtProvider, TokenHeader
from lepton_mesh.proxy.security.authn import (
    Authenticator,
    JwtCause,
    JwtFailure,
    NeedKeys,
    ProviderRuntime,
)
from lepton_mesh.proxy.security.jwks import FileKeys, StaticKeys

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def at(**over: Any) -> dict[str, Any]:
    """Claims issued at NOW, valid for an hour."""
    return claims(**{"iat": int(NOW), "exp": int(NOW) + 3600, **over})


def authenticator(
    *providers: JwtProvider, clock: Clock | None = None, cache_size: int = 100
) -> Authenticator:
    rts = []
    for p in providers:
        src = StaticKeys(p.jwks or "", frozenset(p.algorithms), lambda: 0.0)
        rts.append(ProviderRuntime(p, src))
    return Authenticator(rts, wall=clock or Clock(), cache_size=cache_size)


RSA = rsa_key()
OTHER = rsa_key("other")
EC = ec_key()
ED = ed_key()
KEYS = orjson.dumps(
    jwks(public_jwk(RSA, "k1"), public_jwk(EC, "e1"), public_jwk(ED, "d1"))
).decode()
CORP = provider(jwks=KEYS, algorithms=("RS256", "ES256", "EdDSA"), clock_skew=60.0)


def _swap_segment(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


# (name, token builder, cause). Every one is refused with exactly this cause.
ATTACKS: list[tuple[str, Callable[[], str], str]] = [
    (
        "alg-none",
        lambda: raw_token({"alg": "none", "kid": "k1"}, at()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    (
        "alg-None-case",
        lambda: raw_token({"alg": "None", "kid": "k1"}, at()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    ("alg-missing", lambda: raw_token({"kid": "k1"}, at(), b"sig"), JwtCause.ALGORITHM_NOT_ALLOWED),
    (
        "hs256-keyed-with-the-rsa-public-key",
        lambda: hmac_token(public_pem(RSA), at()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    (
        "hs256-keyed-with-the-jwk-json",
        lambda: hmac_token(orjson.dumps(public_jwk(RSA, "k1")), at()),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    ("expired", lambda: mint(RSA, at(exp=int(NOW) - 61)), JwtCause.EXPIRED),
    ("nbf-in-the-future", lambda: mint(RSA, at(nbf=int(NOW) + 120)), JwtCause.NOT_YET_VALID),
    ("iat-in-the-future", lambda: mint(RSA, at(iat=int(NOW) + 120)), JwtCause.NOT_YET_VALID),
    ("exp-not-a-number", lambda: mint(RSA, at(exp="soon")), JwtCause.MALFORMED),
    ("wrong-issuer", lambda: mint(RSA, at(iss="https://evil.test")), JwtCause.WRONG_ISSUER),
    ("no-issuer", lambda: mint(RSA, at(iss=None)), JwtCause.WRONG_ISSUER),
    ("wrong-audience", lambda: mint(RSA, at(aud="other-api")), JwtCause.WRONG_AUDIENCE),
    ("no-audience", lambda: mint(RSA, at(aud=None)), JwtCause.WRONG_AUDIENCE),
    ("unknown-kid", lambda: mint(RSA, at(), kid="nope"), JwtCause.UNKNOWN_KEY),
    ("signed-by-another-key", lambda: mint(OTHER, at()), JwtCause.BAD_SIGNATURE),
    (
        "ec-kid-with-rs256-header",
        lambda: _swap_segment(mint(RSA, at()), 0, b64(b'{"alg":"RS256","kid":"e1"}')),
        JwtCause.ALGORITHM_NOT_ALLOWED,
    ),
    (
        "payload-swapped-after-signing",
        lambda: _swap_segment(mint(RSA, at()), 1, b64(orjson.dumps(at(sub="root")))),
        JwtCause.BAD_SIGNATURE,
    ),
    ("signature-stripped", lambda: mint(RSA, at()).rsplit(".", 1)[0] + ".", JwtCause.MALFORMED),
    ("two-segments", lambda: ".".join(mint(RSA, at()).split(".")[:2]), JwtCause.MALFORMED),
    ("four-segments", lambda: mint(RSA, at()) + ".x", JwtCause.MALFORMED),
    ("header-not-base64", lambda: _swap_segment(mint(RSA, at()), 0, "***"), JwtCause.MALFORMED),
    ("header-not-json", lambda: _swap_segment(mint(RSA, at()), 0, b64(b"{")), JwtCause.MALFORMED),
    ("header-a-list", lambda: _swap_segment(mint(RSA, at()), 0, b64(b"[1]")), JwtCause.MALFORMED),
    ("kid-a-number", lambda: raw_token({"alg": "RS256", "kid": 7}, at(), b"s"), JwtCause.MALFORMED),
    ("empty", lambda: "", JwtCause.MALFORMED),
    ("oversized", lambda: mint(RSA, at(pad="x" * 9000)), JwtCause.OVERSIZED),
]


@pytest.mark.parametrize(("build", "cause"), [a[1:] for a in ATTACKS], ids=[a[0] for a in ATTACKS])
def test_attack_corpus_is_refused_with_its_cause(build: Callable[[], str], cause: str):
    auth = authenticator(CORP)
    with pytest.raises(JwtFailure) as err:
        auth.verify(build().encode(), may_wait=False)
    assert err.value.cause == cause, err.value.detail
    assert len(auth.cache) == 0, "nothing refused is cached"


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [(RSA, "RS256", "k1"), (EC, "ES256", "e1"), (ED, "EdDSA", "d1")],
    ids=["rs256", "es256", "eddsa"],
)
def test_valid_tokens_of_every_key_type(key: Any, alg: str, kid: str):
    auth = authenticator(CORP)
    v = auth.verify(mint(key, at(groups=["a", "b"]), alg=alg, kid=kid).encode())
    assert v.principal == f"{ISSUER}/alice"
    assert v.claims["groups"] == ["a", "b"] and v.provider.name == "corp"


def test_clock_skew_is_a_leeway_both_ways():
    auth = authenticator(CORP)
    assert auth.verify(mint(RSA, at(exp=int(NOW) - 59)).encode())  # expired 59 s ago, skew 60
    assert auth.verify(mint(RSA, at(nbf=int(NOW) + 59)).encode())
    strict = authenticator(provider(jwks=KEYS, clock_skew=0.0))
    with pytest.raises(JwtFailure, match="expired"):
        strict.verify(mint(RSA, at(exp=int(NOW))).encode())


def test_no_kid_is_accepted_only_when_one_key_fits():
    single = provider(jwks=orjson.dumps(jwks(public_jwk(RSA, None))).decode())
    assert authenticator(single).verify(mint(RSA, at(), kid=None).encode())
    two = provider(jwks=orjson.dumps(jwks(public_jwk(RSA, "a"), public_jwk(OTHER, "b"))).decode())
    with pytest.raises(JwtFailure) as err:
        authenticator(two).verify(mint(RSA, at(), kid=None).encode(), may_wait=False)
    assert err.value.cause == JwtCause.UNKNOWN_KEY


def test_audience_list_matches_any_and_empty_audiences_skip_the_check():
    auth = authenticator(CORP)
    assert auth.verify(mint(RSA, at(aud=["x", AUDIENCE])).encode())
    any_aud = authenticator(provider(jwks=KEYS, audiences=()))
    assert any_aud.verify(mint(RSA, at(aud="whatever")).encode())


def test_the_token_issuer_picks_the_provider():
    other_keys = orjson.dumps(jwks(public_jwk(OTHER, "o1"))).decode()
    auth = authenticator(
        CORP, provider(name="partner", issuer="https://partner.test", jwks=other_keys)
    )
    v = auth.verify(mint(OTHER, at(iss="https://partner.test"), kid="o1").encode())
    assert v.provider.name == "partner" and v.principal == "https://partner.test/alice"
    # The partner's key never verifies corp's issuer.
    with pytest.raises(JwtFailure) as err:
        auth.verify(mint(OTHER, at(), kid="o1").encode(), may_wait=False)
    assert err.value.cause == JwtCause.UNKNOWN_KEY


def test_claims_become_header_lines_and_control_characters_never_do():
    p = provider(
        jwks=KEYS,
        claims_to_headers=(
            ClaimToHeader("sub", "x-user-id"),
            ClaimToHeader("groups", "x-user-groups"),
            ClaimToHeader("org.team", "x-team"),
            ClaimToHeader("evil", "x-evil"),
            ClaimToHeader("absent", "x-absent"),
        ),
    )
    token = mint(
        RSA, at(groups=["a", "b"], org={"team": "ml"}, evil="x\r\nx-user-id: root")
    ).encode()
    v = authenticator(p).verify(token)
    assert v.header_lines == b"x-user-id: alice\r\nx-user-groups: a,b\r\nx-team: ml\r\n"


# -- where the token is ---------------------------------------------------------------


def kept(*headers: tuple[str, str]) -> list[tuple[bytes, bytes, bytes]]:
    return [(k.lower().encode(), k.encode(), v.encode()) for k, v in headers]


LOCATED = provider(
    jwks=KEYS,
    from_headers=(TokenHeader("authorization", "Bearer "), TokenHeader("x-token")),
    from_params=("access_token",),
    from_cookies=("session",),
)


@pytest.mark.parametrize(
    ("headers", "target", "expected"),
    [
        ((("Authorization", "Bearer abc"),), b"/", (b"abc", ("header", b"authorization"))),
        ((("authorization", "bearer  abc "),), b"/", (b"abc", ("header", b"authorization"))),
        ((("Authorization", "Basic dXNlcg=="),), b"/", None),
        ((("Authorization", "Bearer"),), b"/", (b"", ("header", b"authorization"))),
        ((("X-Token", "abc"),), b"/", (b"abc", ("header", b"x-token"))),
        ((), b"/p?x=1&access_token=a%2Eb", (b"a.b", ("param", b"access_token"))),
        ((("Cookie", 'a=1; session="tok"'),), b"/", (b"tok", ("cookie", b"session"))),
        ((), b"/?other=1", None),
    ],
    ids=[
        "bearer",
        "bearer-case-and-spaces",
        "basic-is-not-ours",
        "bearer-alone-is-empty",
        "custom-header",
        "query-param-decoded",
        "cookie-quoted",
        "none",
    ],
)
def test_find_token(headers, target, expected):
    assert authenticator(LOCATED).find_token(kept(*headers), target) == expected


@pytest.mark.parametrize(
    ("headers", "target"),
    [
        ((("Authorization", "Bearer a"), ("authorization", "Bearer b")), b"/"),
        ((("Authorization", "Bearer a"), ("x-token", "b")), b"/"),
        ((), b"/?access_token=a&access_token=b"),
        ((("Cookie", "session=a"), ("Cookie", "session=b")), b"/"),
        # A token in two kinds of place: one verified, the other forwarded unverified.
        ((("Authorization", "Bearer h"),), b"/?access_token=q"),
        ((("Authorization", "Bearer h"), ("Cookie", "session=c")), b"/"),
        ((("Cookie", "session=c"),), b"/?access_token=q"),
        ((("Authorization", "Bearer h"),), b"/?access_token=h"),
    ],
    ids=[
        "two-authorization",
        "two-header-kinds",
        "param-twice",
        "cookie-twice",
        "header-and-param",
        "header-and-cookie",
        "cookie-and-param",
        "same-token-twice",
    ],
)
def test_two_tokens_are_ambiguous(headers, target):
    with pytest.raises(JwtFailure) as err:
        authenticator(LOCATED).find_token(kept(*headers), target)
    assert err.value.cause == JwtCause.MALFORMED


def test_a_token_must_come_from_its_providers_location():
    partner = provider(
        name="partner",
        issuer="https://partner.test",
        jwks=KEYS,
        from_headers=(TokenHeader("x-partner-token"),),
    )
    auth = authenticator(CORP, partner)
    corp_token = mint(RSA, at()).encode()
    assert auth.verify(corp_token, ("header", b"authorization"))
    with pytest.raises(JwtFailure) as err:
        auth.verify(corp_token, ("header", b"x-partner-token"))
    assert err.value.cause == JwtCause.WRONG_ISSUER


# -- the cache ----------------------------------------------------------------------


def test_cache_hits_are_keyed_by_hash_and_never_outlive_exp():
    clock = Clock()
    auth = authenticator(CORP, clock=clock)
    token = mint(RSA, at(exp=int(NOW) + 10)).encode()
    first = auth.verify(token)
    assert auth.verify(token) is first and auth.cache.hits == 1
    (digest,) = auth.cache._entries
    assert len(digest) == 32 and token not in auth.cache._entries
    clock.now = NOW + 9.999
    assert auth.verify(token) is first
    clock.now = NOW + 10  # at exp: verified again (still within the skew: accepted, fresh)
    again = auth.verify(token)
    assert again is not first
    clock.now = NOW + 71
    with pytest.raises(JwtFailure, match="expired"):
        auth.verify(token)


def test_cache_is_bounded_least_recently_used_out():
    auth = authenticator(CORP, cache_size=3)
    tokens = [mint(RSA, at(sub=f"u{i}")).encode() for i in range(4)]
    for t in tokens[:3]:
        auth.verify(t)
    auth.verify(tokens[0])  # used: now the most recent
    auth.verify(tokens[3])  # evicts tokens[1], the least recently used
    assert len(auth.cache) == 3
    hits = auth.cache.hits
    auth.verify(tokens[0])
    auth.verify(tokens[2])
    assert auth.cache.hits == hits + 2
    auth.verify(tokens[1])
    assert auth.cache.hits == hits + 2


async def test_cached_tokens_stop_verifying_when_their_key_is_rotated_out():
    auth = authenticator(CORP)
    source = auth.providers[0].keys
    token = mint(RSA, at()).encode()
    auth.verify(token)
    source.install(source.keys.__class__({}, (), (), "rotated"))  # the key is gone
    with pytest.raises((JwtFailure, NeedKeys)):
        auth.verify(token, may_wait=False)


def test_a_new_kid_in_a_jwks_file_verifies_on_the_request_that_asked_for_it(tmp_path):
    """An unknown kid re-reads a `jwks_file` at once (no fetch to wait for): the token
    that named the rotated-in key is verified with it, not refused."""
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps(jwks(public_jwk(RSA, "k1"))))
    p = provider(jwks_file=str(path))
    src = FileKeys(str(path), frozenset(p.algorithms), 300.0, Clock(), min_refresh=30.0)
    auth = Authenticator([ProviderRuntime(p, src)], wall=Clock())
    assert auth.verify(mint(RSA, at(), kid="k1").encode()).principal == f"{ISSUER}/alice"
    path.write_bytes(orjson.dumps(jwks(public_jwk(RSA, "k1"), public_jwk(OTHER, "k2"))))
    os.utime(path, (1, 1))  # a different mtime whatever the filesystem's resolution
    bob = mint(OTHER, at(sub="bob"), kid="k2").encode()
    assert auth.verify(bob).principal == f"{ISSUER}/bob"
    # A made-up kid re-reads at most once per min_refresh and is refused, never waits.
    with pytest.raises(JwtFailure) as err:
        auth.verify(mint(OTHER, at(sub="eve"), kid="k9").encode())
    assert err.value.cause == JwtCause.UNKNOWN_KEY


def test_cached_verification_costs_almost_nothing():
    """Prints µs per verification: cached vs fresh (RS256, 2048-bit)."""
    auth = authenticator(CORP, cache_size=10_000)
    n = 300
    tokens = [mint(RSA, at(sub=f"u{i}")).encode() for i in range(n)]
    start = time.perf_counter()
    for t in tokens:
        auth.verify(t)
    fresh = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    for _ in range(10):
        for t in tokens:
            auth.verify(t)
    cached = (time.perf_counter() - start) / (10 * n) * 1e6
    print(f"\nJWT RS256: fresh verify {fresh:.1f} us, cached {cached:.2f} us per request")
    assert cached * 10 < fresh


def test_hmac_is_refused_even_if_a_provider_lists_it():
    """Defense in depth: the loader refuses HS* in `algorithms`, and if one got
    through, no JWKS key is ever pinned to an HMAC algorithm."""
    lax = provider(jwks=KEYS, algorithms=("RS256", "HS256"))
    auth = authenticator(lax)
    with pytest.raises(JwtFailure) as err:
        auth.verify(hmac_token(public_pem(RSA), at()).encode(), may_wait=False)
    assert err.value.cause == JwtCause.ALGORITHM_NOT_ALLOWED
