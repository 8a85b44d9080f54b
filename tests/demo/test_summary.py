"""The summary rows and table, from a sidecar's exposition text."""

import math
from collections import Counter

import pytest

from lepton_mesh.demo.summary import (
    Row,
    Series,
    ServiceStats,
    Split,
    delta,
    format_table,
    rows_from_metrics,
    service_stats,
    sidecar_table,
    split_text,
    tick_line,
)

LABELS_200 = (
    'reporter="destination",source_workload="unknown",destination_service="chat",'
    'response_code="200",response_flags="-"'
)
LABELS_503 = (
    'reporter="destination",source_workload="unknown",destination_service="chat",'
    'response_code="503",response_flags="upstream_connect_failed"'
)
LABELS_OUT = (
    'reporter="source",source_workload="chat",destination_service="intent",'
    'response_code="200",response_flags="-"'
)
LABELS_NR = (
    'reporter="source",source_workload="chat",destination_service="weather",'
    'response_code="404",response_flags="no_route"'
)


def _hist(labels: str, buckets: list[tuple[str, int]], total: float) -> str:
    lines = [
        f'lepton_request_duration_milliseconds_bucket{{{labels},le="{le}"}} {n}'
        for le, n in buckets
    ]
    lines.append(f"lepton_request_duration_milliseconds_count{{{labels}}} {buckets[-1][1]}")
    lines.append(f"lepton_request_duration_milliseconds_sum{{{labels}}} {total}")
    return "\n".join(lines)


EXPOSITION = "\n".join(
    [
        "# HELP lepton_requests_total Requests handled by the sidecar.",
        "# TYPE lepton_requests_total counter",
        f"lepton_requests_total{{{LABELS_200}}} 30.0",
        f"lepton_requests_total{{{LABELS_503}}} 10.0",
        f"lepton_requests_total{{{LABELS_OUT}}} 30.0",
        f"lepton_requests_total{{{LABELS_NR}}} 1.0",
        "# HELP lepton_request_duration_milliseconds Request duration.",
        "# TYPE lepton_request_duration_milliseconds histogram",
        # Summed per bound over both inbound series: 1:10, 2:20, 4:40, +Inf:40.
        _hist(LABELS_200, [("1.0", 10), ("2.0", 10), ("4.0", 30), ("+Inf", 30)], 60.0),
        _hist(LABELS_503, [("1.0", 0), ("2.0", 10), ("4.0", 10), ("+Inf", 10)], 15.0),
        _hist(LABELS_OUT, [("1.0", 30), ("2.0", 30), ("4.0", 30), ("+Inf", 30)], 15.0),
        _hist(LABELS_NR, [("1.0", 1), ("2.0", 1), ("4.0", 1), ("+Inf", 1)], 0.1),
        "# TYPE lepton_downstream_connections_active gauge",
        'lepton_downstream_connections_active{listener="inbound"} 3.0',
        "",
    ]
)


def test_rows_group_by_reporter_source_destination() -> None:
    rows = rows_from_metrics("chat", EXPOSITION)
    assert rows == [
        Row("chat", "destination", "unknown", "chat", 40,
            codes=(("200", 30), ("503", 10)), flags=(("upstream_connect_failed", 10),),
            p50_ms=2.0, p99_ms=3.96),
        Row("chat", "source", "chat", "intent", 30,
            codes=(("200", 30),), flags=(), p50_ms=0.5, p99_ms=0.99),
        Row("chat", "source", "chat", "weather", 1,
            codes=(("404", 1),), flags=(("no_route", 1),), p50_ms=0.5, p99_ms=0.99),
    ]  # fmt: skip


def test_rows_of_an_idle_sidecar() -> None:
    assert rows_from_metrics("intent", "# TYPE lepton_requests_total counter\n") == []


def test_table_aligns_columns() -> None:
    table = format_table(("NAME", "N"), [("a", "1"), ("long-name", "123")], numeric={1})
    assert table.splitlines() == [
        "NAME         N",
        "---------  ---",
        "a            1",
        "long-name  123",
    ]


def test_sidecar_table_shows_codes_and_reasons() -> None:
    row = Row("chat", "source", "chat", "weather", 1, (("404", 1),), (("no_route", 1),),
              math.nan, math.nan)  # fmt: skip
    lines = sidecar_table([row]).splitlines()
    assert lines[2].split() == [
        "chat", "source", "chat", "weather", "1", "404:1", "no_route", "-", "-",
    ]  # fmt: skip


def _scrape(code_counts: dict[str, int], buckets: list[tuple[float, int]], reporter="destination"):
    """A one-group scrape: `chat` calling `dialog`, as the dialog sidecar would see it."""
    return {
        (reporter, "chat", "dialog"): Series(
            codes=Counter(code_counts), buckets=Counter(dict(buckets))
        )
    }


INF = math.inf


def test_delta_is_per_group_and_keeps_empty_lower_buckets() -> None:
    before = _scrape({"200": 10}, [(1.0, 10), (5.0, 10), (10.0, 10), (INF, 10)])
    after = _scrape({"200": 30, "503": 2}, [(1.0, 10), (5.0, 20), (10.0, 32), (INF, 32)])
    d = delta(after, before)
    series = d[("destination", "chat", "dialog")]
    assert series.codes == Counter({"200": 20, "503": 2})
    # The 1 ms bucket grew by 0 and stays: interpolation in (1, 5] starts at 1, not 0.
    assert series.buckets == Counter({1.0: 0, 5.0: 10, 10.0: 22, INF: 22})
    assert series.quantile_ms(0.25) == pytest.approx(1 + 4 * 5.5 / 10)
    assert delta(before, before) == {}  # nothing new: no group


def test_service_stats_sum_instances_inbound_only() -> None:
    v1 = _scrape({"200": 80, "404": 5}, [(1.0, 40), (5.0, 85), (INF, 85)])
    v2 = _scrape({"200": 10, "503": 5}, [(1.0, 5), (5.0, 15), (INF, 15)])
    # What a sidecar counted as a caller (reporter=source) is not its service's traffic.
    v2 |= _scrape({"200": 999}, [(1.0, 999), (INF, 999)], reporter="source")
    stats = service_stats("dialog", {"dialog-v1": v1, "dialog-v2": v2}, elapsed_s=2.0)
    assert stats == ServiceStats(
        service="dialog",
        instances=("dialog-v1", "dialog-v2"),
        requests=100,
        per_s=50.0,
        success=0.95,  # 5xx fail, a 404 is the caller's problem
        p99_ms=pytest.approx(1 + 4 * (99 - 45) / 55),
    )


def test_service_stats_without_traffic() -> None:
    stats = service_stats("intent", {"intent": {}}, elapsed_s=1.0)
    assert (stats.requests, stats.per_s) == (0, 0.0)
    assert math.isnan(stats.success) and math.isnan(stats.p99_ms)


def test_split_shares_and_its_text() -> None:
    split = Split((("v1", 903), ("v2", 97)))
    assert (split.total, split.share("v1"), split.share("v3")) == (1000, 0.903, 0.0)
    assert split_text(split) == "v1 903 (90.3%)  v2 97 (9.7%)"
    assert math.isnan(Split((("v1", 0), ("v2", 0))).share("v1"))


def test_tick_line() -> None:
    stats = [ServiceStats("chat", ("chat",), 300, 99.6, 1.0, 24.7),
             ServiceStats("dialog", ("dialog-v1", "dialog-v2"), 300, 99.6, 0.5, math.nan)]  # fmt: skip
    line = tick_line(2.04, stats, Split((("v1", 270), ("v2", 30))))
    assert line == (
        "  2.0 s  chat 100/s 100.0%  24.7 ms | dialog 100/s  50.0%     - ms | v1  90.0% v2  10.0%"
    )
