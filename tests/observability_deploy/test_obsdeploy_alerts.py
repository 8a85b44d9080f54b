"""deploy/observability/alerts.yml: its shape, and that every expression asks only for
series and labels the code really exports (checked against real scrapes, see conftest)."""

from __future__ import annotations

import re

import promql_parser as pq
import pytest
import yaml
from obsdeploy_files import (
    ALERTS,
    ALERTS_TEST,
    JOBS,
    MONITORING_DOC,
    SCRAPE_CONFIGS,
    alert_rules,
    doc_anchors,
    load_yaml,
    promtool,
    run_promtool,
    scrape_target_labels,
)
from obsdeploy_promql import (
    Exported,
    check_expr,
    metric_names,
    output_labels,
    selectors,
    template_labels,
)

RULES = alert_rules()
NAMES = [r["alert"] for r in RULES]
SEVERITIES = {"critical", "warning", "info"}
DURATION = re.compile(r"^\d+[smhd]$")


# --- the checker itself: it must catch what it is there to catch ---------------------


CHECKER_CASES = [
    ("ok", 'sum by (destination_service) (rate(lepton_requests_total{reporter="source"}[5m]))', []),
    ("ok histogram", "histogram_quantile(0.9, sum by (le) (rate(lepton_request_duration_milliseconds_bucket[5m])))", []),
    ("ok target label", 'lepton_control_etcd_up{instance="a"} == 0', []),
    ("typo in a name", "rate(lepton_request_total[5m])", ["lepton_request_total: no such series in what the code exports"]),
    ("histogram family without suffix", "lepton_request_duration_milliseconds", ["lepton_request_duration_milliseconds: no such series in what the code exports"]),
    ("label the series lacks", 'lepton_circuit_open{service="x"}', ["lepton_circuit_open: no label 'service'"]),
    ("grouping by a missing label", "sum by (service) (lepton_circuit_open)", ["grouping label 'service'"]),
    ("matching on a missing label", "lepton_circuit_open / on (pod) lepton_retry_budget_available", ["grouping label 'pod'"]),
    ("no samples", "lepton_mirror_requests_total", ["lepton_mirror_requests_total: no samples in the scrapes"]),
    ("syntax", "sum(rate(lepton_requests_total[5m])", ["does not parse"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("expr", "expected"), [c[1:] for c in CHECKER_CASES], ids=[c[0] for c in CHECKER_CASES]
)
def test_the_checker_finds_unknown_names_and_labels(
    expr: str, expected: list[str], exported: Exported, target_labels: frozenset[str]
) -> None:
    problems = check_expr(expr, exported, target_labels)
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problems


OUTPUT_CASES = [
    ("sum by (a, b) (x)", {"a", "b"}),
    ("sum without (reporter) (lepton_requests_total)", {"destination_service", "response_code", "response_flags", "source_workload", "job", "instance"}),
    ("histogram_quantile(0.99, sum by (destination_service, le) (rate(lepton_request_duration_milliseconds_bucket[5m])))", {"destination_service"}),
    ("lepton_identity_cert_expiration_timestamp_seconds - time() < 6 * 3600", {"job", "instance"}),
    ("sum by (a) (x) / on (a) group_left (b) sum by (a, b) (y)", {"a", "b"}),
    ("max by (a, b) (x) > 0 or sum by (a) (y) > 0", {"a"}),
    ("sum(x) == 0", set()),
]  # fmt: skip


@pytest.mark.parametrize(("expr", "labels"), OUTPUT_CASES)
def test_the_checker_knows_which_labels_a_result_keeps(
    expr: str, labels: set[str], exported: Exported, target_labels: frozenset[str]
) -> None:
    assert output_labels(expr, exported, target_labels) == labels


# --- the file's shape --------------------------------------------------------------------


def test_groups_and_rules_have_the_required_fields() -> None:
    doc = load_yaml(ALERTS)
    assert set(doc) == {"groups"}
    groups = doc["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert set(group) == {"name", "rules"}, group["name"]
        assert group["rules"], group["name"]
    assert len(set(NAMES)) == len(NAMES)
    for rule in RULES:
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"Lepton[A-Z][A-Za-z0-9]+", name), rule
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert DURATION.match(rule["for"]), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert all(isinstance(v, str) and v.strip() for v in notes.values()), name


def test_every_runbook_link_is_a_section_of_the_monitoring_doc() -> None:
    anchors = doc_anchors(MONITORING_DOC)
    for rule in RULES:
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/monitoring.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/monitoring.md has no section {rule['alert']}"


# What the issue asks for, and the series each must be built on.
REQUIRED = [
    ("LeptonHighErrorRate", {"lepton_requests_total"}, ['reporter="destination"', 'response_code=~"5.."']),
    ("LeptonHighErrorRateSeenByCallers", {"lepton_requests_total"}, ['reporter="source"', 'response_code=~"5.."']),
    ("LeptonHighLatencyP99", {"lepton_request_duration_milliseconds_bucket", "lepton_requests_total"}, ["histogram_quantile(0.99"]),
    ("LeptonCircuitBreakerOpen", {"lepton_circuit_open", "lepton_circuit_overflows_total"}, []),
    ("LeptonEndpointsEjected", {"lepton_endpoint_ejected", "lepton_outlier_ejections_total"}, []),
    ("LeptonWorkloadCertificateExpiringSoon", {"lepton_identity_cert_expiration_timestamp_seconds"}, ["time() < 6 * 3600"]),
    ("LeptonSidecarNotAckingConfig", {"lepton_control_sidecar_ack_lag_seconds"}, []),
    ("LeptonControlEtcdUnreachable", {"lepton_control_etcd_up"}, ["== 0"]),
]  # fmt: skip


@pytest.mark.parametrize(("alert", "series", "fragments"), REQUIRED, ids=[r[0] for r in REQUIRED])
def test_the_alerts_the_issue_asks_for_are_there(
    alert: str, series: set[str], fragments: list[str]
) -> None:
    (rule,) = [r for r in RULES if r["alert"] == alert]
    assert metric_names(rule["expr"]) == series
    for fragment in fragments:
        assert fragment in rule["expr"], fragment


# --- names and labels against the real exports -----------------------------------------


@pytest.mark.parametrize("rule", RULES, ids=NAMES)
def test_every_expression_uses_only_exported_series_and_labels(
    rule: dict, exported: Exported, target_labels: frozenset[str]
) -> None:
    assert check_expr(rule["expr"], exported, target_labels) == []


@pytest.mark.parametrize("rule", RULES, ids=NAMES)
def test_annotations_read_only_labels_the_alert_has(
    rule: dict, exported: Exported, target_labels: frozenset[str]
) -> None:
    have = output_labels(rule["expr"], exported, target_labels)
    for field, text in rule["annotations"].items():
        missing = template_labels(text) - have
        assert not missing, f"{field} reads {sorted(missing)}; the result has {sorted(have)}"


def test_job_matchers_name_jobs_every_scrape_config_has() -> None:
    for path in SCRAPE_CONFIGS:
        assert set(scrape_target_labels(load_yaml(path))) == set(JOBS), path.name
    for rule in RULES:
        for sel in selectors(pq.parse(rule["expr"])):
            for m in sel.matchers.matchers:
                if m.name == "job":
                    assert m.op == pq.MatchOp.Equal and m.value in JOBS, rule["alert"]


def test_scrape_configs_never_shadow_a_metric_label(exported: Exported) -> None:
    """A target label named like a metric label would rename the metric's (to exported_x)."""
    metric_labels = set().union(*(s.labels or () for s in exported.values()))
    for path in SCRAPE_CONFIGS:
        for job, labels in scrape_target_labels(load_yaml(path)).items():
            assert not labels & metric_labels, (
                f"{path.name} {job}: {sorted(labels & metric_labels)}"
            )


# --- the promtool unit tests: their input is real, and every alert is tested --------------


def _unit_tests() -> list[dict]:
    doc = load_yaml(ALERTS_TEST)
    assert doc["rule_files"] == ["alerts.yml"]
    return doc["tests"]


def test_unit_test_series_are_named_and_labelled_as_exported(
    exported: Exported, target_labels: frozenset[str]
) -> None:
    for case in _unit_tests():
        for item in case["input_series"]:
            assert check_expr(item["series"], exported, target_labels) == [], item["series"]


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    fired = {
        t["alertname"] for case in _unit_tests() for t in case["alert_rule_test"] if t["exp_alerts"]
    }
    assert fired == set(NAMES)


@pytest.mark.skipif(promtool() is None, reason="promtool is not on PATH (it is not on PyPI)")
def test_promtool_checks_the_rules() -> None:
    result = run_promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rules found" in result.stdout


@pytest.mark.skipif(promtool() is None, reason="promtool is not on PATH (it is not on PyPI)")
def test_promtool_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_file_is_plain_yaml_without_anchors() -> None:
    """No anchors or aliases: every rule reads on its own (and Prometheus' loader and
    PyYAML agree on what the file says)."""
    text = ALERTS.read_text()
    events = list(yaml.parse(text))
    assert not any(getattr(e, "anchor", None) for e in events)
    assert not any(isinstance(e, yaml.AliasEvent) for e in events)
