"""Local rate limits end to end: 429 with Retry-After and reason `rate_limited`, buckets
per key with overrides, selected routes only, buckets kept across config swaps, and the
rate itself within 10%: exactly over a controlled clock, and in a short real run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from security_support import Client, EchoApp

from lepton_mesh.policy.security import (
    RateKey,
    RateLimit,
    RateLimitRule,
    RateOverride,
    RequestSelector,
    SecurityPolicies,
)
from lepton_mesh.proxy.security.inbound_policy import InboundState
from lepton_mesh.proxy.snapshot import Snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def limits(*rules: RateLimitRule) -> SecurityPolicies:
    return SecurityPolicies(rate_limit=RateLimit("limits", "default", "intent", rules))


async def with_clock(sc: Any) -> Clock:
    """Run the sidecar's inbound policy on a clock the test moves."""
    clock = Clock()
    sc.snapshot = Snapshot(sc.snapshot.cfg, sc.states, InboundState(mono=clock))
    return clock


def limited_total(sc: Any, limit: str) -> float:
    text = sc.metrics.render()[0].decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lepton_rate_limited_total" and s.labels == {"limit": limit}:
                return s.value
    return 0.0


async def test_429_with_retry_after_per_key_with_overrides(secured, app: EchoApp):
    rule = RateLimitRule(
        "per-key",
        requests_per_second=10,
        burst=5,
        key=RateKey("header", "x-api-key"),
        overrides=(RateOverride("vip", 100, 50),),
    )
    sc = await secured(limits(rule))
    clock = await with_clock(sc)
    sc.metrics.set_security_source(sc.snapshot.inbound_state)
    c = await Client.connect(sc.addresses["inbound"])
    a = [("x-api-key", "a")]
    for _ in range(5):
        assert (await c.request(headers=a)).status == 200
    r = await c.request(headers=a)
    assert r.status == 429 and r.get("x-lepton-reason") == "rate_limited"
    assert r.get("retry-after") == "1" and r.get("connection") == "keep-alive"
    rec = sc.log.of(r)
    assert rec["rate_limit"] == "per-key" and rec["reason"] == "rate_limited"
    assert limited_total(sc, "per-key") == 1
    # Another key has its own bucket; the vip override a bigger one.
    assert (await c.request(headers=[("x-api-key", "b")])).status == 200
    for _ in range(50):
        assert (await c.request(headers=[("x-api-key", "vip")])).status == 200
    assert (await c.request(headers=[("x-api-key", "vip")])).status == 429
    # Requests without the header share one bucket.
    statuses = [(await c.request()).status for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    # A tenth of a second (and a hair, for float arithmetic) refills one token for `a`.
    clock.now += 0.1001
    assert (await c.request(headers=a)).status == 200
    assert (await c.request(headers=a)).status == 429
    await c.close()


async def test_the_configured_rate_within_ten_percent_on_a_controlled_clock(secured, app: EchoApp):
    """Offered 200 rps for a fixed 5 s window against 50 rps with burst 10: exactly
    10 + 50 * 5 get through (the clock moves 5 ms per request)."""
    sc = await secured(limits(RateLimitRule("service", requests_per_second=50, burst=10)))
    clock = await with_clock(sc)
    c = await Client.connect(sc.addresses["inbound"])
    ok = 0
    for _ in range(1000):
        r = await c.request()
        ok += r.status == 200
        clock.now += 0.005
    assert abs(ok - 260) <= 1, ok
    await c.close()


async def test_the_configured_rate_within_ten_percent_in_a_real_short_run(secured, app: EchoApp):
    rate, burst = 200.0, 10
    sc = await secured(limits(RateLimitRule("service", requests_per_second=rate, burst=burst)))
    clients = [await Client.connect(sc.addresses["inbound"]) for _ in range(4)]
    ok = 0
    stop = time.monotonic() + 1.0

    async def hammer(c: Client) -> None:
        nonlocal ok
        while time.monotonic() < stop:
            r = await c.request()
            ok += r.status == 200
            assert r.status in (200, 429)

    start = time.monotonic()
    await asyncio.gather(*(hammer(c) for c in clients))
    elapsed = time.monotonic() - start
    expected = burst + rate * elapsed
    print(
        f"\nrate limit {rate:g}/s burst {burst}: {ok} allowed in {elapsed:.3f}s, expected {expected:.0f}"
    )
    assert abs(ok - expected) <= 0.1 * expected
    for c in clients:
        await c.close()


async def test_only_selected_routes_count(secured, app: EchoApp):
    rule = RateLimitRule(
        "posts",
        requests_per_second=1,
        burst=1,
        route=RequestSelector(methods=frozenset({"POST"}), paths=("/v1/*",)),
    )
    sc = await secured(limits(rule))
    await with_clock(sc)
    c = await Client.connect(sc.addresses["inbound"])
    assert (await c.request("POST", "/v1/x")).status == 200
    assert (await c.request("POST", "/v1/x")).status == 429
    assert (await c.request("GET", "/v1/x")).status == 200
    assert (await c.request("POST", "/v2/x")).status == 200
    await c.close()


async def test_buckets_survive_a_config_swap(secured, app: EchoApp):
    rule = RateLimitRule("service", requests_per_second=1, burst=2)
    sc = await secured(limits(rule))
    clock = Clock()
    state = InboundState(mono=clock)
    sc.snapshot = Snapshot(sc.snapshot.cfg, sc.states, state)
    c = await Client.connect(sc.addresses["inbound"])
    assert [(await c.request()).status for _ in range(3)] == [200, 200, 429]
    sc.snapshot = Snapshot(sc.snapshot.cfg, sc.states, state)  # a config push, same limit
    assert (await c.request()).status == 429
    # A changed limit starts over.
    changed = limits(RateLimitRule("service", requests_per_second=1, burst=3))
    from dataclasses import replace

    sc.snapshot = Snapshot(replace(sc.snapshot.cfg, security=changed), sc.states, state)
    assert [(await c.request()).status for _ in range(4)] == [200, 200, 200, 429]
    assert state.describe()["rate_limit"]["limits"][0]["limited_total"] == 3
    await c.close()
