"""The inbound_policy run's token, policies and metric checks (bench/inbound.py).

Nothing here times anything: the figures come from `python -m bench`.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jwt
import pytest
import yaml

from bench import inbound, report, sidecar, wrk
from bench.harness import RunResult, fail_if_not_all_ok
from bench.procs import BenchError
from lepton_mesh.policy.security_decisions import Authorizer, AuthzRequest
from lepton_mesh.policy.sidecar_loader import sidecar_config_from_mapping

NOW = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)


@pytest.fixture(scope="module")
def issuer() -> inbound.Issuer:
    return inbound.issue(NOW)


@pytest.fixture(scope="module")
def config(issuer):
    spec = sidecar.SidecarSpec(
        "sidecar-inbound_policy",
        "upstream",
        8001,
        {},
        sidecar.SidecarPorts(9001, 9002, 9003),
        policies=inbound.policies("upstream", issuer),
    )
    return sidecar_config_from_mapping(sidecar.config(spec), "bench")


def _claims(issuer: inbound.Issuer) -> dict:
    key = jwt.PyJWK(issuer.jwks["keys"][0])
    return jwt.decode(
        issuer.token,
        key,
        algorithms=["ES256"],
        audience=inbound.AUDIENCE,
        issuer=inbound.ISSUER,
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )


def test_the_token_verifies_with_the_jwks_and_lasts_a_day(issuer):
    assert jwt.get_unverified_header(issuer.token) == {
        "alg": "ES256",
        "kid": inbound.KID,
        "typ": "JWT",
    }
    claims = _claims(issuer)
    assert (claims["sub"], claims["groups"]) == (inbound.SUBJECT, [inbound.GROUP, "staff"])
    assert claims["exp"] - claims["iat"] == 86400
    assert claims["iat"] == int(NOW.timestamp())
    assert set(issuer.jwks["keys"][0]) == {"kty", "crv", "x", "y", "kid", "alg", "use"}


def test_the_request_carries_the_token_and_the_tenant(issuer):
    req = inbound.request(issuer.token)
    assert req.path == inbound.PATH
    assert req.headers == (f"Authorization: Bearer {issuer.token}", "x-tenant: acme")


def test_the_sidecar_config_loads_with_all_three_policies(config):
    sec = config.security
    (provider,) = sec.authentication.providers
    assert (provider.name, provider.algorithms, provider.jwks is not None) == (
        inbound.PROVIDER,
        ("ES256",),
        True,
    )
    (policy,) = sec.authorization
    assert (policy.name, policy.action, policy.dry_run) == (inbound.POLICY, "ALLOW", False)
    assert len(policy.rules) == inbound.RULES == 50
    assert policy.rules[-1].name == inbound.ALLOW_RULE
    (limit,) = sec.rate_limit.limits
    assert (limit.name, limit.requests_per_second, limit.key.kind) == (
        inbound.RATE_LIMIT,
        1e6,
        "client_ip",
    )


def test_every_shape_is_used():
    names = [r["name"] for r in inbound.authorization_rules()]
    for shape in inbound.SHAPES:
        assert any(n.endswith(shape.__name__.strip("_").replace("_", "-")) for n in names)


def _bench_request(issuer: inbound.Issuer) -> AuthzRequest:
    """The request wrk sends, as authorization sees it after the token is verified."""
    headers = {"x-tenant": inbound.TENANT, "host": "upstream"}
    return AuthzRequest(
        method="GET",
        path=inbound.PATH,
        port=9002,
        header=headers.get,
        principal=inbound.PRINCIPAL,
        claims=_claims(issuer),
        client_ip="127.0.0.1",
    )


def test_only_the_last_rule_allows_the_bench_request(config, issuer):
    """So every request is checked against all 50 rules before one allows it."""
    (policy,) = config.security.authorization
    req = _bench_request(issuer)
    decision = Authorizer([policy]).authorize(req)
    assert (decision.allowed, decision.policy, decision.rule) == (
        True,
        inbound.POLICY,
        inbound.ALLOW_RULE,
    )
    matching = []
    for rule in policy.rules[:-1]:
        alone = type(policy)(policy.name, policy.namespace, policy.service, rules=(rule,))
        if Authorizer([alone]).authorize(req).allowed:
            matching.append(rule.name)
    assert matching == []


# --- the counters after the run ------------------------------------------------------


def _metrics(*, codes=None, authz=None, jwt_results=None, limited=0) -> str:
    codes = {"200": 1000} if codes is None else codes
    lines = ["# TYPE lepton_requests_total counter"]
    for code, n in codes.items():
        lines.append(
            f'lepton_requests_total{{reporter="destination",source_workload="unknown",'
            f'destination_service="upstream",response_code="{code}",response_flags="-"}} {n}.0'
        )
    lines.append(
        'lepton_requests_total{reporter="source",source_workload="upstream",'
        'destination_service="x",response_code="503",response_flags="no_route"} 3.0'
    )
    lines.append("# TYPE lepton_authz_decisions_total counter")
    for (d, p, r), n in (authz or {}).items():
        lines.append(f'lepton_authz_decisions_total{{decision="{d}",policy="{p}",rule="{r}"}} {n}')
    lines.append("# TYPE lepton_jwt_authentications_total counter")
    for (p, r), n in (jwt_results or {}).items():
        lines.append(f'lepton_jwt_authentications_total{{provider="{p}",result="{r}"}} {n}')
    lines.append("# TYPE lepton_rate_limited_total counter")
    if limited:
        lines.append(f'lepton_rate_limited_total{{limit="per-client-ip"}} {limited}')
    return "\n".join(lines) + "\n"


ALLOWED = {("allow", inbound.POLICY, inbound.ALLOW_RULE): 1000}
VERIFIED = {(inbound.PROVIDER, "ok"): 1000}


def test_counts_read_the_inbound_counters():
    c = inbound.counts(_metrics(authz=ALLOWED, jwt_results=VERIFIED, limited=2))
    assert (c.responses, c.authz, c.jwt, c.rate_limited) == (
        {"200": 1000},
        ALLOWED,
        VERIFIED,
        {"per-client-ip": 2},
    )


@pytest.mark.parametrize(
    ("policy", "metrics", "problem"),
    [
        (False, _metrics(), None),
        (True, _metrics(authz=ALLOWED, jwt_results=VERIFIED), None),
        (False, _metrics(codes={"200": 990, "502": 10}), "answers by status"),
        (False, _metrics(codes={"200": 10}), "10 inbound answers counted, wrk had 500"),
        (False, _metrics(authz=ALLOWED), "security counted without policies"),
        (True, _metrics(jwt_results=VERIFIED), "authorization decisions {}"),
        (True, _metrics(authz=ALLOWED), "tokens by result {}"),
        (
            True,
            _metrics(
                authz=ALLOWED | {("allow", inbound.POLICY, "r03-wrong-path"): 1},
                jwt_results=VERIFIED,
            ),
            "authorization decisions",
        ),
        (
            True,
            _metrics(authz=ALLOWED, jwt_results=VERIFIED | {(inbound.PROVIDER, "expired"): 1}),
            "tokens by result",
        ),
        (
            True,
            _metrics(
                codes={"200": 1000, "429": 5},
                authz=ALLOWED,
                jwt_results=VERIFIED,
                limited=5,
            ),
            "rate-limited {'per-client-ip': 5}",
        ),
    ],
)
def test_check_metrics(policy, metrics, problem):
    c = inbound.counts(metrics)
    if problem is None:
        inbound.check_metrics(c, policy=policy, at_least=500, what="run")
    else:
        with pytest.raises(BenchError, match="run: the sidecar did not run what was meant") as e:
            inbound.check_metrics(c, policy=policy, at_least=500, what="run")
        assert problem in str(e.value)


# --- wrk, the harness and the report ----------------------------------------------------


def test_wrk_sends_each_header_line():
    argv = wrk.command(
        url="http://127.0.0.1:9/v1/items/42",
        host="upstream",
        duration_s=8.0,
        connections=50,
        threads=1,
        script=Path("r.lua"),
        pin=[],
        headers=("Authorization: Bearer t", "x-tenant: acme"),
    )
    assert argv[-7:] == [
        "-H",
        "Host: upstream",
        "-H",
        "Authorization: Bearer t",
        "-H",
        "x-tenant: acme",
        "http://127.0.0.1:9/v1/items/42",
    ]


def _wrk_result(status: int) -> wrk.WrkResult:
    errors = {"connect": 0, "read": 0, "write": 0, "status": status, "timeout": 0}
    return wrk.WrkResult(1000, 1.0, errors, 1.0, 1.0, 1.0, 1.0, 1.0)


def test_one_refused_answer_fails_the_run():
    fail_if_not_all_ok(_wrk_result(0), "inbound_policy")
    with pytest.raises(BenchError, match="inbound_policy: 1 of 1000 answers had a status >= 400"):
        fail_if_not_all_ok(_wrk_result(1), "inbound_policy")


@pytest.mark.parametrize(
    ("policy_rps", "verdict"),
    [(16000.0, "met"), (15999.0, "MISSED"), (None, "n/a")],
)
def test_inbound_policy_target_and_ratios(policy_rps, verdict):
    results = {
        "inbound_plain": RunResult("inbound_plain", "throughput", rps=20000.0, cpu_us_per_req=50.0),
        "inbound_policy": RunResult(
            "inbound_policy",
            "throughput",
            rps=policy_rps,
            cpu_us_per_req=62.5,
            error=None if policy_rps else "boom",
        ),
    }
    report.ratios(results)
    (target,) = [t for t in report.TARGETS if t.run == "inbound_policy"]
    assert target.check(results)[1] == verdict
    if policy_rps:
        extra = results["inbound_policy"].extra
        assert extra["x_inbound_plain"] == round(policy_rps / 20000.0, 3)
        assert extra["cpu_ratio_vs_inbound_plain"] == 0.8


def test_the_abbreviated_policies_in_the_docs_are_the_runs():
    """docs/benchmarks.md shows some of the rules: each must be the run's rule of that name."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    start = text.index("```yaml\napiVersion: lepton-mesh/v1\nkind: RequestAuthentication")
    docs = list(yaml.safe_load_all(text[start + len("```yaml\n") : text.index("```", start + 3)]))
    shown = {d["kind"]: d for d in docs}
    made = {d["kind"]: d for d in inbound.policies("upstream", inbound.issue(NOW))}
    for d in (shown, made):
        provider = d["RequestAuthentication"]["spec"]["providers"][0]
        assert provider.pop("jwks")["keys"][0]["kid"] == inbound.KID
    assert shown["RequestAuthentication"] == made["RequestAuthentication"]
    assert shown["RateLimit"] == made["RateLimit"]
    rules = {r["name"]: r for r in made["AuthorizationPolicy"]["spec"]["rules"]}
    shown_rules = shown["AuthorizationPolicy"]["spec"].pop("rules")
    made["AuthorizationPolicy"]["spec"].pop("rules")
    assert shown["AuthorizationPolicy"] == made["AuthorizationPolicy"]
    assert [rules[r["name"]] for r in shown_rules] == shown_rules
    assert shown_rules[-1]["name"] == inbound.ALLOW_RULE
