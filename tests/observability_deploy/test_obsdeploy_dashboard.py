"""deploy/observability/grafana-dashboard.json: its shape, the panels the issue asks for,
and that every query uses only series and labels the code really exports."""

from __future__ import annotations

import re

import promql_parser as pq
import pytest
from obsdeploy_files import all_panels, dashboard, dashboard_targets, interpolate
from obsdeploy_promql import Exported, check_expr, metric_names, output_labels

BOARD = dashboard()
TARGETS = dashboard_targets(BOARD)
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_dashboard_is_a_current_grafana_dashboard() -> None:
    assert BOARD["schemaVersion"] >= 36
    assert BOARD["uid"] and BOARD["title"]
    panels = all_panels(BOARD)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"] and panel.get("description"), panel["title"]


def test_variables_pick_a_prometheus_and_services() -> None:
    variables = {v["name"]: v for v in BOARD["templating"]["list"]}
    assert set(variables) == {"datasource", "service"}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["type"] == "query" and service["datasource"] == DATASOURCE
    assert service["multi"] and service["includeAll"] and service["allValue"] == ".*"
    assert service["query"]["query"] == service["definition"]


def test_the_service_variable_lists_a_label_the_metric_has(exported: Exported) -> None:
    definition = BOARD["templating"]["list"][1]["definition"]
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", definition)
    assert m is not None, definition
    selector, label = m[1], m[2]
    assert check_expr(selector, exported, frozenset()) == []
    series = exported[metric_names(selector).pop()]
    assert series.labels is not None and label in series.labels


@pytest.mark.parametrize(
    ("title", "target"), TARGETS, ids=[f"{t}/{x['refId']}" for t, x in TARGETS]
)
def test_every_query_uses_only_exported_series_and_labels(
    title: str, target: dict, exported: Exported, target_labels: frozenset[str]
) -> None:
    assert target["datasource"] == DATASOURCE
    assert check_expr(interpolate(target["expr"]), exported, target_labels) == []


def test_every_query_follows_the_selected_services() -> None:
    """A panel about services filters on $service; only identity and control are mesh-wide."""
    for title, target in TARGETS:
        names = metric_names(interpolate(target["expr"]))
        mesh_wide = all(
            n.startswith(("lepton_control_", "lepton_tls_", "lepton_identity_")) for n in names
        )
        if not mesh_wide:
            assert 'destination_service=~"$service"' in target["expr"], title


def _uses(title: str) -> tuple[set[str], str]:
    targets = [t for t_title, t in TARGETS if t_title == title]
    assert targets, f"no panel {title!r}"
    exprs = [interpolate(t["expr"]) for t in targets]
    return set().union(*(metric_names(e) for e in exprs)), " ".join(exprs)


# Panel title -> the series it must read and fragments its queries must hold.
REQUIRED = [
    ("Request rate", {"lepton_requests_total"}, ["by (destination_service)", 'reporter="destination"']),
    ("Success rate", {"lepton_requests_total"}, ['response_code!~"5.."']),
    ("Latency p50 / p90 / p99", {"lepton_request_duration_milliseconds_bucket"}, ["histogram_quantile(0.5,", "histogram_quantile(0.9,", "histogram_quantile(0.99,"]),
    ("Requests per edge", {"lepton_requests_total"}, ["by (source_workload, destination_service)", 'reporter="source"']),
    ("Edges", {"lepton_requests_total", "lepton_request_duration_milliseconds_bucket"}, ["source_workload"]),
    ("Circuit breakers at their max", {"lepton_circuit_open"}, []),
    ("Ejected endpoints", {"lepton_endpoint_ejected", "lepton_outlier_ejections_total"}, []),
    ("Retries", {"lepton_retries_total"}, ["outcome"]),
]  # fmt: skip


@pytest.mark.parametrize(("title", "series", "fragments"), REQUIRED, ids=[r[0] for r in REQUIRED])
def test_the_panels_the_issue_asks_for_are_there(
    title: str, series: set[str], fragments: list[str]
) -> None:
    used, text = _uses(title)
    assert used == series
    for fragment in fragments:
        assert fragment in text, fragment


def test_legends_name_labels_the_query_keeps(
    exported: Exported, target_labels: frozenset[str]
) -> None:
    for title, target in TARGETS:
        if target.get("format") == "table":
            continue
        have = output_labels(interpolate(target["expr"]), exported, target_labels)
        used = set(re.findall(r"\{\{(\w+)\}\}", target["legendFormat"]))
        assert used <= have, f"{title}: legend reads {sorted(used - have)}"


def test_queries_parse_after_interpolation_only() -> None:
    """Queries hold Grafana variables; interpolated, each is valid PromQL."""
    for title, target in TARGETS:
        pq.parse(interpolate(target["expr"]))
        assert "$" not in interpolate(target["expr"]), title
