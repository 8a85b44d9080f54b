"""Outlier detection, end to end: ejection, return, growing ejection time,
the max ejection percentage and the panic threshold, as the admin `/clusters`
JSON and the metrics show them.

Requests here are not retried (`attempts=1`) so every failure the client
sees is one the detector counted.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from proxy_harness import LOCAL, Address, assert_lepton_error, free_port, outbound, wait_for
from traffic_support import (
    HOLD,
    OK,
    STATUS,
    Backend,
    call,
    clusters,
    destination,
    drive,
    endpoint_view,
    mesh_config,
    metric,
    scrape,
    start_backend,
    start_backends,
)

from lepton_mesh.policy.traffic import CircuitLimits, LoadBalancer, OutlierDetection, RetryPolicy
from lepton_mesh.proxy.errors import Reason

NO_RETRY = RetryPolicy(attempts=1)


async def ejected(sc, backends: list[Backend]) -> list[bool]:
    view = (await clusters(sc))["svc"]
    return [endpoint_view(view, b)["ejected"] for b in backends]


async def drive_until(sc, predicate, *, batch: int = 10, limit: int = 400) -> int:
    """Send requests in small batches until `predicate()` holds; returns how many were sent."""
    sent = 0
    while not predicate():
        assert sent < limit, f"condition not reached after {sent} requests"
        await drive(outbound(sc), batch, concurrency=1)
        sent += batch
    return sent


async def test_ejection_and_return(sidecars, upstreams) -> None:
    base = 0.5
    good = await start_backends(upstreams, "good-1", "good-2")
    bad = await start_backend(upstreams, "bad", STATUS, status=503)
    outlier = OutlierDetection(
        consecutive_5xx=3,
        consecutive_gateway_errors=3,
        base_ejection_time=base,
        max_ejection_time=10 * base,
        max_ejection_percent=50,
    )
    cfg = mesh_config(
        {"svc": [*good, bad]},
        destinations=[destination("svc", retry=NO_RETRY, outlier=outlier)],
    )
    sc = await sidecars(cfg)

    # Three consecutive 503s from `bad` eject it (successes elsewhere do not
    # interrupt its run: counts are per endpoint).
    results = []
    while bad.hits < 3:
        results += await drive(outbound(sc), 1, concurrency=1)
    ejected_at = time.monotonic()
    assert sum(r.status == 503 for r in results) == 3

    view = (await clusters(sc))["svc"]
    entry = endpoint_view(view, bad)
    assert entry["ejected"] is True
    assert entry["outlier"]["times_ejected"] == 1
    assert 0 < entry["outlier"]["ejection_remaining"] <= base
    assert view["ejections_total"] == 1
    assert [endpoint_view(view, g)["ejected"] for g in good] == [False, False]
    samples = await scrape(sc)
    assert metric(samples, "lepton_outlier_ejections_total", destination_service="svc") == 1
    ep_labels = {"destination_service": "svc", "endpoint": str(bad.address)}
    assert metric(samples, "lepton_endpoint_ejected", **ep_labels) == 1

    # While ejected, it gets nothing.
    during = await drive(outbound(sc), 30, concurrency=2)
    assert [r.status for r in during] == [200] * 30
    assert bad.hits == 3
    assert (await ejected(sc, [bad])) == [True], "the 30 requests outlasted the ejection"

    # It comes back by itself after the base ejection time.
    bad.mode = OK
    back: list[bool] = [True]

    async def poll() -> None:
        back[0] = (await ejected(sc, [bad]))[0]

    deadline = time.monotonic() + 5
    while back[0]:
        assert time.monotonic() < deadline, "not returned within 5 s"
        await poll()
    returned_after = time.monotonic() - ejected_at
    assert base * 0.9 <= returned_after < base + 1.0, returned_after
    samples = await scrape(sc)
    assert metric(samples, "lepton_endpoint_ejected", **ep_labels) == 0
    # ... and takes traffic again.
    await drive_until(sc, lambda: bad.hits > 3)

    # A second ejection soon after lasts twice as long (base x times ejected).
    bad.mode = STATUS
    failing_from = bad.hits
    await drive_until(sc, lambda: bad.hits >= failing_from + 3, batch=1)
    entry = endpoint_view((await clusters(sc))["svc"], bad)
    assert entry["ejected"] is True
    assert entry["outlier"]["times_ejected"] == 2
    assert base < entry["outlier"]["ejection_remaining"] <= 2 * base


@pytest.mark.parametrize(("max_percent", "expected_ejected"), [(25, 1), (50, 2), (75, 3)])
async def test_max_ejection_percent(sidecars, upstreams, max_percent, expected_ejected) -> None:
    """Three of four endpoints fail; no more than max_ejection_percent of them are ejected."""
    good = await start_backend(upstreams, "good")
    bad = await start_backends(upstreams, "bad-1", "bad-2", "bad-3", mode=STATUS, status=503)
    outlier = OutlierDetection(
        consecutive_5xx=2, base_ejection_time=30, max_ejection_percent=max_percent
    )
    cfg = mesh_config(
        {"svc": [good, *bad]},
        destinations=[
            destination(
                "svc",
                retry=NO_RETRY,
                outlier=outlier,
                load_balancer=LoadBalancer(panic_threshold=0),  # panic has its own test
            )
        ],
    )
    sc = await sidecars(cfg)
    await drive(outbound(sc), 200, concurrency=2)
    flags = await ejected(sc, bad)
    view = (await clusters(sc))["svc"]
    assert sum(flags) == expected_ejected
    assert view["ejections_total"] == expected_ejected
    assert endpoint_view(view, good)["ejected"] is False
    # The failing endpoints left in rotation still take (and fail) requests.
    before = {b.name: b.hits for b in bad}
    await drive(outbound(sc), 100, concurrency=2)
    for b, out in zip(bad, flags, strict=True):
        assert (b.hits == before[b.name]) == out, (b.name, out, before[b.name], b.hits)


@pytest.mark.parametrize(("panic_threshold", "panic"), [(50.0, True), (30.0, False)])
async def test_panic_threshold(sidecars, upstreams, panic_threshold, panic) -> None:
    """Two of three endpoints ejected leaves 33% available: below a 50% panic
    threshold the balancer uses all three again (no blackout); above 30% it
    keeps to the healthy one."""
    good = await start_backend(upstreams, "good")
    bad = await start_backends(upstreams, "bad-1", "bad-2", mode=STATUS, status=503)
    outlier = OutlierDetection(consecutive_5xx=1, base_ejection_time=30, max_ejection_percent=100)
    cfg = mesh_config(
        {"svc": [good, *bad]},
        destinations=[
            destination(
                "svc",
                retry=NO_RETRY,
                outlier=outlier,
                load_balancer=LoadBalancer(panic_threshold=panic_threshold),
            )
        ],
    )
    sc = await sidecars(cfg)
    flags: list[bool] = []

    async def both_ejected() -> bool:
        flags[:] = await ejected(sc, bad)
        return all(flags)

    sent = 0
    while not await both_ejected():
        assert sent < 200, flags
        await drive(outbound(sc), 5, concurrency=1)
        sent += 5
    view = (await clusters(sc))["svc"]
    assert view["panic"] is panic
    assert view["ejections_total"] == 2

    before = [b.hits for b in bad]
    results = await drive(outbound(sc), 150, concurrency=2)
    served = [r.served_by for r in results]
    if panic:
        # Every endpoint takes a share again, ejected or not.
        for b, was in zip(bad, before, strict=True):
            assert b.hits - was > 15, (b.name, b.hits - was)
        assert 15 < served.count("good") < 90
    else:
        assert [b.hits for b in bad] == before
        assert served == ["good"] * 150
    assert (await ejected(sc, bad)) == [True, True]


async def test_refusing_endpoint_is_ejected_after_consecutive_gateway_errors(
    sidecars, upstreams
) -> None:
    """Refused connections count as gateway errors: after three, the endpoint is
    ejected, so exactly three requests ever needed a second try."""
    good = await start_backends(upstreams, "good-1", "good-2")
    dead = Address(LOCAL, free_port())
    outlier = OutlierDetection(
        consecutive_5xx=0, consecutive_gateway_errors=3, base_ejection_time=30
    )
    cfg = mesh_config(
        {"svc": [*good, dead]},
        destinations=[destination("svc", retry=RetryPolicy(attempts=2), outlier=outlier)],
    )
    sc = await sidecars(cfg)
    # One at a time: a try already on its way to the endpoint when it is
    # ejected would be a fourth (and is not what this test counts).
    results = await drive(outbound(sc), 150, concurrency=1)
    assert [r.status for r in results] == [200] * 150
    assert sum(r.attempts == 2 for r in results) == 3
    view = (await clusters(sc))["svc"]
    (entry,) = [e for e in view["endpoints"] if e["address"] == str(dead)]
    assert entry["ejected"] is True
    assert view["ejections_total"] == 1
    samples = await scrape(sc)
    assert (
        metric(samples, "lepton_retries_total", destination_service="svc", outcome="attempted") == 3
    )


async def test_local_overflow_is_not_an_endpoint_failure(sidecars, upstreams) -> None:
    """A request refused by the sidecar's own limit (max_connections here) never
    reached the endpoint: it must not count towards the endpoint's ejection."""
    held = await start_backend(upstreams, "held", HOLD)
    cfg = mesh_config(
        {"svc": [held]},
        destinations=[
            destination(
                "svc",
                limits=CircuitLimits(max_connections=1),
                retry=RetryPolicy(attempts=1),
                outlier=OutlierDetection(consecutive_5xx=1, consecutive_gateway_errors=1),
            )
        ],
    )
    sc = await sidecars(cfg)
    first = asyncio.ensure_future(call(outbound(sc), target="/first"))
    await wait_for(lambda: held.in_flight == 1)
    for _ in range(3):
        refused = await call(outbound(sc), target="/second")
        assert_lepton_error(refused.response, 503, Reason.OVERFLOW)
    view = (await clusters(sc))["svc"]
    entry = endpoint_view(view, held)
    assert entry["ejected"] is False
    assert (view["ejections_total"], view["circuit"]["connections"]["overflows"]) == (0, 3)
    held.release()
    assert (await first).status == 200
