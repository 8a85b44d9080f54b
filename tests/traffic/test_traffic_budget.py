"""The retry budget, end to end: a 100%-failing upstream cannot be amplified.

How the allowance is computed. The budget (Finagle's, as Linkerd's) gives
each original request `percent`/100 of a retry and keeps a constant reserve
of `min_per_second * window` retries; both kinds of token expire after the
window. So within one window, retries <= percent% of requests +
min_per_second * window: the "floor of 10 retries/s" is 100 retries per 10 s
window, usable at once (a burst), not 10 per elapsed second. Over a run of
T seconds the reserve can be spent once per window the run touches; its
buckets expire between 0.9 and 1.0 window after use, so at most
ceil(T / (0.9 * window)) times. That is the floor's allowance asserted below.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from proxy_harness import assert_lepton_error, outbound
from traffic_support import (
    RESET,
    STATUS,
    call,
    clusters,
    destination,
    drive,
    mesh_config,
    metric,
    scrape,
    start_backend,
)

from lepton_mesh.policy.sidecar_config import AccessLogConfig
from lepton_mesh.policy.traffic import Backoff, RetryBudget, RetryPolicy
from lepton_mesh.proxy.errors import Reason

FAST = Backoff(base=0.001, max=0.004)


def floor_allowance(budget: RetryBudget, seconds: float) -> float:
    """Retries the budget's reserve may add over a run of `seconds` (module docstring)."""
    return budget.min_per_second * budget.window * math.ceil(seconds / (0.9 * budget.window))


async def test_budget_caps_amplification_of_a_failing_upstream(sidecars, upstreams) -> None:
    """2,000 requests, up to 5 tries each on 5xx, every try fails: the default
    budget (20%, 10/s, 10 s) holds upstream tries to <= 1.2 x requests + floor."""
    bad = await start_backend(upstreams, "bad", STATUS, status=503)
    budget = RetryBudget()  # the default: on without being asked for
    policy = RetryPolicy(attempts=5, retry_on=frozenset({"5xx"}), backoff=FAST)
    cfg = mesh_config({"svc": [bad]}, destinations=[destination("svc", retry=policy, outlier=None)])
    sc = await sidecars(replace(cfg, access_log=AccessLogConfig(False)))

    n = 2000
    started = time.perf_counter()
    results = await drive(outbound(sc), n, concurrency=16)
    elapsed = time.perf_counter() - started

    ratio = bad.hits / n
    floor = floor_allowance(budget, elapsed)
    limit = 1 + budget.percent / 100 + floor / n
    print(
        f"\nretry budget: {n} requests, {bad.hits} upstream tries in {elapsed:.2f}s: "
        f"ratio {ratio:.4f} (limit {limit:.4f}; without a budget it would be 5.0)"
    )
    assert ratio <= limit
    # And the budget is what stopped it, not luck: nearly all of it was spent.
    assert ratio >= limit - 0.01

    assert [r.status for r in results] == [503] * n
    assert sum(r.attempts for r in results) == bad.hits
    exhausted = [r for r in results if r.reason == Reason.RETRY_BUDGET_EXHAUSTED]
    # A request ends either on its fifth try (the attempts ran out) or when
    # the budget refuses its next retry (said in x-lepton-reason).
    for r in results:
        assert (r.attempts == 5) != (r.reason == Reason.RETRY_BUDGET_EXHAUSTED), (
            r.attempts,
            r.reason,
        )
    assert len(exhausted) > n * 0.8
    # Once spent, the budget stays nearly spent: in the second half a retry is
    # granted only as deposits (one per five requests) come in, and almost
    # every request is refused its first or second retry.
    late = results[n // 2 :]
    late_exhausted = sum(r.reason == Reason.RETRY_BUDGET_EXHAUSTED for r in late)
    assert late_exhausted >= 0.95 * len(late), late_exhausted

    view = (await clusters(sc))["svc"]["retry_budget"]
    assert view["requests_total"] == n
    assert view["retries_total"] == bad.hits - n
    assert view["exhausted_total"] == len(exhausted)
    assert view["available"] == 0
    samples = await scrape(sc)
    labels = {"destination_service": "svc"}
    assert metric(samples, "lepton_retries_total", **labels, outcome="attempted") == bad.hits - n
    assert metric(samples, "lepton_retries_total", **labels, outcome="budget_exhausted") == len(
        exhausted
    )
    assert metric(samples, "lepton_retry_budget_available", **labels) == 0


async def test_exhausted_budget_is_named_in_a_sidecar_error(sidecars, upstreams) -> None:
    """A reserve of exactly one retry: the first request retries, the second is
    refused and its error says the budget, not just the reset."""
    bad = await start_backend(upstreams, "bad", RESET)
    budget = RetryBudget(percent=0.0, min_per_second=0.1, window=10.0)
    policy = RetryPolicy(attempts=3, backoff=FAST)
    cfg = mesh_config(
        {"svc": [bad]},
        destinations=[destination("svc", retry=policy, retry_budget=budget, outlier=None)],
    )
    sc = await sidecars(cfg)

    first = await call(outbound(sc))
    assert_lepton_error(
        first.response, 502, Reason.RETRY_BUDGET_EXHAUSTED
    )  # 2 tries, then no token
    assert bad.hits == 2
    second = await call(outbound(sc))
    body = assert_lepton_error(second.response, 502, Reason.RETRY_BUDGET_EXHAUSTED)
    assert "reset" in body["error"] or "closed" in body["error"]
    assert bad.hits == 3
    view = (await clusters(sc))["svc"]["retry_budget"]
    assert (view["retries_total"], view["exhausted_total"]) == (1, 2)
