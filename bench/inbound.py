"""What `inbound_policy` adds to `inbound_plain`: a signed token, the security policies, checks.

Both runs send wrk's one request to a sidecar's inbound listener, the same
bytes each time (`REQUEST`: a path under the API, a tenant header and a
bearer token), so the rps ratio of the two is the price of the policies
alone. `inbound_policy`'s sidecar also has:

- a RequestAuthentication with one ES256 provider whose JWKS is inline (the
  key is made for the run with `cryptography`; the token, signed once, is
  valid for a day, far past any run), forwarding `sub` as `x-user-id`;
- an AuthorizationPolicy (ALLOW) of `RULES` rules where only the last
  matches the request, so every request is checked against all of them. The
  49 others have the shapes real policies have (services, namespaces,
  principals, IP blocks, methods, exact, prefix and glob paths, header and
  claim conditions) and fail at different points: some at the caller, some
  at the operation, some only at the last condition;
- a RateLimit per client IP at 10^6 requests/s, which never refuses one.

After the run the sidecar's /metrics must show that this is what ran: every
inbound answer 200, every token verified, every decision the last rule's,
nothing rate-limited (`check_metrics`).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import WrkRequest
from bench.procs import BenchError

NAMESPACE = "default"
ISSUER = "https://idp.bench.example"
AUDIENCE = "upstream-api"
SUBJECT = "bench-user"
PRINCIPAL = f"{ISSUER}/{SUBJECT}"
KID = "bench-es256"
PROVIDER = "bench-idp"
GROUP = "catalog-readers"
TENANT = "acme"
PATH = "/v1/items/42"

POLICY = "upstream-callers"
RULES = 50
ALLOW_RULE = "catalog-readers-get-items"
RATE_LIMIT = "per-client-ip"
RATE = 1_000_000  # requests/s: far above what one sidecar core serves, so never a 429

TOKEN_LIFETIME = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Issuer:
    """The run's identity provider: its public keys (a JWKS) and the one token it signed."""

    jwks: Mapping[str, Any]
    token: str


def issue(now: datetime.datetime | None = None) -> Issuer:
    """A new P-256 key, its JWKS, and a token for `SUBJECT` valid from `now` for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    public |= {"kid": KID, "alg": "ES256", "use": "sig"}
    at = now or datetime.datetime.now(datetime.UTC)
    claims = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": at,
        "nbf": at,
        "exp": at + TOKEN_LIFETIME,
        "groups": [GROUP, "staff"],
        "org": {"team": "catalog"},
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": KID})
    return Issuer({"keys": [public]}, token)


def request(token: str) -> WrkRequest:
    """The one request both runs send (the plain run's sidecar just forwards the token)."""
    return WrkRequest(PATH, (f"Authorization: Bearer {token}", f"x-tenant: {TENANT}"))


def _manifest(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "lepton-mesh/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def request_authentication(service: str, jwks: Mapping[str, Any]) -> dict[str, Any]:
    provider = {
        "name": PROVIDER,
        "issuer": ISSUER,
        "audiences": [AUDIENCE],
        "algorithms": ["ES256"],
        "jwks": dict(jwks),
        "claims_to_headers": [{"claim": "sub", "header": "x-user-id"}],
    }
    return _manifest(
        "RequestAuthentication", service, {"service": service, "providers": [provider]}
    )


# --- the 49 rules that do not match ----------------------------------------------------
#
# Each shape takes the rule's index (so no two rules are the same) and returns
# its `from`, `to` and `when`. The comment says where it stops matching
# `REQUEST` from a plaintext caller (no SPIFFE identity) at 127.0.0.1.

_Shape = Callable[[int], dict[str, Any]]


def _from_service(i: int) -> dict[str, Any]:  # at `from`: a plaintext caller has no service
    return {
        "from": [{"services": [f"billing-{i}"], "namespaces": [NAMESPACE]}],
        "to": [{"methods": ["POST"], "paths": [f"/v1/invoices-{i}/*"]}],
    }


def _from_partner_idp(i: int) -> dict[str, Any]:  # at `from`: another issuer's principals
    return {"from": [{"principals": [f"https://idp-{i}.partner.example/*"]}]}


def _wrong_method(i: int) -> dict[str, Any]:  # at `to`: the methods
    return {
        "from": [{"principals": [f"{ISSUER}/*"]}],
        "to": [{"methods": ["POST", "PUT", "DELETE"], "paths": [f"/v1/items/{i}", "/v1/items/*"]}],
    }


def _wrong_path(i: int) -> dict[str, Any]:  # at `to`: exact and prefix paths
    return {
        "from": [{"principals": [f"{ISSUER}/*"]}],
        "to": [{"methods": ["GET"], "paths": [f"/v1/reports-{i}/*", f"/v1/exports-{i}"]}],
    }


def _other_tenant(i: int) -> dict[str, Any]:  # at `when`: the header's value
    return {
        "to": [{"methods": ["GET", "HEAD"], "paths": ["/v1/items/*"]}],
        "when": [{"key": "request.headers[x-tenant]", "values": [f"tenant-{i}"]}],
    }


def _from_namespace(i: int) -> dict[str, Any]:  # at `from`: a plaintext caller has no namespace
    return {"from": [{"namespaces": [f"team-{i}"], "not_services": ["legacy"]}]}


def _admins_only(i: int) -> dict[str, Any]:  # at `when`: the list claim holds no such group
    return {
        "from": [{"principals": [f"{ISSUER}/*"]}],
        "to": [{"paths": ["/v1/*"]}],
        "when": [{"key": "request.auth.claims[groups]", "values": [f"admins-{i}"]}],
    }


def _private_network(i: int) -> dict[str, Any]:  # at `from`: 127.0.0.1 is in no block
    return {"from": [{"ip_blocks": [f"10.{i}.0.0/16", f"192.168.{i}.0/24"]}]}


def _glob_path(i: int) -> dict[str, Any]:  # at `to`: the glob's later segments
    return {"to": [{"methods": ["GET"], "paths": [f"/v1/*/orders-{i}/*", "/v2/**/items"]}]}


def _everyone_but_us(i: int) -> dict[str, Any]:  # at `from`: not_principals names the caller
    return {
        "from": [{"not_principals": [PRINCIPAL, f"{ISSUER}/svc-{i}"]}],
        "to": [{"paths": ["/v1/*"]}],
    }


def _other_team(i: int) -> dict[str, Any]:  # at the last `when`: a nested claim
    return {
        "from": [{"principals": [f"{ISSUER}/*"]}],
        "to": [{"methods": ["GET"], "paths": ["/v1/items/*"]}],
        "when": [
            {"key": "request.headers[x-tenant]", "values": [TENANT]},
            {"key": "request.auth.claims[org.team]", "values": [f"team-{i}"]},
        ],
    }


SHAPES: tuple[_Shape, ...] = (
    _from_service,
    _from_partner_idp,
    _wrong_method,
    _wrong_path,
    _other_tenant,
    _from_namespace,
    _admins_only,
    _private_network,
    _glob_path,
    _everyone_but_us,
    _other_team,
)


def authorization_rules(count: int = RULES) -> list[dict[str, Any]]:
    """`count - 1` rules cycling through `SHAPES`, then the one that allows the request."""
    rules = [
        {"name": f"r{i:02d}-{SHAPES[i % len(SHAPES)].__name__.strip('_').replace('_', '-')}"}
        | SHAPES[i % len(SHAPES)](i)
        for i in range(count - 1)
    ]
    rules.append(
        {
            "name": ALLOW_RULE,
            "from": [{"principals": [f"{ISSUER}/*"]}],
            "to": [{"methods": ["GET", "HEAD"], "paths": ["/v1/items/*"]}],
            "when": [
                {"key": "request.headers[x-tenant]", "values": [TENANT]},
                {"key": "request.auth.claims[groups]", "values": [GROUP]},
            ],
        }
    )
    return rules


def authorization_policy(service: str) -> dict[str, Any]:
    spec = {"service": service, "action": "ALLOW", "rules": authorization_rules()}
    return _manifest("AuthorizationPolicy", POLICY, spec)


def rate_limit(service: str) -> dict[str, Any]:
    limit = {
        "name": RATE_LIMIT,
        "key": "client_ip",
        "requests_per_second": RATE,
        "burst": RATE,
        "route": {"methods": ["GET", "POST"], "paths": ["/v1/*"]},
    }
    return _manifest("RateLimit", service, {"service": service, "limits": [limit]})


def policies(service: str, issuer: Issuer) -> list[dict[str, Any]]:
    """The three manifests of `inbound_policy`, for the sidecar config's `policies:`."""
    return [
        request_authentication(service, issuer.jwks),
        authorization_policy(service),
        rate_limit(service),
    ]


# --- what the sidecar counted ----------------------------------------------------------


@dataclass(slots=True)
class Counts:
    """The sidecar's inbound counters, by their labels."""

    responses: dict[str, int] = field(default_factory=dict)  # response_code -> n
    authz: dict[tuple[str, str, str], int] = field(default_factory=dict)  # decision, policy, rule
    jwt: dict[tuple[str, str], int] = field(default_factory=dict)  # provider, result
    rate_limited: dict[str, int] = field(default_factory=dict)  # limit -> n


def _add(table: dict[Any, int], key: Any, value: float) -> None:
    table[key] = table.get(key, 0) + int(value)


def counts(metrics_text: str) -> Counts:
    """Read the counters `check_metrics` needs from the admin port's /metrics."""
    out = Counts()
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            labels = s.labels
            # The inbound side reports as "destination" (Istio's label values).
            if s.name == "lepton_requests_total" and labels.get("reporter") == "destination":
                _add(out.responses, labels["response_code"], s.value)
            elif s.name == "lepton_authz_decisions_total":
                _add(out.authz, (labels["decision"], labels["policy"], labels["rule"]), s.value)
            elif s.name == "lepton_jwt_authentications_total":
                _add(out.jwt, (labels["provider"], labels["result"]), s.value)
            elif s.name == "lepton_rate_limited_total":
                _add(out.rate_limited, labels["limit"], s.value)
    return out


def check_metrics(c: Counts, *, policy: bool, at_least: int, what: str) -> None:
    """Fail unless the sidecar answered 200 to all of at least `at_least` inbound
    requests and, with `policy`, verified every token and allowed every request by
    `ALLOW_RULE` without rate-limiting any; without, decided nothing at all."""
    answered = sum(c.responses.values())
    problems = []
    if set(c.responses) - {"200"}:
        problems.append(f"inbound answers by status {c.responses}")
    if answered < at_least:
        problems.append(f"{answered} inbound answers counted, wrk had {at_least}")
    if policy:
        if set(c.jwt) != {(PROVIDER, "ok")} or c.jwt[(PROVIDER, "ok")] < answered:
            problems.append(f"tokens by result {c.jwt}, for {answered} requests")
        decided = ("allow", POLICY, ALLOW_RULE)
        if set(c.authz) != {decided} or c.authz[decided] < answered:
            problems.append(f"authorization decisions {c.authz}, for {answered} requests")
        if any(c.rate_limited.values()):
            problems.append(f"rate-limited {c.rate_limited}")
    elif c.authz or c.jwt or c.rate_limited:
        problems.append(f"security counted without policies: {c.authz} {c.jwt}")
    if problems:
        raise BenchError(f"{what}: the sidecar did not run what was meant: {'; '.join(problems)}")
