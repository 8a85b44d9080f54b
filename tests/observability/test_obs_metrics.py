"""ProxyMetrics: what a scrape says, parsed back with prometheus-client's parser."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lepton_mesh.proxy.observe.metrics import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    ProxyMetrics,
)

REQ = ("destination", "frontend", "ratings.default")


def scrape(m: ProxyMetrics) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """family name -> [(sample name, labels, value)], from the rendered text."""
    text, content_type = m.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {
        f.name: [(s.name, s.labels, s.value) for s in f.samples]
        for f in text_string_to_metric_families(text.decode())
    }


def samples(m: ProxyMetrics, name: str, **labels: str) -> dict[str, float]:
    """`{sample name or le: value}` for one family's samples matching `labels`."""
    family = name.removesuffix("_total")
    out = {}
    for sample, lbl, value in scrape(m)[family]:
        if all(lbl.get(k) == v for k, v in labels.items()):
            key = lbl.get("le", sample)
            assert key not in out, f"two samples for {key} with {labels}"
            out[key] = value
    return out


def les(buckets: tuple[float, ...]) -> list[str]:
    from prometheus_client.utils import floatToGoString

    return [floatToGoString(b) for b in buckets] + ["+Inf"]


def expect_one_in(buckets: tuple[float, ...], le: str) -> dict[str, float]:
    """Cumulative bucket counts for a single observation that lands in `le`."""
    names = les(buckets)
    at = names.index(le)
    return {n: float(i >= at) for i, n in enumerate(names)}


@pytest.mark.parametrize(
    ("duration_s", "le"),
    [
        (0.0, "0.5"),
        (0.0005, "0.5"),  # on a bound: le means "less or equal"
        (0.0006, "1.0"),
        (0.001, "1.0"),
        (0.0011, "5.0"),
        (0.042, "50.0"),
        (1.0, "1000.0"),
        (1800.0, "1.8e+06"),
        (3600.0, "3.6e+06"),
        (3600.5, "+Inf"),
    ],
)
def test_duration_lands_in_its_bucket(duration_s: float, le: str) -> None:
    m = ProxyMetrics()
    m.observe_request(*REQ, 200, "-", duration_s, 0, 0)
    got = samples(m, "lepton_request_duration_milliseconds")
    buckets = {k: v for k, v in got.items() if not k.startswith("lepton_")}
    assert buckets == expect_one_in(DURATION_BUCKETS_MS, le)
    assert got["lepton_request_duration_milliseconds_count"] == 1
    assert got["lepton_request_duration_milliseconds_sum"] == pytest.approx(duration_s * 1000)


@pytest.mark.parametrize(
    ("size", "le"),
    [
        (0, "1.0"),
        (1, "1.0"),
        (2, "10.0"),
        (10, "10.0"),
        (11, "100.0"),
        (999_999, "1e+06"),
        (10**9, "1e+09"),
        (10**9 + 1, "+Inf"),
    ],
)
def test_sizes_land_in_their_buckets(size: int, le: str) -> None:
    m = ProxyMetrics()
    m.observe_request(*REQ, 200, "-", 0.001, size, size)
    for name in ("lepton_request_bytes", "lepton_response_bytes"):
        got = samples(m, name)
        buckets = {k: v for k, v in got.items() if not k.startswith("lepton_")}
        assert buckets == expect_one_in(BYTES_BUCKETS, le)
        assert got[f"{name}_sum"] == size
        assert got[f"{name}_count"] == 1


def test_scrape_counts_sums_and_labels_exactly() -> None:
    m = ProxyMetrics()
    for duration in (0.002, 0.003, 0.2):
        m.observe_request("destination", "frontend", "ratings.default", 200, "-", duration, 10, 500)
    m.observe_request("source", "frontend", "reviews.default", 503, "upstream_reset", 0.03, 0, 91)

    got = scrape(m)
    assert got["lepton_requests"] == [  # in order of first sight
        (
            "lepton_requests_total",
            {
                "reporter": "destination",
                "source_workload": "frontend",
                "destination_service": "ratings.default",
                "response_code": "200",
                "response_flags": "-",
            },
            3.0,
        ),
        (
            "lepton_requests_total",
            {
                "reporter": "source",
                "source_workload": "frontend",
                "destination_service": "reviews.default",
                "response_code": "503",
                "response_flags": "upstream_reset",
            },
            1.0,
        ),
    ]
    ok = samples(m, "lepton_request_duration_milliseconds", destination_service="ratings.default")
    assert ok == {
        **dict(zip(les(DURATION_BUCKETS_MS), [0, 0, 2, 2, 2, 2, 2, 3] + [3] * 12, strict=True)),
        "lepton_request_duration_milliseconds_count": 3,
        "lepton_request_duration_milliseconds_sum": pytest.approx(205.0),
    }
    failed = samples(m, "lepton_request_duration_milliseconds", response_flags="upstream_reset")
    assert failed["50.0"] == 1 and failed["25.0"] == 0
    assert samples(m, "lepton_response_bytes", response_code="200")[
        "lepton_response_bytes_sum"
    ] == (1500)


def test_every_histogram_is_well_formed() -> None:
    m = ProxyMetrics()
    for i in range(50):
        m.observe_request(*REQ, 200 + i % 3, "-", i * 0.37, i**5, i**6)
    for family in text_string_to_metric_families(m.render()[0].decode()):
        if family.type != "histogram":
            continue
        by_series: dict[tuple, dict[str, float]] = {}
        for s in family.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            by_series.setdefault(key, {})[s.labels.get("le", s.name)] = s.value
        for series in by_series.values():
            bucket_values = [v for k, v in series.items() if not k.startswith("lepton_")]
            assert bucket_values == sorted(bucket_values), "buckets must be cumulative"
            assert series["+Inf"] == series[f"{family.name}_count"]


def test_tcp_counters_follow_istio_direction() -> None:
    m = ProxyMetrics()
    m.tcp_opened("source", "frontend", "db.default")
    m.tcp_opened("source", "frontend", "db.default")
    m.tcp_closed("source", "frontend", "db.default", sent=100, received=7000)
    labels = {
        "reporter": "source",
        "source_workload": "frontend",
        "destination_service": "db.default",
    }
    got = scrape(m)
    assert got["lepton_tcp_connections_opened"] == [
        ("lepton_tcp_connections_opened_total", labels, 2.0)
    ]
    assert got["lepton_tcp_connections_closed"] == [
        ("lepton_tcp_connections_closed_total", labels, 1.0)
    ]
    # Istio: sent = during response (from the upstream), received = during request.
    assert got["lepton_tcp_sent_bytes"] == [("lepton_tcp_sent_bytes_total", labels, 7000.0)]
    assert got["lepton_tcp_received_bytes"] == [("lepton_tcp_received_bytes_total", labels, 100.0)]


def test_pool_and_listener_gauges_are_pulled_at_scrape_time() -> None:
    m = ProxyMetrics()
    rows = [("ratings.default", "10.0.0.1:9080", 3, 5, 0)]
    m.set_pool_source(lambda: rows)
    m.set_listener_source(lambda: [("outbound", 12), ("inbound", 4)])
    assert samples(m, "lepton_upstream_connections_active") == {
        "lepton_upstream_connections_active": 3
    }
    rows.append(("reviews.default", "10.0.0.2:9080", 0, 1, 7))
    got = scrape(m)
    assert got["lepton_upstream_connections_idle"] == [
        (
            "lepton_upstream_connections_idle",
            {"destination_service": "ratings.default", "endpoint": "10.0.0.1:9080"},
            5.0,
        ),
        (
            "lepton_upstream_connections_idle",
            {"destination_service": "reviews.default", "endpoint": "10.0.0.2:9080"},
            1.0,
        ),
    ]
    assert [v for _, _, v in got["lepton_upstream_requests_pending"]] == [0.0, 7.0]
    assert got["lepton_downstream_connections_active"] == [
        ("lepton_downstream_connections_active", {"listener": "outbound"}, 12.0),
        ("lepton_downstream_connections_active", {"listener": "inbound"}, 4.0),
    ]


def test_a_failing_source_costs_only_its_own_gauges(caplog: pytest.LogCaptureFixture) -> None:
    m = ProxyMetrics()
    m.observe_request(*REQ, 200, "-", 0.001, 0, 0)

    def broken() -> list:
        raise RuntimeError("pool is gone")

    m.set_pool_source(broken)
    m.set_listener_source(lambda: [("outbound", 1)])
    with caplog.at_level(logging.ERROR, logger="lepton_mesh.proxy.observe.metrics"):
        got = scrape(m)
    assert got["lepton_upstream_connections_active"] == []
    assert got["lepton_downstream_connections_active"][0][2] == 1.0
    assert got["lepton_requests"][0][2] == 1.0
    assert "pool source failed" in caplog.text


def test_label_overflow_folds_new_keys_and_counts_them() -> None:
    m = ProxyMetrics(max_series=2)
    m.observe_request("source", "frontend", "a", 200, "-", 0.001, 0, 0)
    m.observe_request("source", "frontend", "b", 200, "-", 0.001, 0, 0)
    m.observe_request("source", "frontend", "c", 200, "-", 0.001, 0, 0)  # folded
    m.observe_request("source", "frontend", "d", 200, "-", 0.001, 0, 0)  # folded, same key
    m.observe_request("source", "frontend", "a", 200, "-", 0.001, 0, 0)  # known: not folded
    m.tcp_opened("source", "frontend", "x")
    m.tcp_opened("source", "frontend", "y")
    m.tcp_opened("source", "frontend", "z")  # folded

    got = scrape(m)
    by_service = {lbl["destination_service"]: v for _, lbl, v in got["lepton_requests"]}
    assert by_service == {"a": 2.0, "b": 1.0, "overflow": 2.0}
    tcp = {lbl["destination_service"]: v for _, lbl, v in got["lepton_tcp_connections_opened"]}
    assert tcp == {"x": 1.0, "y": 1.0, "overflow": 1.0}
    overflow = {lbl["table"]: v for _, lbl, v in got["lepton_metrics_label_overflow"]}
    assert overflow == {"requests": 2.0, "tcp": 1.0}
    # The overflow series keeps the low-cardinality labels.
    (folded,) = [
        lbl for _, lbl, _ in got["lepton_requests"] if lbl["destination_service"] == "overflow"
    ]
    assert folded["response_code"] == "200" and folded["reporter"] == "source"


def test_render_matches_prometheus_client_exposition() -> None:
    """The hand-written text writer says exactly what generate_latest says."""
    m = ProxyMetrics(max_series=3)
    for i in range(5):
        m.observe_request(
            "destination", 'wei"rd\\work\nload', f"svc-{i}", 200, "-", i / 7, i * 333, 7
        )
    m.tcp_opened("source", "frontend", "db")
    m.tcp_closed("source", "frontend", "db", 3, 4)
    m.set_pool_source(lambda: [("svc", "[::1]:80", 1, 2, 3)])
    m.set_listener_source(lambda: [("outbound", 9)])

    ours = list(text_string_to_metric_families(m.render()[0].decode()))
    theirs = list(text_string_to_metric_families(generate_latest(m.registry).decode()))
    assert ours == theirs
    assert {f.name for f in ours} >= {
        "lepton_requests",
        "lepton_request_duration_milliseconds",
        "lepton_request_bytes",
        "lepton_response_bytes",
        "lepton_tcp_sent_bytes",
        "lepton_upstream_requests_pending",
        "lepton_downstream_connections_active",
        "lepton_metrics_label_overflow",
    }


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()
    a.observe_request(*REQ, 200, "-", 0.001, 0, 0)
    assert a.registry is not b.registry
    assert scrape(b)["lepton_requests"] == []


def test_max_series_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_series"):
        ProxyMetrics(max_series=0)


def test_callers_naming_themselves_cannot_grow_the_tables_without_bound() -> None:
    """source_workload on a plaintext inbound port is the caller's x-lepton-peer header:
    a new name per request must not add a series per request, even folded."""
    m = ProxyMetrics(max_series=10)
    for i in range(500):
        m.observe_request("destination", f"caller-{i}", "ratings", 200, "-", 0.001, 0, 0)
        m.tcp_opened("destination", f"caller-{i}", "db")
    got = scrape(m)
    requests = got["lepton_requests"]
    assert len(requests) <= 2 * 10 + 1
    assert sum(v for _, _, v in requests) == 500.0  # every request still counted once
    assert {"source_workload": "overflow", "destination_service": "overflow"}.items() <= (
        requests[-1][1].items()
    )
    tcp = got["lepton_tcp_connections_opened"]
    assert len(tcp) <= 2 * 10 + 1
    assert sum(v for _, _, v in tcp) == 500.0
    overflow = {lbl["table"]: v for _, lbl, v in got["lepton_metrics_label_overflow"]}
    assert overflow == {"requests": 490.0, "tcp": 490.0}
