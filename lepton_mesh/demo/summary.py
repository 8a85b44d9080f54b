"""Turn the sidecars' own Prometheus metrics into the demo's summary table.

The numbers come from each sidecar's admin `GET /metrics`, parsed with
prometheus-client's parser, never from the demo's own bookkeeping: the point
is to show what the mesh reports. Latency quantiles are estimated from
histogram buckets exactly as Prometheus's `histogram_quantile` does, so the
table matches what a dashboard over the same scrape would show.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

REQUESTS = "lepton_requests_total"
DURATION = "lepton_request_duration_milliseconds"
NO_FLAGS = ("", "-")


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs.

    Prometheus's rules (promql/quantile.go, bucketQuantile): linear
    interpolation inside the bucket holding rank q * total; the lowest bucket
    starts at 0 when its bound is positive (else its bound is the answer); a
    rank in the +Inf bucket answers the highest finite bound; NaN without a
    +Inf bucket, with fewer than two buckets, or with no observations; -Inf /
    +Inf for q below 0 / above 1. Equal bounds are merged and counts made
    monotonic first. (Prometheus also evens out float rounding in counts;
    counts from one scrape are integers, so that step is left out.)
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(buckets, key=lambda b: b[0])
    if not ordered or not math.isinf(ordered[-1][0]):
        return math.nan
    merged = _monotonic(_coalesce(ordered))
    if len(merged) < 2:
        return math.nan
    total = merged[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    # First finite bucket whose cumulative count reaches the rank; else the +Inf one.
    b = next((i for i, (_, c) in enumerate(merged[:-1]) if c >= rank), len(merged) - 1)
    if b == len(merged) - 1:
        return merged[-2][0]
    if b == 0 and merged[0][0] <= 0:
        return merged[0][0]
    start, end, count = 0.0, merged[b][0], merged[b][1]
    if b > 0:
        start = merged[b - 1][0]
        count -= merged[b - 1][1]
        rank -= merged[b - 1][1]
    if count == 0:  # q == 0 over an empty lowest bucket: 0/0, NaN as in Go
        return math.nan
    return start + (end - start) * (rank / count)


def _coalesce(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for le, count in buckets:
        if out and out[-1][0] == le:
            out[-1] = (le, out[-1][1] + count)
        else:
            out.append((le, count))
    return out


def _monotonic(buckets: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, peak = [], -math.inf
    for le, count in buckets:
        peak = max(peak, count)
        out.append((le, peak))
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """One sidecar's view of one (reporter, source, destination) pair."""

    sidecar: str
    reporter: str
    source: str
    destination: str
    requests: int
    codes: tuple[tuple[str, int], ...]  # (response_code, count), by code
    flags: tuple[tuple[str, int], ...]  # (reason code, count), by reason; no "-"
    p50_ms: float
    p99_ms: float

    def count(self, code: str) -> int:
        return dict(self.codes).get(code, 0)


GroupKey = tuple[str, str, str]  # reporter, source_workload, destination_service


def rows_from_metrics(sidecar: str, text: str) -> list[Row]:
    """Summarize one sidecar's exposition text, one Row per group, in a stable order.

    Buckets of all series in a group are summed per bound before the quantile,
    like `histogram_quantile(q, sum by (le) (...))`.
    """
    totals: dict[GroupKey, int] = Counter()
    codes: dict[GroupKey, Counter[str]] = defaultdict(Counter)
    flags: dict[GroupKey, Counter[str]] = defaultdict(Counter)
    buckets: dict[GroupKey, Counter[float]] = defaultdict(Counter)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (
                s.labels.get("reporter", ""),
                s.labels.get("source_workload", ""),
                s.labels.get("destination_service", ""),
            )
            if s.name == REQUESTS:
                n = int(s.value)
                totals[key] += n
                codes[key][s.labels.get("response_code", "")] += n
                if (flag := s.labels.get("response_flags", "-")) not in NO_FLAGS:
                    flags[key][flag] += n
            elif s.name == f"{DURATION}_bucket":
                buckets[key][float(s.labels["le"])] += s.value
    rows = []
    for key in sorted(totals, key=_group_order):
        reporter, source, destination = key
        hist = list(buckets[key].items())
        rows.append(
            Row(
                sidecar=sidecar,
                reporter=reporter,
                source=source,
                destination=destination,
                requests=totals[key],
                codes=tuple(sorted(codes[key].items())),
                flags=tuple(sorted(flags[key].items())),
                p50_ms=histogram_quantile(0.5, hist),
                p99_ms=histogram_quantile(0.99, hist),
            )
        )
    return rows


def _group_order(key: GroupKey) -> tuple[int, str, str]:
    # Inbound (destination) first: it reads in the order the request travels.
    reporter, source, destination = key
    return (0 if reporter == "destination" else 1, destination, source)


# -- rendering ---------------------------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    """Columns padded to their widest cell, two spaces apart; `numeric` right-aligned."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def fmt_counts(pairs: Sequence[tuple[str, int]]) -> str:
    return " ".join(f"{k}:{n}" for k, n in pairs) or "-"


SIDECAR_HEADER = (
    "SIDECAR",
    "REPORTER",
    "SOURCE",
    "DESTINATION",
    "REQUESTS",
    "CODES",
    "REASONS",
    "P50 ms",
    "P99 ms",
)


def sidecar_table(rows: Sequence[Row]) -> str:
    cells = [
        (
            r.sidecar,
            r.reporter,
            r.source,
            r.destination,
            str(r.requests),
            fmt_counts(r.codes),
            " ".join(flag for flag, _ in r.flags) or "-",
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
        )
        for r in rows
    ]
    return format_table(SIDECAR_HEADER, cells, numeric={4, 7, 8})
