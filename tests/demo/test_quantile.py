"""histogram_quantile over (upper bound, cumulative count) pairs, as Prometheus computes it."""

import math

import pytest

from lepton_mesh.demo.summary import histogram_quantile

INF = math.inf
UNIFORM = [(1.0, 10), (2.0, 20), (4.0, 40), (INF, 40)]
# The sidecar's lowest duration buckets (ms), 1000 observations.
SIDECAR = [(0.5, 0), (1.0, 100), (5.0, 900), (10.0, 990), (25.0, 1000), (50.0, 1000), (INF, 1000)]

CASES = [
    # (name, q, buckets, expected)
    ("lowest bucket interpolates from 0", 0.25, UNIFORM, 1.0),
    ("rank on a bucket bound", 0.5, UNIFORM, 2.0),
    ("inside a wider bucket", 0.75, UNIFORM, 3.0),
    ("seven eighths", 0.875, UNIFORM, 3.5),
    ("q=1 is the top of the last filled bucket", 1.0, [(1.0, 10), (2.0, 20), (INF, 20)], 2.0),
    ("rank in +Inf answers the highest finite bound", 0.5, [(1.0, 1), (2.0, 2), (INF, 10)], 2.0),
    ("non-positive lowest bound is returned as is", 0.2, [(-1.0, 5), (0.0, 10), (INF, 10)], -1.0),
    ("input order does not matter", 0.75, [(INF, 40), (2.0, 20), (4.0, 40), (1.0, 10)], 3.0),
    ("equal bounds are merged", 0.5, [(1.0, 5), (1.0, 5), (2.0, 20), (INF, 20)], 1.0),
    ("counts forced monotonic", 0.75, [(1.0, 10), (2.0, 8), (4.0, 20), (INF, 20)], 3.0),
    ("sidecar buckets p50", 0.5, SIDECAR, 3.0),
    ("sidecar buckets p99", 0.99, SIDECAR, 10.0),
    ("q below 0", -0.1, UNIFORM, -INF),
    ("q above 1", 1.1, UNIFORM, INF),
]

NAN_CASES = [
    ("no observations", 0.5, [(1.0, 0), (INF, 0)]),
    ("no +Inf bucket", 0.5, [(1.0, 5), (2.0, 10)]),
    ("only the +Inf bucket", 0.5, [(INF, 5)]),
    ("no buckets", 0.5, []),
    ("q is NaN", math.nan, UNIFORM),
    ("q=0 over an empty lowest bucket is 0/0", 0.0, [(1.0, 0), (2.0, 10), (INF, 10)]),
]


@pytest.mark.parametrize(("name", "q", "buckets", "expected"), CASES, ids=[c[0] for c in CASES])
def test_quantile(name: str, q: float, buckets: list, expected: float) -> None:
    assert histogram_quantile(q, buckets) == expected


@pytest.mark.parametrize(("name", "q", "buckets"), NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_quantile_nan(name: str, q: float, buckets: list) -> None:
    assert math.isnan(histogram_quantile(q, buckets))
