"""Security manifests: the YAML contract, every validation rule with its exact
message and line, the round trip back to manifests, and the sidecar's view."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.manifest_set import as_documents, identity, resulting_set
from lepton_mesh.policy.security import (
    AuthorizationPolicy,
    AuthorizationRule,
    ClaimToHeader,
    Condition,
    JwtProvider,
    Operation,
    RateKey,
    RateLimit,
    RateLimitRule,
    RateOverride,
    RequestAuthentication,
    RequestSelector,
    SecurityPolicies,
    Source,
    TokenHeader,
)
from lepton_mesh.policy.security_loader import ServiceKey, security_to_manifests
from lepton_mesh.policy.sidecar_loader import (
    load_sidecar_config,
    sidecar_config_from_mapping,
    sidecar_config_to_json,
)
from lepton_mesh.policy.traffic_loader import collect_policies, load_policy_files
from lepton_mesh.policy.yaml_source import Document, load_documents, load_file

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "mesh" / "security.yaml"

# A real P-256 public key (the example's).
X = "Zw-xhFPFuAwLNv_kBKvZqendUR9Ukzqvegp0jSljJcY"
Y = "6O3ppKnzrS6SyD-ncgFrL8UdnZQ6yrPF_-UX2emZQTs"
JWK = f"{{kty: EC, crv: P-256, x: {X}, y: {Y}"  # left open: cases add members


def collect(docs: list[Document]) -> Mapping[ServiceKey, SecurityPolicies]:
    problems: list[Any] = []
    _, security = collect_policies([(d, ()) for d in docs], problems)
    if problems:
        raise ConfigError(problems)
    return security


def load_text(text: str) -> Mapping[ServiceKey, SecurityPolicies]:
    return collect(load_documents(textwrap.dedent(text), "f.yaml"))


def problems_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(text)
    return [(p.line, p.path, p.message) for p in info.value.problems]


def unsourced(sec: SecurityPolicies) -> SecurityPolicies:
    """`sec` with every object's `source` blanked, to compare what was loaded twice."""

    def blank(obj: Any) -> Any:
        return None if obj is None else dataclasses.replace(obj, source="")

    return SecurityPolicies(
        blank(sec.authentication),
        tuple(blank(p) for p in sec.authorization),
        blank(sec.rate_limit),
    )


# --- the example, exactly -----------------------------------------------------------


def test_the_example_loads_to_exactly_this() -> None:
    security = collect(load_file(EXAMPLE))
    assert list(security) == [("default", "intent")]
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "kid": "corp-2024", "alg": "ES256",
                      "use": "sig", "x": X, "y": Y}]}  # fmt: skip
    where = str(EXAMPLE)
    assert security[("default", "intent")] == SecurityPolicies(
        authentication=RequestAuthentication(
            "intent",
            "default",
            "intent",
            (
                JwtProvider(
                    name="corp-idp",
                    issuer="https://idp.example.com",
                    jwks=json.dumps(jwks, sort_keys=True, separators=(",", ":")),
                    audiences=("intent-api",),
                    algorithms=("ES256",),
                    from_headers=(TokenHeader("authorization", "Bearer "),),
                    from_cookies=("session",),
                    forward_original_token=False,
                    claims_to_headers=(
                        ClaimToHeader("sub", "x-user-id"),
                        ClaimToHeader("org.team", "x-user-team"),
                    ),
                    clock_skew=30.0,
                    required=False,
                ),
            ),
            source=f"{where}:8",
        ),
        authorization=(
            AuthorizationPolicy(
                "intent-admin",
                "default",
                "intent",
                "DENY",
                (
                    AuthorizationRule(
                        "admin-from-outside",
                        sources=(Source(not_namespaces=("default",)),),
                        operations=(Operation(paths=("/v1/admin/*", "*/debug")),),
                    ),
                ),
                source=f"{where}:56",
            ),
            AuthorizationPolicy(
                "intent-callers",
                "default",
                "intent",
                "ALLOW",
                (
                    AuthorizationRule(
                        "chat-classifies",
                        sources=(Source(services=("chat",), namespaces=("default",)),),
                        operations=(
                            Operation(methods=frozenset({"POST"}), paths=("/v1/classify",)),
                        ),
                    ),
                    AuthorizationRule(
                        "support-agents",
                        sources=(Source(principals=("https://idp.example.com/*",)),),
                        operations=(
                            Operation(methods=frozenset({"GET", "POST"}), paths=("/v1/*",)),
                        ),
                        conditions=(
                            Condition(
                                "request.auth.claims[groups]",
                                "claim",
                                "groups",
                                ("groups",),
                                values=("support-agents",),
                            ),
                        ),
                    ),
                ),
                dry_run=True,
                source=f"{where}:32",
            ),
        ),
        rate_limit=RateLimit(
            "intent",
            "default",
            "intent",
            (
                RateLimitRule(
                    "per-caller",
                    200.0,
                    400,
                    RateKey("source_identity"),
                    overrides=(
                        RateOverride("spiffe://cluster.local/ns/default/svc/batch", 10.0, 10),
                    ),
                ),
                RateLimitRule(
                    "batch-per-api-key",
                    5.0,
                    20,
                    RateKey("header", "x-api-key"),
                    route=RequestSelector(frozenset({"POST"}), ("/v1/batch/*",)),
                ),
            ),
            source=f"{where}:69",
        ),
    )


def test_the_example_is_valid_beside_the_traffic_examples() -> None:
    load_policy_files(sorted((ROOT / "examples" / "mesh").glob("*.yaml")))


def test_back_to_manifests_and_again_gives_equal_objects() -> None:
    sec = collect(load_file(EXAMPLE))[("default", "intent")]
    manifests = security_to_manifests(sec)
    assert [m["kind"] for m in manifests] == [
        "RequestAuthentication",
        "AuthorizationPolicy",
        "AuthorizationPolicy",
        "RateLimit",
    ]
    json.dumps(manifests)  # plain JSON data, as etcd and /config need
    again = collect(as_documents(manifests))[("default", "intent")]
    assert unsourced(again) == unsourced(sec)


# --- what is accepted, and how it is normalized ----------------------------------------

HEADER = "apiVersion: lepton-mesh/v1\n"


def test_defaults_and_normal_forms() -> None:
    sec = load_text(
        """\
        apiVersion: lepton-mesh/v1
        kind: RequestAuthentication
        metadata: {name: a, namespace: ns1}
        spec:
          service: intent
          providers:
            - name: idp
              issuer: https://idp
              jwks_file: /etc/idp/jwks.json
              algorithms: [RS256, EdDSA]
              from_headers: [X-Token, {name: Authorization, prefix: "Bearer "}]
              from_params: [access_token]
              claims_to_headers: [{claim: sub, header: X-User}]
        ---
        apiVersion: lepton-mesh/v1
        kind: AuthorizationPolicy
        metadata: {name: nothing, namespace: ns1}
        spec: {service: intent}
        ---
        apiVersion: lepton-mesh/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: ns1}
        spec:
          service: intent
          action: DENY
          rules:
            - from: [{ip_blocks: [10.0.0.0/8, "2001:db8::/32", 192.168.1.7]}]
              to: [{methods: [get], ports: [15006]}]
              when:
                - {key: "request.headers[X-Tenant]", values: [acme]}
                - {key: "request.auth.claims[org][team.name]", not_values: [x]}
                - {key: destination.port, values: [15006, "8080"]}
                - {key: source.ip, not_values: [10.1.0.0/16]}
        ---
        apiVersion: lepton-mesh/v1
        kind: RateLimit
        metadata: {name: r, namespace: ns1}
        spec:
          service: intent
          limits: [{requests_per_second: 2.5}]
        """
    )
    assert list(sec) == [("ns1", "intent")]
    got = sec[("ns1", "intent")]
    assert got.authentication is not None
    assert got.authentication.providers == (
        JwtProvider(
            "idp",
            "https://idp",
            jwks_file="/etc/idp/jwks.json",
            algorithms=("RS256", "EdDSA"),
            from_headers=(TokenHeader("x-token"), TokenHeader("authorization", "Bearer ")),
            from_params=("access_token",),
            claims_to_headers=(ClaimToHeader("sub", "x-user"),),
        ),
    )
    nothing, p = got.authorization
    assert (nothing.name, nothing.action, nothing.rules) == (
        "nothing",
        "ALLOW",
        (),
    )  # allow-nothing
    assert p.rules == (
        AuthorizationRule(
            "rule-0",
            sources=(
                Source(
                    ip_blocks=(
                        ipaddress.ip_network("10.0.0.0/8"),
                        ipaddress.ip_network("2001:db8::/32"),
                        ipaddress.ip_network("192.168.1.7/32"),
                    )
                ),
            ),
            operations=(Operation(methods=frozenset({"GET"}), ports=frozenset({15006})),),
            conditions=(
                Condition("request.headers[X-Tenant]", "header", "x-tenant", values=("acme",)),
                Condition(
                    "request.auth.claims[org][team.name]",
                    "claim",
                    "org.team.name",
                    ("org", "team.name"),
                    not_values=("x",),
                ),
                Condition("destination.port", "destination_port", values=("15006", "8080")),
                Condition(
                    "source.ip",
                    "source_ip",
                    not_values=("10.1.0.0/16",),
                    not_networks=(ipaddress.ip_network("10.1.0.0/16"),),
                ),
            ),
        ),
    )
    # burst defaults to one second's worth, at least 1.
    assert got.rate_limit is not None
    assert got.rate_limit.limits == (RateLimitRule("limit-0", 2.5, 3),)


# --- every rule, with its message -----------------------------------------------------------


def authn(provider: str) -> str:
    return (
        f"{HEADER}kind: RequestAuthentication\nmetadata: {{name: a}}\nspec:\n  service: intent\n"
        f"  providers:\n    - name: idp\n      issuer: https://idp\n{provider}"
    )


def authz(spec: str) -> str:
    return f"{HEADER}kind: AuthorizationPolicy\nmetadata: {{name: p}}\nspec:\n  service: intent\n{spec}"


def rate(spec: str, name: str = "r") -> str:
    return f"{HEADER}kind: RateLimit\nmetadata: {{name: {name}}}\nspec:\n  service: intent\n{spec}"


URI = "      jwks_uri: https://idp/jwks\n"
OK = URI + "      algorithms: [RS256]\n"
P0 = "spec.providers[0]"

BAD = [
    (
        "alg-none",
        authn(URI + "      algorithms: [none]\n"),
        [
            (
                10,
                f"{P0}.algorithms[0]",
                "'none' is never accepted: a token with alg none carries no signature",
            )
        ],
    ),
    (
        "alg-hmac",
        authn(URI + "      algorithms: [RS256, HS256]\n"),
        [
            (
                10,
                f"{P0}.algorithms[1]",
                "HS256 is an HMAC algorithm and is refused: verified with a "
                "provider's public key, it lets anyone who has that key forge tokens (algorithm "
                "confusion); use an asymmetric one (RS256, PS256, ES256, EdDSA...)",
            )
        ],
    ),
    (
        "alg-case",
        authn(URI + "      algorithms: [rs256]\n"),
        [
            (
                10,
                f"{P0}.algorithms[0]",
                "unknown algorithm 'rs256' (did you mean 'RS256'?); expected "
                "one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, EdDSA",
            )
        ],
    ),
    (
        "alg-twice",
        authn(URI + "      algorithms: [RS256, RS256]\n"),
        [(10, f"{P0}.algorithms[1]", "'RS256' is listed twice")],
    ),
    (
        "alg-missing",
        authn(URI),
        [
            (
                7,
                f"{P0}.algorithms",
                "required field is missing: list the algorithms the issuer signs "
                "with (RS256, ES256, EdDSA...), so a token cannot pick a weaker one",
            )
        ],
    ),
    (
        "no-key-source",
        authn("      algorithms: [RS256]\n"),
        [(7, P0, "exactly one key source is needed: jwks_uri, jwks or jwks_file; found none")],
    ),
    (
        "two-key-sources",
        authn(OK + "      jwks_file: /etc/jwks.json\n"),
        [
            (
                7,
                P0,
                "exactly one key source is needed: jwks_uri, jwks or jwks_file; found jwks_uri and jwks_file",
            )
        ],
    ),
    (
        "jwks-uri-scheme",
        authn("      jwks_uri: ftp://idp/jwks\n      algorithms: [RS256]\n"),
        [
            (
                9,
                f"{P0}.jwks_uri",
                "invalid jwks_uri 'ftp://idp/jwks': expected an http:// or https:// URL with a host",
            )
        ],
    ),
    (
        "jwks-file-relative",
        authn("      jwks_file: jwks.json\n      algorithms: [RS256]\n"),
        [
            (
                9,
                f"{P0}.jwks_file",
                "jwks_file 'jwks.json' must be an absolute path: the sidecar reads "
                "it, and a relative one would depend on where it runs",
            )
        ],
    ),
    (
        "jwks-symmetric-key",
        authn("      jwks: {keys: [{kty: oct, k: c2VjcmV0}]}\n      algorithms: [RS256]\n"),
        [
            (
                9,
                f"{P0}.jwks.keys[0].kty",
                "symmetric ('oct') keys are refused: a provider's keys are "
                "public, and an HMAC secret must never be one (algorithm confusion)",
            )
        ],
    ),
    (
        "jwks-private-key",
        authn(f"      jwks: {{keys: [{JWK}, d: abc}}]}}\n      algorithms: [ES256]\n"),
        [(9, f"{P0}.jwks.keys[0]", "private key material (d) in a JWKS: give public keys only")],
    ),
    (
        "jwks-broken-key",
        authn(
            "      jwks: {keys: [{kty: EC, crv: P-256, x: AAAA, y: BBBB}]}\n      algorithms: [ES256]\n"
        ),
        [(9, f"{P0}.jwks.keys[0]", "invalid key: Coords should be 32 bytes for curve P-256")],
    ),
    (
        "jwks-key-for-another-alg",
        authn(f"      jwks: {{keys: [{JWK}, alg: ES384}}]}}\n      algorithms: [ES256]\n"),
        [
            (
                9,
                f"{P0}.jwks.keys[0].alg",
                "the key is for 'ES384', which is not in the provider's algorithms (ES256)",
            )
        ],
    ),
    (
        "jwks-kid-twice",
        authn(
            f"      jwks: {{keys: [{JWK}, kid: a}}, {JWK}, kid: a}}]}}\n      algorithms: [ES256]\n"
        ),
        [(9, f"{P0}.jwks.keys[1].kid", "kid 'a' is already used by keys[0]")],
    ),
    (
        "jwks-bad-json",
        authn("      jwks: '[1, 2'\n      algorithms: [ES256]\n"),
        [
            (
                9,
                f"{P0}.jwks",
                "jwks is not valid JSON: Expecting ',' delimiter: line 1 column 6 (char 5)",
            )
        ],
    ),
    (
        "jwks-not-a-set",
        authn("      jwks: {key: []}\n      algorithms: [ES256]\n"),
        [(9, f"{P0}.jwks", 'expected a JWKS: a mapping with a list of keys, {"keys": [...]}')],
    ),
    (
        "claim-headers",
        authn(
            OK + "      claims_to_headers:\n"
            "        - {claim: sub, header: Content-Length}\n"
            "        - {claim: sub, header: x-lepton-user}\n"
            "        - {claim: sub, header: authorization}\n"
            "        - {claim: sub, header: X-User}\n"
            "        - {claim: email, header: x-user}\n"
            "        - {claim: sub, header: Transfer-Encoding}\n"
        ),
        [
            (
                12,
                f"{P0}.claims_to_headers[0].header",
                "a claim cannot be forwarded as 'content-length': frames the message or belongs to one hop; the proxy owns it",
            ),
            (
                13,
                f"{P0}.claims_to_headers[1].header",
                "a claim cannot be forwarded as 'x-lepton-user': x-lepton-* headers are the mesh's own",
            ),
            (
                14,
                f"{P0}.claims_to_headers[2].header",
                "a claim cannot be forwarded as 'authorization': the token itself is read from it",
            ),
            (
                16,
                f"{P0}.claims_to_headers[4].header",
                "a claim cannot be forwarded as 'x-user': another claim already goes to it",
            ),
            (
                17,
                f"{P0}.claims_to_headers[5].header",
                "a claim cannot be forwarded as 'transfer-encoding': frames the message or belongs to one hop; the proxy owns it",
            ),
        ],
    ),
    (
        "nowhere-to-read",
        authn(OK + "      from_headers: []\n"),
        [
            (
                7,
                P0,
                "no place to read a token from: from_headers is empty and there are no from_params or from_cookies",
            )
        ],
    ),
    (
        "providers-twice",
        f"{HEADER}kind: RequestAuthentication\nmetadata: {{name: a}}\nspec:\n  service: intent\n"
        "  providers:\n"
        "    - {name: idp, issuer: https://a, jwks_uri: https://a/j, algorithms: [RS256]}\n"
        "    - {name: idp, issuer: https://b, jwks_uri: https://b/j, algorithms: [RS256]}\n"
        "    - {name: other, issuer: https://a, jwks_uri: https://a/j, algorithms: [RS256]}\n",
        [
            (8, "spec.providers[1].name", "provider 'idp' is already defined at [0]"),
            (
                9,
                "spec.providers[2].issuer",
                "issuer 'https://a' is already providers[0]'s: a token's "
                "issuer picks its provider, so each issuer has one",
            ),
        ],
    ),
    (
        "issuer-missing",
        f"{HEADER}kind: RequestAuthentication\nmetadata: {{name: a}}\nspec:\n  service: intent\n"
        "  providers: [{name: idp, jwks_uri: https://a/j, algorithms: [RS256], clock_skew: -1}]\n",
        [
            (6, "spec.providers[0].issuer", "required field is missing"),
            (6, "spec.providers[0].clock_skew", "must be 0 or more, found -1"),
        ],
    ),
    (
        "no-providers",
        f"{HEADER}kind: RequestAuthentication\nmetadata: {{name: a}}\nspec:\n  service: intent\n  providers: []\n",
        [(6, "spec.providers", "an empty list accepts no token; give at least one provider")],
    ),
    (
        "action",
        authz("  action: allow\n  rules: [{}]\n"),
        [
            (
                6,
                "spec.action",
                "expected one of ALLOW, DENY, AUDIT, found string 'allow' (did you mean 'ALLOW'?)",
            )
        ],
    ),
    (
        "deny-without-rules",
        authz("  action: DENY\n"),
        [
            (
                4,
                "spec.rules",
                "a DENY policy with no rules matches nothing; give rules (to deny "
                "everything by default, write an ALLOW policy with no rules instead)",
            )
        ],
    ),
    (
        "rule-name-twice",
        authz("  rules: [{name: a}, {name: a}]\n"),
        [(6, "spec.rules[1]", "rule name 'a' is already used by rules[0]")],
    ),
    (
        "empty-parts",
        authz("  rules:\n    - from: []\n      to: [{}]\n"),
        [
            (7, "spec.rules[0].from", "an empty list matches nothing; omit 'from' to match any"),
            (
                8,
                "spec.rules[0].to[0]",
                "an empty operation matches every request; omit 'to' instead",
            ),
        ],
    ),
    (
        "source-fields",
        authz(
            "  rules:\n    - from:\n        - principal: [x]\n          identities: [chat]\n"
            "          services: [Chat, 'ch*t']\n          ip_blocks: [10.0.0.1/8, nonsense]\n"
            "          namespaces: []\n"
        ),
        [
            (
                8,
                "spec.rules[0].from[0].principal",
                "unknown field 'principal' (did you mean 'principals'?)",
            ),
            (
                9,
                "spec.rules[0].from[0].identities[0]",
                "'chat' is not a SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/svc/<service>); match a service name with 'services', or use a '*' pattern",
            ),
            (
                10,
                "spec.rules[0].from[0].services[0]",
                "invalid service 'Chat': a name (lowercase letters, digits, '-'), optionally with one '*' at its start or end, or '*'",
            ),
            (
                10,
                "spec.rules[0].from[0].services[1]",
                "invalid service 'ch*t': a name (lowercase letters, digits, '-'), optionally with one '*' at its start or end, or '*'",
            ),
            (
                11,
                "spec.rules[0].from[0].ip_blocks[0]",
                "invalid IP block '10.0.0.1/8': host bits set (did you mean '10.0.0.0/8'?)",
            ),
            (
                11,
                "spec.rules[0].from[0].ip_blocks[1]",
                "invalid IP block 'nonsense': 'nonsense' does not appear to be an IPv4 or IPv6 network (expected a CIDR like 10.0.0.0/8)",
            ),
            (
                12,
                "spec.rules[0].from[0].namespaces",
                "an empty list matches nothing; omit the field instead",
            ),
        ],
    ),
    (
        "operation-fields",
        authz(
            "  rules:\n    - to:\n        - paths: [v1/x, '/v1?x=1', '/a**', '/a/***', '/ok/**/x']\n"
            "          ports: [0]\n          methods: ['GE T']\n"
        ),
        [
            (
                8,
                "spec.rules[0].to[0].paths[0]",
                "invalid path 'v1/x': a path starts with '/' (or '*' for a suffix)",
            ),
            (
                8,
                "spec.rules[0].to[0].paths[1]",
                "invalid path '/v1?x=1': paths are matched without the query string or fragment, so '?' and '#' never appear",
            ),
            (
                8,
                "spec.rules[0].to[0].paths[2]",
                "invalid path '/a**': '**' (any number of segments) must be a whole segment, as in '/a/**' or '/a/**/b'; '*' matches within one segment",
            ),
            (
                8,
                "spec.rules[0].to[0].paths[3]",
                "invalid pattern '/a/***': '***' means nothing; use '*' or '**'",
            ),
            (9, "spec.rules[0].to[0].ports[0]", "must be between 1 and 65535, found 0"),
            (10, "spec.rules[0].to[0].methods[0]", "invalid HTTP method 'GE T'"),
        ],
    ),
    (
        "when",
        authz(
            "  rules:\n    - when:\n"
            "        - {key: 'request.header[x]', values: [a]}\n"
            "        - {key: 'request.auth.claims[]', values: [a]}\n"
            "        - {key: source.ip}\n"
            "        - {key: destination.port, values: [http]}\n"
            "        - {key: source.ip, values: [1.2.3.4/8]}\n"
            "        - {key: 'request.headers[x-a]', values: [1]}\n"
        ),
        [
            (
                8,
                "spec.rules[0].when[0].key",
                "unknown key 'request.header[x]' (did you mean 'request.headers[x]'?); the keys are request.headers[NAME], request.auth.claims[NAME], request.auth.principal, request.auth.audiences, request.auth.presenter, source.ip, source.principal, source.namespace, source.service, destination.port",
            ),
            (
                9,
                "spec.rules[0].when[1].key",
                "invalid claim path in 'request.auth.claims[]': empty names, or a dot at an end",
            ),
            (10, "spec.rules[0].when[2]", "values or not_values is needed"),
            (
                11,
                "spec.rules[0].when[3].values[0]",
                "expected a port number (destination.port compares the inbound port), found string 'http'",
            ),
            (
                12,
                "spec.rules[0].when[4].values[0]",
                "invalid IP block '1.2.3.4/8': host bits set (did you mean '1.0.0.0/8'?)",
            ),
            (
                13,
                "spec.rules[0].when[5].values[0]",
                "expected a string, found integer 1 (quote it to make it a string)",
            ),
        ],
    ),
    (
        "token-rules-without-authentication",
        authz(
            "  rules:\n    - from: [{principals: ['https://idp/*']}]\n"
            "    - when: [{key: 'request.auth.claims[groups]', values: [a]}]\n"
            "    - when: [{key: 'request.auth.claims[groups]', not_values: [a]}]\n"
            "    - from: [{not_principals: ['https://idp/*']}]\n"
        ),
        [
            (
                7,
                "spec.rules[0]",
                "rule 'rule-0' matches request principals, but service 'intent' has no RequestAuthentication in namespace 'default': no request carries a verified token, so the rule can never match",
            ),
            (
                8,
                "spec.rules[1]",
                "rule 'rule-1' matches request.auth.claims[groups], but service 'intent' has no RequestAuthentication in namespace 'default': no request carries a verified token, so the rule can never match",
            ),
        ],
    ),
    (
        "rate-limit-numbers-past-their-bounds",
        rate(
            "  limits:\n    - requests_per_second: .inf\n      burst: 99999999999999999999\n"
            "    - name: b\n      requests_per_second: 1.0e+12\n"
        ),
        [
            (7, "spec.limits[0].requests_per_second", "expected a finite number, found infinity"),
            (8, "spec.limits[0].burst", "must be at most 1000000000, found 99999999999999999999"),
            (
                10,
                "spec.limits[1].requests_per_second",
                "must be at most 1000000000, found 1000000000000.0",
            ),
        ],
    ),
    (
        "rate-limits",
        rate(
            "  limits:\n    - requests_per_second: 0\n      burst: 0\n"
            "    - name: b\n      key: ip\n      requests_per_second: 1\n"
            "    - name: c\n      requests_per_second: 1\n      overrides: [{key_value: x, requests_per_second: 1}]\n"
            "    - name: d\n      key: {header: x}\n      requests_per_second: 1\n"
            "      overrides: [{key_value: x, requests_per_second: 1}, {key_value: x, requests_per_second: 2}]\n"
            "      route: {}\n"
        ),
        [
            (
                7,
                "spec.limits[0].requests_per_second",
                "must be greater than 0 (to refuse every request, use an AuthorizationPolicy)",
            ),
            (8, "spec.limits[0].burst", "must be at least 1, found 0"),
            (
                10,
                "spec.limits[1].key",
                "expected service, source_identity, client_ip or {header: NAME}, found string 'ip' (did you mean 'client_ip'?)",
            ),
            (
                14,
                "spec.limits[2].overrides",
                "a limit keyed by service has one bucket, no key values to override; set key: source_identity, client_ip or {header: NAME}",
            ),
            (18, "spec.limits[3].overrides[1].key_value", "'x' is already overridden at [0]"),
            (
                19,
                "spec.limits[3].route",
                "an empty route selects every request; omit 'route' instead",
            ),
        ],
    ),
    (
        "no-limits",
        rate("  limits: []\n"),
        [(6, "spec.limits", "an empty list limits nothing; give at least one")],
    ),
    (
        "one-per-service",
        rate("  limits: [{requests_per_second: 1}]\n")
        + "---\n"
        + rate("  limits: [{requests_per_second: 1}]\n", name="r2")
        + "---\n"
        + authn(OK)
        + "---\n"
        + authn(OK).replace("name: a}", "name: b}"),
        [
            (
                12,
                "spec.service",
                "RateLimit 'r2' is a second RateLimit for service 'intent' in namespace 'default': RateLimit 'r' (f.yaml:1) already covers it; put every limit of the service in one RateLimit",
            ),
            (
                30,
                "spec.service",
                "RequestAuthentication 'b' is a second RequestAuthentication for service 'intent' in namespace 'default': RequestAuthentication 'a' (f.yaml:15) already covers it; list every provider of the service in one RequestAuthentication",
            ),
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_manifests(text: str, expected: list[tuple[int, str, str]]) -> None:
    assert problems_of(text) == expected


def test_one_per_service_is_per_namespace() -> None:
    two = (
        rate("  limits: [{requests_per_second: 1}]\n")
        + "---\n"
        + rate("  limits: [{requests_per_second: 1}]\n").replace(
            "{name: r}", "{name: r, namespace: other}"
        )
    )
    assert sorted(load_text(two)) == [("default", "intent"), ("other", "intent")]


# --- where policy sets are loaded -------------------------------------------------------------


def test_identity_and_the_policy_store_set_know_the_kinds() -> None:
    docs = load_file(EXAMPLE)
    assert [identity(d.data) for d in docs] == [
        ("RequestAuthentication", "default", "intent"),
        ("AuthorizationPolicy", "default", "intent-callers"),
        ("AuthorizationPolicy", "default", "intent-admin"),
        ("RateLimit", "default", "intent"),
    ]
    stored = resulting_set({}, docs)
    assert sorted(stored) == sorted(i for d in docs if (i := identity(d.data)) is not None)
    # Deleting the RequestAuthentication would strand a rule on principals: refused, named.
    with pytest.raises(ConfigError) as info:
        resulting_set(stored, [], delete=[("RequestAuthentication", "default", "intent")])
    [problem] = info.value.problems
    assert problem.file == "live AuthorizationPolicy/default/intent-callers"
    assert problem.path == "spec.rules[1]"


def sidecar_yaml(service: str, namespace: str = "default") -> str:
    return textwrap.dedent(
        f"""\
        service: {service}
        namespace: {namespace}
        app: 127.0.0.1:8080
        policies: [{EXAMPLE}]
        """
    )


@pytest.mark.parametrize(
    ("service", "namespace", "has_security"),
    [("intent", "default", True), ("chat", "default", False), ("intent", "other", False)],
)
def test_a_sidecar_keeps_its_own_services_policies(
    tmp_path: Path, service: str, namespace: str, has_security: bool
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(sidecar_yaml(service, namespace))
    cfg = load_sidecar_config(path)
    expected = collect(load_file(EXAMPLE))[("default", "intent")]
    assert cfg.security == (expected if has_security else SecurityPolicies())


def test_config_view_round_trips_security(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(sidecar_yaml("intent"))
    cfg = load_sidecar_config(path)
    data = sidecar_config_to_json(cfg)
    kinds = [m["kind"] for m in data["policies"]]
    assert kinds.count("AuthorizationPolicy") == 2 and "RateLimit" in kinds
    data.pop("source")
    again = sidecar_config_from_mapping(json.loads(json.dumps(data)), "control")
    assert unsourced(again.security) == unsourced(cfg.security)


def test_a_security_problem_in_a_sidecar_file_names_the_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "security.yaml"
    policy.write_text(authn(URI + "      algorithms: [HS256]\n"))
    path = tmp_path / "sidecar.yaml"
    path.write_text(f"service: intent\napp: 127.0.0.1:8080\npolicies: [{policy.name}]\n")
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.path) == (str(policy), 10, f"{P0}.algorithms[0]")
