"""JWT authentication on the inbound side: find the token, verify it, cache the result.

`Authenticator` is built per snapshot from the service's
`RequestAuthentication`; its key sources (jwks.py) outlive snapshots.
`find_token` reads the request's token from the configured locations;
`verify` checks it with PyJWT and returns a `Verified` (claims, principal,
the pre-rendered claim headers), raises `JwtFailure` naming the cause, or
raises `NeedKeys` when the answer depends on keys being fetched right now.

Which provider: the token's own `iss` (read before verifying, used only
to choose) picks the provider with that issuer; then that provider's keys,
algorithms, issuer and audiences decide. A token whose `iss` no provider
has is `wrong_issuer`.

Invariants:
- A token longer than MAX_TOKEN_BYTES is refused before any decoding.
- The token header's `alg` must be one the provider allows and one the key
  was pinned to (jwks.VerifyKey); `none` and HMAC are never allowed, so no
  header can make us verify with the wrong kind of key.
- Time claims (`exp`, `nbf`, `iat`) are checked here against an injectable
  wall clock with the provider's leeway; they must be numbers when present.
- This module imports PyJWT, so only what builds an `Authenticator` (a
  service with RequestAuthentication) imports it; the request path of a
  service without one names only authn_errors.
- The cache is keyed by SHA-256 of the token (the token itself is not kept
  as a key), bounded (LRU), and an entry is never used at or after the
  token's `exp` (without `exp`: after CACHE_TTL), nor after the provider's
  keys changed (a rotated-out key stops verifying at once).
"""

from __future__ import annotations

import binascii
import hashlib
import time
from base64 import urlsafe_b64decode
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt
import orjson
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
)

from lepton_mesh.policy.security import MAX_TOKEN_BYTES, JwtProvider
from lepton_mesh.policy.security_decisions import claim_header_value, lookup_claim, principal_of
from lepton_mesh.proxy.security.authn_errors import JwtCause, JwtFailure, NeedKeys
from lepton_mesh.proxy.security.jwks import KeySet, KeySource, VerifyKey

# A token without `exp` is cached at most this long (seconds).
CACHE_TTL = 300.0
CACHE_SIZE = 10_000
# A claim longer than this is not forwarded as a header (it would bloat every request).
MAX_CLAIM_HEADER_CHARS = 4096

WallClock = Callable[[], float]


class Verified:
    """A verified token: what authorization and the forwarded request need."""

    __slots__ = ("claims", "expires", "generation", "header_lines", "principal", "provider")

    def __init__(
        self,
        provider: ProviderRuntime,
        claims: dict[str, Any],
        principal: str | None,
        header_lines: bytes,
        expires: float,
    ) -> None:
        self.provider = provider
        self.claims = claims
        self.principal = principal
        self.header_lines = header_lines
        self.expires = expires
        self.generation = provider.keys.generation


class ProviderRuntime:
    """One provider, as verification needs it."""

    __slots__ = (
        "algorithms",
        "audiences",
        "claim_headers",
        "issuer",
        "keys",
        "leeway",
        "locations",
        "name",
        "spec",
    )

    def __init__(self, spec: JwtProvider, keys: KeySource) -> None:
        self.spec = spec
        self.name = spec.name
        self.issuer = spec.issuer
        self.audiences: list[str] | None = list(spec.audiences) or None
        self.algorithms = frozenset(spec.algorithms)
        self.leeway = spec.clock_skew
        self.keys = keys
        self.claim_headers: tuple[tuple[str, bytes], ...] = tuple(
            (c.claim, c.header.encode("ascii")) for c in spec.claims_to_headers
        )
        self.locations: frozenset[TokenLocation] = frozenset(
            [("header", h.name.encode("latin-1")) for h in spec.from_headers]
            + [("param", n.encode()) for n in spec.from_params]
            + [("cookie", n.encode()) for n in spec.from_cookies]
        )


class TokenCache:
    """Verified tokens by SHA-256 of the token; bounded, least recently used out first."""

    __slots__ = ("_entries", "hits", "max_entries", "misses")

    def __init__(self, max_entries: int = CACHE_SIZE) -> None:
        self._entries: OrderedDict[bytes, Verified] = OrderedDict()
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def get(self, digest: bytes, now: float) -> Verified | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry.expires or entry.generation != entry.provider.keys.generation:
            del self._entries[digest]
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return entry

    def put(self, digest: bytes, entry: Verified) -> None:
        entries = self._entries
        entries[digest] = entry
        if len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


_TWO_PLACES = "tokens in more than one place (header, query parameter, cookie)"

# Where a token was found, so that it can be removed before forwarding and
# checked against its provider's locations: ("header" | "param" | "cookie", name).
TokenLocation = tuple[str, bytes]


class Authenticator:
    """The providers of one service, their token locations, and the token cache."""

    __slots__ = (
        "_by_issuer",
        "_cookies",
        "_headers",
        "_params",
        "cache",
        "providers",
        "required",
        "wall",
    )

    def __init__(
        self,
        providers: Iterable[ProviderRuntime],
        *,
        wall: WallClock = time.time,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.providers = tuple(providers)
        self._by_issuer = {p.issuer: p for p in self.providers}
        self.wall = wall
        self.cache = TokenCache(cache_size)
        self.required = any(p.spec.required for p in self.providers)
        headers: dict[bytes, bytes] = {}
        params: list[bytes] = []
        cookies: list[bytes] = []
        for p in self.providers:
            for h in p.spec.from_headers:
                headers.setdefault(h.name.encode("latin-1"), h.prefix.lower().encode("latin-1"))
            params += [n.encode() for n in p.spec.from_params if n.encode() not in params]
            cookies += [n.encode() for n in p.spec.from_cookies if n.encode() not in cookies]
        self._headers = headers  # lowercase name -> lowercase prefix
        self._params = tuple(params)
        self._cookies = tuple(cookies)

    @property
    def token_headers(self) -> frozenset[bytes]:
        return frozenset(self._headers)

    @property
    def read_headers(self) -> frozenset[bytes]:
        """Every header a token may be found in (Cookie too, when a provider reads cookies)."""
        return self.token_headers | ({b"cookie"} if self._cookies else set())

    # -- finding the token --------------------------------------------------------

    def find_token(
        self, kept: list[tuple[bytes, bytes, bytes]], target: bytes
    ) -> tuple[bytes, TokenLocation] | None:
        """The request's token and where it was; None when there is none.

        Headers, query parameters and cookies are all looked at. Two tokens
        (two token headers, a parameter or cookie twice, or a token in two
        kinds of place) are ambiguous: JwtFailure(malformed) rather than a
        guess at which one the app reads. Verifying one and forwarding the
        other would let a request carry a good token past us and a forged one
        to an app that reads the other place (Envoy verifies every token for
        the same reason).
        """
        found: tuple[bytes, TokenLocation] | None = None
        if self._headers:
            headers = self._headers
            for lname, _, value in kept:
                prefix = headers.get(lname)
                if prefix is None:
                    continue
                if prefix:
                    if value[: len(prefix)].lower() != prefix:
                        if value.strip().lower() != prefix.strip():
                            continue  # another scheme (Basic ...): no token for us
                        value = b""  # "Bearer" alone: a token meant, and empty
                    else:
                        value = value[len(prefix) :]
                if found is not None:
                    raise JwtFailure(JwtCause.MALFORMED, "more than one token in the request")
                found = (value.strip(), ("header", lname))
        if self._params:
            q = target.find(b"?")
            if q >= 0:
                hit = _one_of(_query_pairs(target[q + 1 :]), self._params, "query parameter")
                if hit is not None:
                    if found is not None:
                        raise JwtFailure(JwtCause.MALFORMED, _TWO_PLACES)
                    found = (hit[1], ("param", hit[0]))
        if self._cookies:
            pairs = [
                pair for lname, _, value in kept if lname == b"cookie" for pair in _cookies(value)
            ]
            hit = _one_of(pairs, self._cookies, "cookie")
            if hit is not None:
                if found is not None:
                    raise JwtFailure(JwtCause.MALFORMED, _TWO_PLACES)
                found = (hit[1], ("cookie", hit[0]))
        return found

    # -- verifying ---------------------------------------------------------------

    def verify(
        self, token: bytes, location: TokenLocation | None = None, *, may_wait: bool = True
    ) -> Verified:
        """The verified token; JwtFailure; or NeedKeys (only when `may_wait`).

        `location`: where `find_token` found it; the provider of the token's
        issuer must read tokens from there (None: not checked).
        """
        if len(token) > MAX_TOKEN_BYTES:
            raise JwtFailure(JwtCause.OVERSIZED, f"token longer than {MAX_TOKEN_BYTES} bytes")
        now = self.wall()
        digest = hashlib.sha256(token).digest()
        verified = self.cache.get(digest, now)
        if verified is None:
            verified = self._verify(token, now, may_wait)
            self.cache.put(digest, verified)
        if location is not None and location not in verified.provider.locations:
            raise JwtFailure(
                JwtCause.WRONG_ISSUER,
                f"provider {verified.provider.name!r} does not read tokens from the "
                f"{location[0]} {location[1].decode('latin-1')!r}",
                verified.provider.name,
            )
        return verified

    def _verify(self, token: bytes, now: float, may_wait: bool) -> Verified:
        header, payload = _peek(token)
        alg = header.get("alg")
        iss = payload.get("iss")
        provider = self._by_issuer.get(iss) if isinstance(iss, str) else None
        if provider is None:
            raise JwtFailure(JwtCause.WRONG_ISSUER, f"no provider has issuer {_short(iss)}")
        name = provider.name
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise JwtFailure(
                JwtCause.ALGORITHM_NOT_ALLOWED, f"algorithm {_short(alg)} is not allowed", name
            )
        if token.endswith(b"."):  # after the alg check: `alg: none` is named as such
            raise JwtFailure(JwtCause.MALFORMED, "the token has no signature", name)
        key = self._key(provider, header.get("kid"), alg, may_wait)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=provider.issuer,
                audience=provider.audiences,
                options=_DECODE_OPTIONS if provider.audiences else _DECODE_OPTIONS_NO_AUD,
            )
        except InvalidTokenError as exc:
            raise JwtFailure(_cause_of(exc), str(exc) or type(exc).__name__, name) from None
        expires = _check_times(claims, now, provider.leeway, name)
        principal = principal_of(claims)
        lines = _claim_lines(provider.claim_headers, claims)
        return Verified(provider, claims, principal, lines, expires)

    def _key(self, provider: ProviderRuntime, kid: Any, alg: str, may_wait: bool) -> VerifyKey:
        source = provider.keys
        now = source.clock()
        source.maybe_refresh(now)
        keys = source.keys
        if kid is not None and not isinstance(kid, str):
            raise JwtFailure(JwtCause.MALFORMED, "kid is not a string", provider.name)
        key = _pick(keys, kid, alg)
        if key is None and may_wait:
            pending = source.pending() if not source.loaded else None
            if pending is None:
                pending = source.refresh_for_unknown_kid(now)
            if pending is not None:
                raise NeedKeys(pending)
            if source.keys is not keys:  # reloaded at once (a file): look again
                key = _pick(source.keys, kid, alg)
        if key is None:
            raise JwtFailure(
                JwtCause.UNKNOWN_KEY,
                f"no key {_short(kid)} for {alg}"
                if kid is not None
                else f"no single key for {alg}",
                provider.name,
            )
        if alg not in key.algorithms:
            raise JwtFailure(
                JwtCause.ALGORITHM_NOT_ALLOWED,
                f"key {_short(kid)} is not for {alg}",
                provider.name,
            )
        return key

    def describe(self) -> dict[str, Any]:
        return {
            "providers": {p.name: p.keys.describe() for p in self.providers},
            "token_cache": {
                "entries": len(self.cache),
                "max_entries": self.cache.max_entries,
                "hits": self.cache.hits,
                "misses": self.cache.misses,
            },
        }


def _pick(keys: KeySet, kid: str | None, alg: str) -> VerifyKey | None:
    """The key named by `kid`; without a kid, the one key that fits `alg` (else None)."""
    if kid is not None:
        return keys.by_kid.get(kid)
    fits = [k for k in keys.all if alg in k.algorithms]
    return fits[0] if len(fits) == 1 else None


# Exp/nbf/iat are ours (an injectable clock, precise causes); signature,
# issuer and audience are PyJWT's.
_DECODE_OPTIONS: Any = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": True,
    "verify_iss": True,
    "require": [],
}
_DECODE_OPTIONS_NO_AUD: Any = {**_DECODE_OPTIONS, "verify_aud": False}


def _cause_of(exc: InvalidTokenError) -> str:
    if isinstance(exc, InvalidSignatureError):
        return JwtCause.BAD_SIGNATURE
    if isinstance(exc, InvalidIssuerError):
        return JwtCause.WRONG_ISSUER
    if isinstance(exc, InvalidAudienceError):
        return JwtCause.WRONG_AUDIENCE
    if isinstance(exc, MissingRequiredClaimError):
        return JwtCause.WRONG_AUDIENCE if exc.claim == "aud" else JwtCause.MALFORMED
    if isinstance(exc, InvalidAlgorithmError):
        return JwtCause.ALGORITHM_NOT_ALLOWED
    if isinstance(exc, ExpiredSignatureError):
        return JwtCause.EXPIRED
    if isinstance(exc, ImmatureSignatureError):
        return JwtCause.NOT_YET_VALID
    if isinstance(exc, InvalidKeyError):
        return JwtCause.BAD_SIGNATURE
    if isinstance(exc, DecodeError):
        return JwtCause.MALFORMED
    return JwtCause.MALFORMED


def _b64json(segment: bytes) -> Any:
    try:
        raw = urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))
        return orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None


def _peek(token: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and payload of a compact JWS, unverified (to choose provider and key)."""
    parts = token.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise JwtFailure(JwtCause.MALFORMED, "a JWT has three dot-separated segments")
    header = _b64json(parts[0])
    payload = _b64json(parts[1])
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise JwtFailure(JwtCause.MALFORMED, "header or payload is not base64url JSON object")
    return header, payload


def _number(claims: Mapping[str, Any], name: str, provider: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtFailure(JwtCause.MALFORMED, f"{name} is not a number", provider)
    return float(value)


def _check_times(claims: Mapping[str, Any], now: float, leeway: float, provider: str) -> float:
    """Check exp/nbf/iat; return until when the result may be cached."""
    exp = _number(claims, "exp", provider)
    nbf = _number(claims, "nbf", provider)
    iat = _number(claims, "iat", provider)
    if exp is not None and now >= exp + leeway:
        raise JwtFailure(JwtCause.EXPIRED, "the token has expired", provider)
    if nbf is not None and now < nbf - leeway:
        raise JwtFailure(JwtCause.NOT_YET_VALID, "the token is not valid yet (nbf)", provider)
    if iat is not None and now < iat - leeway:
        raise JwtFailure(
            JwtCause.NOT_YET_VALID, "the token was issued in the future (iat)", provider
        )
    # Cached never past exp itself (the leeway tolerates clocks, it does not extend tokens).
    return min(exp, now + CACHE_TTL) if exp is not None else now + CACHE_TTL


def _claim_lines(claim_headers: tuple[tuple[str, bytes], ...], claims: Mapping[str, Any]) -> bytes:
    if not claim_headers:
        return b""
    out: list[bytes] = []
    for path, header in claim_headers:
        text = claim_header_value(lookup_claim(claims, (path,)))
        if text and len(text) <= MAX_CLAIM_HEADER_CHARS:
            # UTF-8 as sent by the issuer; control characters were refused above.
            out += (header, b": ", text.strip(" \t").encode(), b"\r\n")
    return b"".join(out)


def _query_pairs(query: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for part in query.split(b"&"):
        name, _, value = part.partition(b"=")
        out.append((unquote_to_bytes(name.replace(b"+", b" ")), value))
    return out


def _cookies(header: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for part in header.split(b";"):
        name, sep, value = part.strip().partition(b"=")
        if sep:
            out.append((name.strip(), value.strip().strip(b'"')))
    return out


def _one_of(
    pairs: list[tuple[bytes, bytes]], names: tuple[bytes, ...], what: str
) -> tuple[bytes, bytes] | None:
    """The (name, value) of the first configured name present; twice is ambiguous."""
    for name in names:
        values = [v for n, v in pairs if n == name]
        if len(values) > 1:
            raise JwtFailure(JwtCause.MALFORMED, f"{what} {name.decode()!r} appears more than once")
        if values:
            value = values[0]
            if what == "query parameter":
                value = unquote_to_bytes(value.replace(b"+", b" "))
            return name, value
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
