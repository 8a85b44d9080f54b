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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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


@dataclass(slots=True)
class Series:
    """One group's counters in one scrape.

    `codes` and `flags` come from the request counter; `buckets` are the
    duration histogram's cumulative counts by upper bound (ms), summed over
    every series of the group (`sum by (le)`).
    """

    codes: Counter[str] = field(default_factory=Counter)
    flags: Counter[str] = field(default_factory=Counter)
    buckets: Counter[float] = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.codes.values())

    def add(self, other: Series) -> None:
        self.codes.update(other.codes)
        self.flags.update(other.flags)
        self.buckets.update(other.buckets)

    def minus(self, earlier: Series) -> Series:
        """What happened between `earlier` and this scrape of the same counters.

        Counters only grow while a sidecar runs, so every difference is >= 0.
        Codes and reasons that did not grow are dropped; every bucket bound is
        kept, even at 0, because an empty lower bucket is where the
        interpolation of the next one starts.
        """
        buckets = Counter({le: n - earlier.buckets.get(le, 0) for le, n in self.buckets.items()})
        return Series(self.codes - earlier.codes, self.flags - earlier.flags, buckets)

    def quantile_ms(self, q: float) -> float:
        return histogram_quantile(q, list(self.buckets.items()))


Scrape = dict[GroupKey, Series]


def parse_metrics(text: str) -> Scrape:
    """One sidecar's exposition text, grouped by (reporter, source, destination)."""
    scrape: Scrape = defaultdict(Series)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (
                s.labels.get("reporter", ""),
                s.labels.get("source_workload", ""),
                s.labels.get("destination_service", ""),
            )
            if s.name == REQUESTS:
                n = int(s.value)
                scrape[key].codes[s.labels.get("response_code", "")] += n
                if (flag := s.labels.get("response_flags", "-")) not in NO_FLAGS:
                    scrape[key].flags[flag] += n
            elif s.name == f"{DURATION}_bucket":
                scrape[key].buckets[float(s.labels["le"])] += s.value
    return dict(scrape)


def delta(after: Scrape, before: Scrape) -> Scrape:
    """Per group, what `after` counted beyond `before` (groups with no new request dropped)."""
    out = {}
    for key, series in after.items():
        d = series.minus(before[key]) if key in before else series
        if d.requests:
            out[key] = d
    return out


def inbound(scrape: Scrape) -> Series:
    """Everything a sidecar's inbound listener served (reporter="destination")."""
    total = Series()
    for (reporter, _, _), series in scrape.items():
        if reporter == "destination":
            total.add(series)
    return total


def rows_from_metrics(sidecar: str, text: str) -> list[Row]:
    """Summarize one sidecar's exposition text, one Row per group, in a stable order.

    Buckets of all series in a group are summed per bound before the quantile,
    like `histogram_quantile(q, sum by (le) (...))`.
    """
    return rows_from_scrape(sidecar, parse_metrics(text))


def rows_from_scrape(sidecar: str, scrape: Scrape) -> list[Row]:
    rows = []
    for key in sorted(scrape, key=_group_order):
        reporter, source, destination = key
        series = scrape[key]
        rows.append(
            Row(
                sidecar=sidecar,
                reporter=reporter,
                source=source,
                destination=destination,
                requests=series.requests,
                codes=tuple(sorted(series.codes.items())),
                flags=tuple(sorted(series.flags.items())),
                p50_ms=series.quantile_ms(0.5),
                p99_ms=series.quantile_ms(0.99),
            )
        )
    return rows


# -- per service -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceStats:
    """One service over an interval, from its instances' inbound sidecar metrics.

    `success` is the share of responses below 500 (Linkerd's success rate:
    a 4xx is the caller's mistake, not the service failing); NaN without
    requests.
    """

    service: str
    instances: tuple[str, ...]
    requests: int
    per_s: float
    success: float
    p99_ms: float


def service_stats(service: str, instances: Mapping[str, Scrape], elapsed_s: float) -> ServiceStats:
    """Sum the inbound series of `service`'s instances (name -> interval scrape)."""
    total = Series()
    for scrape in instances.values():
        total.add(inbound(scrape))
    n = total.requests
    failed = sum(count for code, count in total.codes.items() if code[:1] == "5")
    return ServiceStats(
        service=service,
        instances=tuple(instances),
        requests=n,
        per_s=n / elapsed_s if elapsed_s > 0 else math.nan,
        success=(n - failed) / n if n else math.nan,
        p99_ms=total.quantile_ms(0.99),
    )


@dataclass(frozen=True, slots=True)
class Split:
    """How many calls each version served, versions in their given order."""

    counts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts)

    def share(self, version: str) -> float:
        """The version's share of all calls, 0..1; NaN when there were none."""
        total = self.total
        return dict(self.counts).get(version, 0) / total if total else math.nan


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


def fmt_pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v * 100:.1f}%"


SERVICE_HEADER = ("SERVICE", "INSTANCES", "REQUESTS", "REQ/S", "SUCCESS", "P99 ms")


def service_table(stats: Sequence[ServiceStats]) -> str:
    cells = [
        (
            s.service,
            ", ".join(s.instances),
            str(s.requests),
            f"{s.per_s:.0f}",
            fmt_pct(s.success),
            fmt_ms(s.p99_ms),
        )
        for s in stats
    ]
    return format_table(SERVICE_HEADER, cells, numeric={2, 3, 4, 5})


def split_text(split: Split) -> str:
    """`v1 903 (90.3%)  v2 97 (9.7%)`: counts and shares, in version order."""
    return "  ".join(f"{v} {n} ({fmt_pct(split.share(v))})" for v, n in split.counts)


def tick_line(t: float, stats: Sequence[ServiceStats], split: Split) -> str:
    """One live line: each service's rate, success and p99 since the last tick, and the split."""
    parts = [
        f"{s.service} {s.per_s:3.0f}/s {fmt_pct(s.success):>6} {fmt_ms(s.p99_ms):>5} ms"
        for s in stats
    ]
    shares = " ".join(f"{v} {fmt_pct(split.share(v)):>6}" for v, _ in split.counts)
    return f"{t:5.1f} s  " + " | ".join([*parts, shares])


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
