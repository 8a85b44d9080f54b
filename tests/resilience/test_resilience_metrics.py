"""Resilience metrics: pulled from one source at scrape time; mirror counted on the hot path."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from resilience_support import FakeClock, FakeLoop

from lepton_mesh.policy.sidecar_config import Address
from lepton_mesh.policy.traffic import CircuitLimits, OutlierDetection
from lepton_mesh.policy.traffic import RetryBudget as BudgetConfig
from lepton_mesh.proxy.observe.metrics import ProxyMetrics, ResilienceRow, resilience_row
from lepton_mesh.proxy.outbound.endpoints import EndpointState
from lepton_mesh.proxy.resilience.circuit import CircuitBreaker
from lepton_mesh.proxy.resilience.outlier import OutlierDetector
from lepton_mesh.proxy.resilience.retry_budget import RetryBudget

RESILIENCE_FAMILIES = (
    "lepton_outlier_ejections",
    "lepton_endpoint_ejected",
    "lepton_circuit_open",
    "lepton_circuit_overflows",
    "lepton_retries",
    "lepton_retry_budget_available",
)


def scrape(m: ProxyMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text, _ = m.render()
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text.decode())
    }


ROW = ResilienceRow(
    destination_service="dialog.default",
    ejections_total=3,
    endpoints=[("10.0.0.1:80", True), ("10.0.0.2:80", False)],
    circuit=[
        ("connections", False, 0),
        ("pending", False, 4),
        ("requests", True, 17),
        ("retries", False, 2),
    ],
    retries_attempted=40,
    retries_budget_exhausted=9,
    retries_limit=2,
    budget_available=12,
)


def test_every_resilience_family_from_one_row() -> None:
    m = ProxyMetrics()
    m.set_resilience_source(lambda: [ROW])
    got = scrape(m)
    svc = {"destination_service": "dialog.default"}
    assert got["lepton_outlier_ejections"] == [("lepton_outlier_ejections_total", svc, 3.0)]
    assert got["lepton_endpoint_ejected"] == [
        ("lepton_endpoint_ejected", {**svc, "endpoint": "10.0.0.1:80"}, 1.0),
        ("lepton_endpoint_ejected", {**svc, "endpoint": "10.0.0.2:80"}, 0.0),
    ]
    assert got["lepton_circuit_open"] == [
        ("lepton_circuit_open", {**svc, "limit": limit}, value)
        for limit, value in [("connections", 0), ("pending", 0), ("requests", 1), ("retries", 0)]
    ]
    assert got["lepton_circuit_overflows"] == [
        ("lepton_circuit_overflows_total", {**svc, "limit": limit}, value)
        for limit, value in [("connections", 0), ("pending", 4), ("requests", 17), ("retries", 2)]
    ]
    assert got["lepton_retries"] == [
        ("lepton_retries_total", {**svc, "outcome": outcome}, value)
        for outcome, value in [("attempted", 40), ("budget_exhausted", 9), ("limit", 2)]
    ]
    assert got["lepton_retry_budget_available"] == [("lepton_retry_budget_available", svc, 12.0)]


def test_a_plain_tuple_row_works_and_the_source_is_pulled_on_every_scrape() -> None:
    m = ProxyMetrics()
    rows: list[tuple] = []
    m.set_resilience_source(lambda: rows)
    assert all(scrape(m)[name] == [] for name in RESILIENCE_FAMILIES)
    rows.append(("a", 1, (), (), 0, 0, 0, 0.0))
    rows.append(tuple(ROW))
    got = scrape(m)
    assert [lbl["destination_service"] for _, lbl, _ in got["lepton_outlier_ejections"]] == [
        "a",
        "dialog.default",
    ]


def test_rows_built_from_the_live_objects() -> None:
    loop = FakeLoop(0.0)
    clock = FakeClock()
    breaker = CircuitBreaker(CircuitLimits(max_requests=1, max_retries=1))
    budget = RetryBudget(BudgetConfig(percent=50.0, min_per_second=0.0, window=10.0), clock=clock)
    detector = OutlierDetector(OutlierDetection(consecutive_5xx=1), loop)
    eps = [EndpointState(Address("10.0.0.1", 80)), EndpointState(Address("::1", 81))]
    detector.set_endpoints(eps)

    assert breaker.try_acquire_request()
    assert not breaker.try_acquire_request()
    for _ in range(4):
        budget.record_request()
    assert breaker.try_acquire_retry() and budget.try_retry()
    assert not breaker.try_acquire_retry()  # limit
    breaker.release_retry()
    assert breaker.try_acquire_retry() and budget.try_retry()
    breaker.release_retry()
    assert breaker.try_acquire_retry() and not budget.try_retry()  # budget exhausted
    breaker.release_retry()
    detector.report(eps[1], "gateway")

    row = resilience_row("dialog.default", breaker, budget, detector)
    assert row == ResilienceRow(
        "dialog.default",
        1,
        [("10.0.0.1:80", False), ("[::1]:81", True)],
        [
            ("connections", False, 0),
            ("pending", False, 0),
            ("requests", True, 1),
            ("retries", False, 1),
        ],
        2,
        1,
        1,
        0,
    )
    no_detector = resilience_row("x", breaker, budget)
    assert (no_detector.ejections_total, list(no_detector.endpoints)) == (0, [])

    m = ProxyMetrics()
    m.set_resilience_source(lambda: [row])
    retries = {lbl["outcome"]: v for _, lbl, v in scrape(m)["lepton_retries"]}
    assert retries == {"attempted": 2.0, "budget_exhausted": 1.0, "limit": 1.0}


def test_a_bad_row_costs_only_the_resilience_families(caplog: pytest.LogCaptureFixture) -> None:
    m = ProxyMetrics()
    m.observe_request("source", "frontend", "dialog.default", 200, "-", 0.001, 0, 0)
    m.observe_mirror("dialog.default", "sent")
    m.set_resilience_source(lambda: [ROW, ("short", 1)])
    with caplog.at_level(logging.ERROR, logger="lepton_mesh.proxy.observe.metrics"):
        got = scrape(m)
    assert all(got[name] == [] for name in RESILIENCE_FAMILIES)
    assert got["lepton_requests"][0][2] == 1.0
    assert got["lepton_mirror_requests"][0][2] == 1.0
    assert "resilience source" in caplog.text


def test_a_failing_source_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    m = ProxyMetrics()

    def broken() -> list[ResilienceRow]:
        raise RuntimeError("gone")

    m.set_resilience_source(broken)
    with caplog.at_level(logging.ERROR, logger="lepton_mesh.proxy.observe.metrics"):
        got = scrape(m)
    assert all(got[name] == [] for name in RESILIENCE_FAMILIES)
    assert "resilience source failed" in caplog.text


def test_mirror_requests_are_counted_per_service_and_outcome() -> None:
    m = ProxyMetrics()
    for outcome in ("sent", "sent", "failed", "dropped", "sent"):
        m.observe_mirror("dialog.default", outcome)
    m.observe_mirror("intent.default", "sent")
    got = {
        (lbl["destination_service"], lbl["outcome"]): v
        for _, lbl, v in scrape(m)["lepton_mirror_requests"]
    }
    assert got == {
        ("dialog.default", "sent"): 3.0,
        ("dialog.default", "failed"): 1.0,
        ("dialog.default", "dropped"): 1.0,
        ("intent.default", "sent"): 1.0,
    }


def test_mirror_label_overflow_is_folded_and_counted() -> None:
    m = ProxyMetrics(max_series=2)
    m.observe_mirror("a", "sent")
    overflow = {lbl["table"]: v for _, lbl, v in scrape(m)["lepton_metrics_label_overflow"]}
    assert "mirror" not in overflow  # appears on the first fold
    m.observe_mirror("b", "sent")
    m.observe_mirror("c", "sent")  # folded
    m.observe_mirror("d", "sent")  # folded into the same series
    m.observe_mirror("a", "sent")  # known
    got = scrape(m)
    by_key = {
        (lbl["destination_service"], lbl["outcome"]): v
        for _, lbl, v in got["lepton_mirror_requests"]
    }
    assert by_key == {("a", "sent"): 2.0, ("b", "sent"): 1.0, ("overflow", "sent"): 2.0}
    overflow = {lbl["table"]: v for _, lbl, v in got["lepton_metrics_label_overflow"]}
    assert overflow == {"requests": 0.0, "tcp": 0.0, "mirror": 2.0}


def test_render_matches_prometheus_client_exposition() -> None:
    m = ProxyMetrics()
    m.set_resilience_source(
        lambda: [ROW, ('we"ird\\svc', 0, [("[::1]:1", True)], (), 0, 0, 0, 1.5)]
    )
    m.observe_mirror("dialog.default", "sent")
    ours = list(text_string_to_metric_families(m.render()[0].decode()))
    theirs = list(text_string_to_metric_families(generate_latest(m.registry).decode()))
    assert ours == theirs
    assert {f.name for f in ours} >= {*RESILIENCE_FAMILIES, "lepton_mirror_requests"}
