"""Request security on the inbound side: authenticate, authorize, rate-limit, then forward.

The pipeline for one request to the local app (`InboundGuard.admit`):

  1. strip    headers only we may set: the configured claim headers (a client
              must never name its own user). x-lepton-peer and
              x-forwarded-client-cert are already gone (http1, downstream).
  2. path     with authorization or rate-limit rules, the path they match is
              normalized (dot segments, repeated slashes, escaped unreserved
              characters) and the normalized path is what the app gets, so
              both judge the same path; escaped '/' and '\\' are refused (400).
  3. authn    find the token (authn.py); none: pass unauthenticated unless a
              provider is `required` (401 jwt_missing). Invalid: 401
              jwt_invalid with `WWW-Authenticate: Bearer error="invalid_token"`
              and the cause in the access log. Unknown key: wait once for a
              JWKS refresh (jwks.py) and try again.
  4. authz    the service's AuthorizationPolicies (security_decisions.Authorizer)
              over the caller's verified SPIFFE ID (mTLS; None without it: the
              x-lepton-peer header is never evidence), the JWT principal and
              claims, client IP, method, path, port, headers. Denied: 403
              rbac_denied naming policy and rule; but 401 jwt_missing when no
              token came and an enforced rule reads the request principal or
              claims (a token might have been allowed).
  5. rate     the service's RateLimit (ratelimit.py): 429 rate_limited with
              Retry-After.
  6. forward  with the verified claims as headers, the token itself
              removed if a provider says so.

Admissions are cached (`Admission`): steps 2-4 are a pure function of the
request's method, target, the headers a token, a condition or a rate-limit
key reads, the caller's verified identity and (when a rule reads it) the
client IP. A request whose inputs match an admitted one replays its outcome:
the same normalized target, claim headers and decision (counted again), with
the cached token re-checked for expiry and key rotation, and the rate limit
still taken per request. Measured in a running sidecar, the pipeline cost
~50 us per request even with each step cached on its own (a JWT cache hit,
an authorization decision cache hit): many small steps, each paying for cold
caches; one lookup replaces them. Only admitted requests are cached, and a
token taken out of a cookie (the request's headers are rewritten) is not.

Precomputed per snapshot (`InboundGuard`), built only when the service has
security policies: a sidecar without them pays nothing, and the outbound side
never runs any of this. PyJWT (authn.py) is imported by the first snapshot
with a RequestAuthentication, not before. What must outlive a snapshot (JWKS sources and their
keys, rate-limit buckets, counters) lives in `InboundState`, owned by the
sidecar.

Metrics (pulled at scrape time from `InboundState`):
- `lepton_authz_decisions_total{decision, policy, rule}`: `decision` is
  `allow` or `deny` for the enforced decision, `audit` for each AUDIT policy
  that matched, and `dry_run_allow` / `dry_run_deny` for the decision the
  service would have made with its dry-run policies enforced too (counted on
  every request while a dry-run policy exists, so the two can be compared).
  `policy` and `rule` are `-` when no rule decided (no ALLOW/DENY policy:
  allowed; ALLOW policies and none matched: denied).
- `lepton_jwt_authentications_total{provider, result}`: `ok`, or the
  failure cause (authn.JwtCause), `-` as provider when none was chosen.
- `lepton_rate_limited_total{limit}`.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_to_bytes

from lepton_mesh.policy.security import JwtProvider, RateLimit
from lepton_mesh.policy.security_decisions import (
    Authorizer,
    AuthzDecision,
    AuthzRequest,
    RatePlan,
)
from lepton_mesh.proxy.errors import ProxyError, Reason, bad_request
from lepton_mesh.proxy.security.authn_errors import JwtCause, JwtFailure, NeedKeys
from lepton_mesh.proxy.security.jwks import FileKeys, KeySource, RemoteKeys, StaticKeys
from lepton_mesh.proxy.security.ratelimit import RateLimitedError, RateLimitRuntime

if TYPE_CHECKING:
    import ssl

    from lepton_mesh.policy.sidecar_config import SidecarConfig
    from lepton_mesh.proxy.http.http1 import RequestFacts
    from lepton_mesh.proxy.security.authn import Authenticator, TokenLocation, Verified

_INVALID_TOKEN = b'www-authenticate: Bearer error="invalid_token"\r\n'
_NO_TOKEN = b"www-authenticate: Bearer\r\n"


class Admitting(Protocol):
    """What the guard needs from an exchange (exchange.Exchange)."""

    facts: RequestFacts
    down: Any  # the client connection: client_ip_str, transport, `xfcc` (b"" without mTLS)
    done: bool
    sec: SecurityOutcome | None

    def admitted(self, extra: bytes, remove: frozenset[bytes]) -> None: ...
    def respond_error(self, err: ProxyError) -> None: ...


class SecurityOutcome:
    """What the inbound policy found about one request, for its access-log line."""

    __slots__ = (
        "_fields",
        "authz",
        "detail",
        "identity",
        "jwt_cause",
        "principal",
        "provider",
        "rate_limit",
    )

    def __init__(self, identity: str | None) -> None:
        self._fields: dict[str, Any] | None = None
        self.identity = identity
        self.principal: str | None = None
        self.provider: str | None = None
        self.jwt_cause: str | None = None
        self.authz: AuthzDecision | None = None
        self.rate_limit: str | None = None
        self.detail: str | None = None

    def copy(self) -> SecurityOutcome:
        other = SecurityOutcome(self.identity)
        for name in self.__slots__:
            setattr(other, name, getattr(self, name))
        other._fields = None
        return other

    def log_fields(self) -> dict[str, Any]:
        """The access-log fields; built once: they are read after the request ended,
        when nothing changes the outcome any more (a cached one is shared by many)."""
        fields = self._fields
        if fields is None:
            fields = self._fields = self._build_fields()
        return fields

    def _build_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source_identity": self.identity}
        if self.provider is not None or self.jwt_cause is not None:
            out["jwt_provider"] = self.provider
            out["principal"] = self.principal
            out["jwt_cause"] = self.jwt_cause
        d = self.authz
        if d is not None:
            out["authz"] = _decision_json(d)
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit
        if self.detail is not None:
            out["detail"] = self.detail
        return out


def _authz_count_keys(d: AuthzDecision) -> tuple[tuple[str, str, str], ...]:
    """The `lepton_authz_decisions_total` series one decision counts in."""
    keys = [("allow" if d.allowed else "deny", d.policy or "-", d.rule or "-")]
    keys += [("audit", ref.policy, ref.rule) for ref in d.audit]
    s = d.dry_run
    if s is not None:
        keys.append(
            ("dry_run_allow" if s.allowed else "dry_run_deny", s.policy or "-", s.rule or "-")
        )
    return tuple(keys)


def _decision_json(d: AuthzDecision) -> dict[str, Any]:
    out: dict[str, Any] = {
        "decision": "allow" if d.allowed else "deny",
        "cause": d.cause,
        "policy": d.policy,
        "rule": d.rule,
    }
    if d.audit:
        out["audit"] = [f"{r.policy}/{r.rule}" for r in d.audit]
    if d.dry_run is not None:
        s = d.dry_run
        out["dry_run"] = {
            "decision": "allow" if s.allowed else "deny",
            "policy": s.policy,
            "rule": s.rule,
        }
    return out


# --------------------------------------------------------------------------
# State that outlives snapshots


class InboundState:
    """One sidecar's inbound-security state across config swaps.

    Key sources are shared by every snapshot whose provider has the same key
    settings (so a config push does not refetch a JWKS); the rate limiter
    hands its buckets to the next snapshot's; counters only grow.
    """

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.time,
        mono: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.wall = wall
        self.mono = mono
        self.ssl_context = ssl_context
        self._sources: dict[tuple[Any, ...], KeySource] = {}
        self.rate: RateLimitRuntime | None = None
        self.guard: InboundGuard | None = None
        self.authz_counts: dict[tuple[str, str, str], int] = {}
        self.jwt_counts: dict[tuple[str, str], int] = {}

    def key_source(self, p: JwtProvider) -> KeySource:
        allowed = frozenset(p.algorithms)
        if p.jwks_uri is not None:
            key: tuple[Any, ...] = (
                "uri",
                p.jwks_uri,
                allowed,
                p.jwks_refresh,
                p.jwks_min_refresh,
                p.jwks_timeout,
            )
        elif p.jwks_file is not None:
            key = ("file", p.jwks_file, allowed, p.jwks_refresh, p.jwks_min_refresh)
        else:
            key = ("inline", p.jwks or "", allowed)
        source = self._sources.get(key)
        if source is None:
            if p.jwks_uri is not None:
                source = RemoteKeys(
                    p.jwks_uri,
                    allowed,
                    p.jwks_refresh,
                    self.mono,
                    ssl_context=self.ssl_context,
                    timeout=p.jwks_timeout,
                    min_refresh=p.jwks_min_refresh,
                )
                # The first fetch starts now, not on the first request that needs it.
                source.start_refresh(self.mono())
            elif p.jwks_file is not None:
                source = FileKeys(
                    p.jwks_file, allowed, p.jwks_refresh, self.mono, min_refresh=p.jwks_min_refresh
                )
            else:
                source = StaticKeys(p.jwks or "", allowed, self.mono)
            self._sources[key] = source
        return source

    def install(self, guard: InboundGuard | None) -> None:
        """`guard` is the running snapshot's: sources it does not use are closed."""
        self.guard = guard
        used = (
            {id(p.keys) for p in guard.authn.providers}
            if guard is not None and guard.authn is not None
            else set()
        )
        for key, source in list(self._sources.items()):
            if id(source) not in used:
                source.close()
                del self._sources[key]
        if guard is None or guard.rate is None:
            self.rate = None

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
        self._sources.clear()

    # -- metrics rows (scrape time) ---------------------------------------------

    def authz_rows(self) -> list[tuple[str, str, str, int]]:
        return [(d, p, r, n) for (d, p, r), n in list(self.authz_counts.items())]

    def jwt_rows(self) -> list[tuple[str, str, int]]:
        return [(p, r, n) for (p, r), n in list(self.jwt_counts.items())]

    def rate_limited_rows(self) -> list[tuple[str, int]]:
        return list(self.rate.limited.items()) if self.rate is not None else []

    def describe(self) -> dict[str, Any]:
        """The running inbound security, for /config."""
        guard = self.guard
        return guard.describe() if guard is not None else {"enabled": False}


# --------------------------------------------------------------------------
# The per-snapshot guard

# Cached admissions per snapshot; when full, cleared (not evicted one by one).
# An entry holds its key (the token's header value included), the outcome and
# the rate plan: ~1.4 KB with a 400-byte token, so ~1.4 MB when full.
ADMISSIONS_MAX = 1024

AdmissionKey = tuple[Any, ...]


class Admission:
    """An admitted request's outcome, replayed for requests with the same inputs.

    Invariant: never mutated once cached (`outcome` is shared by every
    exchange that replays it; a refusal copies it first)."""

    __slots__ = (
        "authz_keys",
        "extra",
        "jwt_key",
        "outcome",
        "rate_plan",
        "remove",
        "target",
        "verified",
    )

    def __init__(
        self,
        target: bytes | None,
        verified: Verified | None,
        outcome: SecurityOutcome,
        rate_plan: RatePlan | None,
        remove: frozenset[bytes],
    ) -> None:
        self.target = target  # None: forwarded as sent
        self.verified = verified
        self.outcome = outcome
        # The counter series each replay adds one to.
        self.jwt_key = (verified.provider.name, "ok") if verified is not None else None
        decision = outcome.authz
        self.authz_keys = _authz_count_keys(decision) if decision is not None else ()
        self.rate_plan = rate_plan  # the rate limit still takes a token per request
        self.extra = verified.header_lines if verified is not None else b""
        self.remove = remove

    def fresh(self, wall: Callable[[], float]) -> bool:
        """The token it verified is still valid, under the same keys."""
        v = self.verified
        return v is None or (wall() < v.expires and v.generation == v.provider.keys.generation)


class InboundGuard:
    """A service's inbound security, compiled for one snapshot."""

    __slots__ = (
        "_admissions",
        "_key_headers",
        "_key_ip",
        "_token_strip",
        "authn",
        "authz",
        "judges",
        "policies",
        "port",
        "rate",
        "state",
        "strip",
    )

    def __init__(self, cfg: SidecarConfig, state: InboundState) -> None:
        sec = cfg.security
        self.policies = sec
        self.state = state
        self.port = cfg.listeners.inbound.port  # 0: read the bound port per request
        self.authn: Authenticator | None = None
        strip: set[bytes] = set()
        if sec.authentication is not None:
            # Once per snapshot; PyJWT is loaded only by a service that verifies tokens.
            from lepton_mesh.proxy.security.authn import Authenticator, ProviderRuntime

            providers = [
                ProviderRuntime(p, state.key_source(p)) for p in sec.authentication.providers
            ]
            self.authn = Authenticator(providers, wall=state.wall)
            for p in providers:
                strip.update(h for _, h in p.claim_headers)
        self.strip = frozenset(strip)
        # Removing the token header too, when its provider says not to forward it.
        self._token_strip: dict[bytes, frozenset[bytes]] = (
            {h: self.strip | {h} for h in self.authn.token_headers}
            if self.authn is not None
            else {}
        )
        self.authz = Authorizer(sec.authorization) if sec.authorization else None
        self.rate = (
            RateLimitRuntime(sec.rate_limit, state.rate, state.mono)
            if sec.rate_limit is not None
            else None
        )
        state.rate = self.rate
        # Authorization or rate limits judge the request (its path normalized first).
        self.judges = self.authz is not None or self.rate is not None
        self._admissions: dict[AdmissionKey, Admission] = {}
        self._key_headers, self._key_ip = self._admission_inputs(sec.rate_limit)

    def _admission_inputs(self, rate_limit: RateLimit | None) -> tuple[frozenset[bytes], bool]:
        """The headers an admission depends on, and whether the client IP does."""
        headers: set[bytes] = set()
        if self.authn is not None:
            headers |= self.authn.read_headers
        if self.authz is not None:
            headers.update(n.encode("latin-1") for n in self.authz.header_names)
        limits = rate_limit.limits if rate_limit is not None else ()
        headers.update(
            lim.key.header.encode("latin-1")
            for lim in limits
            if lim.key.kind == "header" and lim.key.header
        )
        uses_ip = (self.authz is not None and self.authz.uses_client_ip) or any(
            lim.key.kind == "client_ip" for lim in limits
        )
        return frozenset(headers), uses_ip

    @classmethod
    def build(cls, cfg: SidecarConfig, state: InboundState) -> InboundGuard | None:
        """The guard for `cfg`, or None when the service has no security policies."""
        guard = None if cfg.security.empty else cls(cfg, state)
        state.install(guard)
        return guard

    @property
    def cached_admissions(self) -> int:
        return len(self._admissions)

    # -- the pipeline -----------------------------------------------------------

    def admit(self, ex: Admitting, *, may_wait: bool = True) -> None:
        """Let `ex` go on (`ex.admitted`) or answer it (`ex.respond_error`), now or once
        the keys it waits for are in."""
        facts = ex.facts
        down = ex.down
        names = self._key_headers
        key = (
            facts.method,
            facts.target,
            down.xfcc,
            down.client_ip_str if self._key_ip else None,
            self.port or _bound_port(down),
            tuple([(n, v) for n, _, v in facts.kept if n in names]) if names else (),
        )
        hit = self._admissions.get(key)
        if hit is None or not hit.fresh(self.state.wall):
            self._admit(ex, key, may_wait)
            return
        # A replay (one function: this is the path nearly every request takes).
        if hit.target is not None:
            facts.target = hit.target
        out = ex.sec = hit.outcome
        state = self.state
        if hit.jwt_key is not None:
            jwt_counts = state.jwt_counts
            jwt_counts[hit.jwt_key] = jwt_counts.get(hit.jwt_key, 0) + 1
        authz_counts = state.authz_counts
        for k in hit.authz_keys:
            authz_counts[k] = authz_counts.get(k, 0) + 1
        if hit.rate_plan is not None and not self._rate_ok(ex, out, hit.rate_plan):
            return
        ex.admitted(hit.extra, hit.remove)

    def _rate_ok(self, ex: Admitting, out: SecurityOutcome, plan: RatePlan) -> bool:
        """Take the rate-limit tokens `plan` names; False when `ex` was answered 429."""
        try:
            self.rate.take(plan)  # type: ignore[union-attr]
        except RateLimitedError as err:
            refused = ex.sec = out.copy()  # a cached outcome is shared: never mutated
            refused.rate_limit = err.limit
            refused.detail = err.detail
            ex.respond_error(err)
            return False
        return True

    def _admit(self, ex: Admitting, key: AdmissionKey, may_wait: bool) -> None:
        """The whole pipeline; an admitted request's outcome is cached under `key`."""
        facts = ex.facts
        down = ex.down
        sent_target = facts.target
        out = ex.sec = SecurityOutcome(verified_identity(down))
        if self.judges:
            try:
                normalize_target(facts)
            except ProxyError as err:
                out.detail = err.detail
                ex.respond_error(err)
                return
        remove = self.strip
        verified: Verified | None = None
        token_sent = False
        rewrote_headers = False
        authn = self.authn
        if authn is not None:
            try:
                found = authn.find_token(facts.kept, facts.target)
                if found is None:
                    if authn.required:
                        raise JwtFailure(JwtCause.MISSING, "a token is required")
                else:
                    token_sent = True
                    verified = authn.verify(found[0], found[1], may_wait=may_wait)
                    out.provider = verified.provider.name
                    out.principal = verified.principal
                    if not verified.provider.spec.forward_original_token:
                        remove = self._drop_token(facts, found[1])
                        rewrote_headers = found[1][0] == "cookie"
                    self._count_jwt(out.provider, "ok")
            except NeedKeys as wait:
                ex.sec = None
                wait.future.add_done_callback(lambda _: self._resume(ex))
                return
            except JwtFailure as fail:
                self._refuse_token(ex, out, fail)
                return
        plan: RatePlan | None = None
        if self.judges:
            req = self._request(ex, out, verified, remove)
            if self.authz is not None and not self._authorize(ex, out, req, token_sent):
                return
            if self.rate is not None:
                plan = self.rate.plan(req)
                if not self._rate_ok(ex, out, plan):
                    return
        if not rewrote_headers:
            target = facts.target if facts.target != sent_target else None
            self._remember(key, Admission(target, verified, out, plan, remove))
        ex.admitted(verified.header_lines if verified is not None else b"", remove)

    def _remember(self, key: AdmissionKey, admission: Admission) -> None:
        cache = self._admissions
        if len(cache) >= ADMISSIONS_MAX:
            cache.clear()  # bounded; a flood of distinct requests only costs the full pipeline
        cache[key] = admission

    def _request(
        self,
        ex: Admitting,
        out: SecurityOutcome,
        verified: Verified | None,
        remove: frozenset[bytes],
    ) -> AuthzRequest:
        """What authorization and rate limits read of `ex`."""
        facts = ex.facts
        down = ex.down
        return AuthzRequest(
            method=facts.method.decode("latin-1"),
            path=facts.path.decode("latin-1"),
            port=self.port or _bound_port(down),
            header=_header_lookup(facts.kept, remove, verified),
            source_identity=out.identity,
            principal=out.principal,
            claims=verified.claims if verified is not None else None,
            client_ip=down.client_ip_str,
        )

    def _authorize(
        self, ex: Admitting, out: SecurityOutcome, req: AuthzRequest, token_sent: bool
    ) -> bool:
        """The authorization decision; False when `ex` was answered (401/403)."""
        assert self.authz is not None
        decision = out.authz = self.authz.authorize(req)
        self._count_authz(decision)
        if not decision.allowed:
            ex.respond_error(self._denied(decision, token_sent, out))
            return False
        return True

    def _resume(self, ex: Admitting) -> None:
        """The JWKS refresh a request waited for ended: decide, without waiting again."""
        if ex.done:
            return
        try:
            self.admit(ex, may_wait=False)
        except Exception as exc:  # a bug of ours: answer 500, never leave the client hanging
            traceback.print_exception(exc, file=sys.stderr)
            ex.respond_error(
                ProxyError(500, Reason.INTERNAL, f"internal error: {type(exc).__name__}")
            )

    def _refuse_token(self, ex: Admitting, out: SecurityOutcome, fail: JwtFailure) -> None:
        out.provider = fail.provider
        out.jwt_cause = fail.cause
        out.detail = fail.detail
        self._count_jwt(fail.provider or "-", fail.cause)
        if fail.cause == JwtCause.MISSING:
            err = ProxyError(
                401, Reason.JWT_MISSING, "a bearer token is required", headers=_NO_TOKEN
            )
        else:
            err = ProxyError(
                401, Reason.JWT_INVALID, f"invalid token: {fail.cause}", headers=_INVALID_TOKEN
            )
        ex.respond_error(err)

    def _denied(self, d: AuthzDecision, token_sent: bool, out: SecurityOutcome) -> ProxyError:
        assert self.authz is not None
        if not token_sent and self.authz.uses_request_auth and d.cause == "no_allow_match":
            out.detail = "no ALLOW rule matched and the request carried no token"
            return ProxyError(
                401, Reason.JWT_MISSING, "a bearer token is required", headers=_NO_TOKEN
            )
        if d.policy is not None:
            out.detail = f"denied by {d.policy}/{d.rule}"
            return ProxyError(403, Reason.RBAC_DENIED, f"RBAC: access denied by rule {d.rule!r}")
        out.detail = "no ALLOW rule matched"
        return ProxyError(403, Reason.RBAC_DENIED, "RBAC: access denied")

    def _drop_token(self, facts: RequestFacts, where: TokenLocation) -> frozenset[bytes]:
        kind, name = where
        if kind == "header":
            return self._token_strip[name]
        if kind == "param":
            facts.target = _without_param(facts.target, name)
        else:
            facts.kept = _without_cookie(facts.kept, name)
        return self.strip

    # -- counting ------------------------------------------------------------------

    def _count_authz(self, d: AuthzDecision) -> None:
        counts = self.state.authz_counts
        for key in _authz_count_keys(d):
            counts[key] = counts.get(key, 0) + 1

    def _count_jwt(self, provider: str, result: str) -> None:
        counts = self.state.jwt_counts
        key = (provider, result)
        counts[key] = counts.get(key, 0) + 1

    def describe(self) -> dict[str, Any]:
        sec = self.policies
        out: dict[str, Any] = {
            "enabled": True,
            "stripped_headers": sorted(h.decode("latin-1") for h in self.strip),
        }
        if self.authn is not None:
            out["authentication"] = self.authn.describe()
        if self.authz is not None:
            out["authorization"] = {
                "policies": [
                    {
                        "name": p.name,
                        "action": p.action,
                        "dry_run": p.dry_run,
                        "rules": [r.name for r in p.rules],
                    }
                    for p in sec.authorization
                ],
                "uses_request_auth": self.authz.uses_request_auth,
            }
        if self.rate is not None:
            out["rate_limit"] = self.rate.describe()
        return out


# --------------------------------------------------------------------------
# Helpers


def verified_identity(down: Any) -> str | None:
    """The caller's SPIFFE ID as its certificate proved it, or None.

    Only the mTLS handshake is evidence: the downstream protocol renders it
    into the x-forwarded-client-cert value it adds (`By=<us>;URI=<caller>`),
    set only on a verified TLS connection. Without mTLS the caller is unknown,
    whatever x-lepton-peer says.
    """
    xfcc = down.xfcc
    if not xfcc:
        return None
    i = xfcc.rfind(b";URI=")
    return xfcc[i + 5 :].decode("ascii") if i >= 0 else None


def _bound_port(down: Any) -> int:
    transport = down.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return sockname[1] if sockname else 0


def _header_lookup(
    kept: list[tuple[bytes, bytes, bytes]], hidden: frozenset[bytes], verified: Verified | None
) -> Callable[[str], str | None]:
    """`request.headers[name]` for policies: the value the app will get.

    A repeated header is its values joined with "," (RFC 9110 section 5.3,
    and what Envoy's header matchers see): judging only the first value while
    the app reads the last would let `x-tenant: acme` escort `x-tenant: evil`.
    A stripped header is absent, except a claim header, which is the verified
    claim's value (`x-user-id: mallory` from the token, never from the client):
    else a DENY on it would deny nothing and a rate limit keyed on it would
    put every user in one bucket.
    """

    def header(name: str) -> str | None:
        lname = name.encode("latin-1")
        if lname in hidden:
            return _claim_header(verified, lname) if verified is not None else None
        found: bytes | None = None
        for n, _, value in kept:
            if n == lname:
                found = value if found is None else found + b"," + value
        return found.decode("latin-1") if found is not None else None

    return header


def _claim_header(verified: Verified, lname: bytes) -> str | None:
    """The value of claim header `lname` as forwarded for `verified` (None: not set)."""
    for line in verified.header_lines.split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep and name == lname:
            return value.decode()  # encoded as UTF-8 by authn._claim_lines
    return None


# Unreserved characters (RFC 3986 section 2.3): their escapes mean the same as the character.
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def normalize_path(path: bytes) -> bytes:
    """The path policies match and the app receives (RFC 3986 section 6.2.2).

    Escapes of unreserved characters are decoded (`%41` -> `A`), other
    escapes upper-cased; repeated slashes are merged; `.` and `..` segments
    are resolved (never above the root). An escaped '/' or '\\', a raw '\\',
    a malformed escape, or a dot segment with parameters (`..;x`) is refused:
    different servers read them differently, so no rule could mean the same
    thing to both.
    """
    if b"%" in path:
        out = bytearray()
        i = 0
        n = len(path)
        while i < n:
            c = path[i]
            if c != 0x25:  # '%'
                out.append(c)
                i += 1
                continue
            if i + 2 >= n or path[i + 1] not in _HEX or path[i + 2] not in _HEX:
                raise bad_request("malformed percent-escape in the path")
            value = int(path[i + 1 : i + 3], 16)
            if value in (0x2F, 0x5C):
                raise bad_request("escaped '/' or '\\' in the path")
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%" + path[i + 1 : i + 3].upper()
            i += 3
        path = bytes(out)
    if b"\\" in path:
        raise bad_request("'\\' in the path")
    if b"//" not in path and b"/." not in path:
        return path
    segments: list[bytes] = []
    parts = path.split(b"/")
    for seg in parts[1:]:
        if seg == b"..":
            if segments:
                segments.pop()
        elif seg != b"." and seg:
            if seg[:2] == b".;" or seg[:3] == b"..;":
                # Servlet containers drop `;params` first and then see `..`: to
                # them /public/..;/admin is /admin, to a rule it is under /public/.
                raise bad_request("a dot segment with ';' parameters in the path")
            segments.append(seg)
    trailing = parts[-1] in (b"", b".", b"..") and len(parts) > 1
    out_path = b"/" + b"/".join(segments)
    if trailing and segments:
        out_path += b"/"
    return out_path


def normalize_target(facts: RequestFacts) -> None:
    """Normalize `facts.target`'s path in place (the query is kept as sent)."""
    target = facts.target
    if target[:1] != b"/":
        return  # `*` (OPTIONS *): no path to judge
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    if b"%" not in path and b"//" not in path and b"/." not in path and b"\\" not in path:
        return
    fixed = normalize_path(path)
    if fixed != path:
        facts.target = fixed if q < 0 else fixed + target[q:]


def _without_param(target: bytes, name: bytes) -> bytes:
    q = target.find(b"?")
    if q < 0:
        return target
    kept = [
        part
        for part in target[q + 1 :].split(b"&")
        if unquote_to_bytes(part.partition(b"=")[0].replace(b"+", b" ")) != name
    ]
    return target[:q] + (b"?" + b"&".join(kept) if kept else b"")


def _without_cookie(
    kept: list[tuple[bytes, bytes, bytes]], name: bytes
) -> list[tuple[bytes, bytes, bytes]]:
    out = []
    for lname, hname, value in kept:
        if lname == b"cookie":
            pairs = [p for p in value.split(b";") if p.strip().partition(b"=")[0].strip() != name]
            if not pairs:
                continue
            value = b";".join(pairs).strip()
        out.append((lname, hname, value))
    return out
