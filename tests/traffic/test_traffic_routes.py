"""Route rules, end to end: matching (path exact/prefix/regex, method, header,
query) sends each request to the right backend, header operations edit
requests and responses, and fault injection aborts and delays.

The matching test loads its Route from a YAML manifest through the sidecar
config loader (`policies:`), so the file -> SidecarConfig.traffic -> proxy
path is covered; the others build `TrafficPolicies` objects directly.
"""

from __future__ import annotations

import textwrap

import pytest
from proxy_harness import LOCAL, assert_lepton_error, free_port, outbound, seen_header
from traffic_support import (
    STATUS,
    TIMER_SLACK,
    CapturedLog,
    call,
    drive,
    mesh_config,
    route,
    start_backend,
)

from lepton_mesh.policy.sidecar_loader import load_sidecar_config
from lepton_mesh.policy.traffic import (
    Fault,
    FaultAbort,
    FaultDelay,
    HeaderOps,
    RouteRule,
)
from lepton_mesh.proxy.errors import Reason

ROUTES_YAML = """\
apiVersion: lepton-mesh/v1
kind: Route
metadata: {name: svc-routes, namespace: default}
spec:
  destination: svc
  rules:
    - name: exact
      match: [{path: {exact: /exact}}]
      backends: [{service: s-exact}]
    - name: regex
      match: [{path: {regex: "/items/[0-9]+"}}]
      backends: [{service: s-regex}]
    - name: deletes
      match: [{methods: [DELETE]}]
      backends: [{service: s-method}]
    - name: api
      match: [{path: {prefix: /api/}}]
      backends: [{service: s-prefix}]
    - name: by-header
      match:
        - headers: [{name: x-env, exact: canary}]
        - headers: [{name: x-user, regex: "beta-[a-z]+"}]
        - headers: [{name: x-trace-me, present: true}]
      backends: [{service: s-header}]
    - name: by-query
      match:
        - query: [{name: debug, present: true}]
        - query: [{name: v, exact: "2"}]
      backends: [{service: s-query}]
"""

SERVICES = ("svc", "s-exact", "s-regex", "s-method", "s-prefix", "s-header", "s-query")


async def sidecar_from_yaml(sidecars, tmp_path, backends) -> object:
    (tmp_path / "routes.yaml").write_text(ROUTES_YAML)
    services = "\n".join(
        f"  {name}: {{endpoints: ['{b.address}']}}" for name, b in backends.items()
    )
    (tmp_path / "sidecar.yaml").write_text(
        textwrap.dedent(
            f"""\
            service: test
            app: {LOCAL}:{free_port()}
            listeners: {{outbound: {LOCAL}:0, inbound: {LOCAL}:0, admin: {LOCAL}:0}}
            policies: [routes.yaml]
            services:
            """
        )
        + services
        + "\n"
    )
    cfg = load_sidecar_config(tmp_path / "sidecar.yaml")
    assert set(cfg.traffic.routes) == {"svc"}
    assert [r.name for r in cfg.traffic.routes["svc"].rules] == [
        "exact", "regex", "deletes", "api", "by-header", "by-query",
    ]  # fmt: skip
    return await sidecars(cfg)


@pytest.fixture
async def routed(sidecars, upstreams, tmp_path):  # type: ignore[no-untyped-def]
    backends = {name: await start_backend(upstreams, name) for name in SERVICES}
    sc = await sidecar_from_yaml(sidecars, tmp_path, backends)
    return sc, backends


# (method, target, headers, backend that must answer, rule named in the access log)
ROUTING_CASES = [
    ("GET", "/exact", [], "s-exact", "exact"),
    ("GET", "/exact/more", [], "svc", "default"),  # exact is exact
    ("GET", "/exact?x=1", [], "s-exact", "exact"),  # the query is not part of the path
    ("GET", "/items/42", [], "s-regex", "regex"),
    ("GET", "/items/42x", [], "svc", "default"),  # the regex must match the whole path
    ("GET", "/items/42?debug", [], "s-regex", "regex"),  # first matching rule wins
    ("DELETE", "/api/x", [], "s-method", "deletes"),  # ... even over a longer prefix
    ("GET", "/api/x", [], "s-prefix", "api"),
    ("POST", "/api/", [], "s-prefix", "api"),
    ("GET", "/apix", [], "svc", "default"),
    ("GET", "/other", [("x-env", "canary")], "s-header", "by-header"),
    ("GET", "/other", [("X-Env", "canary")], "s-header", "by-header"),  # names ignore case
    ("GET", "/other", [("x-env", "prod")], "svc", "default"),
    ("GET", "/other", [("x-user", "beta-bob")], "s-header", "by-header"),
    ("GET", "/other", [("x-user", "beta-Bob")], "svc", "default"),  # values do not
    ("GET", "/other", [("x-trace-me", "")], "s-header", "by-header"),  # present, even empty
    ("GET", "/other?debug", [], "s-query", "by-query"),
    ("GET", "/other?a=1&v=2", [], "s-query", "by-query"),
    ("GET", "/other?v=2%20", [], "svc", "default"),  # decoded "2 " is not "2"
    ("GET", "/other?Debug=1", [], "svc", "default"),  # parameter names are case-sensitive
    ("GET", "/other", [], "svc", "default"),
]


async def test_route_matching_end_to_end(routed) -> None:
    sc, backends = routed
    log = CapturedLog(sc)
    for method, target, headers, _, _ in ROUTING_CASES:
        result = await call(outbound(sc), method, target, headers=headers)
        assert result.status == 200, (method, target, headers)
    got = [(r.method, r.target, backend) for backend, b in backends.items() for r in b.requests]
    want = [(m, t, backend) for m, t, _, backend, _ in ROUTING_CASES]
    assert sorted(got) == sorted(want)
    records = log.records()
    assert [(rec["path"], rec["rule"], rec["backend"]) for rec in records] == [
        (t, rule, backend) for _, t, _, backend, rule in ROUTING_CASES
    ]


async def test_header_operations(sidecars, upstreams) -> None:
    backend = await start_backend(
        upstreams,
        "svc",
        response_headers=(("x-set-me", "old"), ("x-remove-me", "1"), ("x-keep", "k")),
    )
    rule = RouteRule(
        name="edit",
        request_headers=HeaderOps(
            set=(("x-canary", "true"),), add=(("x-a", "1"),), remove=("x-internal",)
        ),
        response_headers=HeaderOps(
            set=(("x-set-me", "new"),), add=(("x-added", "yes"),), remove=("x-remove-me",)
        ),
    )
    sc = await sidecars(mesh_config({"svc": [backend]}, routes=[route("svc", rule)]))
    result = await call(
        outbound(sc),
        headers=[("x-internal", "secret"), ("x-canary", "false"), ("x-a", "0"), ("x-b", "b")],
    )
    assert result.status == 200
    seen = result.response.json()
    assert seen_header(seen, "x-canary") == ["true"]  # set replaces
    assert seen_header(seen, "x-a") == ["0", "1"]  # add appends
    assert seen_header(seen, "x-internal") == []  # remove
    assert seen_header(seen, "x-b") == ["b"]  # the rest untouched
    resp = result.response
    assert resp.all("x-set-me") == ["new"]
    assert resp.all("x-added") == ["yes"]
    assert resp.all("x-remove-me") == []
    assert resp.all("x-keep") == ["k"]


def fault_rule(fault: Fault) -> RouteRule:
    return RouteRule(name="chaos", fault=fault)


@pytest.mark.parametrize(
    ("fault", "headers", "status", "min_latency", "reaches_upstream"),
    [
        # abort 100%: the configured status, nothing sent upstream
        (Fault(abort=FaultAbort(100, 418)), [], 418, 0.0, False),
        (Fault(abort=FaultAbort(100, 503)), [], 503, 0.0, False),
        # delay 100%: the request is held, then served
        (Fault(delay=FaultDelay(100, 0.2)), [], 200, 0.2, True),
        # both: delay first, then abort (as Istio)
        (Fault(delay=FaultDelay(100, 0.15), abort=FaultAbort(100, 500)), [], 500, 0.15, False),
        # 0%: nothing happens
        (Fault(abort=FaultAbort(0, 500), delay=FaultDelay(0, 5)), [], 200, 0.0, True),
        # header-triggered faults only when header_trigger is on
        (Fault(header_trigger=True), [("x-lepton-fault-abort", "503")], 503, 0.0, False),
        (Fault(header_trigger=True), [("x-lepton-fault-delay", "150ms")], 200, 0.15, True),
        (Fault(header_trigger=True), [("x-lepton-fault-abort", "999")], 200, 0.0, True),
        (Fault(header_trigger=True), [], 200, 0.0, True),
        (
            Fault(abort=FaultAbort(0, 500), header_trigger=False),
            [("x-lepton-fault-abort", "503"), ("x-lepton-fault-delay", "1s")],
            200,
            0.0,
            True,
        ),
    ],
)
async def test_fault_injection(
    sidecars, upstreams, fault, headers, status, min_latency, reaches_upstream
) -> None:
    backend = await start_backend(upstreams, "svc")
    sc = await sidecars(mesh_config({"svc": [backend]}, routes=[route("svc", fault_rule(fault))]))
    log = CapturedLog(sc)
    result = await call(outbound(sc), headers=headers)
    assert result.status == status
    if status != 200:
        body = assert_lepton_error(result.response, status, Reason.FAULT_INJECTED)
        assert "chaos" in body["error"]
    assert min_latency - TIMER_SLACK <= result.latency < min_latency + 0.15, result.latency
    assert backend.hits == (1 if reaches_upstream else 0)
    (rec,) = log.records()
    assert rec["reason"] == (Reason.FAULT_INJECTED if status != 200 else "-")


async def test_fault_abort_percentage(sidecars, upstreams) -> None:
    """abort 25%: about a quarter of 800 requests are aborted (seeded draws)."""
    backend = await start_backend(upstreams, "svc")
    rule = fault_rule(Fault(abort=FaultAbort(25, 503)))
    sc = await sidecars(mesh_config({"svc": [backend]}, routes=[route("svc", rule)]))
    results = await drive(outbound(sc), 800, concurrency=4)
    aborted = [r for r in results if r.status == 503]
    assert all(r.reason == Reason.FAULT_INJECTED for r in aborted)
    assert backend.hits == 800 - len(aborted)
    print(f"\nabort 25%: {len(aborted) / 800:.1%} aborted")
    assert 0.20 <= len(aborted) / 800 <= 0.30


POLICY_YAML = """\
apiVersion: lepton-mesh/v1
kind: DestinationPolicy
metadata: {name: svc}
spec:
  service: svc
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
  retry: {attempts: 3, retry_on: [5xx], backoff: {base: 1ms, max: 4ms}}
  outlier: null
---
apiVersion: lepton-mesh/v1
kind: Route
metadata: {name: svc}
spec:
  destination: svc
  rules:
    - name: v2-only
      match: [{headers: [{name: x-canary, exact: "yes"}]}]
      backends: [{service: svc, subset: v2}]
      response_headers: {set: {x-route: v2-only}}
"""


async def test_destination_policy_from_yaml(sidecars, upstreams, tmp_path) -> None:
    """A DestinationPolicy manifest's retry and subsets take effect through the loader."""
    v1 = await start_backend(upstreams, "v1")
    v2 = await start_backend(upstreams, "v2", STATUS, status=500)
    (tmp_path / "svc.yaml").write_text(POLICY_YAML)
    (tmp_path / "sidecar.yaml").write_text(
        textwrap.dedent(
            f"""\
            service: test
            app: {LOCAL}:{free_port()}
            listeners: {{outbound: {LOCAL}:0, inbound: {LOCAL}:0, admin: {LOCAL}:0}}
            policies: [svc.yaml]
            services:
              svc:
                endpoints:
                  - {{address: '{v1.address}', labels: {{version: v1}}}}
                  - {{address: '{v2.address}', labels: {{version: v2}}}}
            """
        )
    )
    sc = await sidecars(load_sidecar_config(tmp_path / "sidecar.yaml"))
    canary = await call(outbound(sc), headers=[("x-canary", "yes")])
    # The v2 subset is one failing endpoint: three tries (the policy's), all to it.
    assert (canary.status, canary.served_by, canary.attempts) == (500, "v2", 3)
    assert canary.response.get("x-route") == "v2-only"
    assert v2.hits == 3
    plain = await call(outbound(sc))
    # Without the header: the whole service; a try on v2 is retried on v1.
    assert (plain.status, plain.served_by) == (200, "v1")
    assert v1.hits == 1
