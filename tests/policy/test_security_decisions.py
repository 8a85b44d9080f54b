"""Security decisions, table-driven with exact results: authorization, patterns,
claims, token extraction, token buckets and the local rate limiter."""

from __future__ import annotations

import ipaddress
import math
from typing import Any

import pytest

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
    RequestSelector,
    Source,
)
from lepton_mesh.policy.security_decisions import (
    ALLOWED_NO_POLICY,
    MISSING,
    RATE_ALLOWED,
    Authorizer,
    AuthzDecision,
    AuthzRequest,
    LocalRateLimiter,
    RateDecision,
    RuleRef,
    TokenBucket,
    authorize,
    claim_header_value,
    claims_to_headers,
    compile_patterns,
    cookie_value,
    lookup_claim,
    parse_ip,
    principal_of,
)

CHAT = "spiffe://cluster.local/ns/default/svc/chat"
BILLING = "spiffe://cluster.local/ns/finance/svc/billing"
ALICE = "https://idp.example.com/alice"


def net(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def req(
    method: str = "GET",
    path: str = "/",
    *,
    port: int = 15006,
    identity: str | None = None,
    principal: str | None = None,
    claims: dict[str, Any] | None = None,
    ip: str | None = "10.1.2.3",
    headers: dict[str, str] | None = None,
) -> AuthzRequest:
    h = headers or {}
    return AuthzRequest(method, path, port, h.get, identity, principal, claims, ip)


def policy(
    name: str, action: str, *rules: AuthorizationRule, dry_run: bool = False
) -> AuthorizationPolicy:
    return AuthorizationPolicy(name, "default", "intent", action, rules, dry_run)  # type: ignore[arg-type]


def rule(name: str, **parts: Any) -> AuthorizationRule:
    return AuthorizationRule(
        name,
        sources=tuple(parts.get("sources", ())),
        operations=tuple(parts.get("operations", ())),
        conditions=tuple(parts.get("conditions", ())),
    )


def allow(policy_name: str, rule_name: str, **kw: Any) -> AuthzDecision:
    return AuthzDecision(True, "allow_rule", policy_name, rule_name, **kw)


def deny(policy_name: str, rule_name: str, **kw: Any) -> AuthzDecision:
    return AuthzDecision(False, "deny_rule", policy_name, rule_name, **kw)


NO_MATCH = AuthzDecision(False, "no_allow_match")

# --- patterns ----------------------------------------------------------------------

PATTERNS = [
    # (patterns, segmented, value, matches)
    (["*"], True, "anything/at/all", True),
    (["/v1/classify"], True, "/v1/classify", True),
    (["/v1/classify"], True, "/v1/classify/", False),
    (["/v1/admin/*"], True, "/v1/admin/a/b", True),  # a final '*' is a prefix: spans '/'
    (["/v1/admin/*"], True, "/v1/admin", False),
    (["*/healthz"], True, "/a/b/healthz", True),
    (["*/healthz"], True, "/healthzx", False),
    (["/v1/*/models"], True, "/v1/a/models", True),
    (["/v1/*/models"], True, "/v1/a/b/models", False),  # a glob '*' stays in its segment
    (["/v1/**/models"], True, "/v1/a/b/models", True),
    (["/v1/**/models"], True, "/v1/x", False),
    (["/a/**"], True, "/a/b/c", True),
    (["/v1/*/x/*"], True, "/v1/a/x/b", True),
    (["/v1/*/x/*"], True, "/v1/a/x/b/c", False),
    (["spiffe://cluster.local/ns/*/svc/chat"], True, CHAT, True),
    (["spiffe://cluster.local/ns/*/svc/chat"], True, BILLING, False),
    (["*/svc/chat"], True, CHAT, True),
    (["a*b"], False, "a/x/b", True),  # unsegmented: '*' spans anything
    (["a*b"], True, "a/x/b", False),
    (["a.b"], True, "axb", False),  # regex characters are literal
    (["x", "y*", "*z", "q*r"], True, "qqr", True),
    (["x", "y*", "*z", "q*r"], True, "w", False),
]


@pytest.mark.parametrize(("patterns", "segmented", "value", "matches"), PATTERNS)
def test_patterns(patterns: list[str], segmented: bool, value: str, matches: bool) -> None:
    assert compile_patterns(patterns, segmented=segmented)(value) is matches


# --- claims ------------------------------------------------------------------------

CLAIMS = {
    "iss": "https://idp.example.com",
    "sub": "alice",
    "aud": ["intent-api", "other"],
    "groups": ["admins", "dev"],
    "org": {"team": "search", "level": 3},
    "https://example.com/roles": ["owner"],
    "email_verified": True,
    "nothing": None,
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("sub",), "alice"),
        (("org.team",), "search"),  # dotted: nested
        (("org", "team"), "search"),  # bracketed segments
        (("https://example.com/roles",), ["owner"]),  # a dotted name that is a key
        (("org.missing",), MISSING),
        (("sub.x",), MISSING),  # below a string
        (("nothing",), None),
        (("absent",), MISSING),
    ],
)
def test_lookup_claim(path: tuple[str, ...], expected: Any) -> None:
    found = lookup_claim(CLAIMS, path)
    assert found is MISSING if expected is MISSING else found == expected


def test_lookup_claim_without_claims() -> None:
    assert lookup_claim(None, ("sub",)) is MISSING


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice", "alice"),
        (["admins", "dev"], "admins,dev"),
        ({"team": "search", "level": 3}, '{"level":3,"team":"search"}'),
        (True, "true"),
        (3, "3"),
        (None, None),
        (MISSING, None),
        ("evil\r\nx-injected: 1", None),  # never splits a header
        ([{"a": 1}], '[{"a":1}]'),
    ],
)
def test_claim_header_value(value: Any, expected: str | None) -> None:
    assert claim_header_value(value) == expected


def test_claims_to_headers_in_provider_order() -> None:
    provider = JwtProvider(
        "p",
        "https://idp.example.com",
        jwks_uri="https://idp.example.com/jwks",
        claims_to_headers=(
            ClaimToHeader("sub", "x-user-id"),
            ClaimToHeader("missing", "x-missing"),
            ClaimToHeader("groups", "x-groups"),
            ClaimToHeader("org.team", "x-team"),
        ),
    )
    assert claims_to_headers(provider, CLAIMS) == [
        ("x-user-id", "alice"),
        ("x-groups", "admins,dev"),
        ("x-team", "search"),
    ]


def test_principal_of() -> None:
    assert principal_of(CLAIMS) == "https://idp.example.com/alice"
    assert principal_of({"iss": "x"}) is None
    assert principal_of({"iss": "x", "sub": 1}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # dual-stack sockets give IPv4 this way
        ("fe80::1%eth0", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("not-an-ip", None),
        (None, None),
    ],
)
def test_parse_ip(text: str | None, expected: str | None) -> None:
    ip = parse_ip(text)
    assert (None if ip is None else str(ip)) == expected


# --- cookies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name", "expected"),
    [
        ("a=1; b=2", "b", "2"),
        ("a=1;b=2", "a", "1"),
        ('s="quoted"', "s", "quoted"),
        ("sa=1; a=2", "a", "2"),  # whole names only
        ("a=1; a=2", "a", "1"),
        ("flag; a=1", "flag", None),
        (None, "a", None),
        ("", "a", None),
    ],
)
def test_cookie_value(header: str | None, name: str, expected: str | None) -> None:
    assert cookie_value(header, name) == expected


# --- authorization -------------------------------------------------------------------

FROM_CHAT = rule(
    "chat-classifies",
    sources=[Source(services=("chat",), namespaces=("default",))],
    operations=[Operation(methods=frozenset({"POST"}), paths=("/v1/classify",))],
)
ADMINS = rule(
    "admins",
    sources=[Source(principals=("https://idp.example.com/*",))],
    conditions=[
        Condition("request.auth.claims[groups]", "claim", "groups", ("groups",), ("admins",))
    ],
)
DENY_ADMIN_OUTSIDE = rule(
    "admin-from-outside",
    sources=[Source(not_namespaces=("default",))],
    operations=[Operation(paths=("/v1/admin/*",))],
)
ALLOW = policy("allow", "ALLOW", FROM_CHAT, ADMINS)
DENY = policy("deny", "DENY", DENY_ADMIN_OUTSIDE)
ALLOW_NOTHING = policy("allow-nothing", "ALLOW")
AUDIT = policy(
    "audit", "AUDIT", rule("writes", operations=[Operation(methods=frozenset({"POST"}))])
)

AUTHZ_CASES: list[tuple[str, tuple[AuthorizationPolicy, ...], AuthzRequest, AuthzDecision]] = [
    ("no policies", (), req(), ALLOWED_NO_POLICY),
    ("only AUDIT: still no policy", (AUDIT,), req(), ALLOWED_NO_POLICY),
    (
        "allow rule",
        (ALLOW,),
        req("POST", "/v1/classify", identity=CHAT),
        allow("allow", "chat-classifies"),
    ),
    ("allow: wrong method", (ALLOW,), req("GET", "/v1/classify", identity=CHAT), NO_MATCH),
    ("allow: plaintext caller", (ALLOW,), req("POST", "/v1/classify"), NO_MATCH),
    ("allow: other namespace", (ALLOW,), req("POST", "/v1/classify", identity=BILLING), NO_MATCH),
    (
        "allow: principal and claim",
        (ALLOW,),
        req("GET", "/x", principal=ALICE, claims={"groups": ["dev", "admins"]}),
        allow("allow", "admins"),
    ),
    (
        "allow: claim not in list",
        (ALLOW,),
        req("GET", "/x", principal=ALICE, claims={"groups": ["dev"]}),
        NO_MATCH,
    ),
    ("allow: no token", (ALLOW,), req("GET", "/x"), NO_MATCH),
    (
        "deny first",
        (ALLOW, DENY),
        req("POST", "/v1/admin/x", identity=BILLING),
        deny("deny", "admin-from-outside"),
    ),
    (
        "deny: plaintext has no namespace",
        (DENY,),
        req("GET", "/v1/admin/x"),
        deny("deny", "admin-from-outside"),
    ),
    (
        "deny: inside namespace passes",
        (DENY,),
        req("GET", "/v1/admin/x", identity=CHAT),
        ALLOWED_NO_POLICY,
    ),
    (
        "deny only: unmatched allowed",
        (DENY,),
        req("GET", "/v1/other", identity=BILLING),
        ALLOWED_NO_POLICY,
    ),
    ("allow-nothing", (ALLOW_NOTHING,), req("POST", "/v1/classify", identity=CHAT), NO_MATCH),
    (
        "allow-nothing beside an allow",
        (ALLOW_NOTHING, ALLOW),
        req("POST", "/v1/classify", identity=CHAT),
        allow("allow", "chat-classifies"),
    ),
    (
        "audit is reported, never decides",
        (AUDIT, DENY),
        req("POST", "/v1/admin/x"),
        deny("deny", "admin-from-outside", audit=(RuleRef("audit", "writes"),)),
    ),
    ("audit not matching", (AUDIT, ALLOW), req("GET", "/y"), NO_MATCH),
]


@pytest.mark.parametrize(
    ("policies", "request_", "expected"),
    [c[1:] for c in AUTHZ_CASES],
    ids=[c[0] for c in AUTHZ_CASES],
)
def test_authorize(
    policies: tuple[AuthorizationPolicy, ...], request_: AuthzRequest, expected: AuthzDecision
) -> None:
    assert Authorizer(policies).authorize(request_) == expected


def test_policies_in_name_order_and_rules_in_written_order() -> None:
    everyone = rule("everyone")  # no parts: matches every request
    elsewhere = rule("elsewhere", operations=[Operation(ports=frozenset({1}))])
    first = policy("a-first", "DENY", elsewhere, everyone)
    second = policy("b-second", "DENY", rule("r1"))
    assert Authorizer((second, first)).authorize(req()) == deny("a-first", "everyone")
    r2 = rule("r2", operations=[Operation(ports=frozenset({15006}))])
    assert Authorizer((policy("p", "DENY", r2, everyone),)).authorize(req()) == deny("p", "r2")


SOURCE_CASES = [
    # (source, request, matches)
    (Source(identities=(CHAT,)), req(identity=CHAT), True),
    (Source(identities=("*/svc/chat",)), req(identity=CHAT), True),
    (Source(identities=("*",)), req(), False),  # '*' needs an identity: plaintext has none
    (Source(not_identities=(CHAT,)), req(), True),  # not_: absent never matches the pattern
    (Source(not_identities=(CHAT,)), req(identity=CHAT), False),
    (Source(services=("ch*",)), req(identity=CHAT), True),
    (Source(not_services=("billing",)), req(identity=BILLING), False),
    (Source(namespaces=("finance",)), req(identity=BILLING), True),
    (
        Source(services=("chat",)),
        req(identity="spiffe://cluster.local/chat"),
        False,
    ),  # not mesh-shaped
    (Source(principals=(ALICE,)), req(principal=ALICE), True),
    (Source(not_principals=(ALICE,)), req(principal="https://idp.example.com/bob"), True),
    (Source(ip_blocks=net("10.0.0.0/8")), req(ip="10.9.9.9"), True),
    (Source(ip_blocks=net("10.0.0.0/8")), req(ip="::ffff:10.9.9.9"), True),
    (Source(ip_blocks=net("10.0.0.0/8")), req(ip="192.168.0.1"), False),
    (Source(ip_blocks=net("10.0.0.0/8", "2001:db8::/32")), req(ip="2001:db8::5"), True),
    (Source(ip_blocks=net("10.0.0.0/8")), req(ip=None), False),
    (Source(not_ip_blocks=net("10.0.0.0/8")), req(ip="10.0.0.1"), False),
    (Source(not_ip_blocks=net("10.0.0.0/8")), req(ip="11.0.0.1"), True),
    # AND across fields
    (Source(services=("chat",), ip_blocks=net("192.168.0.0/16")), req(identity=CHAT), False),
]


@pytest.mark.parametrize(("source", "request_", "matches"), SOURCE_CASES)
def test_source_fields(source: Source, request_: AuthzRequest, matches: bool) -> None:
    decision = Authorizer((policy("p", "DENY", rule("r", sources=[source])),)).authorize(request_)
    assert decision == (deny("p", "r") if matches else ALLOWED_NO_POLICY)


OPERATION_CASES = [
    (Operation(methods=frozenset({"GET"})), req("GET"), True),
    (Operation(not_methods=frozenset({"GET"})), req("GET"), False),
    (Operation(paths=("/v1/*",)), req(path="/v1/x"), True),
    (Operation(not_paths=("/v1/*",)), req(path="/v2/x"), True),
    (Operation(ports=frozenset({15006})), req(port=15006), True),
    (Operation(not_ports=frozenset({15006})), req(port=15006), False),
    (Operation(methods=frozenset({"GET"}), paths=("/a",)), req("GET", "/b"), False),
]


@pytest.mark.parametrize(("operation", "request_", "matches"), OPERATION_CASES)
def test_operation_fields(operation: Operation, request_: AuthzRequest, matches: bool) -> None:
    decision = Authorizer((policy("p", "DENY", rule("r", operations=[operation])),)).authorize(
        request_
    )
    assert decision == (deny("p", "r") if matches else ALLOWED_NO_POLICY)


def cond(key: str, kind: str, arg: str = "", path: tuple[str, ...] = (), **kw: Any) -> Condition:
    return Condition(key, kind, arg, path, **kw)  # type: ignore[arg-type]


CONDITION_CASES = [
    (
        cond("request.headers[x-tenant]", "header", "x-tenant", values=("acme",)),
        req(headers={"x-tenant": "acme"}),
        True,
    ),
    (
        cond("request.headers[x-tenant]", "header", "x-tenant", values=("ac*",)),
        req(headers={"x-tenant": "acme"}),
        True,
    ),
    (cond("request.headers[x-tenant]", "header", "x-tenant", values=("acme",)), req(), False),
    (cond("request.headers[x-tenant]", "header", "x-tenant", not_values=("acme",)), req(), True),
    (
        cond("request.headers[x-tenant]", "header", "x-tenant", not_values=("acme",)),
        req(headers={"x-tenant": "acme"}),
        False,
    ),
    (
        cond(
            "request.auth.claims[org.team]", "claim", "org.team", ("org.team",), values=("search",)
        ),
        req(claims=CLAIMS),
        True,
    ),
    (
        cond(
            "request.auth.claims[org][level]", "claim", "org.level", ("org", "level"), values=("3",)
        ),
        req(claims=CLAIMS),
        True,
    ),
    (
        cond(
            "request.auth.claims[email_verified]",
            "claim",
            "email_verified",
            ("email_verified",),
            values=("true",),
        ),
        req(claims=CLAIMS),
        True,
    ),
    (
        cond("request.auth.claims[groups]", "claim", "groups", ("groups",), values=("dev",)),
        req(claims=CLAIMS),
        True,
    ),
    (
        cond("request.auth.claims[groups]", "claim", "groups", ("groups",), not_values=("dev",)),
        req(claims=CLAIMS),
        False,
    ),
    (
        cond("request.auth.claims[groups]", "claim", "groups", ("groups",), values=("dev",)),
        req(),
        False,
    ),
    (cond("request.auth.principal", "principal", values=(ALICE,)), req(principal=ALICE), True),
    (cond("request.auth.audiences", "audiences", values=("intent-api",)), req(claims=CLAIMS), True),
    (cond("request.auth.audiences", "audiences", values=("nope",)), req(claims=CLAIMS), False),
    (
        cond("request.auth.presenter", "presenter", values=("web",)),
        req(claims={"azp": "web"}),
        True,
    ),
    (
        cond("source.ip", "source_ip", values=("10.0.0.0/8",), networks=net("10.0.0.0/8")),
        req(ip="10.1.1.1"),
        True,
    ),
    (
        cond("source.ip", "source_ip", not_values=("10.0.0.0/8",), not_networks=net("10.0.0.0/8")),
        req(ip="10.1.1.1"),
        False,
    ),
    (
        cond("source.principal", "source_principal", values=("*/ns/default/*",)),
        req(identity=CHAT),
        False,
    ),
    (
        cond("source.principal", "source_principal", values=("*/svc/chat",)),
        req(identity=CHAT),
        True,
    ),
    (cond("source.namespace", "source_namespace", values=("default",)), req(identity=CHAT), True),
    (cond("source.service", "source_service", values=("chat",)), req(identity=CHAT), True),
    (cond("destination.port", "destination_port", values=("15006",)), req(port=15006), True),
    (cond("destination.port", "destination_port", values=("80",)), req(port=15006), False),
]


@pytest.mark.parametrize(("condition", "request_", "matches"), CONDITION_CASES)
def test_conditions(condition: Condition, request_: AuthzRequest, matches: bool) -> None:
    decision = Authorizer((policy("p", "DENY", rule("r", conditions=[condition])),)).authorize(
        request_
    )
    assert decision == (deny("p", "r") if matches else ALLOWED_NO_POLICY)


def test_rule_alternatives_or_and_parts_and() -> None:
    r = rule(
        "r",
        sources=[Source(services=("chat",)), Source(ip_blocks=net("192.168.0.0/16"))],
        operations=[Operation(methods=frozenset({"GET"})), Operation(paths=("/open/*",))],
        conditions=[cond("request.headers[x-a]", "header", "x-a", values=("1",))],
    )
    authz = Authorizer((policy("p", "ALLOW", r),))
    ok = allow("p", "r")
    assert authz.authorize(req("GET", identity=CHAT, headers={"x-a": "1"})) == ok
    assert authz.authorize(req("POST", "/open/x", ip="192.168.1.1", headers={"x-a": "1"})) == ok
    assert authz.authorize(req("POST", "/closed", identity=CHAT, headers={"x-a": "1"})) == NO_MATCH
    assert authz.authorize(req("GET", identity=CHAT)) == NO_MATCH


# --- dry run ----------------------------------------------------------------------------

DRY_DENY = policy(
    "try-deny",
    "DENY",
    rule("posts", operations=[Operation(methods=frozenset({"POST"}))]),
    dry_run=True,
)
DRY_ALLOW = policy("try-allow", "ALLOW", FROM_CHAT, dry_run=True)


@pytest.mark.parametrize(
    ("policies", "request_", "expected"),
    [
        # A dry-run DENY that would bite: enforced decision unchanged, would-be reported.
        (
            (DRY_DENY,),
            req("POST", "/a"),
            AuthzDecision(True, "no_policy", dry_run=deny("try-deny", "posts")),
        ),
        (
            (DRY_DENY,),
            req("GET", "/a"),
            AuthzDecision(True, "no_policy", dry_run=ALLOWED_NO_POLICY),
        ),
        # A dry-run ALLOW makes the would-be decision default-deny.
        ((DRY_ALLOW,), req("GET", "/a"), AuthzDecision(True, "no_policy", dry_run=NO_MATCH)),
        (
            (DRY_ALLOW,),
            req("POST", "/v1/classify", identity=CHAT),
            AuthzDecision(True, "no_policy", dry_run=allow("try-allow", "chat-classifies")),
        ),
        # Beside enforced policies: the would-be decision sees both.
        (
            (DENY, DRY_ALLOW),
            req("GET", "/v1/admin/x"),
            AuthzDecision(
                False,
                "deny_rule",
                "deny",
                "admin-from-outside",
                dry_run=deny("deny", "admin-from-outside"),
            ),
        ),
        (
            (ALLOW_NOTHING, DRY_DENY),
            req("POST", "/"),
            AuthzDecision(False, "no_allow_match", dry_run=deny("try-deny", "posts")),
        ),
    ],
)
def test_dry_run_is_reported_never_enforced(
    policies: tuple[AuthorizationPolicy, ...], request_: AuthzRequest, expected: AuthzDecision
) -> None:
    assert Authorizer(policies).authorize(request_) == expected


def test_no_dry_run_policies_no_dry_run_decision() -> None:
    assert Authorizer((ALLOW,)).authorize(req()).dry_run is None


def test_uses_request_auth_is_about_enforced_allow_rules() -> None:
    assert Authorizer((ALLOW,)).uses_request_auth is True
    assert Authorizer((policy("d", "DENY", ADMINS),)).uses_request_auth is False
    assert Authorizer((policy("a", "ALLOW", ADMINS, dry_run=True),)).uses_request_auth is False
    assert Authorizer((policy("a", "ALLOW", FROM_CHAT),)).uses_request_auth is False


def test_authorize_caches_per_policy_tuple() -> None:
    policies = (ALLOW,)
    assert authorize(policies, req("POST", "/v1/classify", identity=CHAT)) == allow(
        "allow", "chat-classifies"
    )
    assert authorize(policies, req()) == NO_MATCH


def test_an_allowed_decision_allocates_nothing_new() -> None:
    authz = Authorizer((ALLOW,))
    r = req("POST", "/v1/classify", identity=CHAT)
    assert authz.authorize(r) is authz.authorize(r)
    assert Authorizer(()).authorize(r) is ALLOWED_NO_POLICY


def test_fifty_rules_decide_fast() -> None:
    """The bench's shape: 50 rules, the matching one last. A loose bound, for regressions only."""
    import time

    rules = [
        rule(
            f"r{i}",
            sources=[Source(services=(f"svc-{i}",))],
            operations=[Operation(paths=(f"/p{i}/*",))],
        )
        for i in range(49)
    ]
    rules.append(FROM_CHAT)
    authz = Authorizer((policy("big", "ALLOW", *rules),))
    r = req("POST", "/v1/classify", identity=CHAT)
    assert authz.authorize(r) == allow("big", "chat-classifies")
    start = time.perf_counter()
    for _ in range(2000):
        authz.authorize(r)
    per_call = (time.perf_counter() - start) / 2000
    assert per_call < 200e-6, per_call


# --- token buckets ------------------------------------------------------------------------


def test_token_bucket_arithmetic() -> None:
    b = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [b.try_take(100.0) for _ in range(4)] == [(True, 0.0)] * 3 + [(False, 0.5)]
    assert b.try_take(100.25) == (False, 0.25)
    assert b.try_take(100.5) == (True, 0.0)
    assert b.try_take(110.0) == (True, 0.0)  # refilled, capped at burst
    assert b.tokens == 2.0
    assert b.try_take(109.0) == (True, 0.0)  # the clock went back: no refill, no harm
    assert b.tokens == 1.0 and b.last == 110.0
    assert b.is_full(111.0) is True


def test_token_bucket_takes_several() -> None:
    b = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert b.try_take(0.0, 5) == (True, 0.0)
    ok, wait = b.try_take(0.0, 2)
    assert not ok and math.isclose(wait, 0.2)


def limiter(*rules: RateLimitRule) -> LocalRateLimiter:
    return LocalRateLimiter(RateLimit("rl", "default", "intent", rules))


def test_rate_limit_holds_the_rate_within_ten_percent() -> None:
    """Offered 1000 req/s for 10 s against 100 req/s, burst 10: ~1010 pass."""
    rl = limiter(RateLimitRule("all", 100.0, 10))
    passed = sum(rl.check(req(), now=i / 1000).allowed for i in range(10_000))
    assert abs(passed - (100 * 10 + 10)) <= 0.1 * 1010
    assert passed == 1009  # exact: the arithmetic is deterministic


def test_rate_limit_keys_and_overrides() -> None:
    rl = limiter(
        RateLimitRule(
            "per-caller",
            1.0,
            2,
            RateKey("source_identity"),
            overrides=(RateOverride(CHAT, 1.0, 1),),
        )
    )
    chat, billing = req(identity=CHAT), req(identity=BILLING)
    assert rl.check(chat, 0.0) is RATE_ALLOWED
    assert rl.check(chat, 0.0) == RateDecision(False, "per-caller", CHAT, 1.0)  # override: burst 1
    assert [rl.check(billing, 0.0).allowed for _ in range(3)] == [True, True, False]
    assert rl.check(req(), 0.0).allowed and rl.check(req(), 0.0).allowed  # no identity: one bucket
    assert rl.check(req(), 0.0) == RateDecision(False, "per-caller", "", 1.0)
    assert rl.bucket_count() == 3


@pytest.mark.parametrize(
    ("key", "request_", "expected_key"),
    [
        (RateKey("client_ip"), req(ip="10.0.0.9"), "10.0.0.9"),
        (RateKey("header", "x-api-key"), req(headers={"x-api-key": "k1"}), "k1"),
        (RateKey("header", "x-api-key"), req(), ""),
        (RateKey(), req(identity=CHAT), ""),
    ],
)
def test_rate_limit_key_values(key: RateKey, request_: AuthzRequest, expected_key: str) -> None:
    rl = limiter(RateLimitRule("l", 1.0, 1, key))
    assert rl.check(request_, 0.0).allowed
    assert rl.check(request_, 0.0) == RateDecision(False, "l", expected_key, 1.0)


def test_rate_limit_route_selects_requests() -> None:
    rl = limiter(
        RateLimitRule("posts", 1.0, 1, route=RequestSelector(frozenset({"POST"}), ("/v1/*",)))
    )
    assert rl.check(req("POST", "/v1/a"), 0.0).allowed
    assert not rl.check(req("POST", "/v1/b"), 0.0).allowed
    assert all(rl.check(req("GET", "/v1/a"), 0.0).allowed for _ in range(5))
    assert all(rl.check(req("POST", "/v2"), 0.0).allowed for _ in range(5))


def test_every_limit_counts_first_refusal_names_its_limit() -> None:
    rl = limiter(RateLimitRule("wide", 1.0, 3), RateLimitRule("narrow", 1.0, 1))
    assert rl.check(req(), 0.0).allowed
    # Refused by narrow, but wide's token is already taken (3 -> 1 after two requests).
    assert rl.check(req(), 0.0) == RateDecision(False, "narrow", "", 1.0)
    assert rl.check(req(), 0.0) == RateDecision(False, "narrow", "", 1.0)
    assert rl.check(req(), 0.0) == RateDecision(False, "wide", "", 1.0)


def test_bucket_count_stays_bounded() -> None:
    rl = limiter(RateLimitRule("per-key", 1.0, 1, RateKey("header", "k"), max_keys=100))
    for i in range(1000):
        rl.check(req(headers={"k": str(i)}), now=0.0)  # every bucket used: none full
        assert rl.bucket_count() <= 100
    # Full buckets go first: a key that kept its bucket is still limited.
    slow_hot = (RateOverride("hot", 0.1, 1),)  # 5 s after its token went, not yet full
    rl2 = limiter(RateLimitRule("per-key", 1.0, 1, RateKey("header", "k"), slow_hot, max_keys=10))
    hot = req(headers={"k": "hot"})
    assert rl2.check(hot, 0.0).allowed
    for i in range(9):
        rl2.check(req(headers={"k": f"idle-{i}"}), 0.0)
    # 5 s later the idle buckets are full again (as is nothing else): they are dropped first.
    assert rl2.check(req(headers={"k": "new"}), 5.0).allowed
    assert rl2.bucket_count() == 2
    assert rl2.check(hot, 5.0) == RateDecision(False, "per-key", "hot", 5.0)


def test_unchanged_limits_keep_their_buckets_across_snapshots() -> None:
    same = RateLimitRule("a", 1.0, 1)
    old = limiter(same, RateLimitRule("b", 1.0, 1))
    assert old.check(req(), 0.0).allowed
    new = LocalRateLimiter(
        RateLimit("rl", "default", "intent", (same, RateLimitRule("b", 5.0, 5))), old
    )
    assert new.check(req(), 0.0) == RateDecision(False, "a", "", 1.0)


def test_a_kept_plan_takes_from_the_same_buckets_as_check() -> None:
    """A plan (the limits that select a request, with its key values) computed once
    and reused takes exactly what `check` would: same buckets, same refusals."""
    rules = (
        RateLimitRule("per-caller", 1.0, 2, RateKey("source_identity")),
        RateLimitRule("posts", 1.0, 5, route=RequestSelector(methods=frozenset({"POST"}))),
    )
    by_check, by_plan = limiter(*rules), limiter(*rules)
    chat = req(identity=CHAT)
    plan = by_plan.plan(chat)
    assert [(lim.rule.name, key) for lim, key in plan] == [("per-caller", CHAT)]  # GET: no "posts"
    for t in (0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 3.0):
        assert by_plan.take(plan, t) == by_check.check(chat, t)
    # The plan's buckets are the limiter's own: a check after it sees what it took.
    assert by_plan.check(chat, 3.0) is RATE_ALLOWED  # the last of the refilled burst
    assert by_plan.take(plan, 3.0) == RateDecision(False, "per-caller", CHAT, 1.0)


# --- the decision cache ------------------------------------------------------------


def test_cached_decisions_follow_every_input_the_policies_read() -> None:
    """A decision is cached by the request values policies read: a header a
    condition names, a claim, the client IP when IP blocks are used. Changing
    any of them re-decides; an unrelated header does not split the cache."""
    tenant = Condition("request.headers[x-tenant]", "header", "x-tenant", values=("acme",))
    team = Condition("request.auth.claims[team]", "claim", "team", ("team",), values=("ops",))
    az = Authorizer(
        [
            policy("p", "ALLOW", rule("by-tenant", conditions=[tenant])),
            policy("q", "ALLOW", rule("by-team", conditions=[team])),
            policy(
                "r",
                "DENY",
                rule(
                    "blocked-net",
                    sources=[Source(ip_blocks=(ipaddress.ip_network("10.9.0.0/16"),))],
                ),
            ),
        ]
    )
    cases = [
        (req(headers={"x-tenant": "acme"}), allow("p", "by-tenant")),
        (req(headers={"x-tenant": "acme", "x-other": "1"}), allow("p", "by-tenant")),
        (req(headers={"x-tenant": "evil"}), NO_MATCH),
        (req(claims={"team": "ops"}), allow("q", "by-team")),
        (req(claims={"team": ["dev", "ops"]}), allow("q", "by-team")),
        (req(claims={"team": "dev"}), NO_MATCH),
        (req(headers={"x-tenant": "acme"}, ip="10.9.1.1"), deny("r", "blocked-net")),
    ]
    for _ in range(2):  # the second pass answers from the cache
        assert [az.authorize(r) for r, _ in cases] == [want for _, want in cases]
    assert len(az._cache) == 6  # the unrelated x-other header shared an entry
