"""The request-security policy model: JWT authentication, authorization, local rate limits.

Three kinds of object, each targeting the service whose INBOUND side
enforces it (`service`), as the YAML manifests declare them
(docs/policy-reference.md):

- a `RequestAuthentication` lists the JWT providers whose tokens the
  service accepts (issuer, audiences, where the keys come from, which
  algorithms, where the token is, which claims become headers); at most
  one per service;
- an `AuthorizationPolicy` holds rules with one action (ALLOW, DENY or
  AUDIT) matching the caller (`from`), the request (`to`) and conditions
  (`when`); a service may have several, combined as Istio does: DENY
  first, then, if any ALLOW policy exists, a request must match one;
- a `RateLimit` holds token-bucket limits keyed by source identity, client
  IP or a header, with per-key overrides; at most one per service.

Every object is frozen and part of the sidecar's config snapshot.
`SecurityPolicies` groups what one service has; `SidecarConfig.security`
holds the sidecar's own service's. This module only declares shapes and
the invariants the loader (`security_loader`) enforces; the per-request
functions are in `security_decisions`. Loading keys (fetching a JWKS,
reading a key file) is the proxy's job, not done here. Durations are float
seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

__all__ = [
    "ACTIONS",
    "CONDITION_KEYS",
    "DEFAULT_TOKEN_HEADERS",
    "HMAC_ALGORITHMS",
    "JWT_ALGORITHMS",
    "MAX_TOKEN_BYTES",
    "SECURITY_KINDS",
    "Action",
    "AuthorizationPolicy",
    "AuthorizationRule",
    "ClaimToHeader",
    "Condition",
    "ConditionKind",
    "IPNetwork",
    "JwtProvider",
    "Operation",
    "RateKey",
    "RateKeyKind",
    "RateLimit",
    "RateLimitRule",
    "RateOverride",
    "RequestAuthentication",
    "RequestSelector",
    "SecurityPolicies",
    "Source",
    "TokenHeader",
]

SECURITY_KINDS = ("RequestAuthentication", "AuthorizationPolicy", "RateLimit")

# Asymmetric algorithms only. An HMAC algorithm verified with a key meant to
# be public is the classic algorithm-confusion attack (anyone holding the
# public key can sign), and `none` is no signature at all: neither is ever
# accepted, whatever a token's header says.
JWT_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# A token longer than this is refused (401) before any parsing: real ones
# are a few hundred bytes to a few KiB.
MAX_TOKEN_BYTES = 8192

IPNetwork = IPv4Network | IPv6Network

# --- RequestAuthentication ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenHeader:
    """A header that may carry the token. `name` is lowercase.

    With a `prefix` ("Bearer "), a value not starting with it (compared
    case-insensitively: auth schemes are) holds no token for us; the token is
    what follows it, surrounding whitespace stripped.
    """

    name: str
    prefix: str = ""


@dataclass(frozen=True, slots=True)
class ClaimToHeader:
    """Forward a verified claim to the app as a request header.

    `claim` is a claim path as in `when` keys (`sub`, `org.team`); `header`
    is lowercase and never a framing, hop-by-hop or `x-lepton-*` header.
    A header of this name sent by the client is always removed first, so the
    app can trust it.
    """

    claim: str
    header: str


DEFAULT_TOKEN_HEADERS = (TokenHeader("authorization", "Bearer "),)


@dataclass(frozen=True, slots=True)
class JwtProvider:
    """One issuer whose tokens a service accepts.

    Exactly one key source is set: `jwks_uri` (http or https URL, fetched by
    the proxy, refreshed every `jwks_refresh` and on an unknown `kid` at
    most once per `jwks_min_refresh`, last good keys kept when a fetch
    fails), `jwks` (an inline JWKS, as canonical JSON text) or `jwks_file`
    (an absolute path, read by the proxy). Keys are asymmetric only.

    `algorithms` is a non-empty subset of `JWT_ALGORITHMS`, without
    duplicates. `audiences` empty: the `aud` claim is not checked; else
    the token's `aud` must hold one of them. Token locations are headers,
    query parameters and cookies; a request with a token in two of them (or
    twice in one) is refused as ambiguous. `clock_skew` is the leeway for `exp`, `nbf` and
    `iat`. `required`: a request without a token is refused (401) instead
    of passing unauthenticated.
    """

    name: str
    issuer: str
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | None = None
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256",)
    from_headers: tuple[TokenHeader, ...] = DEFAULT_TOKEN_HEADERS
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    forward_original_token: bool = True
    claims_to_headers: tuple[ClaimToHeader, ...] = ()
    clock_skew: float = 60.0
    required: bool = False
    jwks_refresh: float = 300.0
    jwks_min_refresh: float = 30.0
    jwks_timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class RequestAuthentication:
    """The JWT providers of `service`: at least one, names and issuers unique."""

    name: str
    namespace: str
    service: str
    providers: tuple[JwtProvider, ...]
    source: str = "<memory>"


# --- AuthorizationPolicy -------------------------------------------------------

Action = Literal["ALLOW", "DENY", "AUDIT"]
ACTIONS: tuple[Action, ...] = ("ALLOW", "DENY", "AUDIT")


@dataclass(frozen=True, slots=True)
class Source:
    """One `from` alternative: every field set must match (AND); within a
    field, any value (OR); a `not_` field matches when none of its values do.

    String values are patterns: `*` (anything), `prefix*`, `*suffix`, exact,
    or a glob where `*` spans no '/' and `**` spans anything (identities
    only). `identities` are SPIFFE IDs; `services` and `namespaces` are read
    from the caller's verified SPIFFE ID (a plaintext caller has none, and
    matches no positive identity, service or namespace field);
    `principals` are `iss/sub` of a verified JWT. `ip_blocks` hold the
    client's address (the peer's TCP address).
    """

    identities: tuple[str, ...] = ()
    not_identities: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    not_services: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One `to` alternative, with the same AND/OR/not rules as `Source`.

    `methods` are uppercase. `paths` are patterns over the request path
    (without the query string, as sent): exact (`/v1/classify`), prefix
    (only a final `*`: `/v1/admin/*`), suffix (only a leading `*`:
    `*/healthz`), `*` for any, or a glob (`*` within one segment, `**`
    across segments: `/v1/*/models`). `ports` are the inbound listener's port.
    """

    methods: frozenset[str] = frozenset()
    not_methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()
    ports: frozenset[int] = frozenset()
    not_ports: frozenset[int] = frozenset()


ConditionKind = Literal[
    "header",  # request.headers[NAME]        arg: lowercase header name
    "claim",  # request.auth.claims[PATH]     arg: the claim path (see claim_path)
    "principal",  # request.auth.principal    iss/sub
    "audiences",  # request.auth.audiences    the token's aud (list membership)
    "presenter",  # request.auth.presenter    the token's azp
    "source_ip",  # source.ip                 values are CIDRs or addresses
    "source_principal",  # source.principal   the caller's SPIFFE ID
    "source_namespace",  # source.namespace
    "source_service",  # source.service
    "destination_port",  # destination.port   values are port numbers
]

# Keys `when` understands, as written (bracketed ones take an argument).
CONDITION_KEYS = (
    "request.headers[NAME]",
    "request.auth.claims[NAME]",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "source.ip",
    "source.principal",
    "source.namespace",
    "source.service",
    "destination.port",
)


@dataclass(frozen=True, slots=True)
class Condition:
    """One `when` entry: the value at `key` matches one of `values` (if any)
    and none of `not_values` (at least one of the two is non-empty).

    `key` is the text as written (for messages and round trips); `kind` and
    `arg` are its parse. For `claim`, `claim_path` holds the bracketed
    segments (`claims[org][team]` -> ("org", "team"); `claims[org.team]`
    -> ("org.team",), looked up as the key "org.team" if present, else
    nested). A list value (a claim, `aud`) matches if any element does.
    Values are patterns as in `Source`; for `source_ip` they are CIDRs,
    held in `networks` / `not_networks` (`values` keep the text).
    """

    key: str
    kind: ConditionKind
    arg: str = ""
    claim_path: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    not_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationRule:
    """Matches when one `sources` alternative, one `operations` alternative
    and every condition match; an absent part matches anything, so a rule
    with none of them matches every request. `name` is unique in its policy
    (the loader names unnamed rules `rule-<index>`)."""

    name: str
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    """Rules of one action for `service`. A policy with no rules matches
    nothing: an ALLOW policy with no rules is therefore "allow nothing", the
    way to make a service default-deny. `dry_run`: evaluated and reported,
    never enforced."""

    name: str
    namespace: str
    service: str
    action: Action = "ALLOW"
    rules: tuple[AuthorizationRule, ...] = ()
    dry_run: bool = False
    source: str = "<memory>"


# --- RateLimit -----------------------------------------------------------------

RateKeyKind = Literal["service", "source_identity", "client_ip", "header"]


@dataclass(frozen=True, slots=True)
class RateKey:
    """What a bucket is per: one for the whole service, or per caller
    identity, client IP or value of `header` (lowercase; set exactly for
    "header"). Requests with no value for the key (no header, a plaintext
    caller) share one bucket."""

    kind: RateKeyKind = "service"
    header: str | None = None


@dataclass(frozen=True, slots=True)
class RateOverride:
    """A different rate for one key value (exact match)."""

    key_value: str
    requests_per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class RequestSelector:
    """Which requests a limit counts: empty fields match any; `paths` are
    patterns as in `Operation`."""

    methods: frozenset[str] = frozenset()
    paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """A token bucket per key value: `requests_per_second` > 0 refill,
    `burst` >= 1 capacity. Override key values are unique. `max_keys`
    bounds the buckets kept (full buckets are dropped first: dropping one
    changes nothing). `route` None: every request counts."""

    name: str
    requests_per_second: float
    burst: int
    key: RateKey = field(default_factory=RateKey)
    overrides: tuple[RateOverride, ...] = ()
    route: RequestSelector | None = None
    max_keys: int = 10_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """The limits of `service`: at least one, names unique. A request counts
    against every limit that selects it and is refused (429) by the first
    one without a token."""

    name: str
    namespace: str
    service: str
    limits: tuple[RateLimitRule, ...]
    source: str = "<memory>"


# --- one service's policies ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecurityPolicies:
    """Everything the inbound side of one service enforces; empty by default
    (no authentication, every request allowed, no limit). `authorization`
    is sorted by (namespace, name)."""

    authentication: RequestAuthentication | None = None
    authorization: tuple[AuthorizationPolicy, ...] = ()
    rate_limit: RateLimit | None = None

    @property
    def empty(self) -> bool:
        return self.authentication is None and not self.authorization and self.rate_limit is None
