"""Micro-benchmark of the sidecar's per-request observability costs.

Run by hand (not by pytest):  python bench/micro_observability.py [--quick]

Prints microseconds per call, best of a few repeats, for:
- prometheus-client used directly: `labels(...).inc()`, a cached child's
  `inc()`, histogram `observe()` cached and uncached, and all four request
  metrics per request both ways;
- our ProxyMetrics hot path (`observe_request`, `tcp_closed`);
- one access-log line: `json.dumps` vs `orjson.dumps`, and `AccessLog.log`
  enabled and disabled;
- a scrape at 100, 1,000 and 10,000 label tuples, in ms: our text writer
  (`ProxyMetrics.render`) and prometheus-client's `generate_latest` over the
  same data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import timeit
from collections.abc import Callable

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from lepton_mesh.proxy.observe.access_log import AccessLog
from lepton_mesh.proxy.observe.metrics import BYTES_BUCKETS, DURATION_BUCKETS_MS, ProxyMetrics

LABELS = ("reporter", "source_workload", "destination_service", "response_code", "response_flags")
VALUES = ("destination", "frontend", "ratings.default", "200", "-")

RECORD = {
    "time": "2024-05-01T12:34:56.789012Z",
    "reporter": "destination",
    "method": "GET",
    "authority": "ratings.default:8080",
    "path": "/api/v1/ratings/42?lang=en",
    "protocol": "HTTP/1.1",
    "status": 200,
    "reason": "-",
    "duration_ms": 3.412,
    "upstream_ms": 2.981,
    "request_bytes": 0,
    "response_bytes": 1834,
    "upstream": "10.0.3.17:8080",
    "request_id": "6f1c2a0e-8d7b-4c35-9a51-2f0d3b9e7c44",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "attempts": 1,
    "downstream": "10.0.1.5:51234",
}


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def prometheus_variants() -> dict[str, Callable[[], object]]:
    reg = CollectorRegistry()
    total = Counter("b_requests", "x", LABELS, registry=reg)
    dur = Histogram("b_dur", "x", LABELS, buckets=DURATION_BUCKETS_MS, registry=reg)
    req = Histogram("b_req", "x", LABELS, buckets=BYTES_BUCKETS, registry=reg)
    resp = Histogram("b_resp", "x", LABELS, buckets=BYTES_BUCKETS, registry=reg)
    c_total, c_dur, c_req, c_resp = (m.labels(*VALUES) for m in (total, dur, req, resp))
    children = {VALUES: (c_total, c_dur, c_req, c_resp)}

    def all_four_labels() -> None:
        total.labels(*VALUES).inc()
        dur.labels(*VALUES).observe(3.4)
        req.labels(*VALUES).observe(0)
        resp.labels(*VALUES).observe(1834)

    def all_four_cached() -> None:
        t, d, q, r = children[VALUES]
        t.inc()
        d.observe(3.4)
        q.observe(0)
        r.observe(1834)

    return {
        "prometheus-client counter labels(...).inc()": lambda: total.labels(*VALUES).inc(),
        "prometheus-client cached child inc()": c_total.inc,
        "prometheus-client histogram labels(...).observe()": lambda: dur.labels(*VALUES).observe(
            3.4
        ),
        "prometheus-client cached child observe()": lambda: c_dur.observe(3.4),
        "prometheus-client all 4 request metrics, labels()": all_four_labels,
        "prometheus-client all 4 request metrics, cached children": all_four_cached,
    }


def ours() -> dict[str, Callable[[], object]]:
    m = ProxyMetrics()
    return {
        "ProxyMetrics.observe_request (all 4 metrics)": lambda: m.observe_request(
            "destination", "frontend", "ratings.default", 200, "-", 0.0034, 0, 1834
        ),
        "ProxyMetrics.tcp_opened": lambda: m.tcp_opened("source", "frontend", "db.default"),
        "ProxyMetrics.tcp_closed": lambda: m.tcp_closed(
            "source", "frontend", "db.default", 100, 2000
        ),
    }


def access_log(off: AccessLog) -> dict[str, Callable[[], object]]:
    return {
        "json.dumps(access-log record)": lambda: json.dumps(RECORD),
        "orjson.dumps(access-log record)": lambda: orjson.dumps(RECORD),
        "AccessLog.log disabled": lambda: off.log(RECORD),
    }


def access_log_enabled_us(on: AccessLog, number: int) -> float:
    """`log()` with default batching, in blocks of 100 lines (~60 KB) + flush().

    A tight loop never lets the writer thread take the GIL (the event loop
    does, each time it polls), so we wait for the writer between blocks,
    outside the timed part; the join and hand-over stay inside it.
    """
    best = math.inf
    for _ in range(max(1, number // 100)):
        t0 = time.perf_counter()
        for _ in range(100):
            on.log(RECORD)
        on.flush()
        best = min(best, time.perf_counter() - t0)
        on.wait_written(5.0)
    return best / 100 * 1e6


def filled(series: int) -> ProxyMetrics:
    m = ProxyMetrics(max_series=series)
    for i in range(series):
        m.observe_request("destination", "frontend", f"svc-{i}", 200, "-", 0.003, 10, 1000)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    number, repeat = (20_000, 3) if args.quick else (200_000, 5)
    with open(os.devnull, "wb") as devnull:
        for group in (prometheus_variants(), ours(), access_log(AccessLog(False, devnull))):
            for name, fn in group.items():
                print(f"{per_call_us(fn, number, repeat):8.2f} us  {name}")
        on = AccessLog(True, devnull)
        us = access_log_enabled_us(on, number)
        on.close()
        print(f"{us:8.2f} us  AccessLog.log enabled (dumps + append + batch hand-over)")
        assert on.dropped == 0, on.dropped
    for series in (100, 1_000, 10_000):
        m = filled(series)
        ms = per_call_us(m.render, number=1, repeat=3) / 1000
        print(f"{ms:8.1f} ms  ProxyMetrics.render() with {series} request label tuples")
        if series <= 1_000:  # generate_latest takes seconds beyond
            ms = per_call_us(lambda m=m: generate_latest(m.registry), number=1, repeat=3) / 1000
            print(f"{ms:8.1f} ms  generate_latest(registry) with {series} request label tuples")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
