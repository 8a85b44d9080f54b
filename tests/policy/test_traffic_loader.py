"""Traffic policy manifests: the YAML contract, every validation rule, the JSON view."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest

from lepton_mesh.policy.errors import ConfigError
from lepton_mesh.policy.sidecar_loader import (
    load_sidecar_config,
    sidecar_config_from_mapping,
    sidecar_config_to_json,
)
from lepton_mesh.policy.traffic import (
    Backend,
    Backoff,
    CircuitLimits,
    DestinationPolicy,
    Fault,
    FaultAbort,
    FaultDelay,
    HashOn,
    HeaderMatch,
    HeaderOps,
    LoadBalancer,
    Mirror,
    OutlierDetection,
    PathMatch,
    QueryMatch,
    RetryBudget,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteRule,
    Subset,
    TrafficPolicies,
    default_destination_policy,
)
from lepton_mesh.policy.traffic_loader import (
    load_policy_files,
    traffic_from_documents,
    traffic_to_manifests,
)
from lepton_mesh.policy.yaml_source import Document, load_documents

ROOT = Path(__file__).resolve().parents[2]

FULL = """\
apiVersion: lepton-mesh/v1
kind: Route
metadata: {name: dialog-canary, namespace: team-a}
spec:
  destination: dialog
  rules:
    - name: beta-users
      match:
        - path: {prefix: /v1/}
          methods: [GET, post]
          headers: [{name: X-User-Group, exact: beta}]
          query: [{name: debug, present: true}]
        - path: {regex: "/v[0-9]+/turn"}
          headers: [{name: x-a, regex: "a|b"}, {name: x-b, present: true}]
          query: [{name: lang, exact: en}, {name: q, regex: "x.*"}]
      backends:
        - {service: dialog, subset: v1, weight: 90}
        - {service: dialog, subset: v2, weight: 10}
      timeout: 5s
      retry:
        attempts: 3
        per_try_timeout: 1s
        retry_on: [connect-failure, reset, gateway-error, retriable-status-codes]
        retriable_status_codes: [409]
        retriable_methods: [post]
        backoff: {base: 25ms, max: 250ms}
      request_headers: {set: {X-Canary: "true"}, add: {x-a: "1", x-b: ["2", "3"]}, remove: [x-internal]}
      response_headers: {set: {x-served-by: mesh}}
      fault: {delay: {percent: 10, fixed: 2s}, abort: {percent: "5%", status: 503}, header_trigger: true}
      mirror: {service: dialog, subset: v2, percent: 20}
    - match: [{path: {exact: /healthz}}]
      timeout: 0
      retry: {attempts: 1, retry_on: []}
    - name: rest
      backends: [{service: dialog-next}]
---
apiVersion: lepton-mesh/v1
kind: DestinationPolicy
metadata: {name: dialog, labels: {team: a}, annotations: {owner: someone}}
spec:
  service: dialog
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2, track: canary}}]
  load_balancer: {algorithm: ring_hash, hash_on: {header: X-User-Id}, panic_threshold: 40, locality: true}
  timeout: 15s
  retry: {attempts: 2}
  retry_budget: {percent: 25, min_per_second: 5, window: 30s}
  limits: {max_connections: 100, max_pending: 50, max_requests: 80, max_retries: 10}
  outlier: {consecutive_5xx: 0, consecutive_gateway_errors: 3, base_ejection_time: 10s, max_ejection_time: 5m, max_ejection_percent: 30}
---
apiVersion: lepton-mesh/v1
kind: DestinationPolicy
metadata: {name: dialog-next}
spec:
  service: dialog-next
  load_balancer: {algorithm: ring_hash, hash_on: {cookie: session}}
  outlier: {enabled: false}
---
apiVersion: lepton-mesh/v1
kind: DestinationPolicy
metadata: {name: intent}
spec:
  service: intent
  load_balancer: {algorithm: ring_hash, hash_on: {source_ip: true}}
  outlier: null
"""


def full_expected(source: str) -> TrafficPolicies:
    route = Route(
        name="dialog-canary",
        namespace="team-a",
        destination="dialog",
        source=f"{source}:1",
        rules=(
            RouteRule(
                name="beta-users",
                matches=(
                    RouteMatch(
                        path=PathMatch("prefix", "/v1/"),
                        methods=frozenset({"GET", "POST"}),
                        headers=(HeaderMatch("x-user-group", "exact", "beta"),),
                        query=(QueryMatch("debug", "present"),),
                    ),
                    RouteMatch(
                        path=PathMatch("regex", "/v[0-9]+/turn"),
                        headers=(HeaderMatch("x-a", "regex", "a|b"), HeaderMatch("x-b", "present")),
                        query=(QueryMatch("lang", "exact", "en"), QueryMatch("q", "regex", "x.*")),
                    ),
                ),
                backends=(Backend("dialog", "v1", 90), Backend("dialog", "v2", 10)),
                timeout=5.0,
                retry=RetryPolicy(
                    attempts=3,
                    retry_on=frozenset(
                        {"connect-failure", "reset", "gateway-error", "retriable-status-codes"}
                    ),
                    retriable_status_codes=frozenset({409}),
                    retriable_methods=frozenset({"POST"}),
                    per_try_timeout=1.0,
                    backoff=Backoff(0.025, 0.25),
                ),
                request_headers=HeaderOps(
                    set=(("x-canary", "true"),),
                    add=(("x-a", "1"), ("x-b", "2"), ("x-b", "3")),
                    remove=("x-internal",),
                ),
                response_headers=HeaderOps(set=(("x-served-by", "mesh"),)),
                fault=Fault(FaultDelay(10.0, 2.0), FaultAbort(5.0, 503), header_trigger=True),
                mirror=Mirror(Backend("dialog", "v2"), 20.0),
            ),
            RouteRule(
                name="rule-1",
                matches=(RouteMatch(path=PathMatch("exact", "/healthz")),),
                timeout=0.0,
                retry=RetryPolicy(attempts=1, retry_on=frozenset()),
            ),
            RouteRule(name="rest", backends=(Backend("dialog-next"),)),
        ),
    )
    dialog = DestinationPolicy(
        name="dialog",
        namespace="default",
        service="dialog",
        subsets=(
            Subset("v1", MappingProxyType({"version": "v1"})),
            Subset("v2", MappingProxyType({"version": "v2", "track": "canary"})),
        ),
        load_balancer=LoadBalancer("ring_hash", HashOn(header="x-user-id"), 40.0, True),
        timeout=15.0,
        retry=RetryPolicy(attempts=2),
        retry_budget=RetryBudget(25.0, 5.0, 30.0),
        limits=CircuitLimits(100, 50, 80, 10),
        outlier=OutlierDetection(0, 3, 10.0, 300.0, 30.0),
        source=f"{source}:37",
    )
    dialog_next = DestinationPolicy(
        name="dialog-next",
        namespace="default",
        service="dialog-next",
        load_balancer=LoadBalancer("ring_hash", HashOn(cookie="session")),
        outlier=None,
        source=f"{source}:50",
    )
    intent = DestinationPolicy(
        name="intent",
        namespace="default",
        service="intent",
        load_balancer=LoadBalancer("ring_hash", HashOn(source_ip=True)),
        outlier=None,
        source=f"{source}:58",
    )
    return TrafficPolicies(
        routes=MappingProxyType({"dialog": route}),
        destinations=MappingProxyType(
            {"dialog": dialog, "dialog-next": dialog_next, "intent": intent}
        ),
    )


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_full_example_loads_into_literal_objects(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    assert load_policy_files([path]) == full_expected(str(path))


def test_documents_from_any_source() -> None:
    docs = load_documents(FULL, "snapshot-7")
    assert traffic_from_documents(docs) == full_expected("snapshot-7")


def test_defaults() -> None:
    text = """\
    apiVersion: lepton-mesh/v1
    kind: Route
    metadata: {name: r}
    spec:
      destination: intent
      rules: [{}]
    ---
    apiVersion: lepton-mesh/v1
    kind: DestinationPolicy
    metadata: {name: intent}
    spec: {service: intent}
    """
    policies = traffic_from_documents(load_documents(textwrap.dedent(text), "m"))
    assert policies.routes["intent"] == Route(
        "r", "default", "intent", (RouteRule("rule-0"),), source="m:1"
    )
    assert policies.destinations["intent"] == dataclasses.replace(
        default_destination_policy("intent", "default"), source="m:8"
    )
    assert RetryPolicy().retry_on == frozenset({"connect-failure", "refused", "reset"})


def test_no_documents_is_empty_policies() -> None:
    assert traffic_from_documents([]) == TrafficPolicies()


def test_manifests_round_trip_through_json(tmp_path: Path) -> None:
    policies = load_policy_files([write(tmp_path, FULL)])
    manifests = json.loads(json.dumps(traffic_to_manifests(policies)))
    again = traffic_from_documents([Document("admin", m, {}) for m in manifests])
    assert _without_sources(again) == _without_sources(policies)


def _without_sources(p: TrafficPolicies) -> TrafficPolicies:
    return TrafficPolicies(
        routes={k: dataclasses.replace(v, source="") for k, v in p.routes.items()},
        destinations={k: dataclasses.replace(v, source="") for k, v in p.destinations.items()},
    )


def test_manifest_json_is_literal() -> None:
    policies = traffic_from_documents(
        load_documents(
            textwrap.dedent(
                """\
                apiVersion: lepton-mesh/v1
                kind: Route
                metadata: {name: r}
                spec:
                  destination: intent
                  rules:
                    - match: [{path: {exact: /a}, methods: [GET]}]
                      backends: [{service: intent, subset: v1}]
                      mirror: {service: intent, subset: v1, percent: 5}
                ---
                apiVersion: lepton-mesh/v1
                kind: DestinationPolicy
                metadata: {name: intent}
                spec:
                  service: intent
                  subsets: [{name: v1, labels: {version: v1}}]
                  outlier: null
                """
            ),
            "m",
        )
    )
    retry_default = {
        "attempts": 2,
        "retry_on": ["connect-failure", "refused", "reset"],
        "retriable_status_codes": [],
        "retriable_methods": [],
        "per_try_timeout": 0.0,
        "backoff": {"base": 0.025, "max": 0.25},
    }
    assert traffic_to_manifests(policies) == [
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "Route",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {
                "destination": "intent",
                "rules": [
                    {
                        "name": "rule-0",
                        "match": [{"path": {"exact": "/a"}, "methods": ["GET"]}],
                        "backends": [{"service": "intent", "subset": "v1", "weight": 100}],
                        "mirror": {"service": "intent", "subset": "v1", "percent": 5.0},
                    }
                ],
            },
        },
        {
            "apiVersion": "lepton-mesh/v1",
            "kind": "DestinationPolicy",
            "metadata": {"name": "intent", "namespace": "default"},
            "spec": {
                "service": "intent",
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                "load_balancer": {
                    "algorithm": "least_request",
                    "panic_threshold": 50.0,
                    "locality": False,
                },
                "timeout": 60.0,
                "retry": retry_default,
                "retry_budget": {"percent": 20.0, "min_per_second": 10.0, "window": 10.0},
                "limits": {
                    "max_connections": 1024,
                    "max_pending": 1024,
                    "max_requests": 1024,
                    "max_retries": 64,
                },
                "outlier": None,
            },
        },
    ]


# --- every validation rule: (manifests, [(line, path, message substring), ...]) -----


def route(spec: str, name: str = "r") -> str:
    """A Route manifest; the first line of `spec` is line 5 of the document."""
    head = f"apiVersion: lepton-mesh/v1\nkind: Route\nmetadata: {{name: {name}}}\nspec:\n"
    return head + textwrap.indent(textwrap.dedent(spec), "  ")


def policy(spec: str, name: str = "d") -> str:
    """A DestinationPolicy manifest; the first line of `spec` is line 5 of the document."""
    head = (
        f"apiVersion: lepton-mesh/v1\nkind: DestinationPolicy\nmetadata: {{name: {name}}}\nspec:\n"
    )
    return head + textwrap.indent(textwrap.dedent(spec), "  ")


DIALOG_POLICY = policy(
    """\
    service: dialog
    subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
    """,
    name="dialog",
)


def rules(text: str) -> str:
    """A Route for `dialog` with these rules (their first line is line 7)."""
    return route("destination: dialog\nrules:\n" + textwrap.indent(textwrap.dedent(text), "  "))


BAD: list[tuple[str, str, list[tuple[int, str, str]]]] = [
    # the envelope
    (
        "api-version",
        route("destination: a\nrules: [{}]\n").replace("lepton-mesh/v1", "networking.istio.io/v1"),
        [(1, "apiVersion", "must be 'lepton-mesh/v1', found string 'networking.istio.io/v1'")],
    ),
    (
        "unknown-kind",
        route("destination: a\nrules: [{}]\n").replace("kind: Route", "kind: VirtualService"),
        [
            (
                2,
                "kind",
                "unknown kind 'VirtualService' (Istio's VirtualService is our Route); "
                "the kinds of lepton-mesh/v1 are Route, DestinationPolicy, ExternalService, "
                "RequestAuthentication, AuthorizationPolicy and RateLimit",
            )
        ],
    ),
    (
        "kind-typo",
        route("destination: a\nrules: [{}]\n").replace("kind: Route", "kind: Rout"),
        [(2, "kind", "unknown kind 'Rout' (did you mean 'Route'?)")],
    ),
    (
        "missing-spec",
        "apiVersion: lepton-mesh/v1\nkind: Route\nmetadata: {name: r}\n",
        [(1, "spec", "required field is missing")],
    ),
    (
        "not-a-mapping",
        "- just\n- a list\n",
        [(1, "", "expected a manifest (a mapping with apiVersion, kind, metadata, spec)")],
    ),
    (
        "metadata",
        route("destination: a\nrules: [{}]\n").replace("{name: r}", "{nmae: r, namespace: A}"),
        [
            (3, "metadata.nmae", "unknown field 'nmae' (did you mean 'name'?)"),
            (3, "metadata.name", "required field is missing"),
            (3, "metadata.namespace", "invalid name 'A'"),
        ],
    ),
    (
        "spec-unknown-field",
        route("destinaton: a\nrules: [{}]\n"),
        [
            (4, "spec.destination", "required field is missing"),
            (5, "spec.destinaton", "unknown field 'destinaton' (did you mean 'destination'?)"),
        ],
    ),
    (
        "rule-unknown-field",
        rules("- {name: a, retries: {attempts: 2}}\n"),
        [(7, "spec.rules[0].retries", "unknown field 'retries' (did you mean 'retry'?)")],
    ),
    # backends and weights
    (
        "weights-sum",
        DIALOG_POLICY
        + "---\n"
        + rules(
            """\
            - backends:
                - {service: dialog, subset: v1, weight: 50}
                - {service: dialog, subset: v2, weight: 40}
            """
        ),
        [(14, "spec.rules[0].backends", "backend weights must add up to 100, found 90 (50 + 40)")],
    ),
    (
        "weight-missing",
        rules("- backends: [{service: dialog}, {service: other, weight: 100}]\n"),
        [(7, "spec.rules[0].backends[0].weight", "required when a rule has more than one backend")],
    ),
    (
        "single-weight-not-100",
        rules("- backends: [{service: dialog, weight: 60}]\n"),
        [(7, "spec.rules[0].backends", "must add up to 100, found 60 (60)")],
    ),
    (
        "weight-range",
        rules("- backends: [{service: dialog, weight: 101}]\n"),
        [(7, "spec.rules[0].backends[0].weight", "must be between 0 and 100, found 101")],
    ),
    (
        "backend-twice",
        rules("- backends: [{service: x, weight: 50}, {service: x, weight: 50}]\n"),
        [(7, "spec.rules[0].backends[1]", "x is listed twice (also at [0])")],
    ),
    (
        "empty-backends",
        rules("- backends: []\n"),
        [(7, "spec.rules[0].backends", "an empty list sends nowhere")],
    ),
    # subsets
    (
        "unknown-subset",
        DIALOG_POLICY + "---\n" + rules("- backends: [{service: dialog, subset: v3}]\n"),
        [
            (
                14,
                "spec.rules[0].backends[0].subset",
                "subset 'v3' is not defined by DestinationPolicy 'dialog' ({file}:1) for service "
                "'dialog'; it defines 'v1', 'v2'",
            )
        ],
    ),
    (
        "subset-typo",
        DIALOG_POLICY + "---\n" + rules("- backends: [{service: dialog, subset: v-1}]\n"),
        [(14, "spec.rules[0].backends[0].subset", "it defines 'v1', 'v2' (did you mean 'v1'?)")],
    ),
    (
        "subset-without-policy",
        rules("- backends: [{service: dialog, subset: v1}]\n"),
        [
            (
                7,
                "spec.rules[0].backends[0].subset",
                "subset 'v1' of service 'dialog' is not defined: no DestinationPolicy for "
                "'dialog' defines subsets",
            )
        ],
    ),
    (
        "mirror-subset",
        DIALOG_POLICY + "---\n" + rules("- mirror: {service: dialog, subset: shadow}\n"),
        [
            (
                14,
                "spec.rules[0].mirror.subset",
                "subset 'shadow' is not defined by DestinationPolicy",
            )
        ],
    ),
    (
        "subset-definitions",
        policy(
            """\
            service: dialog
            subsets:
              - {name: v1, labels: {}}
              - {name: v2, labels: {version: v2}}
              - {name: v2, labels: {version: v3}}
            """
        ),
        [
            (7, "spec.subsets[0].labels", "must select on at least one label"),
            (9, "spec.subsets[2].name", "subset 'v2' is already defined at [1]"),
        ],
    ),
    # one object per destination
    (
        "two-routes",
        route("destination: dialog\nrules: [{}]\n", name="first")
        + "---\n"
        + route("destination: dialog\nrules: [{}]\n", name="second"),
        [
            (
                12,
                "spec.destination",
                "Route 'second' is a second Route for destination 'dialog': Route 'first' "
                "({file}:1) already covers it; the order between rules of two Routes would be "
                "undefined",
            )
        ],
    ),
    (
        "two-destination-policies",
        policy("service: dialog\n", name="a") + "---\n" + policy("service: dialog\n", name="b"),
        [
            (
                11,
                "spec.service",
                "DestinationPolicy 'b' is a second DestinationPolicy for service 'dialog': "
                "DestinationPolicy 'a' ({file}:1) already covers it",
            )
        ],
    ),
    # regexes
    (
        "bad-path-regex",
        rules("- match: [{path: {regex: '/v1/(a'}}]\n"),
        [
            (
                7,
                "spec.rules[0].match[0].path.regex",
                "invalid regex '/v1/(a': missing ), unterminated subpattern at position 4 "
                "(regexes use Python's re syntax",
            )
        ],
    ),
    (
        "bad-header-regex",
        rules("- match: [{headers: [{name: x-a, regex: '*a'}]}]\n"),
        [(7, "spec.rules[0].match[0].headers[0].regex", "invalid regex '*a': nothing to repeat")],
    ),
    (
        "bad-query-regex",
        rules("- match: [{query: [{name: q, regex: '[a'}]}]\n"),
        [(7, "spec.rules[0].match[0].query[0].regex", "invalid regex '[a'")],
    ),
    # match conditions
    (
        "path-two-kinds",
        rules("- match: [{path: {exact: /a, prefix: /a}}]\n"),
        [
            (
                7,
                "spec.rules[0].match[0].path",
                "exactly one of exact, prefix or regex is needed, found exact and prefix",
            )
        ],
    ),
    (
        "path-no-slash",
        rules("- match: [{path: {prefix: v1/}}]\n"),
        [(7, "spec.rules[0].match[0].path.prefix", "must start with '/', found 'v1/'")],
    ),
    (
        "path-with-query",
        rules("- match: [{path: {exact: '/a?b=1'}}]\n"),
        [(7, "spec.rules[0].match[0].path.exact", "matched without the query string")],
    ),
    (
        "empty-match",
        rules("- match: []\n"),
        [(7, "spec.rules[0].match", "an empty list matches nothing; omit 'match'")],
    ),
    (
        "empty-methods",
        rules("- match: [{methods: []}]\n"),
        [(7, "spec.rules[0].match[0].methods", "an empty list matches nothing")],
    ),
    (
        "header-name",
        rules("- match: [{headers: [{name: 'x a', exact: b}]}]\n"),
        [(7, "spec.rules[0].match[0].headers[0].name", "invalid header name 'x a'")],
    ),
    (
        "present-false",
        rules("- match: [{headers: [{name: x-a, present: false}]}]\n"),
        [(7, "spec.rules[0].match[0].headers[0].present", "must be true, found boolean false")],
    ),
    (
        "condition-kinds",
        rules("- match: [{query: [{name: q}]}]\n"),
        [
            (
                7,
                "spec.rules[0].match[0].query[0]",
                "exactly one of exact, regex or present is needed, found none",
            )
        ],
    ),
    (
        "exact-number",
        rules("- match: [{headers: [{name: x-a, exact: 1}]}]\n"),
        [(7, "spec.rules[0].match[0].headers[0].exact", "quote it to make it a string")],
    ),
    (
        "same-header-twice",
        rules("- match: [{headers: [{name: X-A, exact: a}, {name: x-a, exact: b}]}]\n"),
        [(7, "spec.rules[0].match[0].headers[1]", "a second condition on 'x-a' (first at [0])")],
    ),
    # rules
    (
        "empty-rules",
        route("destination: dialog\nrules: []\n"),
        [(6, "spec.rules", "an empty list routes nothing")],
    ),
    (
        "duplicate-rule-names",
        rules(
            "- {name: a, match: [{path: {exact: /a}}]}\n- {name: a, match: [{path: {exact: /b}}]}\n"
        ),
        [(8, "spec.rules[1]", "rule name 'a' is already used by rules[0]")],
    ),
    (
        "timeout-negative",
        rules("- timeout: -1s\n"),
        [(7, "spec.rules[0].timeout", "expected a duration")],
    ),
    # retries
    (
        "attempts",
        rules(
            "- match: [{path: {exact: /a}}]\n  retry: {attempts: 0}\n"
            "- match: [{path: {exact: /b}}]\n  retry: {attempts: 11}\n"
        ),
        [
            (8, "spec.rules[0].retry.attempts", "must be between 1 and 10, found 0"),
            (10, "spec.rules[1].retry.attempts", "must be between 1 and 10, found 11"),
        ],
    ),
    (
        "retry-on",
        rules("- retry: {retry_on: [5XX, retriable-4xx]}\n"),
        [
            (
                7,
                "spec.rules[0].retry.retry_on[0]",
                "unknown retry condition '5XX' (did you mean '5xx'?)",
            ),
            (
                7,
                "spec.rules[0].retry.retry_on[1]",
                "unknown retry condition 'retriable-4xx'; allowed: connect-failure, refused, "
                "reset, 5xx, gateway-error, retriable-status-codes",
            ),
        ],
    ),
    (
        "status-codes-without-condition",
        rules("- retry: {retry_on: [5xx], retriable_status_codes: [409]}\n"),
        [
            (
                7,
                "spec.rules[0].retry.retriable_status_codes",
                "retried only with 'retriable-status-codes' in retry_on",
            )
        ],
    ),
    (
        "condition-without-status-codes",
        rules("- retry: {retry_on: [retriable-status-codes]}\n"),
        [
            (
                7,
                "spec.rules[0].retry.retry_on",
                "'retriable-status-codes' needs a non-empty retriable_status_codes list",
            )
        ],
    ),
    (
        "status-code-range",
        rules(
            "- retry: {retry_on: [retriable-status-codes], retriable_status_codes: [409, 600]}\n"
        ),
        [(7, "spec.rules[0].retry.retriable_status_codes[1]", "must be between 100 and 599")],
    ),
    (
        "backoff-order",
        rules(
            "- match: [{path: {exact: /a}}]\n  retry: {backoff: {base: 2s, max: 1s}}\n"
            "- match: [{path: {exact: /b}}]\n  retry: {backoff: {base: 1s}}\n"
        ),
        [
            (8, "spec.rules[0].retry.backoff.base", "base (2s) must not exceed max (1s)"),
            (10, "spec.rules[1].retry.backoff.base", "must not exceed max (250ms, the default)"),
        ],
    ),
    (
        "retriable-methods",
        rules("- retry: {retriable_methods: ['PO ST']}\n"),
        [(7, "spec.rules[0].retry.retriable_methods[0]", "invalid HTTP method 'PO ST'")],
    ),
    # header edits
    (
        "header-ops",
        rules(
            """\
            - request_headers:
                set: {Content-Length: "0", x-a: "1\\r\\nx-evil: 1"}
                remove: [x-a, Transfer-Encoding]
            """
        ),
        [
            (8, "spec.rules[0].request_headers.set.Content-Length", "the proxy owns it"),
            (8, "spec.rules[0].request_headers.set.x-a", "may not contain control characters"),
            (
                9,
                "spec.rules[0].request_headers.remove[1]",
                "'transfer-encoding' frames the message",
            ),
        ],
    ),
    (
        "set-and-remove",
        rules("- request_headers: {set: {x-a: '1'}, remove: [X-A]}\n"),
        [(7, "spec.rules[0].request_headers.remove[0]", "'x-a' is also in 'set'")],
    ),
    # faults and mirrors
    (
        "fault-ranges",
        rules("- fault: {delay: {percent: 101, fixed: 1s}, abort: {percent: 5, status: 100}}\n"),
        [
            (7, "spec.rules[0].fault.delay.percent", "must be between 0 and 100, found 101"),
            (7, "spec.rules[0].fault.abort.status", "must be between 200 and 599, found 100"),
        ],
    ),
    (
        "fault-missing-fields",
        rules("- fault: {delay: {fixed: 1s}, abort: {percent: '5 %'}}\n"),
        [
            (7, "spec.rules[0].fault.delay.percent", "required field is missing"),
            (7, "spec.rules[0].fault.abort.status", "required field is missing"),
        ],
    ),
    (
        "fault-nothing",
        rules("- fault: {header_trigger: false}\n"),
        [(7, "spec.rules[0].fault", "injects nothing")],
    ),
    (
        "percent-syntax",
        rules("- mirror: {service: dialog, percent: ten}\n"),
        [(7, "spec.rules[0].mirror.percent", "expected a percentage like 10, 12.5 or '10%'")],
    ),
    (
        "mirror-negative",
        rules("- mirror: {service: dialog, percent: -1}\n"),
        [(7, "spec.rules[0].mirror.percent", "must be between 0 and 100, found -1")],
    ),
    # destination policies
    (
        "ring-hash-needs-hash-on",
        policy("service: dialog\nload_balancer: {algorithm: ring_hash}\n"),
        [(6, "spec.load_balancer.algorithm", "ring_hash needs hash_on")],
    ),
    (
        "hash-on-needs-ring-hash",
        policy("service: dialog\nload_balancer: {hash_on: {header: x-user}}\n"),
        [
            (
                6,
                "spec.load_balancer.hash_on",
                "only ring_hash uses hash_on; the algorithm is 'least_request'",
            )
        ],
    ),
    (
        "hash-on-exactly-one",
        policy(
            "service: dialog\nload_balancer:\n  algorithm: ring_hash\n"
            "  hash_on: {header: x-user, cookie: s}\n"
        ),
        [
            (
                8,
                "spec.load_balancer.hash_on",
                "exactly one of header, cookie or source_ip: true is needed, found header and cookie",
            )
        ],
    ),
    (
        "hash-on-none",
        policy(
            "service: dialog\nload_balancer: {algorithm: ring_hash, hash_on: {source_ip: false}}\n"
        ),
        [(6, "spec.load_balancer.hash_on", "found none")],
    ),
    (
        "algorithm",
        policy("service: dialog\nload_balancer: {algorithm: round-robin}\n"),
        [
            (
                6,
                "spec.load_balancer.algorithm",
                "unknown algorithm: found string 'round-robin' (did you mean 'round_robin'?)",
            )
        ],
    ),
    (
        "limits",
        policy("service: dialog\nlimits: {max_connections: 0, max_pendng: 1}\n"),
        [
            (
                6,
                "spec.limits.max_pendng",
                "unknown field 'max_pendng' (did you mean 'max_pending'?)",
            ),
            (6, "spec.limits.max_connections", "must be at least 1, found 0"),
        ],
    ),
    (
        "percents",
        policy(
            "service: dialog\nload_balancer: {panic_threshold: 150}\n"
            "retry_budget: {percent: -5, window: 0}\n"
        ),
        [
            (6, "spec.load_balancer.panic_threshold", "must be between 0 and 100, found 150"),
            (7, "spec.retry_budget.percent", "must be between 0 and 100, found -5"),
            (7, "spec.retry_budget.window", "must be greater than 0, found 0"),
        ],
    ),
    (
        "ejection-times",
        policy("service: dialog\noutlier: {base_ejection_time: 10m, max_ejection_time: 1m}\n"),
        [
            (
                6,
                "spec.outlier.base_ejection_time",
                "base_ejection_time (600s) must not exceed max_ejection_time (60s)",
            )
        ],
    ),
    (
        "outlier-disabled-with-fields",
        policy("service: dialog\noutlier: {enabled: false, consecutive_5xx: 3}\n"),
        [
            (
                6,
                "spec.outlier",
                "'enabled: false' disables outlier detection; remove consecutive_5xx",
            )
        ],
    ),
    (
        "outlier-counts",
        policy("service: dialog\noutlier: {consecutive_5xx: -1}\n"),
        [(6, "spec.outlier.consecutive_5xx", "must be at least 0, found -1")],
    ),
    (
        # Past 64 bits these crashed the control daemon's store (orjson); every
        # number has a bound, and past it the problem is the field's own.
        "numbers-past-their-bounds",
        policy(
            "service: dialog\nlimits: {max_connections: 99999999999999999999999999}\n"
            "outlier: {consecutive_5xx: 1000000001}\nretry_budget: {min_per_second: .inf}\n"
            "timeout: 99999999999999999999\n"
        ),
        [
            (
                6,
                "spec.limits.max_connections",
                "must be at most 1000000000, found 99999999999999999999999999",
            ),
            (7, "spec.outlier.consecutive_5xx", "must be at most 1000000000, found 1000000001"),
            (8, "spec.retry_budget.min_per_second", "expected a finite number, found infinity"),
            (9, "spec.timeout", "must be at most 8760h (a year), found 99999999999999999999"),
        ],
    ),
    (
        "destination-timeout-and-retry",
        policy("service: dialog\ntimeout: soon\nretry: {attempts: 20}\n"),
        [
            (6, "spec.timeout", "expected a duration like '250ms'"),
            (7, "spec.retry.attempts", "must be between 1 and 10, found 20"),
        ],
    ),
    # shadowing: reported
    (
        "shadow-after-catch-all",
        rules("- name: all\n- name: never\n  match: [{path: {prefix: /}}]\n- name: nor\n"),
        [
            (
                8,
                "spec.rules[1]",
                "rule 'never' can never match: rule 'all' (rules[0]) comes first and has no "
                "'match', so it takes every request; put catch-all rules last",
            ),
            (10, "spec.rules[2]", "rule 'nor' can never match: rule 'all' (rules[0])"),
        ],
    ),
    (
        "shadow-prefix-covers-exact",
        rules(
            """\
            - name: v1
              match: [{path: {prefix: /v1}}]
            - name: chat
              match: [{path: {exact: /v1/chat}, methods: [GET]}]
            """
        ),
        [
            (
                9,
                "spec.rules[1]",
                "rule 'chat' can never match: every request it matches is already matched by "
                "rule 'v1' (rules[0]) before it; put the narrower rule first or remove it",
            )
        ],
    ),
    (
        "shadow-prefix-covers-prefix-and-methods-superset",
        rules(
            """\
            - name: a
              match: [{path: {prefix: /v1/}, methods: [GET, POST]}]
            - name: b
              match: [{path: {prefix: /v1/chat}, methods: [get]}]
            """
        ),
        [(9, "spec.rules[1]", "rule 'b' can never match")],
    ),
    (
        "shadow-header-subset",
        rules(
            """\
            - name: a
              match: [{headers: [{name: x-group, exact: beta}]}]
            - name: b
              match: [{path: {exact: /a}, headers: [{name: x-group, exact: beta}, {name: x-b, present: true}], query: [{name: q, exact: '1'}]}]
            """
        ),
        [(9, "spec.rules[1]", "rule 'b' can never match")],
    ),
    (
        "shadow-present-covers-exact",
        rules(
            """\
            - name: a
              match: [{headers: [{name: x-debug, present: true}], query: [{name: q, present: true}]}]
            - name: b
              match: [{headers: [{name: x-debug, regex: '1|2'}], query: [{name: q, exact: ''}]}]
            """
        ),
        [(9, "spec.rules[1]", "rule 'b' can never match")],
    ),
    (
        "shadow-regex-covers-exact",
        rules(
            """\
            - name: a
              match: [{path: {regex: '/v[0-9]+/chat'}, headers: [{name: x-v, regex: 'v.*'}]}]
            - name: b
              match: [{path: {exact: /v2/chat}, headers: [{name: x-v, exact: v2}]}]
            """
        ),
        [(9, "spec.rules[1]", "rule 'b' can never match")],
    ),
    (
        "shadow-identical",
        rules(
            """\
            - name: a
              match: [{path: {regex: '/x.*'}, query: [{name: q, regex: 'a+'}]}]
            - name: b
              match: [{path: {regex: '/x.*'}, query: [{name: q, regex: 'a+'}]}]
            """
        ),
        [(9, "spec.rules[1]", "rule 'b' can never match")],
    ),
    (
        "shadow-by-two-rules",
        rules(
            """\
            - name: a
              match: [{path: {exact: /a}}]
            - name: b
              match: [{path: {exact: /b}}]
            - name: both
              match: [{path: {exact: /b}}, {path: {exact: /a}, methods: [GET]}]
            """
        ),
        [
            (
                11,
                "spec.rules[2]",
                "rule 'both' can never match: every request it matches is already matched by "
                "rules 'a' (rules[0]) and 'b' (rules[1]) before it",
            )
        ],
    ),
    # a rule whose match has an error takes no part in shadowing
    (
        "invalid-match-is-not-a-shadow",
        rules(
            """\
            - name: a
              match: [{path: {regex: '('}}]
            - name: b
              match: [{path: {exact: /b}}]
            """
        ),
        [(8, "spec.rules[0].match[0].path.regex", "invalid regex '('")],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_manifests(tmp_path: Path, text: str, expected: list[tuple[int, str, str]]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_policy_files([path])
    got = [(p.file, p.line, p.path, p.message) for p in info.value.problems]
    assert len(got) == len(expected), "\n".join(map(str, got))
    for (file, line, field, message), (want_line, want_field, want) in zip(
        got, expected, strict=True
    ):
        assert file == str(path)
        assert (line, field) == (want_line, want_field), message
        assert want.format(file=path) in message


NOT_SHADOWED = {
    "exact-does-not-cover-prefix": """\
        - match: [{path: {exact: /v1}}]
        - match: [{path: {prefix: /v1}}]
        """,
    "longer-prefix-first": """\
        - match: [{path: {prefix: /v1/chat}}]
        - match: [{path: {prefix: /v1}}]
        """,
    "methods-narrower": """\
        - match: [{path: {prefix: /}, methods: [GET]}]
        - match: [{path: {prefix: /x}}]
        - match: [{path: {prefix: /y}, methods: [GET, POST]}]
        """,
    "extra-header-condition-first": """\
        - match: [{headers: [{name: x-a, present: true}]}]
        - match: [{path: {prefix: /}}]
        """,
    "regex-vs-prefix-unprovable": """\
        - match: [{path: {regex: '/v1/.*'}}]
        - match: [{path: {prefix: /v1/}}]
        """,
    "different-regexes": """\
        - match: [{headers: [{name: x, regex: 'a.*'}]}]
        - match: [{headers: [{name: x, regex: 'ab.*'}]}]
        """,
    "one-alternative-still-reachable": """\
        - match: [{path: {prefix: /a}}]
        - match: [{path: {prefix: /a/b}}, {path: {prefix: /c}}]
        """,
    "different-exact-values": """\
        - match: [{headers: [{name: x, exact: '1'}]}]
        - match: [{headers: [{name: x, exact: '2'}]}]
        """,
    "present-does-not-imply-exact": """\
        - match: [{query: [{name: q, exact: 'yes'}]}]
        - match: [{query: [{name: q, present: true}]}]
        """,
    "regex-not-matching-exact": """\
        - match: [{path: {regex: '/v[0-9]/chat'}}]
        - match: [{path: {exact: /v10/chat}}]
        """,
    "catch-all-last": """\
        - match: [{path: {prefix: /a}}]
        - {}
        """,
}


@pytest.mark.parametrize("text", NOT_SHADOWED.values(), ids=NOT_SHADOWED.keys())
def test_rules_not_reported_as_shadowed(text: str) -> None:
    docs = load_documents(rules(text), "m")
    assert len(traffic_from_documents(docs).routes["dialog"].rules) == text.count("- ")


def test_problems_from_several_files_in_file_order(tmp_path: Path) -> None:
    a = write(tmp_path, rules("- timeout: x\n"), "a.yaml")
    b = write(tmp_path, "kind: [\n", "b.yaml")
    with pytest.raises(ConfigError) as info:
        load_policy_files([b, a, tmp_path / "missing.yaml"])
    assert [(p.file, p.path) for p in info.value.problems] == [
        (str(b), ""),
        (str(a), "spec.rules[0].timeout"),
        (str(tmp_path / "missing.yaml"), ""),
    ]
    assert "cannot read" in info.value.problems[2].message


def test_documents_across_files_are_one_set(tmp_path: Path) -> None:
    a = write(tmp_path, rules("- backends: [{service: dialog, subset: v2}]\n"), "a.yaml")
    b = write(tmp_path, DIALOG_POLICY, "b.yaml")
    assert load_policy_files([a, b]).routes["dialog"].rules[0].backends == (
        Backend("dialog", "v2"),
    )
    c = write(tmp_path, route("destination: dialog\nrules: [{}]\n", name="again"), "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_policy_files([a, b, c])
    (problem,) = info.value.problems
    assert (problem.file, problem.line) == (str(c), 5)
    assert f"Route 'r' ({a}:1) already covers it" in problem.message


# --- the examples and the docs ----------------------------------------------------


def test_mesh_examples_validate() -> None:
    files = sorted((ROOT / "examples" / "mesh").glob("*.yaml"))
    assert files
    policies = load_policy_files(files)
    assert set(policies.routes) == {"intent", "dialog"}
    canary = next(r for r in policies.routes["dialog"].rules if r.name == "turns")
    assert canary.backends == (Backend("dialog", "v1", 90), Backend("dialog", "v2", 10))
    dialog = policies.destinations["dialog"]
    assert dialog.outlier is not None and dialog.limits.max_requests == 256


def test_chat_sidecar_example_loads_its_policies() -> None:
    cfg = load_sidecar_config(ROOT / "examples" / "sidecar" / "chat.yaml")
    assert set(cfg.traffic.routes) == {"intent", "dialog"}
    assert cfg.traffic == load_policy_files(
        [ROOT / "examples" / "mesh" / "intent.yaml", ROOT / "examples" / "mesh" / "dialog.yaml"]
    )


def test_reference_doc_examples_load() -> None:
    doc = (ROOT / "docs" / "policy-reference.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```yaml\n")[1:]]
    full = [b for b in blocks if "apiVersion: lepton-mesh/v1" in b]
    assert full
    for block in full:
        traffic_from_documents(load_documents(block, "policy-reference.md"))


# --- the sidecar config's `policies:` ----------------------------------------------

SIDECAR = """\
service: chat
app: 127.0.0.1:8080
services:
  dialog: {endpoints: [{address: 127.0.0.1:9001, labels: {version: v1}}]}
  redis: {protocol: tcp, listen: 127.0.0.1:16379, endpoints: [127.0.0.1:6379]}
"""


def test_sidecar_policies_from_files_and_inline(tmp_path: Path) -> None:
    (tmp_path / "mesh").mkdir()
    write(tmp_path, DIALOG_POLICY, "mesh/dialog.yaml")
    inline = (
        "  - apiVersion: lepton-mesh/v1\n    kind: Route\n    metadata: {name: r}\n"
        "    spec: {destination: dialog, rules: [{backends: [{service: dialog, subset: v1}]}]}\n"
    )
    path = write(tmp_path, SIDECAR + "policies:\n  - mesh/dialog.yaml\n" + inline, "sidecar.yaml")
    cfg = load_sidecar_config(path)
    assert cfg.traffic.routes["dialog"].source == f"{path}:8"
    assert cfg.traffic.destinations["dialog"].source == f"{tmp_path / 'mesh' / 'dialog.yaml'}:1"

    data = sidecar_config_to_json(cfg)
    assert [m["kind"] for m in data["policies"]] == ["Route", "DestinationPolicy"]
    source = data.pop("source")
    again = sidecar_config_from_mapping(json.loads(json.dumps(data)), source)
    assert _without_sources(again.traffic) == _without_sources(cfg.traffic)


def test_sidecar_without_policies_has_none_in_json(tmp_path: Path) -> None:
    cfg = load_sidecar_config(write(tmp_path, SIDECAR, "sidecar.yaml"))
    assert cfg.traffic == TrafficPolicies()
    assert "policies" not in sidecar_config_to_json(cfg)


def test_sidecar_policy_problems(tmp_path: Path) -> None:
    bad = write(tmp_path, rules("- backends: [{service: dialog, weight: 50}]\n"), "bad.yaml")
    text = (
        SIDECAR
        + "policies:\n  - bad.yaml\n  - nowhere.yaml\n  - bad.yaml\n  - 7\n  - {kind: Nope}\n"
    )
    path = write(tmp_path, text, "sidecar.yaml")
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    got = [(p.file, p.line, p.path, p.message) for p in info.value.problems]
    assert got == [
        (str(path), 8, "policies[1]", f"policy file 'nowhere.yaml' not found (looked for {tmp_path / 'nowhere.yaml'})"),
        (str(path), 9, "policies[2]", "'bad.yaml' is already listed at [0]"),
        (str(path), 10, "policies[3]", "expected a policy file path or a manifest, found integer 7"),
        (str(path), 11, "policies[4].apiVersion", "required field is missing"),
        (str(path), 11, "policies[4].metadata", "required field is missing"),
        (str(path), 11, "policies[4].spec", "required field is missing"),
        (str(path), 11, "policies[4].kind", "unknown kind 'Nope'; the kinds of lepton-mesh/v1 are Route, DestinationPolicy, ExternalService, RequestAuthentication, AuthorizationPolicy and RateLimit"),
        (str(bad), 7, "spec.rules[0].backends", "backend weights must add up to 100, found 50 (50)"),
    ]  # fmt: skip


def test_a_policies_entry_that_is_a_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "mesh").mkdir()
    path = write(tmp_path, SIDECAR + "policies: [mesh]\n", "sidecar.yaml")
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    assert [(p.line, p.path, p.message) for p in info.value.problems] == [
        (6, "policies[0]", f"'mesh' is a folder ({tmp_path / 'mesh'}): list the policy files in it")
    ]


def test_sidecar_routes_must_reach_known_http_services(tmp_path: Path) -> None:
    write(
        tmp_path,
        rules("- backends: [{service: dialog, weight: 50}, {service: dialog-v2, weight: 50}]\n")
        + "---\n"
        + route("destination: redis\nrules: [{}]\n", name="cache")
        + "---\n"
        + route("destination: billing\nrules: [{backends: [{service: nowhere}]}]\n", name="b"),
        "routes.yaml",
    )
    path = write(tmp_path, SIDECAR + "policies: [routes.yaml]\n", "sidecar.yaml")
    with pytest.raises(ConfigError) as info:
        load_sidecar_config(path)
    routes = tmp_path / "routes.yaml"
    assert [(p.line, p.path, p.message) for p in info.value.problems] == [
        (
            5,
            "services.redis.protocol",
            f"Route 'cache' ({routes}:9) routes 'redis', but routes apply to HTTP calls "
            "and 'redis' is tcp",
        ),
        (
            6,
            "policies",
            f"Route 'r' ({routes}:1) sends 'dialog' calls to 'dialog-v2', which is not in services",
        ),
    ]
