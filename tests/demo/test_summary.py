"""The summary rows and table, from a sidecar's exposition text."""

import math

from lepton_mesh.demo.summary import Row, format_table, rows_from_metrics, sidecar_table

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
